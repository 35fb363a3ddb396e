#!/usr/bin/env bash
# The test command: set up, then run every test (unit, integration, cluster). Starts its own
# Redis and Ray cluster and stops them; builds the demo model family on first use (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -rs "$@"
