"""The hot path: generic autograd Functions in Megatron's ``fused_a2a`` call signatures.

:func:`build_slot` binds one live backend into three plain functions with exactly the signatures
of Megatron's ``fused_dispatch``, ``fused_combine`` and ``set_deepep_num_sms``. The backend is
captured in the closure: a call does no plugin lookup, reads no environment variable and adds no
device sync. The only per-call overhead beyond ``autograd.Function.apply`` is one set-membership
test that runs the rank-agreement check the first time a process group is seen.

Autograd follows Megatron's ``FusedDispatch``/``FusedCombine``:

* dispatch backward = ``combine(grad_recv_x, handle, topk_weights=grad_recv_probs)``;
* combine backward = ``dispatch_cached(grad, handle)`` (same routing, no new layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .spec import EPBackend

__all__ = ["Slot", "build_slot", "SLOT_MARK"]

#: Attribute set on every function :func:`build_slot` makes (value: the backend name).
SLOT_MARK = "__megatron_ep_backend__"


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, num_experts, group, async_finish, allocate_on_comm_stream, backend):
        out = backend.dispatch(x, topk_idx, topk_weights, num_experts, group,
                               async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.backend, ctx.group, ctx.handle = backend, group, out.handle
        ctx.flags = (async_finish, allocate_on_comm_stream)
        ctx.mark_non_differentiable(out.recv_topk_idx, out.tokens_per_expert)
        return out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.tokens_per_expert, out.handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_weights, _grad_counts, _grad_handle):
        async_finish, on_comm_stream = ctx.flags
        weights = None if grad_weights is None else grad_weights.float()
        grad_in, grad_w = ctx.backend.combine(grad_x.contiguous(), ctx.handle, ctx.group, topk_weights=weights,
                                              async_finish=async_finish, allocate_on_comm_stream=on_comm_stream)
        return grad_in, None, grad_w, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream, backend):
        combined, _ = backend.combine(x, handle, group, async_finish=async_finish,
                                      allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.backend, ctx.group, ctx.handle = backend, group, handle
        ctx.flags = (async_finish, allocate_on_comm_stream)
        return combined, None

    @staticmethod
    def backward(ctx, grad_combined, _unused):
        async_finish, on_comm_stream = ctx.flags
        grad_in = ctx.backend.dispatch_cached(grad_combined.contiguous(), ctx.handle, ctx.group,
                                              async_finish=async_finish, allocate_on_comm_stream=on_comm_stream)
        return grad_in, None, None, None, None, None


@dataclass(frozen=True)
class Slot:
    """The three callables that replace Megatron's, bound to one backend."""

    backend: EPBackend
    fused_dispatch: Callable[..., Any]
    fused_combine: Callable[..., Any]
    set_deepep_num_sms: Callable[[int], None]

    def by_role(self) -> dict[str, Any]:
        return {"dispatch": self.fused_dispatch, "combine": self.fused_combine, "set_num_sms": self.set_deepep_num_sms}


def build_slot(backend: EPBackend, check_group: Optional[Callable[[Any], None]] = None) -> Slot:
    """Bind ``backend`` into Megatron-signature functions.

    ``check_group(group)`` runs once per process group, before its first dispatch (on every rank,
    since dispatch is collective); it is how ranks verify they agree (see ``consistency.py``).
    """
    seen: set[Any] = set()

    def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                       allocate_on_comm_stream=False):
        if group not in seen:
            if check_group is not None:
                check_group(group)
            seen.add(group)
        return _Dispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group,
                               async_finish, allocate_on_comm_stream, backend)

    def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        return _Combine.apply(x, group, handle, async_finish, allocate_on_comm_stream, backend)

    def set_deepep_num_sms(num_sms):
        backend.set_num_sms(num_sms)

    for fn, doc in ((fused_dispatch, "dispatch"), (fused_combine, "combine"), (set_deepep_num_sms, "set_num_sms")):
        setattr(fn, SLOT_MARK, backend.name)
        fn.__doc__ = f"megatron_ep_plugins: {doc} through backend {backend.name!r}."
    return Slot(backend, fused_dispatch, fused_combine, set_deepep_num_sms)
