"""examples/: scripts run from there see the installed plugins, and the template plugin passes the kit.

A script's folder is ``sys.path[0]``. A plugin kept as ``examples/<name>/<package>/`` was imported from there as
an empty namespace package instead of the installed plugin, so ``MCORE_EP_BACKEND=allgather python
examples/train_moe.py`` found no ``allgather`` backend. Plugins now live under ``examples/plugins/<name>/src/``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEMPLATE = EXAMPLES / "plugins" / "ep_allgather"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_nothing_in_examples_shadows_an_installed_module():
    installed = set(importlib.metadata.packages_distributions())
    names = {p.stem if p.suffix == ".py" else p.name for p in EXAMPLES.iterdir() if not p.name.startswith((".", "_"))}
    assert not names & installed, f"examples/ entries shadow installed modules for scripts run there: {names & installed}"


def test_plugin_is_selectable_from_a_script_in_examples():
    code = ("import sys; assert sys.path[0] in ('', {!r}); from megatron_ep_plugins.api import explain; "
            "import ep_allgather_plugin as p; print(explain('allgather').spec.name, p.__file__)").format(str(EXAMPLES))
    proc = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name, origin = proc.stdout.split()
    assert name == "allgather" and origin != "None" and Path(origin).is_relative_to(TEMPLATE / "src")


def test_train_moe_with_the_third_party_backend(tmp_path):
    """The command from issue 8 item 9, shortened to 3 steps."""
    proc = subprocess.run([sys.executable, "examples/train_moe.py", "--steps", "3"], cwd=ROOT,
                          env=_env(MCORE_EP_BACKEND="allgather"), capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: loss did not fall in 3 steps
    assert "selected backend: allgather" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(re.findall(r"^step\s+\d+\s+loss", proc.stdout, re.M)) == 3


def test_template_has_what_an_author_starts_with():
    pyproject = (TEMPLATE / "pyproject.toml").read_text()
    assert '[project.entry-points.megatron_ep_plugins]\nallgather = "ep_allgather_plugin"' in pyproject
    assert 'where = ["src"]' in pyproject
    assert (TEMPLATE / "src" / "ep_allgather_plugin" / "backend.py").is_file()
    readme = (TEMPLATE / "README.md").read_text()
    assert "pytest --pyargs megatron_ep_plugins.testing --ep-backend allgather\n" in readme
    # the plugin module stays cheap to import: the backend module (and torch) only when the factory runs
    code = ("import sys, ep_allgather_plugin; assert 'ep_allgather_plugin.backend' not in sys.modules; "
            "assert 'torch' not in sys.modules, 'importing the plugin imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_template_tests_run_the_kit():
    """What CI runs for the template: its own test file, i.e. the conformance kit on 2 and 4 ranks."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=TEMPLATE,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
