"""Emulated ``deep_ep.utils`` (CPU test double). V1 re-exports ``EventOverlap``/``EventHandle`` here;
V2 does not (``deep_ep.utils.event`` only), which is what broke Megatron 0.19.2's import probe."""

from .. import API as _API

if _API == "v1":
    from .event import EventHandle, EventOverlap  # noqa: F401
