"""The hot path: generic autograd Functions in Megatron's ``fused_a2a`` call signatures.

:func:`build_slot` binds one live backend into three plain functions with exactly the signatures
of Megatron's ``fused_dispatch``, ``fused_combine`` and ``set_deepep_num_sms``. Everything a call
needs is decided when the slot is built: the backend is captured in the closure, so a call does no
plugin lookup, reads no environment variable, imports nothing and adds no device sync. Per call with a
gradient to track, the slot costs what Megatron's own ``FusedDispatch``/``FusedCombine`` cost (one
``autograd.Function.apply`` with the same arguments and the same four ``ctx`` attributes) plus one
set-membership test that runs the once-per-group work (rank-agreement check, fault watcher) the first
time a process group is seen; ``benchmarks/host_overhead.py`` times both side by side.

Autograd follows Megatron's ``FusedDispatch``/``FusedCombine``:

* dispatch backward = ``combine(grad_recv_x, handle, topk_weights=grad_recv_probs)``;
* combine backward = ``dispatch_cached(grad, handle)`` (same routing, no new layout).

Integer outputs (``recv_topk_idx``, ``tokens_per_expert``) are non-differentiable by their dtype, as
in Megatron; they are not marked by hand (that costs a call per dispatch and changes nothing).

No gradient, no Function: when no gradient can flow through a call (grad mode off, as in evaluation,
``torch.no_grad`` or ``torch.inference_mode``, or no input that requires grad), the slot calls the backend
directly and returns the same tuple ``apply`` would (same objects, no ``grad_fn``). ``apply`` is the largest
host cost the slot has: on the 2 x H200 host a cold call took 36-52 us more than the Function's body, 40-90 us
around a DeepEP call (``benchmarks/gpu/trace_slot.py``), against about 3 us in a warm loop on a desktop CPU;
at 256 tokens per rank that is a third of a DeepEP dispatch. Training pays it, as it pays Megatron's own ``FusedDispatch``;
evaluation and inference no longer do. The test costs two attribute reads and one C call.

Failures: when a slot function raises on one rank, :mod:`megatron_ep_plugins.faults` publishes it
so the other ranks of the group stop instead of waiting in the collective (``MCORE_EP_FAULT_PROPAGATION``,
read here once). The ``try``/``except`` around each call costs nothing until something is raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .faults import FaultReporter
from .faults import enabled as _fault_propagation_enabled
from .spec import EPBackend

__all__ = ["Slot", "build_slot", "SLOT_MARK"]

#: Attribute set on every function :func:`build_slot` makes (value: the backend name).
SLOT_MARK = "__megatron_ep_backend__"

#: Op names in fault records (what the other ranks print).
OP_DISPATCH, OP_COMBINE = "dispatch", "combine"
OP_DISPATCH_BACKWARD = "dispatch backward (combine of the gradients)"
OP_COMBINE_BACKWARD = "combine backward (cached dispatch of the gradients)"


class _Bound:
    """What a slot's Functions need besides their arguments: the backend and the fault reporter."""

    __slots__ = ("backend", "reporter")

    def __init__(self, backend: EPBackend, reporter: Optional[FaultReporter]) -> None:
        self.backend, self.reporter = backend, reporter


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, num_experts, group, async_finish, allocate_on_comm_stream, bound):
        recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = bound.backend.dispatch(
            x, topk_idx, topk_weights, num_experts, group,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.bound, ctx.group, ctx.handle, ctx.flags = bound, group, handle, (async_finish, allocate_on_comm_stream)
        return recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_weights, _grad_counts, _grad_handle):
        bound = ctx.bound
        async_finish, on_comm_stream = ctx.flags
        try:
            grad_in, grad_w = bound.backend.combine(
                grad_x.contiguous(), ctx.handle, ctx.group,
                topk_weights=None if grad_weights is None else grad_weights.float(),
                async_finish=async_finish, allocate_on_comm_stream=on_comm_stream)
        except Exception as exc:
            if bound.reporter is not None:
                bound.reporter.report(exc, OP_DISPATCH_BACKWARD, ctx.group)
            raise
        return grad_in, None, grad_w, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream, bound):
        combined, _ = bound.backend.combine(x, handle, group, async_finish=async_finish,
                                            allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.bound, ctx.group, ctx.handle, ctx.flags = bound, group, handle, (async_finish, allocate_on_comm_stream)
        return combined, None

    @staticmethod
    def backward(ctx, grad_combined, _unused):
        bound = ctx.bound
        async_finish, on_comm_stream = ctx.flags
        try:
            grad_in = bound.backend.dispatch_cached(grad_combined.contiguous(), ctx.handle, ctx.group,
                                                    async_finish=async_finish, allocate_on_comm_stream=on_comm_stream)
        except Exception as exc:
            if bound.reporter is not None:
                bound.reporter.report(exc, OP_COMBINE_BACKWARD, ctx.group)
            raise
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
    since dispatch is collective); it is how ranks verify they agree (see ``consistency.py``). The
    group's fault watcher starts just before it (see ``faults.py``), unless
    ``MCORE_EP_FAULT_PROPAGATION=0`` (read now, not per call).
    """
    reporter = FaultReporter() if _fault_propagation_enabled() else None
    bound = _Bound(backend, reporter)
    seen: set[Any] = set()
    apply_dispatch, apply_combine = _Dispatch.apply, _Combine.apply
    grad_enabled = torch.is_grad_enabled

    def first_dispatch(group) -> None:
        if reporter is not None:
            reporter.watch(group)  # before the agreement collective: no peer can fail before it
        if check_group is not None:
            check_group(group)
        seen.add(group)

    def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                       allocate_on_comm_stream=False):
        try:
            if group not in seen:
                first_dispatch(group)
            x = x.contiguous()
            if grad_enabled() and (x.requires_grad or getattr(token_probs, "requires_grad", False)):
                return apply_dispatch(x, token_indices, token_probs, num_experts, group,
                                      async_finish, allocate_on_comm_stream, bound)
            # no gradient can flow: the Function's body without the Function (module docstring)
            recv_x, recv_idx, recv_w, counts, handle = backend.dispatch(
                x, token_indices, token_probs, num_experts, group,
                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
            return recv_x, recv_idx, recv_w, counts, handle
        except Exception as exc:
            if reporter is not None:
                reporter.report(exc, OP_DISPATCH, group)
            raise

    def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        try:
            if grad_enabled() and getattr(x, "requires_grad", False):
                return apply_combine(x, group, handle, async_finish, allocate_on_comm_stream, bound)
            combined, _ = backend.combine(x, handle, group, async_finish=async_finish,
                                          allocate_on_comm_stream=allocate_on_comm_stream)
            return combined, None
        except Exception as exc:
            if reporter is not None:
                reporter.report(exc, OP_COMBINE, group)
            raise

    def set_deepep_num_sms(num_sms):
        backend.set_num_sms(num_sms)

    for fn, doc in ((fused_dispatch, "dispatch"), (fused_combine, "combine"), (set_deepep_num_sms, "set_num_sms")):
        setattr(fn, SLOT_MARK, backend.name)
        fn.__doc__ = f"megatron_ep_plugins: {doc} through backend {backend.name!r}."
    return Slot(backend, fused_dispatch, fused_combine, set_deepep_num_sms)
