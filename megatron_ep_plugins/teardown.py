"""Free the installed backend's communication buffers before ``torch.distributed.destroy_process_group()``.

Some buffers talk to their peers when they are freed: DeepEP V2's ``ElasticBuffer`` runs a GPU barrier over the
group's NCCL window in its destructor. An installed plugin keeps its backend (and so its buffers) alive for the
life of the process, so a job that ends with ``dist.destroy_process_group()``, as PyTorch recommends, freed them
only at interpreter exit, after the group was gone: the barrier faulted (``cudaErrorIllegalAddress``) and the
process died with SIGABRT after training had finished (2 x H200: ``benchmarks/gpu/exit_check.py``,
``benchmarks/results/2xH200/logs/steps_lease18.txt``), which a scheduler reports as a failed job.

:func:`hook` (called by ``install()``) wraps ``destroy_process_group`` in ``torch.distributed`` and
``torch.distributed.distributed_c10d`` so that it first calls the backend's optional ``release(group)`` (every rank
calls ``destroy_process_group`` together, so the release is collective too, while the group still works) and
collects garbage once; :func:`unhook` (``uninstall()``) restores the original. Code that imported the function
by value before ``install()`` (``from torch.distributed import destroy_process_group``) keeps the original.
"""

from __future__ import annotations

import functools
import gc
import logging
from typing import Any, Callable, Optional

log = logging.getLogger("megatron_ep_plugins")

__all__ = ["MARK", "hook", "hooked", "unhook"]

#: Attribute set on the wrapper (its value: the original function), so a second ``hook`` replaces, never stacks.
MARK = "__megatron_ep_plugins_original__"
_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")


def _modules() -> list:
    import importlib

    return [importlib.import_module(name) for name in _MODULES]


def hook(release: Callable[[Optional[Any]], None]) -> None:
    """Make ``destroy_process_group(group)`` call ``release(group)`` first (``group=None``: every group).

    Example (what ``install()`` does with the live backend)::

        release = getattr(backend, "release", None)
        if release is not None:
            teardown.hook(release)
    """
    original = hooked() or _modules()[0].destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(group=None, *args, **kwargs):
        try:
            release(group)
            gc.collect()  # buffers held only by reference cycles go now, while the group still works
        except Exception as exc:  # never stand in the way of the user's own teardown
            log.warning("could not free the backend's buffers before destroy_process_group (%s: %s); if a buffer "
                        "talks to its peers when freed, the process may fail at exit", type(exc).__name__, exc)
        return original(group, *args, **kwargs)

    setattr(destroy_process_group, MARK, original)
    for module in _modules():
        module.destroy_process_group = destroy_process_group


def hooked() -> Optional[Callable]:
    """The original ``destroy_process_group`` when :func:`hook` is in place, else ``None``."""
    return getattr(_modules()[0].destroy_process_group, MARK, None)


def unhook() -> None:
    """Restore the original ``destroy_process_group`` (no-op when not hooked)."""
    original = hooked()
    if original is not None:
        for module in _modules():
            module.destroy_process_group = original
