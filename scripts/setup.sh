#!/usr/bin/env bash
# Create (or update) .venv at the repository root with Python 3.12, the tested stack,
# megatron_ep_plugins (editable, with its .pth) and the example third-party plugin.
# Idempotent: a second run with unchanged inputs takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for cand in python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ]; then echo "env PYENV_VERSION=$v python3"; return; fi
  fi
  echo "error: megatron-core >= 0.17 needs Python 3.12; install it or set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "[setup] creating .venv with: $py"
  $py -m venv .venv
fi

stamp=.venv/.megatron_ep_plugins.stamp
want=$(cat requirements-dev.txt setup.cfg setup.py pyproject.toml megatron_ep_plugins.pth examples/ep_allgather_plugin/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing requirements (first time: about a minute)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -e . -e examples/ep_allgather_plugin
echo "$want" > "$stamp"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, megatron.core.package_info as m, megatron_ep_plugins as p; print(f"torch {torch.__version__}, megatron-core {m.__version__}, megatron_ep_plugins {p.__version__}")' 2>/dev/null)"
