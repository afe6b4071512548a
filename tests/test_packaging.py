"""Packaging, as CI checks it: sdist and wheel build, the .pth ships in both, a fresh venv activates.

Issue 8.8: the sdist had no ``megatron_ep_plugins.pth`` (``python -m build`` and ``pip wheel <sdist>``
failed), and ``scripts/setup.sh`` trusted its stamp after ``pip uninstall``. The build runs on a copy
of the packaging inputs (so this checkout's ``build/`` and ``*.egg-info`` are left alone while other
tests read them), offline: ``--no-isolation`` with the setuptools of this venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import megatron_ep_plugins

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "megatron_ep_plugins.pth"]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build", reason="`build` is in requirements-dev.txt (scripts/setup.sh installs it)")
    src = tmp_path_factory.mktemp("src")
    for name in INPUTS:
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "megatron_ep_plugins", src / "megatron_ep_plugins", ignore=ignore)
    if (ROOT / "docs").is_dir():
        shutil.copytree(ROOT / "docs", src / "docs", ignore=ignore)
    out = src / "dist"
    # no flags: build the sdist, then the wheel *from the sdist* (what `pip wheel <sdist>` does)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return sdist, wheel


def test_sdist_and_wheel_carry_the_pth_and_one_version(dists):
    sdist, wheel = dists
    version = megatron_ep_plugins.__version__
    assert sdist.name == f"megatron_ep_plugins-{version}.tar.gz" and f"-{version}-" in wheel.name
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"megatron_ep_plugins.pth", "setup.py", "pyproject.toml", "docs/backend-contract.md"} <= names
    with zipfile.ZipFile(wheel) as whl:
        assert whl.read("megatron_ep_plugins.pth").decode() == (ROOT / "megatron_ep_plugins.pth").read_text()
        meta = whl.read(f"megatron_ep_plugins-{version}.dist-info/METADATA").decode()
        eps = whl.read(f"megatron_ep_plugins-{version}.dist-info/entry_points.txt").decode()
    assert re.search(rf"^Version: {re.escape(version)}$", meta, re.M)
    assert "Provides-Extra: test" in meta and "Requires-Dist: pluggy" in meta
    for name in ("torch", "legacy", "elastic", "hybridep", "ncclep"):
        assert re.search(rf"^{name} = megatron_ep_plugins\.backends\.", eps, re.M), name
    assert "megatron-ep = megatron_ep_plugins.cli:main" in eps


def test_version_has_one_home():
    assert not (ROOT / "setup.cfg").exists() or "version" not in (ROOT / "setup.cfg").read_text()
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "megatron_ep_plugins.__version__"' in text
    assert not re.search(r"^version\s*=\s*\"", text, re.M)  # no literal version anywhere


def test_wheel_in_a_fresh_venv_lands_the_pth_and_arms_the_hook(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
          "--disable-pip-version-check", str(wheel)])
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    assert (Path(purelib) / "megatron_ep_plugins.pth").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCORE_EP_", "PYTHON"))}
    # the .pth alone (no import in the command) must import the package from this venv and arm the hook
    code = ("import sys; m = sys.modules.get('megatron_ep_plugins.autoload'); "
            "pkg = sys.modules.get('megatron_ep_plugins'); "
            "print(m is not None and m.is_active(), pkg.__file__.startswith(sys.prefix) if pkg else None)")
    armed = _run([str(py), "-c", code], env=env | {"MCORE_EP_BACKEND": "torch"}, cwd=tmp_path)
    assert armed.stdout.split() == ["True", "True"], armed.stdout + armed.stderr
    idle = _run([str(py), "-c", code], env=env, cwd=tmp_path)
    assert idle.stdout.split() == ["False", "None"], idle.stdout + idle.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../calls.log"
if [ "$1 $2" = "-m pip" ]; then exit 0; fi
[ "${FAKE_INSTALLED:-0}" = 1 ]
"""


def test_setup_script_reinstalls_when_the_venv_lost_the_package(tmp_path):
    """A matching stamp is not enough: after `pip uninstall megatron-ep-plugins` setup.sh installs again."""
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup.sh", tree / "scripts" / "setup.sh")
    for name in ("requirements-dev.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "megatron_ep_plugins.pth"):
        shutil.copy2(ROOT / name, tree / name)
    bin_dir = tree / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}

    _run(["bash", str(tree / "scripts" / "setup.sh")], env=env)  # first run: installs, writes the stamp
    log = tree / "calls.log"
    assert "-m pip install" in log.read_text()
    log.unlink()
    _run(["bash", str(tree / "scripts" / "setup.sh")], env=env | {"FAKE_INSTALLED": "1"})  # stamp + installed
    assert "-m pip install" not in log.read_text()
    log.unlink()
    _run(["bash", str(tree / "scripts" / "setup.sh")], env=env)  # stamp matches, package gone
    assert "-m pip install -q --disable-pip-version-check -e ." in log.read_text()
