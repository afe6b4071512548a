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

example=examples/plugins/ep_allgather  # the example third-party plugin the tests install (older layout below)
[ -f "$example/pyproject.toml" ] || example=examples/ep_allgather_plugin
inputs="requirements-dev.txt setup.py pyproject.toml MANIFEST.in megatron_ep_plugins.pth $example/pyproject.toml"
stamp=.venv/.megatron_ep_plugins.stamp
want=$(for f in $inputs; do if [ -f "$f" ]; then cat "$f"; fi; done | sha256sum | cut -c1-16)

# The stamp alone is not trusted: the venv must still hold what this script installs (a `pip uninstall`,
# a moved checkout or a version bump since the last run all mean: install again). About 0.1 s.
installed() {
  .venv/bin/python - "$PWD" "$example" <<'PY'
import importlib.metadata as md, importlib.util, os, sys, sysconfig
root, example = sys.argv[1], sys.argv[2]
need = ["torch", "megatron-core", "pluggy", "pytest", "build", "megatron-ep-plugins"]
if os.path.isfile(os.path.join(root, example, "pyproject.toml")):
    need.append("ep-allgather-plugin")
for dist in need:
    md.distribution(dist)  # PackageNotFoundError: not installed
spec = importlib.util.find_spec("megatron_ep_plugins")
assert spec is not None and os.path.realpath(spec.origin).startswith(os.path.realpath(root) + os.sep), "not this checkout"
assert os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"], "megatron_ep_plugins.pth")), "no .pth"
sys.path.insert(0, root)
import megatron_ep_plugins
assert md.version("megatron-ep-plugins") == megatron_ep_plugins.__version__, "installed metadata of another version"
PY
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed >/dev/null 2>&1; then
  exit 0
fi
echo "[setup] installing requirements (first time: about a minute)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ -f "$example/pyproject.toml" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e . -e "$example"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
echo "$want" > "$stamp"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, megatron.core.package_info as m, megatron_ep_plugins as p; print(f"torch {torch.__version__}, megatron-core {m.__version__}, megatron_ep_plugins {p.__version__}")' 2>/dev/null)"
