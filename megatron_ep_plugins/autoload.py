"""Zero-code activation: install the selected backend when Megatron's token dispatcher is imported.

``megatron_ep_plugins.pth`` (installed into site-packages with the package) runs at every
interpreter start. With ``MCORE_EP_BACKEND`` unset or ``off`` it only reads that variable. Otherwise
it calls :func:`activate`, which adds a meta-path finder that waits for
``megatron.core.transformer.moe.token_dispatcher``; right after that module has executed (so the
by-value copies exist) :func:`megatron_ep_plugins.install` runs. Megatron itself is not imported
early. An error (unknown or unavailable backend, malformed variable ...) propagates out of the import
of Megatron, so a misconfigured job stops at start-up with the reason instead of running with
something else. If nothing catches it, the interpreter prints that reason alone, one paragraph per
rank, instead of a traceback through Megatron's import chain (``MCORE_EP_LOG=debug`` keeps the
traceback); code that catches it gets the exception as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
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
        _install_at_start()

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... for tracebacks and tools
        return getattr(self._inner, name)


_previous_excepthook: Any = None


def _one_error_excepthook(kind, exc, tb) -> None:
    """Print an activation error as its message alone; anything else goes to the previous hook."""
    if getattr(exc, "_megatron_ep_autoload", False):
        message = f"megatron_ep_plugins: {type(exc).__name__}: {exc}\n" \
                  f"(raised while activating MCORE_EP_BACKEND={os.environ.get('MCORE_EP_BACKEND', '')!r} at the " \
                  f"import of {TRIGGER_MODULE}; MCORE_EP_LOG=debug shows the traceback)\n"
        try:
            sys.stderr.write(message)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - stderr closed: nothing better to do
            pass
        return
    (_previous_excepthook or sys.__excepthook__)(kind, exc, tb)


def _install_at_start() -> None:
    """``install()`` for zero-code activation: an EPPluginError becomes one clear message if uncaught."""
    global _previous_excepthook
    from .api import install
    from .errors import EPPluginError

    try:
        install()
    except EPPluginError as exc:
        if os.environ.get("MCORE_EP_LOG", "").strip().lower() != "debug":
            try:
                exc._megatron_ep_autoload = True  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
            if sys.excepthook is not _one_error_excepthook:
                _previous_excepthook = sys.excepthook
                sys.excepthook = _one_error_excepthook
        raise


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
        _install_at_start()
    elif not is_active():
        sys.meta_path.insert(0, _finder)


def deactivate() -> None:
    while _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
