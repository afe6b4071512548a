"""megatron_ep_plugins: pluggable expert-parallel dispatch/combine backends for Megatron-Core MoE.

Importing this package is cheap and has no side effects: the facade (``install``, ``explain``...)
and the hook markers are loaded on first attribute access; backend libraries (``deep_ep``) and
Megatron are imported only when a backend is probed or installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

#: The package version; its only home (pyproject.toml reads it: ``[tool.setuptools.dynamic]``).
__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "install": "api",
    "uninstall": "api",
    "explain": "api",
    "installed": "api",
    "Installation": "api",
    "list_backends": "api",
    "register_plugin": "manager",
    "unregister_plugin": "manager",
    "BackendSpec": "spec",
    "BackendEnv": "spec",
    "Availability": "spec",
    "Capabilities": "spec",
    "Choice": "spec",
    "DispatchResult": "spec",
    "EPBackend": "spec",
    "EnvVar": "spec",
    "Integer": "spec",
    "Boolean": "spec",
    "OneOf": "spec",
    "Text": "spec",
    "Words": "spec",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Installation, explain, install, installed, list_backends, uninstall
    from .hookspecs import hookimpl, hookspec
    from .manager import register_plugin, unregister_plugin
    from .spec import (Availability, BackendEnv, BackendSpec, Boolean, Capabilities, Choice, DispatchResult,
                       EnvVar, EPBackend, Integer, OneOf, Text, Words)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_ep_plugins' has no attribute {name!r}; public names: {__all__}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
