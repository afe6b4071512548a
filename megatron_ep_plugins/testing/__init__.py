"""Conformance kit: prove that an expert-parallel backend keeps the dispatch/combine contract.

Run it on any registered backend (built-in or a third-party plugin)::

    pytest --pyargs megatron_ep_plugins.testing --ep-backend NAME            # 2 and 4 gloo ranks on CPU
    pytest --pyargs megatron_ep_plugins.testing --ep-backend NAME --ep-quick # fewer random cases
    pytest --pyargs megatron_ep_plugins.testing --ep-backend NAME --ep-device cuda --ep-ranks 2  # NCCL, 1 GPU/rank

(``pytest --help`` lists every ``--ep-*`` option; the options come from this package's ``pytest11`` entry point,
``megatron_ep_plugins.testing.plugin``.) Or from Python: :func:`check_backend`.

Every round runs on every rank of a real process group and is compared with a single-process oracle of the
contract (:mod:`.oracle`) computed from every rank's inputs: dispatched rows bit-exact (matched by content, in
any order), top-k ids and weights, ``tokens_per_expert``, combine (the fp32 sum rounded once), autograd of ``x``
and the probs through the slot Megatron calls, ``combine(topk_weights=...)`` taking each entry from its owner,
the cached dispatch; uneven and zero token counts, ``-1`` masks, Megatron's async flags; out-of-range ids must
raise :class:`~megatron_ep_plugins.errors.InvalidInputError` on every rank (a fresh backend: a group's first
dispatch) and leave the backend usable; plus random routings drawn by hypothesis (``pip install
'megatron-ep-plugins[conformance]'``), 200 per group size (25 with ``--ep-quick``), shrunk to a small case
on failure.

Importing this package is cheap (no torch); the pytest plugin only adds options until the kit's tests run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Case", "ConformanceError", "KitConfig", "Report", "Shape", "check_backend"]

_LAZY = {"Case": "cases", "Shape": "cases", "ConformanceError": "kit", "KitConfig": "kit", "Report": "kit",
         "check_backend": "kit"}

if TYPE_CHECKING:  # pragma: no cover
    from .cases import Case, Shape
    from .kit import ConformanceError, KitConfig, Report, check_backend


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_ep_plugins.testing' has no attribute {name!r}; public names: {__all__}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
