"""Reference backend ``torch``: the dispatch/combine contract with ``torch.distributed.all_to_all_single``.

Works with gloo on CPU and NCCL on GPU, needs no extension, and is the fallback that works anywhere
(including clusters where DeepEP cannot run). Every other backend is tested against it.

Per dispatch it runs three collectives: a small header exchange (counts, per-expert counts, and the
values every rank must agree on), moved to the CPU in one transfer (the only host sync), then the
rows and their packed routing metadata. Bad routing ids are detected on the device and reported
through the header, so every rank raises the same error instead of one rank raising and the
others hanging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..errors import InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Capabilities, DispatchResult

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TorchA2ABackend", "TorchA2AHandle", "ep_register_backends"]

# Header columns sent to every destination rank (int64), then the per-expert counts.
_COUNT, _BAD, _HIDDEN, _TOPK, _DTYPE, _NUM_FIXED = 0, 1, 2, 3, 4, 5


def _float_dtypes() -> tuple:
    import torch

    return (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class TorchA2AHandle:
    """Routing of one dispatch, reused by combine and by combine's backward."""

    token_ids: "torch.Tensor"  # [S] source token of each sent row, grouped by destination
    owner_mask: "torch.Tensor"  # [S, K] which top-k entries of a sent row its destination owns
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    num_tokens: int  # T on this rank
    num_experts: int


class TorchA2ABackend:
    """The contract in ``backend-contract.md`` with plain collectives (see module docstring)."""

    name = "torch"

    def __init__(self) -> None:
        self.num_sms: Optional[int] = None

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        self.num_sms = num_sms  # no kernels of its own: recorded for `explain`, otherwise unused

    def agreement_key(self) -> Mapping[str, Any]:
        return {"algorithm": "all_to_all_single", "version": 1}

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(group)
        _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = num_experts // world
        device = x.device
        topk_idx = topk_idx.long()

        in_range = (topk_idx >= 0) & (topk_idx < num_experts)
        bad = ((topk_idx < -1) | (topk_idx >= num_experts)).sum()
        dest = torch.where(in_range, topk_idx // local, world)  # `world` = routed nowhere
        in_rank = torch.zeros(num_tokens, world + 1, dtype=torch.bool, device=device)
        in_rank.scatter_(1, dest, True)
        pairs = in_rank[:, :world].t().nonzero()  # (destination, token), destination-major, tokens ascending
        row_dest, token_ids = pairs[:, 0], pairs[:, 1]
        owner_mask = dest[token_ids] == row_dest[:, None]
        send_idx = torch.where(owner_mask, topk_idx[token_ids] - row_dest[:, None] * local, -1)
        send_w = torch.where(owner_mask, topk_weights[token_ids], 0.0)

        per_expert = torch.bincount(topk_idx[in_range], minlength=num_experts).view(world, local)
        header = torch.empty(world, _NUM_FIXED + local, dtype=torch.int64, device=device)
        header[:, _COUNT] = in_rank[:, :world].sum(0)
        header[:, _BAD] = bad
        header[:, _HIDDEN] = hidden
        header[:, _TOPK] = topk
        header[:, _DTYPE] = _float_dtypes().index(x.dtype)
        header[:, _NUM_FIXED:] = per_expert
        recv_header = torch.empty_like(header)
        dist.all_to_all_single(recv_header, header, group=group)
        both = torch.stack([header, recv_header]).cpu()  # the one host sync of a dispatch
        sent, got = both[0], both[1]
        _check_header(got, group, num_experts, hidden, topk, x.dtype)
        send_splits = sent[:, _COUNT].tolist()
        recv_splits = got[:, _COUNT].tolist()
        num_recv = sum(recv_splits)

        recv_x = x.new_empty(num_recv, hidden)
        dist.all_to_all_single(recv_x, x[token_ids], recv_splits, send_splits, group=group)
        meta = torch.cat([send_idx.to(torch.int32), send_w.float().contiguous().view(torch.int32)], dim=1)
        recv_meta = meta.new_empty(num_recv, 2 * topk)
        dist.all_to_all_single(recv_meta, meta, recv_splits, send_splits, group=group)
        recv_idx = recv_meta[:, :topk].long()
        recv_w = recv_meta[:, topk:].contiguous().view(torch.float32)
        tokens_per_expert = got[:, _NUM_FIXED:].sum(0)
        handle = TorchA2AHandle(token_ids, owner_mask, send_splits, recv_splits, num_tokens, num_experts)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        import torch.distributed as dist

        h = _check_handle(handle)
        if x.dim() != 2 or x.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(x.shape)}"
            )
        recv = x.new_empty(sum(h.recv_splits), x.shape[1])
        dist.all_to_all_single(recv, x[h.token_ids], h.recv_splits, h.send_splits, group=group)
        return recv

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        import torch
        import torch.distributed as dist

        h = _check_handle(handle)
        num_recv = sum(h.recv_splits)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != num_recv:
            raise InvalidInputError(
                f"combine expects x of shape [{num_recv}, H] (one row per row dispatch delivered here, same "
                f"order), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dtype not in _float_dtypes():
            raise InvalidInputError(f"combine expects a bf16/fp16/fp32 tensor, got {x.dtype}")
        num_sent = len(h.token_ids)
        back = x.new_empty(num_sent, x.shape[1])
        dist.all_to_all_single(back, x.contiguous(), h.send_splits, h.recv_splits, group=group)
        out = torch.zeros(h.num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, h.token_ids, back.float())
        combined_w = None
        if topk_weights is not None:
            if topk_weights.shape != (num_recv, h.owner_mask.shape[1]):
                raise InvalidInputError(
                    f"combine's topk_weights must have shape [{num_recv}, {h.owner_mask.shape[1]}], "
                    f"got {tuple(topk_weights.shape)}"
                )
            back_w = topk_weights.new_empty(num_sent, topk_weights.shape[1], dtype=torch.float32)
            dist.all_to_all_single(back_w, topk_weights.float().contiguous(), h.send_splits, h.recv_splits, group=group)
            combined_w = torch.zeros(h.num_tokens, back_w.shape[1], dtype=torch.float32, device=x.device)
            combined_w.index_add_(0, h.token_ids, torch.where(h.owner_mask, back_w, 0.0))
        return out.to(x.dtype), combined_w


def _check_handle(handle: Any) -> TorchA2AHandle:
    if not isinstance(handle, TorchA2AHandle):
        raise InvalidInputError(
            f"backend 'torch' got a handle of type {type(handle).__name__}; pass the handle returned by this "
            "backend's dispatch (handles of different backends are not interchangeable)"
        )
    return handle


def _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world) -> None:
    """Free checks (metadata only, no device sync)."""
    import torch

    if isinstance(x, tuple):
        raise InvalidInputError(
            "backend 'torch' does not support FP8 dispatch input (x is a (tensor, scales) tuple); pass a bf16 "
            "tensor, or select a backend whose capabilities include fp8_dispatch (legacy, elastic)"
        )
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InvalidInputError(f"dispatch expects x as a [num_tokens, hidden] tensor, got {_describe(x)}")
    if x.dtype not in _float_dtypes():
        raise InvalidInputError(f"dispatch expects x in bf16, fp16 or fp32, got {x.dtype}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise InvalidInputError(
            f"topk_idx must be [num_tokens={x.shape[0]}, topk] int64, got {_describe(topk_idx)}"
        )
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"topk_idx must be int64 (global expert ids, -1 = masked), got {topk_idx.dtype}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape:
        raise InvalidInputError(
            f"topk_weights must have the shape of topk_idx {tuple(topk_idx.shape)}, got {_describe(topk_weights)}"
        )
    if topk_weights.dtype != torch.float32:
        raise InvalidInputError(
            f"topk_weights must be float32 (set moe_router_dtype='fp32'), got {topk_weights.dtype}"
        )
    if not (x.device == topk_idx.device == topk_weights.device):
        raise InvalidInputError(
            f"x, topk_idx and topk_weights must be on one device, got {x.device}, {topk_idx.device}, {topk_weights.device}"
        )
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise InvalidInputError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % world:
        raise InvalidInputError(
            f"num_experts={num_experts} is not divisible by the group size {world}: each rank must own "
            f"the same number of experts (use a multiple of {world})"
        )


def _check_header(got, group, num_experts: int, hidden: int, topk: int, dtype) -> None:
    """Raise the same error on every rank when any rank sent bad ids or disagrees on shapes."""
    import torch.distributed as dist

    def ranks(mask) -> list[int]:
        return [dist.get_global_rank(group, i) for i, m in enumerate(mask) if m]

    bad = got[:, _BAD]
    if bool((bad > 0).any()):
        raise InvalidInputError(
            f"expert ids out of range on rank(s) {ranks(bad > 0)} ({bad.sum().item()} entries): topk_idx must "
            f"be in [0, {num_experts}) or -1 for a masked (dropped) entry"
        )
    for col, mine, what in ((_HIDDEN, hidden, "hidden size"), (_TOPK, topk, "top-k"),
                            (_DTYPE, _float_dtypes().index(dtype), "dtype code")):
        values = got[:, col].tolist()
        if any(v != mine for v in values):
            raise InvalidInputError(
                f"ranks disagree on the {what} of dispatch inputs: values by group rank {values} "
                f"(global ranks {ranks([True] * len(values))}); every rank must pass the same {what}"
            )


def _describe(obj: Any) -> str:
    shape = getattr(obj, "shape", None)
    return f"{type(obj).__name__} of shape {tuple(shape)} and dtype {obj.dtype}" if shape is not None else repr(obj)


def _probe() -> Availability:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return Availability.no("torch.distributed is not available in this torch build")
    return Availability.yes(f"torch {torch.__version__}: all_to_all_single (gloo on CPU, NCCL on GPU)",
                            torch=torch.__version__)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="torch",
            aliases=("reference", "torch-a2a"),
            priority=0,
            factory=TorchA2ABackend,
            probe=_probe,
            capabilities=Capabilities(devices=("cpu", "cuda"), uneven_tokens=True, async_overlap=False,
                                      deterministic_order=True, internode=True),
            description="reference: torch.distributed all_to_all_single (gloo/NCCL), runs anywhere",
        )
    ]
