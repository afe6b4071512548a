"""The DeepEP emulator keeps DeepEP's layout: one module per buffer class over a shared collective layer, each
rule citing the DeepEP source it mirrors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent / "emulators" / "deep_ep"
MODULES = {  # module -> the buffer classes it defines (nothing else defines one)
    "buffers/legacy.py": {"Buffer", "Config"},
    "buffers/elastic.py": {"_ElasticBuffer", "EPHandle"},
    "buffers/ep.py": {"EPBuffer", "EPHandle"},
    "hybrid_ep_buffer.py": {"HybridEPBuffer"},
}


def _classes(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_one_module_per_buffer_class_with_citations(module):
    path = PKG / module
    assert MODULES[module] <= _classes(path), (module, _classes(path))
    text = path.read_text()
    assert text.count("# mirrors DeepEP") >= 10, f"{module}: its rules must cite the DeepEP sources they mirror"
    assert "from .._collective import" in text or "from ._collective import" in text


def test_shared_layer_defines_no_buffer_and_buffers_do_not_import_each_other():
    assert not {"Buffer", "ElasticBuffer", "_ElasticBuffer", "EPBuffer", "HybridEPBuffer"} & _classes(PKG / "_collective.py")
    for module in MODULES:
        text = (PKG / module).read_text()
        others = [m for m in MODULES if m != module and Path(m).stem in text.split('"""', 2)[-1]
                  and f"import {Path(m).stem}" in text]
        assert not others, f"{module} imports {others}: buffer modules share only _collective and utils"
    assert not (PKG / "_emulator.py").exists() and not (PKG / "_ep_v25.py").exists()
