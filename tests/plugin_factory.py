"""Build throw-away plugin distributions on sys.path (dist-info + module) for discovery tests."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """Create ``dist`` with ``[megatron_ep_plugins]`` entry points and modules under ``root``.

    The caller puts ``root`` on sys.path (``monkeypatch.syspath_prepend``) so it is removed again.
    """
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[megatron_ep_plugins]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


SPEC_TEMPLATE = """
from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.spec import Availability, BackendSpec
from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

@hookimpl{marker}
def ep_register_backends():
    return [BackendSpec(name={name!r}, aliases={aliases!r}, priority={priority}, factory=TorchA2ABackend,
                        probe=lambda: Availability({available!r}, {reason!r}))]
"""


def spec_module(name: str, priority: int = 0, aliases: tuple = (), available: bool = True,
                reason: str = "ok", marker: str = "") -> str:
    return SPEC_TEMPLATE.format(name=name, priority=priority, aliases=aliases, available=available,
                                reason=reason, marker=marker)
