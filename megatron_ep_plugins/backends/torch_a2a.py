"""Reference backend ``torch``: the dispatch/combine contract with ``torch.distributed.all_to_all_single``.

Works with gloo on CPU and NCCL on GPU, needs no extension, and is the fallback that works anywhere
(including clusters where DeepEP cannot run). Every other backend is tested against it.

Per dispatch: one small header exchange (per-destination row counts, per-expert counts, a count of
bad expert ids and the shape values every rank must agree on), moved to the host in one transfer,
which is the dispatch's only host sync; then the rows and their routing metadata, each with one
``all_to_all_single`` whose split sizes are now known. Bad routing ids are detected on the device
and reported through the header, so every rank raises the same error instead of one rank raising
and the others hanging. Combine and a dispatch with a cached handle never sync the host.

How (shapes: T tokens, K top-k, R ranks, L = E/R experts per rank, S rows sent, N rows received):

* Everything that does not need the sizes is computed on the device *before* the host waits, with
  the upper bound ``S <= min(R, K) * T``: destination of every (token, k) entry, the (destination,
  token) pairs in send order (``torch.nonzero_static``), the send position of every pair (a
  cumsum), the packed per-row metadata (local expert ids and weights, one int32 block), and on CUDA
  the row gather itself. The host waits on an event recorded right after the header's
  device-to-host copy, so the GPU keeps gathering while the host reads the sizes and launches the
  collectives. ``torch.bincount`` and ``nonzero`` (both sync on CUDA) are replaced by a
  ``scatter_add_`` histogram and ``nonzero_static``.
* Combine receives the rows back into a buffer with one spare row and sums them per token over
  precomputed positions (``[T, min(R, K)]``, empty slots pointing at the spare row) in one pass: one
  ``embedding_bag(mode="sum")`` kernel on CUDA; on CPU ``embedding_bag``'s fbgemm fast path for
  fp32/fp16, and for bf16 one bf16 add of two gathered rows when no token has more than two (else
  ``embedding_bag``'s padding path, which rounds ties to even where fbgemm's bf16 output does not).
  Always fp32 accumulation in ascending destination order and one rounding to the input dtype:
  exactly "fp32 sum over destination ranks, then cast", bit-identical to doing that with
  ``index_add_``, with no fp32 copy of the received block. (The fp32 copy the old combine made,
  ``.float()`` of the whole block, was most of a bf16 combine's time on CPU: a fresh allocation twice
  the block's size, page-faulted in on every call once it passes glibc's mmap threshold; an fp32
  combine never paid it.)
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
    """Routing of one dispatch, reused by combine, combine's backward and a cached dispatch."""

    token_ids: "torch.Tensor"  # [S] source token of each sent row, grouped by destination, ascending
    bags: "torch.Tensor"  # [T, min(R, K)] send position of each token's rows (= num_sent where none)
    positions: "torch.Tensor"  # [T, R + 1] send position of (token, destination d) at column d + 1; column 0 and
    # destinations a token was not sent to hold num_sent
    slots: "torch.Tensor"  # [T, K] destination + 1 of each top-k entry, 0 = routed nowhere
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    num_tokens: int  # T on this rank
    num_experts: int
    num_sent: int  # S = sum(send_splits)
    num_recv: int  # N = sum(recv_splits)


class TorchA2ABackend:
    """The contract in ``docs/backend-contract.md`` with plain collectives (see module docstring)."""

    name = "torch"

    def __init__(self) -> None:
        self.num_sms: Optional[int] = None
        #: Gather the rows before the host waits for the header (upper-bound size, sliced afterwards):
        #: ``None`` = on CUDA only, where it overlaps the host's wait and launches; on CPU nothing
        #: runs asynchronously, so it would only copy rows that are not sent. Tests force both ways.
        self.gather_before_sync: Optional[bool] = None
        self._consts: dict = {}  # (device, R, E, hidden, topk, dtype) -> _Consts

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        self.num_sms = num_sms  # no kernels of its own: recorded for `explain`, otherwise unused

    def agreement_key(self) -> Mapping[str, Any]:
        return {"algorithm": "all_to_all_single", "version": 1}  # wire format unchanged since version 1

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        world = dist.get_world_size(group)
        _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = num_experts // world
        device = x.device
        on_cuda = device.type == "cuda"
        max_sent = min(world, topk) * num_tokens  # a token goes to at most min(R, K) ranks
        idx = topk_idx.long()

        # -- routing and header (device only, no sync) ---------------------------------------------
        # code: 0 = masked (-1), e + 1 = expert e, num_experts + 1 = out of range (< -1 or >= E)
        c = self._constants(device, world, num_experts, hidden, topk, x.dtype)
        code = torch.remainder((idx + 1).clamp_(-1, num_experts + 1), num_experts + 2)
        hist = torch.zeros(num_experts + 2, dtype=torch.int64, device=device)
        hist.scatter_add_(0, code.reshape(-1), c.ones.expand(code.numel()))
        slots = c.slot_of_code.take(code)  # [T, K] destination rank + 1, 0 = routed nowhere (masked or bad)
        in_rank = (slots.unsqueeze(2) == c.ranks).any(1)  # [T, R]
        header = torch.cat([in_rank.sum(0).view(world, 1), hist[num_experts + 1:].expand(world, 1), c.header,
                            hist[1:num_experts + 1].view(world, local)], dim=1)
        recv_header = torch.empty_like(header)
        dist.all_to_all_single(recv_header, header, group=group)
        if on_cuda:
            host = torch.empty((2,) + tuple(header.shape), dtype=torch.int64, pin_memory=True)
            host[0].copy_(header, non_blocking=True)
            host[1].copy_(recv_header, non_blocking=True)
            header_ready = torch.cuda.Event()
            header_ready.record()
        else:
            host = torch.stack([header, recv_header])

        # -- index building with the upper bound, queued before the host waits ------------------
        dest_major = in_rank.t()  # [R, T]: send order is destination-major, tokens ascending
        pairs = torch.nonzero_static(dest_major, size=max_sent, fill_value=0)  # (destination, token), padded
        row_dest, token_ids = pairs[:, 0], pairs[:, 1]
        sent_before = dest_major.reshape(-1).cumsum(0).view(world, num_tokens).t()  # [T, R], inclusive
        positions = F.pad(torch.where(in_rank, sent_before - 1, max_sent), (1, 0), value=max_sent)
        meta = _pack_meta(idx, topk_weights, slots, token_ids, row_dest, local, c.meta_fill)  # [max_sent, 2K] int32
        early = on_cuda if self.gather_before_sync is None else self.gather_before_sync
        rows = x.index_select(0, token_ids) if early else None
        if world > topk:  # at most K destinations per token: one bag entry per distinct destination
            distinct = slots.sort(dim=1).values
            distinct[:, 1:].masked_fill_(distinct[:, 1:] == distinct[:, :-1], 0)
        else:
            distinct = None

        # -- the one host sync -------------------------------------------------------------------
        if on_cuda:
            header_ready.synchronize()
        sent, got = host.tolist()
        _check_header(got, group, num_experts, hidden, topk, x.dtype)
        send_splits = [row[_COUNT] for row in sent]
        recv_splits = [row[_COUNT] for row in got]
        num_sent, num_recv = sum(send_splits), sum(recv_splits)

        # -- payload: rows, then metadata (sizes known, no sync) ----------------------------------
        recv_x = x.new_empty(num_recv, hidden)
        send_rows = rows[:num_sent] if early else x.index_select(0, token_ids[:num_sent])
        dist.all_to_all_single(recv_x, send_rows, recv_splits, send_splits, group=group)
        recv_meta = meta.new_empty(num_recv, 2 * topk)
        dist.all_to_all_single(recv_meta, meta[:num_sent], recv_splits, send_splits, group=group)
        recv_idx = recv_meta[:, :topk].long()
        recv_w = recv_meta[:, topk:].view(torch.float32).contiguous()
        tokens_per_expert = host[1, :, _NUM_FIXED:].sum(0)

        positions.clamp_(max=num_sent)  # the spare row of combine's receive buffer
        bags = positions[:, 1:].contiguous() if distinct is None else positions.gather(1, distinct)
        handle = TorchA2AHandle(token_ids[:num_sent], bags, positions, slots, send_splits, recv_splits,
                                num_tokens, num_experts, num_sent, num_recv)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        import torch.distributed as dist

        h = _check_handle(handle)
        if x.dim() != 2 or x.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(x.shape)}"
            )
        recv = x.new_empty(h.num_recv, x.shape[1])
        dist.all_to_all_single(recv, x.index_select(0, h.token_ids), h.recv_splits, h.send_splits, group=group)
        return recv

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        h = _check_handle(handle)
        num_recv, num_sent = h.num_recv, h.num_sent
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != num_recv:
            raise InvalidInputError(
                f"combine expects x of shape [{num_recv}, H] (one row per row dispatch delivered here, same "
                f"order), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dtype not in _float_dtypes():
            raise InvalidInputError(f"combine expects a bf16/fp16/fp32 tensor, got {x.dtype}")
        topk = h.slots.shape[1]
        if topk_weights is not None and topk_weights.shape != (num_recv, topk):
            raise InvalidInputError(
                f"combine's topk_weights must have shape [{num_recv}, {topk}], got {tuple(topk_weights.shape)}"
            )
        # Rows come back in send order into [S + 1, H]; row S is the spare row empty bag slots point at.
        back = x.new_empty(num_sent + 1, x.shape[1])
        dist.all_to_all_single(back[:num_sent], x.contiguous(), h.send_splits, h.recv_splits, group=group)
        # Per token: fp32 sum of its rows in ascending destination order, one cast to x.dtype (round to nearest
        # even); the same arithmetic as index_add_ into fp32 zeros, bit for bit.
        bags = h.bags
        if x.is_cuda:  # one kernel, the spare row skipped as padding
            combined = F.embedding_bag(bags, back, mode="sum", padding_idx=num_sent)
        elif x.dtype != torch.bfloat16:  # fbgemm's fast path (no padding index allowed) over a zeroed spare row
            back[num_sent].zero_()
            combined = F.embedding_bag(bags, back, mode="sum")
        elif bags.shape[1] <= 2:  # at most 2 rows per token: a bf16 add is their fp32 sum, rounded once
            back[num_sent].zero_()
            combined = back.index_select(0, bags[:, 0])
            if bags.shape[1] == 2:
                combined.add_(back.index_select(0, bags[:, 1]))
        else:  # the padding path: fbgemm's fast path rounds bf16 ties away from zero, this one to nearest even
            combined = F.embedding_bag(bags, back, mode="sum", padding_idx=num_sent)
        combined_w = None
        if topk_weights is not None:
            back_w = torch.empty(num_sent + 1, topk, dtype=torch.float32, device=x.device)
            dist.all_to_all_single(back_w[:num_sent], topk_weights.float().contiguous(), h.send_splits,
                                   h.recv_splits, group=group)
            back_w[num_sent] = 0.0
            # every routed entry has exactly one owner: take its value from the row its owner returned
            combined_w = back_w.gather(0, h.positions.gather(1, h.slots))
        return combined, combined_w

    def _constants(self, device, world: int, num_experts: int, hidden: int, topk: int, dtype) -> "_Consts":
        """Small device constants of one (device, group size, E, H, K, dtype): built once, on the device
        (fills, no host-to-device copy), then reused by every dispatch with that key."""
        import torch

        key = (device, world, num_experts, hidden, topk, dtype)
        consts = self._consts.get(key)
        if consts is None:
            local = num_experts // world
            # code 0 = masked, e + 1 = expert e, E + 1 = bad id -> destination + 1, 0 = nowhere
            slot_of_code = torch.arange(-1, num_experts + 1, device=device).div_(local, rounding_mode="floor").add_(1)
            slot_of_code[0] = slot_of_code[num_experts + 1] = 0
            header = torch.empty(world, 3, dtype=torch.int64, device=device)
            for col, value in enumerate((hidden, topk, _float_dtypes().index(dtype))):
                header[:, col].fill_(value)
            meta_fill = torch.zeros(2 * topk, dtype=torch.int32, device=device)
            meta_fill[:topk] = -1  # masked local id; weight bits 0 = 0.0
            consts = _Consts(torch.ones(1, dtype=torch.int64, device=device),
                             torch.arange(1, world + 1, device=device), slot_of_code, header, meta_fill)
            self._consts[key] = consts
        return consts


@dataclass(frozen=True)
class _Consts:
    ones: "torch.Tensor"  # [1] int64
    ranks: "torch.Tensor"  # [R] 1..R
    slot_of_code: "torch.Tensor"  # [E + 2] destination + 1 of each routing code, 0 = nowhere
    header: "torch.Tensor"  # [R, 3] hidden, top-k, dtype code
    meta_fill: "torch.Tensor"  # [2K] int32: -1 (local id) then 0 (weight bits) for entries a row does not own


def _pack_meta(idx, weights, slots, token_ids, row_dest, local: int, fill) -> "torch.Tensor":
    """Per sent row: local expert ids (-1 where the entry's expert is not on the row's destination),
    then the weights' bits (0.0 there), as one int32 block ``[rows, 2K]``."""
    import torch

    topk = idx.shape[1]
    per_token = torch.cat([torch.remainder(idx, local).to(torch.int32), weights.view(torch.int32),
                           slots.to(torch.int32)], dim=1)
    per_row = per_token.index_select(0, token_ids)
    owned = per_row[:, 2 * topk:] == (row_dest + 1).unsqueeze(1)
    return torch.where(owned.repeat(1, 2), per_row[:, :2 * topk], fill)


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


def _check_header(got: list, group, num_experts: int, hidden: int, topk: int, dtype) -> None:
    """Raise the same error on every rank when any rank sent bad ids or disagrees on shapes.

    ``got``: the received header rows (one list per source rank), already on the host."""
    import torch.distributed as dist

    def ranks(mask) -> list[int]:
        return [dist.get_global_rank(group, i) for i, m in enumerate(mask) if m]

    bad = [row[_BAD] for row in got]
    if any(b > 0 for b in bad):
        raise InvalidInputError(
            f"expert ids out of range on rank(s) {ranks([b > 0 for b in bad])} ({sum(bad)} entries): topk_idx must "
            f"be in [0, {num_experts}) or -1 for a masked (dropped) entry"
        )
    for col, mine, what in ((_HIDDEN, hidden, "hidden size"), (_TOPK, topk, "top-k"),
                            (_DTYPE, _float_dtypes().index(dtype), "dtype code")):
        values = [row[col] for row in got]
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
