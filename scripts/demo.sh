#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the demo family (first run only), start the
# local stack (Redis, Ray, Serve), stream held-out answers side by side over gRPC, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/eft demo "$@"
