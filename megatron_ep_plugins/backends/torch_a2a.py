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

* Everything that does not need the sizes (:func:`_route`) is computed on the device *before* the host
  waits, with the upper bound ``S <= min(R, K) * T``: the header, the destination of every (token, k)
  entry, the (destination, token) pairs in send order (``torch.nonzero_static``), the send position of
  every pair (a cumsum), the packed per-row metadata (local expert ids and weights, one int32 block) and
  combine's gather positions; on CUDA the row gather follows. ``torch.bincount`` and ``nonzero`` (both
  sync on CUDA) are replaced by a ``scatter_add_`` histogram and ``nonzero_static``. The host waits on an
  event recorded right after the header's device-to-host copy, so the GPU keeps gathering while the host
  reads the sizes and launches the collectives.
* On CUDA those ~30 kernels are, from the second dispatch of a token count on, one CUDA graph replay
  (:class:`_RouteGraph`; ``MCORE_EP_TORCH_CUDA_GRAPHS=0`` turns it off). Measured on 2 x H200 (torch
  2.11, T=256): launching them one by one from Python cost about 1.1 ms of host time per dispatch, and the
  host sync makes the GPU wait for all of it.
* Combine receives the rows back into a buffer whose row 0 is a spare (zero) row, and sums them per
  token over precomputed positions (``[T, min(R, K)]``, empty slots pointing at row 0). With at most two
  rows per token (two ranks, or top-1/top-2): on CUDA one Triton kernel reading both rows and writing their
  sum (:mod:`._pair_sum`), else a gather of both rows side by side and one elementwise add of the halves
  (two values add in fp32 and round once, in either order); else
  ``embedding_bag(mode="sum", padding_idx=0)``, on CPU fbgemm's fast path for fp32/fp16 (the padding path
  for bf16, which rounds ties to even where fbgemm's bf16 output does not). Always fp32 accumulation in
  ascending destination order and one rounding to the input dtype: exactly "fp32 sum over destination
  ranks, then cast", bit-identical to doing that with ``index_add_``, with no fp32 copy of the received
  block. (The fp32 copy the old combine made, ``.float()`` of the whole block, was most of a bf16
  combine's time on CPU: a fresh allocation twice the block's size, page-faulted in on every call once it
  passes glibc's mmap threshold; an fp32 combine never paid it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional

from ..config import declare, read_bool
from ..errors import InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Boolean, Capabilities, DispatchResult, EnvVar
from ._cuda_graph import ShapeGraphs, capture_replay
from ._pair_sum import pair_sum

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["SETTINGS", "TorchA2ABackend", "TorchA2AHandle", "ep_register_backends"]

# Header columns sent to every destination rank (int64), then the per-expert counts.
_COUNT, _BAD, _HIDDEN, _TOPK, _DTYPE, _NUM_FIXED = 0, 1, 2, 3, 4, 5


def _float_dtypes() -> tuple:
    import torch

    return (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class TorchA2AHandle:
    """Routing of one dispatch, reused by combine, combine's backward and a cached dispatch."""

    token_ids: "torch.Tensor"  # [S] source token of each sent row, grouped by destination, ascending
    bags: "torch.Tensor"  # [T, min(R, K)] 1 + send position of each of a token's rows, 0 (the spare row) where none
    weight_rows: "torch.Tensor"  # [T, K] 1 + send position of the row owning each top-k entry, 0 where none
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
        #: Replay the routing as a CUDA graph per shape (``MCORE_EP_TORCH_CUDA_GRAPHS``, read once here).
        self.cuda_graphs: bool = read_bool("MCORE_EP_TORCH_CUDA_GRAPHS")
        #: Sum a token's two returned rows with one Triton kernel on CUDA (``MCORE_EP_TORCH_FUSED_SUM``, read once).
        self.fused_sum: bool = read_bool("MCORE_EP_TORCH_FUSED_SUM")
        self._consts: dict = {}  # (device, R, E, hidden, topk, dtype) -> _Consts
        self._graphs = ShapeGraphs(_MAX_GRAPHS)  # (consts key, T, idx dtype) -> _RouteGraph (None: capture failed)
        self._host: dict = {}  # (device, header shape) -> (pinned host buffer, CUDA event)

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        self.num_sms = num_sms  # no kernels of its own: recorded for `explain`, otherwise unused

    def agreement_key(self) -> Mapping[str, Any]:
        return {"algorithm": "all_to_all_single", "version": 1}  # wire format unchanged since version 1

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(group)
        _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        device = x.device
        on_cuda = device.type == "cuda"
        max_sent = min(world, topk) * num_tokens  # a token goes to at most min(R, K) ranks

        # -- routing, header and index building (device only, no sync; one CUDA graph replay once warm) ------
        c = self._constants(device, world, num_experts, hidden, topk, x.dtype)
        r = self._routing(c, topk_idx, topk_weights, num_tokens, max_sent)
        headers = r.headers  # [2, R, 5 + L]: [0] what this rank sends, [1] what it receives
        dist.all_to_all_single(headers[1], headers[0], group=group)
        if on_cuda:
            # one copy of both headers into a pinned buffer kept per shape (read before the next dispatch reuses it)
            host, header_ready = self._host_buffer(headers)
            host.copy_(headers, non_blocking=True)
            header_ready.record()
        else:
            host = headers
        early = on_cuda if self.gather_before_sync is None else self.gather_before_sync
        rows = x.index_select(0, r.token_ids) if early else None  # upper-bound size, overlaps the host's wait

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
        send_rows = rows[:num_sent] if early else x.index_select(0, r.token_ids[:num_sent])
        dist.all_to_all_single(recv_x, send_rows, recv_splits, send_splits, group=group)
        recv_meta = r.meta.new_empty(num_recv, 2 * topk)
        dist.all_to_all_single(recv_meta, r.meta[:num_sent], recv_splits, send_splits, group=group)
        recv_idx = recv_meta[:, :topk].long()
        recv_w = recv_meta[:, topk:].view(torch.float32).contiguous()
        tokens_per_expert = host[1, :, _NUM_FIXED:].sum(0)  # a fresh tensor: the pinned buffer is reused
        handle = TorchA2AHandle(r.token_ids[:num_sent], r.bags, r.weight_rows, r.slots, send_splits, recv_splits,
                                num_tokens, num_experts, num_sent, num_recv)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def _host_buffer(self, headers):
        """The pinned host buffer for this header shape and the event that says the copy into it is done: made
        once, reused by every dispatch (saves a pinned allocation and an event per call; a dispatch reads the
        buffer right after waiting on the event, before any later dispatch can write it)."""
        import torch

        key = (headers.device, headers.shape)
        entry = self._host.get(key)
        if entry is None:
            entry = self._host[key] = (torch.empty(headers.shape, dtype=headers.dtype, pin_memory=True),
                                       torch.cuda.Event())
        return entry

    def _routing(self, c: "_Consts", idx, weights, num_tokens: int, max_sent: int) -> "_Routing":
        """:func:`_route` on this dispatch's inputs; on CUDA, from the second dispatch of a shape on, as one
        replay of a CUDA graph captured for that shape (its outputs copied out of the graph's buffers with
        one clone, since handles outlive the next dispatch)."""
        if not c.graphs or num_tokens == 0:
            return _route(c, idx, weights, num_tokens, max_sent)
        graph = self._graphs.lookup((c.key, num_tokens, idx.dtype),
                                    lambda: _RouteGraph.capture(c, idx, weights, num_tokens, max_sent))
        return _route(c, idx, weights, num_tokens, max_sent) if graph is None else graph(idx, weights)

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
        # Rows come back in send order into [1 + S, H]: row 0 is the spare row that empty bag slots point at.
        back = x.new_empty(num_sent + 1, x.shape[1])
        dist.all_to_all_single(back[1:], x.contiguous(), h.send_splits, h.recv_splits, group=group)
        # Per token: fp32 sum of its rows in ascending destination order, one cast to x.dtype (round to nearest
        # even); the same arithmetic as index_add_ into fp32 zeros, bit for bit.
        bags = h.bags
        width = bags.shape[1]
        if width <= 2 and (x.is_cuda or x.dtype == torch.bfloat16):
            # a token's (at most) two rows gathered side by side, then one elementwise add of the two halves: two
            # values add in fp32 and round once, in either order, the same bits as the fp32 sum then cast. On H200
            # at T=4096 H=7168 bf16: embedding_bag's kernel alone took 422 us, the gather 67 us, a .sum(1) of the
            # pair 123 us (a strided reduction), and index_add_ of the peer's block into the gathered rank-0 rows
            # made combine 100 us slower than .sum(1) (bf16 atomics).
            back[0].zero_()
            if width == 1:
                combined = back.index_select(0, bags.view(-1))
            else:
                # CUDA: one kernel reads both rows and writes their sum (MCORE_EP_TORCH_FUSED_SUM; None = unavailable)
                combined = pair_sum(back, bags) if self.fused_sum and x.is_cuda else None
                if combined is None:
                    both = back.index_select(0, bags.view(-1)).view(bags.shape[0], 2, x.shape[1])
                    combined = torch.add(both[:, 0], both[:, 1])
        elif x.is_cuda or x.dtype == torch.bfloat16:
            # more than two rows: embedding_bag accumulates in fp32 in bag order; the spare row is skipped as
            # padding (on CPU fbgemm's bf16 fast path rounds ties away from zero, the padding path to even)
            combined = F.embedding_bag(bags, back, mode="sum", padding_idx=0)
        else:  # CPU fp32/fp16: fbgemm's fast path (no padding index allowed) over a zeroed spare row
            back[0].zero_()
            combined = F.embedding_bag(bags, back, mode="sum")
        combined_w = None
        if topk_weights is not None:
            back_w = torch.empty(num_sent + 1, topk, dtype=torch.float32, device=x.device)
            dist.all_to_all_single(back_w[1:], topk_weights.float().contiguous(), h.send_splits,
                                   h.recv_splits, group=group)
            back_w[0] = 0.0
            # every routed entry has exactly one owner: take its value from the row its owner returned
            combined_w = back_w.gather(0, h.weight_rows)
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
            consts = _Consts(key, world, num_experts, topk, local, torch.ones(1, dtype=torch.int64, device=device),
                             torch.arange(1, world + 1, device=device), slot_of_code, header, meta_fill,
                             graphs=self.cuda_graphs and device.type == "cuda")
            self._consts[key] = consts
        return consts


_MAX_GRAPHS = 16  # CUDA graphs kept per backend (one per token count); later shapes run eagerly


@dataclass
class _Consts:
    key: tuple
    world: int
    num_experts: int
    topk: int
    local: int
    ones: "torch.Tensor"  # [1] int64
    ranks: "torch.Tensor"  # [R] 1..R
    slot_of_code: "torch.Tensor"  # [E + 2] destination + 1 of each routing code, 0 = nowhere
    header: "torch.Tensor"  # [R, 3] hidden, top-k, dtype code
    meta_fill: "torch.Tensor"  # [2K] int32: -1 (local id) then 0 (weight bits) for entries a row does not own
    graphs: bool = False  # route through CUDA graphs (CUDA and MCORE_EP_TORCH_CUDA_GRAPHS=1)


class _Routing(NamedTuple):
    """What a dispatch computes before it knows the split sizes (all sizes upper bounds: S <= min(R, K) * T)."""

    headers: "torch.Tensor"  # [2, R, 5 + L] int64: [0] row d is what this rank tells rank d (the _COUNT.. columns);
    #                          [1] receives what the ranks tell this one (zeros until the exchange)
    token_ids: "torch.Tensor"  # [max_sent] source token of each sent row, destination-major, tokens ascending
    meta: "torch.Tensor"  # [max_sent, 2K] int32 per sent row: local expert ids, then the weights' bits
    bags: "torch.Tensor"  # [T, min(R, K)] 1 + send position of each of a token's rows, 0 (spare row) where none
    weight_rows: "torch.Tensor"  # [T, K] 1 + send position of the row owning each top-k entry, 0 where none
    slots: "torch.Tensor"  # [T, K] destination + 1 of each top-k entry, 0 = routed nowhere


def _route(c: _Consts, topk_idx, weights, num_tokens: int, max_sent: int) -> _Routing:
    """Everything a dispatch computes on the device before its host sync: a fixed sequence of kernels with
    shapes fixed by (T, K, R, E), no host sync, so it can be captured as a CUDA graph (:class:`_RouteGraph`).

    Send order is destination-major, tokens ascending; send position p of a row is stored as p + 1, so that 0
    can mean "no row" and point at the spare row 0 of combine's receive buffer."""
    import torch
    import torch.nn.functional as F

    world, num_experts, topk = c.world, c.num_experts, c.topk
    idx = topk_idx.long()
    # code: 0 = masked (-1), e + 1 = expert e, num_experts + 1 = out of range (< -1 or >= E)
    code = torch.remainder((idx + 1).clamp_(-1, num_experts + 1), num_experts + 2)
    hist = torch.zeros(num_experts + 2, dtype=torch.int64, device=idx.device)
    hist.scatter_add_(0, code.reshape(-1), c.ones.expand(code.numel()))
    slots = c.slot_of_code.take(code)  # [T, K] destination rank + 1, 0 = routed nowhere (masked or bad)
    in_rank = (slots.unsqueeze(2) == c.ranks).any(1)  # [T, R]
    headers = torch.zeros(2, world, _NUM_FIXED + c.local, dtype=torch.int64, device=idx.device)
    torch.cat([in_rank.sum(0).view(world, 1), hist[num_experts + 1:].expand(world, 1), c.header,
               hist[1:num_experts + 1].view(world, c.local)], dim=1, out=headers[0])
    dest_major = in_rank.t()  # [R, T]
    pairs = torch.nonzero_static(dest_major, size=max_sent, fill_value=0)  # (destination, token), padded
    row_dest, token_ids = pairs[:, 0], pairs[:, 1]
    sent_before = dest_major.reshape(-1).cumsum(0).view(world, num_tokens).t()  # [T, R], inclusive: position + 1
    positions = F.pad(torch.where(in_rank, sent_before, 0), (1, 0))  # [T, 1 + R]: column d + 1 for destination d
    meta = _pack_meta(idx, weights, slots, token_ids, row_dest, c.local, c.meta_fill)
    if world > topk:  # at most K destinations per token: one bag entry per distinct destination
        distinct = slots.sort(dim=1).values
        distinct[:, 1:].masked_fill_(distinct[:, 1:] == distinct[:, :-1], 0)
        bags = positions.gather(1, distinct)
    else:
        bags = positions[:, 1:].contiguous()
    return _Routing(headers, token_ids, meta, bags, positions.gather(1, slots), slots)


def _pack(r: _Routing) -> tuple:
    """The routing's fields as one flat int64 block (int32 fields in pairs) and their (shape, dtype): one clone
    copies them all out of a graph's memory; :class:`_RouteGraph` unpacks them as views."""
    import torch

    flat = torch.cat([(t.view(torch.int64) if t.dtype == torch.int32 else t).reshape(-1) for t in r])
    return flat, [(t.shape, t.dtype) for t in r]


class _RouteGraph:
    """:func:`_route` for one shape as a CUDA graph: 2 input copies, 1 replay and 1 clone instead of about 30
    kernel launches from Python (about 1 ms of host time per dispatch on H200 with torch 2.11, which the host
    sync then exposes). The clone copies the outputs out of the graph's memory, since a handle must outlive
    the next dispatch of the same shape."""

    def __init__(self, replay, layout):
        import torch

        self.replay = replay  # a _cuda_graph.Replay whose outputs are (flat int64 block, layout)
        #: each _Routing field's int64 count in the flat block, then (shape, int32?) to view it as; computed once
        self.sizes = [math.prod(shape) // (2 if dtype == torch.int32 else 1) for shape, dtype in layout]
        self.plan = [(shape, dtype == torch.int32) for shape, dtype in layout]

    @classmethod
    def capture(cls, c: _Consts, topk_idx, weights, num_tokens: int, max_sent: int) -> Optional["_RouteGraph"]:
        replay = capture_replay(lambda idx, w: _pack(_route(c, idx, w, num_tokens, max_sent)), (topk_idx, weights),
                                f"backend 'torch': routing for T={num_tokens} (MCORE_EP_TORCH_CUDA_GRAPHS=0 turns "
                                "capture off)")
        return None if replay is None else cls(replay, replay.outputs[1])

    def __call__(self, topk_idx, weights) -> _Routing:
        import torch

        flat, _ = self.replay(topk_idx, weights)
        parts = flat.clone().split(self.sizes)  # one copy out of the graph's memory, sliced by one call
        int32 = torch.int32
        return _Routing(*(t.view(int32).view(shape) if as_int32 else t.view(shape)
                          for t, (shape, as_int32) in zip(parts, self.plan)))


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


SETTINGS = declare(
    EnvVar("MCORE_EP_TORCH_CUDA_GRAPHS", "1", "`1`: on CUDA, backend `torch` replays its routing (about 30 small "
           "kernels before the dispatch's host sync) as one CUDA graph per token count, captured at the second "
           "dispatch of that count (at most 16 kept); `0`: launch them one by one.", Boolean()),
    EnvVar("MCORE_EP_TORCH_FUSED_SUM", "1", "`1`: on CUDA, backend `torch`'s combine sums a token's two returned rows "
           "(two ranks, or top-1/top-2) with one Triton kernel that reads each row once (same bits as the eager "
           "gather + add; falls back to those, with one warning, where Triton is missing); `0`: gather + add.",
           Boolean()),
)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="torch",
            aliases=("reference", "torch-a2a"),
            priority=0,
            factory=TorchA2ABackend,
            probe=_probe,
            settings=SETTINGS,
            capabilities=Capabilities(devices=("cpu", "cuda"), uneven_tokens=True, async_overlap=False,
                                      deterministic_order=True, internode=True),
            description="reference: torch.distributed all_to_all_single (gloo/NCCL), runs anywhere",
        )
    ]
