"""Zero-code activation: install the selected backend when Megatron's token dispatcher is imported.

``megatron_ep_plugins.pth`` (installed into site-packages with the package) runs at every
interpreter start. With ``MCORE_EP_BACKEND`` unset or ``off`` it only reads that variable. Otherwise
it calls :func:`activate`, which adds a meta-path finder that waits for
``megatron.core.transformer.moe.token_dispatcher``; right after that module has executed (so the
by-value copies exist) :func:`megatron_ep_plugins.install` runs. Megatron itself is not imported
early. An error (unknown or unavailable backend ...) propagates out of the import of Megatron, so
a misconfigured job stops at start-up with the reason instead of running with something else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Optional, Sequence

__all__ = ["TRIGGER_MODULE", "activate", "deactivate", "is_active"]

TRIGGER_MODULE = "megatron.core.transformer.moe.token_dispatcher"


class _InstallAfterExec(importlib.abc.Loader):
    """Wraps the real loader; runs ``install()`` after the module body has executed."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):  # noqa: D401 - importlib protocol
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        from .api import install

        install()

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... for tracebacks and tools
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        if fullname != TRIGGER_MODULE:
            return None
        deactivate()  # one shot; also prevents recursion below
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _InstallAfterExec(spec.loader)
        return spec


_finder = _Finder()


def is_active() -> bool:
    return _finder in sys.meta_path


def activate() -> None:
    """Install now if Megatron's dispatcher is already imported, else when it is (idempotent)."""
    if TRIGGER_MODULE in sys.modules:
        from .api import install

        install()
    elif not is_active():
        sys.meta_path.insert(0, _finder)


def deactivate() -> None:
    while _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
