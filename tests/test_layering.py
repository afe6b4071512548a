"""The layering holds by construction: the contract layer imports nothing above it; importing is cheap.

Bottom to top: records (``errors``, ``spec``) -> settings (``config``) -> contract (``hookspecs``) ->
discovery (``manager``) -> policy (``selection``) -> ... A module may import only modules of its own
layer or below, including imports made only for type checking.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "megatron_ep_plugins"

#: module -> the package modules it may import
ALLOWED = {
    "errors": set(),
    "spec": {"errors"},
    "config": {"errors", "spec"},
    "hookspecs": {"errors", "spec", "config"},
    "manager": {"errors", "spec", "config", "hookspecs"},
    "selection": {"errors", "spec", "config", "hookspecs", "manager"},
}


def _package_imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_ep_plugins."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("megatron_ep_plugins."))
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_nothing_above_its_layer(module):
    upward = _package_imports(module) - ALLOWED[module]
    assert not upward, f"{module}.py imports {sorted(upward)} (above its layer)"


def test_records_live_with_the_records():
    from megatron_ep_plugins import selection, spec

    assert selection.Choice is spec.Choice and selection.Verdict is spec.Verdict


def test_import_is_cheap_and_side_effect_free():
    code = ("import sys; before = list(sys.meta_path); import megatron_ep_plugins as m; "
            "heavy = sorted(x for x in sys.modules if x.split('.')[0] in ('torch', 'pluggy', 'megatron', 'deep_ep')); "
            "print(heavy, sys.meta_path == before, m.__version__)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    heavy, same_path, version = out.stdout.rsplit(" ", 2)
    assert heavy == "[]" and same_path == "True" and version.strip()
