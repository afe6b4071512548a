"""Backend ``legacy``: DeepEP V1 ``deep_ep.Buffer``, called the way Megatron-Core's ``fused_a2a`` calls it.

* One ``Buffer`` per backend, sized from ``Buffer.get_dispatch_config(R)``/``get_combine_config(R)`` hints
  for the token's hidden bytes (as Megatron's ``get_buffer``), reused, and rebuilt only when the group
  changes or a larger size is needed. Only the core constructor arguments are passed
  (``group, num_nvl_bytes, num_rdma_bytes``): the optional keywords drift between DeepEP builds.
* Dispatch = ``get_dispatch_layout`` then ``dispatch`` (6-tuple); combine's backward = ``dispatch(x,
  handle=...)``; combine = ``combine`` (3-tuple). FP8 ``(e4m3, scales)`` input is passed through.
* ``async_finish``: like Megatron, ``previous_event=EventOverlap(EventHandle())`` and
  ``event.current_stream_wait()`` afterwards, so returned tensors are safe on the current stream.
  ``allocate_on_comm_stream`` is only forwarded together with ``async_finish`` (DeepEP V1 asserts that
  combination); without it allocation stays on the compute stream, which is always safe.
* Combine with ``topk_weights`` (dispatch's backward) masks the entries whose expert lives elsewhere
  before the kernel sums over ranks, so each source entry comes from the rank owning its expert.
* ``EventOverlap``/``EventHandle`` are imported from ``deep_ep.utils``, else ``deep_ep.utils.event``, else
  ``deep_ep`` (DeepEP V2 stopped re-exporting them from ``deep_ep.utils``, which makes Megatron 0.19.2's own
  probe report DeepEP missing on a V2 install).

Limits: the expert ids are not range-checked (that would cost a host sync; DeepEP does not either), and
DeepEP V1 only has kernel configurations for some group sizes (2, 4, 8, 16, 24, 32, 64, ...).
``MCORE_EP_LEGACY_NUM_SMS`` overrides Megatron's SM budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import read_int
from ..errors import ConfigError, InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Capabilities, DispatchResult
from ._deepep_common import (check_combine_args, check_dispatch_args, check_handle, import_event_classes,
                             probe_deep_ep)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DeepEPLegacyBackend", "LegacyHandle", "ep_register_backends"]

@dataclass
class LegacyHandle:
    """DeepEP's handle plus what the adapter needs for backward."""

    raw: Any  # DeepEP V1's handle tuple
    recv_topk_idx: "torch.Tensor"  # [N, K] local ids, -1 = expert elsewhere (masks combine's topk_weights)
    num_tokens: int
    num_recv: int
    num_experts: int


def _hidden_bytes(data: "torch.Tensor") -> int:
    return data.size(1) * max(data.element_size(), 2)  # as Megatron's get_hidden_bytes


def _validate_num_sms(num_sms: Any, what: str, exc: type) -> int:
    if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0 or num_sms % 2:
        raise exc(f"{what}={num_sms!r} is invalid: DeepEP V1 needs a positive even SM count (e.g. 20 or 24)")
    return num_sms


class DeepEPLegacyBackend:
    """DeepEP V1 ``Buffer`` behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol."""

    name = "legacy"

    def __init__(self) -> None:
        env_sms = read_int("MCORE_EP_LEGACY_NUM_SMS", minimum=2)
        if env_sms is not None:
            _validate_num_sms(env_sms, "MCORE_EP_LEGACY_NUM_SMS", ConfigError)
        import deep_ep

        if not hasattr(deep_ep, "Buffer"):
            raise ImportError("this deep_ep has no Buffer class (DeepEP V1 API); install DeepEP with the V1 Buffer")
        self._Buffer = deep_ep.Buffer
        self._EventOverlap, self._EventHandle = import_event_classes()
        self._env_num_sms = env_sms
        self.num_sms: Optional[int] = None
        self._buffer = None
        self._sized_for: Optional[tuple] = None  # (group, hidden_bytes) the buffer was last checked for
        if env_sms is not None:
            self._Buffer.set_num_sms(env_sms)
            self.num_sms = env_sms

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        _validate_num_sms(num_sms, "num_sms", InvalidInputError)
        if self._env_num_sms is not None:
            return  # MCORE_EP_LEGACY_NUM_SMS wins over Megatron's moe_flex_dispatcher_num_sms
        self._Buffer.set_num_sms(num_sms)
        self.num_sms = num_sms

    def agreement_key(self) -> Mapping[str, Any]:
        # The SM count fixes the channel count, which must match on every rank.
        return {"algorithm": "deep_ep.Buffer", "num_sms": self.num_sms}

    def _get_buffer(self, group, hidden_bytes: int):
        if self._buffer is not None and self._sized_for == (group, hidden_bytes):
            return self._buffer  # steady state: no size-hint arithmetic per call
        size = group.size()
        try:
            configs = (self._Buffer.get_dispatch_config(size), self._Buffer.get_combine_config(size))
        except (AssertionError, KeyError, ValueError) as exc:
            raise InvalidInputError(
                f"DeepEP V1 has no kernel configuration for an expert-parallel group of {size} ranks ({exc}); "
                "use a supported size (2, 4, 8, 16, 24, 32, 64, ...) or the 'elastic'/'torch' backend") from None
        num_nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, size) for c in configs)
        num_rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, size) for c in configs)
        buf = self._buffer
        if buf is None or buf.group is not group or buf.num_nvl_bytes < num_nvl or buf.num_rdma_bytes < num_rdma:
            # NOTES (DeepEP): the network's adaptive routing must be off for internode.
            self._buffer = buf = self._Buffer(group, num_nvl, num_rdma)
        self._sized_for = (group, hidden_bytes)
        return buf

    def _events(self, async_finish: bool, allocate_on_comm_stream: bool):
        previous = self._EventOverlap(self._EventHandle()) if async_finish else None
        return previous, bool(allocate_on_comm_stream and async_finish)

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist

        data, topk_idx, _ = check_dispatch_args(self.name, x, topk_idx, topk_weights, num_experts,
                                                dist.get_world_size(group))
        buffer = self._get_buffer(group, _hidden_bytes(data))
        previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        per_rank, per_rdma_rank, per_expert, in_rank, event = buffer.get_dispatch_layout(
            topk_idx, num_experts, previous_event=previous, async_finish=async_finish,
            allocate_on_comm_stream=on_comm)
        recv_x, recv_idx, recv_w, counts, raw, after = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            previous_event=event, async_finish=async_finish, allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        num_recv = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
        handle = LegacyHandle(raw, recv_idx, data.shape[0], num_recv, num_experts)
        return DispatchResult(recv_x, recv_idx, recv_w, torch.tensor(counts, dtype=torch.int64), handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        h = check_handle(handle, LegacyHandle, "legacy")
        data = x[0] if isinstance(x, tuple) else x
        if data.dim() != 2 or data.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(data.shape)}")
        if not isinstance(x, tuple):
            x = x.contiguous()
        buffer = self._get_buffer(group, _hidden_bytes(data))
        previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        recv_x, _, _, _, _, after = buffer.dispatch(x, handle=h.raw, previous_event=previous,
                                                     async_finish=async_finish, allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        return recv_x

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        h = check_handle(handle, LegacyHandle, "legacy")
        topk_weights = check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, topk_weights)
        buffer = self._get_buffer(group, _hidden_bytes(x))
        previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        combined, combined_w, after = buffer.combine(
            x.contiguous(), h.raw, topk_weights=topk_weights, previous_event=previous, async_finish=async_finish,
            allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        return combined, (combined_w if topk_weights is not None else None)


def _probe() -> Availability:
    facts = probe_deep_ep("Buffer", "install DeepEP, https://github.com/deepseek-ai/DeepEP",
                          "deep_ep has no Buffer class (this DeepEP build lacks the V1 API)",
                          "DeepEP V1 needs an NVIDIA GPU, Ampere (SM80) or newer", (8, 0))
    problems, details = facts.problems, facts.details
    if facts.deep_ep is not None:
        try:
            import_event_classes()
        except ImportError as exc:
            problems.append(str(exc))
    if problems:
        return Availability.no("; ".join(problems), **details)
    return Availability.yes(f"deep_ep {details['deep_ep']}: V1 Buffer (NVLink intranode, NVSHMEM internode)",
                            **details)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="legacy",
            aliases=("deepep", "deepep-v1", "v1"),
            priority=200,
            factory=DeepEPLegacyBackend,
            probe=_probe,
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=True, uneven_tokens=True, async_overlap=True,
                                      deterministic_order=False, internode=True),
            description="DeepEP V1 deep_ep.Buffer (what Megatron's fused_a2a calls)",
        )
    ]
