"""Example third-party backend for megatron_ep_plugins: the plugin module (what the entry point names).

It only registers the backend: importing it must stay cheap (no torch, no communication library), because
every ``megatron-ep list`` and every job's discovery imports it. The backend itself lives in
:mod:`ep_allgather_plugin.backend` and is imported by the factory, when the backend is selected.

Install (``pip install -e examples/plugins/ep_allgather``), then ``MCORE_EP_BACKEND=allgather``;
``megatron-ep list`` shows it. Its priority is below the reference backend's, so ``auto`` never picks it.
Check it keeps the contract: ``pytest --pyargs megatron_ep_plugins.testing --ep-backend allgather``.
"""

from __future__ import annotations

from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.spec import Availability, BackendSpec, Capabilities

__all__ = ["ep_register_backends"]


def _create():
    from .backend import AllGatherBackend  # the heavy part, imported only when the backend is used

    return AllGatherBackend()


def _probe() -> Availability:
    """Cheap, never raises: can this backend run here?"""
    import torch.distributed as dist

    if not dist.is_available():
        return Availability.no("torch.distributed is not available in this torch build")
    return Availability.yes("torch.distributed all_gather/all_to_all")


@hookimpl
def ep_register_backends():
    return [BackendSpec(name="allgather", priority=-10, factory=_create, probe=_probe,
                        capabilities=Capabilities(devices=("cpu", "cuda"), internode=True),
                        description="example third-party backend: all-gather dispatch, all-to-all combine")]
