"""Emulated ``deep_ep.utils`` (CPU test double). V1 re-exports ``EventOverlap``/``EventHandle`` here;
V2 does not (``deep_ep.utils.event`` only), which is what broke Megatron 0.19.2's import probe; V2.5 re-exports
``EventHandle`` only."""

from .. import API as _API

if _API == "v1":
    from .event import EventHandle, EventOverlap  # noqa: F401
elif _API == "v25":
    # mirrors DeepEP V2.5 utils/__init__.py:1-3 "For forward compatibility": EventHandle only (sgl-deep-ep-v25 0.1.0rc0)
    from .event import EventHandle  # noqa: F401
