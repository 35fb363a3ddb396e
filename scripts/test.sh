#!/usr/bin/env bash
# The test command: set up, lint (ruff, ruff format, mypy, import contracts), then run every test
# (unit, integration, cluster). Starts its own
# Redis and Ray cluster and stops them; builds the demo model family on first use (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Static checks first: cheap, and a failure here fails CI like a failing test.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q -rs "$@"
