#!/usr/bin/env bash
# The test command: set up, lint (ruff, ruff format, mypy, import contracts), then run every test
# (unit, integration, cluster). Starts its own
# Redis and Ray cluster and stops them; builds the demo model family on first use (cached).
#
#   ./scripts/test.sh                    everything (what .ci/run runs)
#   ./scripts/test.sh lint               the static checks only
#   ./scripts/test.sh unit|integration|cluster [PYTEST ARGS]   one test directory, e.g. unit -k merge
#   ./scripts/test.sh [PYTEST ARGS]      everything, with extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
part=all
case "${1:-}" in
lint | unit | integration | cluster | all)
    part=$1
    shift
    ;;
esac
if [[ $part == lint && $# -gt 0 ]]; then
    echo "usage: $0 lint (takes no further arguments)" >&2
    exit 2
fi
./scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
if [[ $part == all || $part == lint ]]; then
    # Static checks first: cheap, and a failure here fails CI like a failing test.
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    .venv/bin/lint-imports
fi
case $part in
lint) exit 0 ;;
all) exec .venv/bin/python -m pytest -q -rs "$@" ;;
# Unit tests are independent of each other: one worker per core (pytest-xdist) keeps them under a
# minute (the figure: docs/contributing.md). Integration and cluster tests share session servers and run in one process.
unit) exec .venv/bin/python -m pytest -q -rs -n "$(nproc)" tests/unit "$@" ;;
*) exec .venv/bin/python -m pytest -q -rs "tests/$part" "$@" ;;
esac
