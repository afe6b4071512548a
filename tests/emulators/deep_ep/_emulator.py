"""The CPU test double's implementation (see the package docstring: never installed, tests only).

Algorithm (deliberately unlike the reference ``torch`` backend's all-to-all): every communication call
all-gathers every rank's rows plus their routing metadata (one padded ``all_gather`` of raw bytes) and
each rank selects the rows meant for it locally; combine all-gathers the received rows with their
source coordinates and each source rank sums the rows that name it.

DeepEP asserts enforced (an ``AssertionError``/``RuntimeError``/``TypeError`` like the real library):

* V1: ``set_num_sms`` odd; ``get_dispatch_config`` with an unsupported rank count; ``allocate_on_comm_stream``
  without ``previous_event`` and ``async_finish``; ``previous_event`` that is not an ``EventOverlap``;
  probs not float32; topk_idx not int64 or out of ``[-1, num_experts)``; x not bf16/FP8; cached dispatch with
  topk arguments or another token count; layout tensors inconsistent with ``is_token_in_rank``.
* V2: ``previous_event`` without ``allocate_on_comm_stream=True`` (and not a raw ``EventHandle``);
  ``do_handle_copy=True``; ``do_expand=True`` (not emulated); ranks constructed with different
  ``num_max_tokens_per_rank`` (checked with a collective in the constructor -- the real library hangs);
  ``T > num_max_tokens_per_rank`` on any rank (raised on every rank); ``num_experts`` missing without a
  handle; a combine ``num_sms`` different from the dispatch handle's (the real kernel dies with sticky CUDA
  error 719: every later call of that buffer fails too); hidden/top-k larger than the buffer was built for;
  ``topk_idx`` modified while its handle is alive; num_qps above ``num_allocated_qps``.
* HybridEP: unequal token counts across ranks (the real kernels hang; raised on every rank); ``-1`` in
  ``topk_idx`` (the real ``scatter`` faults); probs not float32; routing_map not bool; T above
  ``max_num_of_tokens_per_rank``.

V2 delivers rows inside one source rank's block in random order unless ``deterministic=True`` (the real
kernel orders them by an atomic counter), so tests cannot depend on the order.
"""

from __future__ import annotations

import random
from typing import Optional

import torch
import torch.distributed as dist

from .utils.event import EventHandle, EventOverlap, _PENDING, consume, new_event

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
_SUPPORTED_V1_RANKS = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)


def pending_async_events() -> int:
    """How many async events a call returned that nobody waited on (tests assert 0)."""
    return len(_PENDING)


def reset_emulator_state() -> None:
    _PENDING.clear()
    Buffer.num_sms = 20
    Buffer.num_constructed = 0
    HybridEPBuffer.num_constructed = 0
    _ElasticBuffer.num_constructed = 0


# -- collectives ----------------------------------------------------------------------------------------
def _gather_objects(group, obj) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_if_any(group, error: Optional[str], exc=AssertionError) -> None:
    """Collective: raise on every rank when any rank found an error (where DeepEP would hang)."""
    errors = _gather_objects(group, error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise exc("; ".join(f"rank {r}: {e}" for r, e in bad))


def _gather_rows(group, tensors: list) -> list[list]:
    """All-gather tensors sharing their row count (may differ per rank) as raw bytes in one collective.

    Returns, per rank, the list of that rank's tensors (same dtypes and trailing shapes)."""
    world = dist.get_world_size(group)
    n = tensors[0].shape[0]
    parts, specs = [], []
    for t in tensors:
        t = t.contiguous()
        width = 1
        for d in t.shape[1:]:
            width *= d
        flat = t.reshape(n, width)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        raw = flat.view(torch.uint8) if flat.shape[1] else flat.to(torch.uint8)
        parts.append(raw)
        specs.append((t.dtype, tuple(t.shape[1:]), raw.shape[1]))
    row = torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=torch.uint8)
    sizes = torch.zeros(world, dtype=torch.int64)
    mine = torch.tensor([n], dtype=torch.int64)
    size_list = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(size_list, mine, group=group)
    sizes = [int(s.item()) for s in size_list]
    width = row.shape[1]
    padded = torch.zeros(max(max(sizes), 1), width, dtype=torch.uint8)
    padded[:n] = row
    got = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(got, padded, group=group)
    result = []
    for r in range(world):
        block = got[r][: sizes[r]]
        out, col = [], 0
        for dtype, shape, nbytes in specs:
            raw = block[:, col:col + nbytes].reshape(-1).clone()  # fresh, aligned storage
            col += nbytes
            if dtype == torch.bool:
                t = raw.bool()
            elif nbytes and sizes[r]:
                t = raw.view(dtype)
            else:
                t = torch.empty(sizes[r], 0, dtype=dtype)
            out.append(t.reshape(sizes[r], *shape))
        result.append(out)
    return result


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _unpack_x(x):
    if isinstance(x, tuple):
        assert len(x) == 2, "FP8 input must be (e4m3 tensor, fp32 scales)"
        data, sf = x
        assert data.dtype in _FP8, f"FP8 dispatch expects float8_e4m3fn data, got {data.dtype}"
        assert sf.dtype == torch.float32 and sf.dim() == 2 and sf.shape[0] == data.shape[0], "bad FP8 scales"
        return data, sf
    assert isinstance(x, torch.Tensor) and x.dim() == 2, "x must be [num_tokens, hidden]"
    assert x.dtype == torch.bfloat16, f"DeepEP dispatches bf16 (or FP8 tuples), got {x.dtype}"
    return x, None


def _pack_x(data, sf):
    return (data, sf) if sf is not None else data


def _check_topk(topk_idx, topk_weights, num_tokens, num_experts):
    assert isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2, "topk_idx must be [num_tokens, num_topk]"
    assert topk_idx.dtype == torch.int64, f"topk_idx must be deep_ep.topk_idx_t (int64), got {topk_idx.dtype}"
    assert topk_idx.shape[0] == num_tokens, "topk_idx and x disagree on num_tokens"
    if topk_idx.numel():
        assert int(topk_idx.min()) >= -1 and int(topk_idx.max()) < num_experts, (
            f"device-side assert: expert id out of [-1, {num_experts})")
    if topk_weights is not None:
        assert topk_weights.dtype == torch.float32, "DeepEP only supports float32 probs (topk_weights)"
        assert topk_weights.shape == topk_idx.shape, "topk_weights must have topk_idx's shape"


def _select(per_rank, me, local, shuffle: bool):
    """Rows of every source rank routed to ``me``, source-rank-major (shuffled inside a block if asked)."""
    picks = []
    for src, (idx, in_rank) in enumerate(per_rank):
        rows = in_rank.nonzero().flatten()
        if shuffle and rows.numel() > 1:
            gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**62))
            rows = rows[torch.randperm(rows.numel(), generator=gen)]
        picks.append((src, rows))
    return picks


def _combine_rows(group, x, src_rank, src_idx, num_tokens, topk_weights=None):
    """Every rank's received rows go back to (src_rank, src_idx); fp32 sums, cast to x.dtype."""
    me = dist.get_rank(group)
    tensors = [x, src_rank, src_idx] + ([topk_weights] if topk_weights is not None else [])
    gathered = _gather_rows(group, tensors)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32)
    out_w = None
    if topk_weights is not None:
        out_w = torch.zeros(num_tokens, topk_weights.shape[1], dtype=torch.float32)
    for parts in gathered:
        rows, srank, sidx = parts[0], parts[1], parts[2]
        mask = srank == me
        out.index_add_(0, sidx[mask], rows[mask].float())
        if out_w is not None:
            out_w.index_add_(0, sidx[mask], parts[3][mask].float())  # summed blindly, like the kernels
    return out, out_w


# -- V1 ---------------------------------------------------------------------------------------------------
class Config:
    """``deep_ep.Config``: size hints grow with hidden bytes and rank count."""

    def __init__(self, num_sms: int, nvl_send: int, nvl_recv: int, rdma_send: int = 6, rdma_recv: int = 128):
        self.num_sms, self.nvl_send, self.nvl_recv = num_sms, nvl_send, nvl_recv
        self.rdma_send, self.rdma_recv = rdma_send, rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return _align((hidden_bytes + 128) * self.nvl_recv * min(num_ranks, 8) * (self.num_sms // 2), 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks <= 8:
            return 0
        return _align((hidden_bytes + 128) * self.rdma_recv * (num_ranks // 8) * (self.num_sms // 2) * 2, 128)


class _V1Handle:
    def __init__(self, src_rank, src_idx, num_tokens, is_token_in_rank):
        self.src_rank, self.src_idx = src_rank, src_idx
        self.num_tokens = num_tokens
        self.num_recv = int(src_rank.numel())
        self.is_token_in_rank = is_token_in_rank


def _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream):
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
    consume(previous_event)
    if allocate_on_comm_stream:
        assert previous_event is not None and async_finish, (
            "allocate_on_comm_stream requires previous_event and async_finish")


class Buffer:
    """``deep_ep.Buffer`` (V1, intranode behaviour) on CPU gloo ranks."""

    num_sms = 20
    num_constructed = 0

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False):
        assert num_nvl_bytes >= 0 and num_rdma_bytes >= 0
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        Buffer.num_constructed += 1

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _SUPPORTED_V1_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 24, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in _SUPPORTED_V1_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 10, 256, 6, 128)

    def _hidden_fits(self, data) -> None:
        needed = Buffer.get_dispatch_config(self.group_size).get_nvl_buffer_size_hint(
            data.shape[1] * max(data.element_size(), 2), self.group_size)
        assert needed <= self.num_nvl_bytes, f"NVL buffer too small: need {needed}, have {self.num_nvl_bytes}"

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        _check_topk(topk_idx, None, topk_idx.shape[0], num_experts)
        world = self.group_size
        assert num_experts % world == 0
        local = num_experts // world
        dest = torch.where(topk_idx >= 0, topk_idx // local, world)
        in_rank = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool)
        in_rank.scatter_(1, dest, True)
        in_rank = in_rank[:, :world].contiguous()
        per_rank = in_rank.sum(0).to(torch.int32)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).to(torch.int32)
        per_rdma = None if world <= 8 else per_rank.view(-1, 8).sum(1).to(torch.int32)
        return per_rank, per_rdma, per_expert, in_rank, new_event(async_finish)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish=False, allocate_on_comm_stream=False):
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        data, sf = _unpack_x(x)
        self._hidden_fits(data)
        me, world = self.rank, self.group_size
        if handle is not None:
            assert isinstance(handle, _V1Handle), "handle must come from this Buffer's dispatch"
            assert topk_idx is None and topk_weights is None, "cached dispatch takes no topk arguments"
            assert data.shape[0] == handle.num_tokens, (
                f"cached dispatch: x has {data.shape[0]} tokens, the handle was made for {handle.num_tokens}")
            gathered = _gather_rows(self.group, [data] + ([sf] if sf is not None else []))
            recv = torch.empty(handle.num_recv, data.shape[1], dtype=data.dtype)
            recv_sf = None if sf is None else torch.empty(handle.num_recv, sf.shape[1], dtype=sf.dtype)
            for src in range(world):
                m = handle.src_rank == src
                recv[m] = gathered[src][0][handle.src_idx[m]]
                if sf is not None:
                    recv_sf[m] = gathered[src][1][handle.src_idx[m]]
            return _pack_x(recv, recv_sf), None, None, None, None, new_event(async_finish)

        assert None not in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights), (
            "non-cached dispatch needs the layout (get_dispatch_layout) and topk_idx/topk_weights")
        num_experts = int(num_tokens_per_expert.numel())
        _check_topk(topk_idx, topk_weights, data.shape[0], num_experts)
        assert is_token_in_rank.dtype == torch.bool and is_token_in_rank.shape == (data.shape[0], world)
        assert torch.equal(is_token_in_rank.sum(0).to(torch.int32), num_tokens_per_rank.to(torch.int32)), (
            "num_tokens_per_rank is inconsistent with is_token_in_rank")
        local = num_experts // world
        tensors = [data, topk_idx, topk_weights, is_token_in_rank]  # each rank reads its own column
        if sf is not None:
            tensors.append(sf)
        gathered = _gather_rows(self.group, tensors)
        picks = _select([(g[1], g[3][:, me]) for g in gathered], me, local, shuffle=False)
        return self._finish_dispatch(gathered, picks, me, local, data.shape[0], is_token_in_rank, sf is not None,
                                     expert_alignment, async_finish, zero_foreign_weights=True)

    def _finish_dispatch(self, gathered, picks, me, local, num_tokens, is_token_in_rank, has_sf, alignment,
                         is_async, zero_foreign_weights):
        rows_x, rows_i, rows_w, rows_sf, src_rank, src_idx = [], [], [], [], [], []
        for src, rows in picks:
            g = gathered[src]
            rows_x.append(g[0][rows])
            rows_i.append(g[1][rows])
            rows_w.append(g[2][rows])
            if has_sf:
                rows_sf.append(g[-1][rows])
            src_rank.append(torch.full((rows.numel(),), src, dtype=torch.int64))
            src_idx.append(rows)
        recv_x = torch.cat(rows_x)
        gidx = torch.cat(rows_i)
        owned = (gidx >= 0) & (gidx // local == me)
        recv_idx = torch.where(owned, gidx - me * local, -1)
        recv_w = torch.cat(rows_w)
        if zero_foreign_weights:
            recv_w = torch.where(owned, recv_w, 0.0)
        counts = torch.bincount(recv_idx[owned], minlength=local).tolist()
        counts = [_align(c, alignment) for c in counts]
        handle = _V1Handle(torch.cat(src_rank), torch.cat(src_idx), num_tokens, is_token_in_rank)
        recv_sf = torch.cat(rows_sf) if has_sf else None
        return _pack_x(recv_x, recv_sf), recv_idx, recv_w, counts, handle, new_event(is_async)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        assert isinstance(handle, _V1Handle), "handle must come from this Buffer's dispatch"
        assert isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.bfloat16, "combine takes bf16 [N, H]"
        assert x.shape[0] == handle.num_recv, f"combine: x has {x.shape[0]} rows, dispatch delivered {handle.num_recv}"
        self._hidden_fits(x)
        if topk_weights is not None:
            assert topk_weights.dtype == torch.float32 and topk_weights.shape[0] == handle.num_recv
        out, out_w = _combine_rows(self.group, x, handle.src_rank, handle.src_idx, handle.num_tokens, topk_weights)
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                out += b.float()
        return out.to(x.dtype), out_w, new_event(async_finish)


# -- V2 ---------------------------------------------------------------------------------------------------
class EPHandle:
    """``deep_ep.EPHandle`` subset: the counts, ``num_experts``, ``num_sms``, ``topk_idx`` (version-checked)."""

    def __init__(self, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx, src_rank,
                 src_idx, num_recv_tokens_per_expert_list):
        self.do_expand = False
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.recv_src_metadata = torch.stack([src_rank, src_idx], dim=1)
        self.num_recv_tokens = int(src_rank.numel())
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self._topk_idx = topk_idx
        self._topk_idx_version = topk_idx._version

    @property
    def topk_idx(self):
        assert self._topk_idx._version == self._topk_idx_version, (
            "`topk_idx` must not be modified while the EP handle is in use")
        return self._topk_idx


class _ElasticBuffer:
    """``deep_ep.ElasticBuffer`` (V2) on CPU gloo ranks."""

    num_constructed = 0
    _AUTO_SMS = 24

    def __init__(self, group, num_bytes: Optional[int] = None, num_max_tokens_per_rank: int = 0, hidden: int = 0,
                 num_topk: int = 0, use_fp8_dispatch: bool = False, lb_allocation_plan_or_num_bytes=0,
                 deterministic: bool = False, allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: Optional[int] = None, num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        assert num_bytes is not None or (num_max_tokens_per_rank > 0 and hidden > 0), (
            "provide num_bytes or (num_max_tokens_per_rank, hidden)")
        self.num_bytes = num_bytes if num_bytes is not None else self.get_buffer_size_hint(
            group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch)
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden, self.num_topk, self.use_fp8_dispatch = hidden, num_topk, use_fp8_dispatch
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.num_allocated_qps = num_allocated_qps if num_allocated_qps > 0 else 129
        self._sticky_error: Optional[str] = None
        values = _gather_objects(group, num_max_tokens_per_rank)
        if len(set(values)) != 1:
            raise RuntimeError(f"num_max_tokens_per_rank differs across ranks {values}: all ranks must hold the "
                               "same value (the real ElasticBuffer hangs here)")
        _ElasticBuffer.num_constructed += 1

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        elem = 1 if use_fp8_dispatch else 2
        raw = dist.get_world_size(group) * num_max_tokens_per_rank * (hidden * elem + max(num_topk, 1) * 16) * 4
        return _align(max(raw, 1), 2 << 20)

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def _check_alive(self):
        if self._sticky_error:
            raise RuntimeError(self._sticky_error)

    @staticmethod
    def _stream_args(previous_event, allocate_on_comm_stream):
        if previous_event is not None:
            if not isinstance(previous_event, EventHandle):
                raise TypeError(f"previous_event must be a raw EventHandle (from capture()), got "
                                f"{type(previous_event).__name__}")
            assert allocate_on_comm_stream, "`previous_event` requires `allocate_on_comm_stream=True`"

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0, previous_event=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = False, do_cpu_sync: Optional[bool] = None, do_expand: bool = False,
                 do_zero_padding: bool = False, emit_expert_ids: bool = False,
                 use_tma_aligned_col_major_sf: bool = False, defer_epilogue: bool = False):
        self._check_alive()
        assert not do_handle_copy, "`do_handle_copy` must be False; handle copying is no longer supported"
        assert not do_expand, "emulator: do_expand=True (expert-major layout) is not emulated"
        self._stream_args(previous_event, allocate_on_comm_stream)
        num_sms = self._AUTO_SMS if num_sms == 0 else _align(num_sms, 2)
        if num_qps:
            assert num_qps <= self.num_allocated_qps, "Allocated QPs are not enough"
        data, sf = _unpack_x(x)
        if self.use_fp8_dispatch:
            assert sf is not None, "buffer built for FP8 dispatch (1 byte/element): bf16 tokens do not fit"
        if self.hidden:
            assert data.shape[1] <= self.hidden, f"hidden {data.shape[1]} > buffer hidden {self.hidden}"
        me, world = self.rank, self.num_ranks

        if handle is not None:
            assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
            assert topk_idx is None, "topk_idx must be None when a cached handle is given"
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            num_experts = handle.num_experts if num_experts is None else num_experts
            alignment = handle.expert_alignment if expert_alignment is None else expert_alignment
            max_t = handle.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
            assert (num_experts, alignment, max_t) == (
                handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
            assert data.shape[0] == handle.topk_idx.shape[0], "cached dispatch: token count differs from the handle's"
            gathered = _gather_rows(self.group, [data] + ([sf] if sf is not None else []))
            src_rank, src_idx = handle.recv_src_metadata[:, 0], handle.recv_src_metadata[:, 1]
            recv = torch.empty(handle.num_recv_tokens, data.shape[1], dtype=data.dtype)
            recv_sf = None if sf is None else torch.empty(handle.num_recv_tokens, sf.shape[1], dtype=sf.dtype)
            for src in range(world):
                m = src_rank == src
                recv[m] = gathered[src][0][src_idx[m]]
                if sf is not None:
                    recv_sf[m] = gathered[src][1][src_idx[m]]
            return _pack_x(recv, recv_sf), None, None, handle, new_event(async_with_compute_stream)

        assert num_experts is not None, "num_experts is required unless a handle is given"
        assert num_experts % world == 0
        _check_topk(topk_idx, topk_weights, data.shape[0], num_experts)
        if self.num_topk:
            assert topk_idx.shape[1] <= self.num_topk, f"num_topk {topk_idx.shape[1]} > buffer's {self.num_topk}"
        max_t = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
        alignment = 1 if expert_alignment is None else expert_alignment
        error = None
        if data.shape[0] > max_t:
            error = f"num_tokens {data.shape[0]} > num_max_tokens_per_rank {max_t}"
        _raise_if_any(self.group, error)
        local = num_experts // world
        weights = topk_weights if topk_weights is not None else torch.zeros(topk_idx.shape, dtype=torch.float32)
        dest = torch.where(topk_idx >= 0, topk_idx // local, world)
        in_rank = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool)
        in_rank.scatter_(1, dest, True)
        tensors = [data, topk_idx, weights, in_rank[:, :world]] + ([sf] if sf is not None else [])
        gathered = _gather_rows(self.group, tensors)
        picks = _select([(g[1], g[3][:, me]) for g in gathered], me, local, shuffle=not self.deterministic)
        rx, ri, rw, counts, h1, event = Buffer._finish_dispatch(
            self, gathered, picks, me, local, data.shape[0], None, sf is not None, alignment,
            async_with_compute_stream, zero_foreign_weights=False)
        handle = EPHandle(num_experts, alignment, max_t, num_sms, topk_idx, h1.src_rank, h1.src_idx, counts)
        return rx, ri, (rw if topk_weights is not None else None), handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                defer_epilogue: bool = False):
        self._check_alive()
        self._stream_args(previous_event, allocate_on_comm_stream)
        assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
        num_sms = handle.num_sms if num_sms == 0 else _align(num_sms, 2)
        if num_sms != handle.num_sms:
            self._sticky_error = ("CUDA error: unspecified launch failure (cudaErrorLaunchFailure = 719, sticky): "
                                  f"combine ran with num_sms={num_sms} but its dispatch handle used {handle.num_sms}")
            raise RuntimeError(self._sticky_error)
        topk_idx = handle.topk_idx  # version check
        assert isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == torch.bfloat16, "combine takes bf16 [N, H]"
        assert x.shape[0] == handle.num_recv_tokens, (
            f"combine: x has {x.shape[0]} rows, dispatch delivered {handle.num_recv_tokens}")
        if topk_weights is not None:
            assert topk_weights.dtype == torch.float32 and topk_weights.shape == (x.shape[0], topk_idx.shape[1])
        out, out_w = _combine_rows(self.group, x, handle.recv_src_metadata[:, 0], handle.recv_src_metadata[:, 1],
                                   topk_idx.shape[0], topk_weights)
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                out += b.float()
        return out.to(x.dtype), out_w, new_event(async_with_compute_stream)


ElasticBuffer = _ElasticBuffer


# -- HybridEP ---------------------------------------------------------------------------------------------
class HybridEPBuffer:
    """``deep_ep.HybridEPBuffer`` (hybrid-ep branch) non-permute API on CPU gloo ranks (one NVLink domain)."""

    num_constructed = 0

    def __init__(self, group, hidden_dim: int, max_num_of_tokens_per_rank: int, num_local_experts: int,
                 use_fp8: bool = False, num_sms_dispatch_api: Optional[int] = None,
                 num_sms_combine_api: Optional[int] = None, num_sms_preprocessing_api: Optional[int] = None,
                 num_blocks_permute: Optional[int] = None, num_blocks_unpermute: Optional[int] = None,
                 load_cached_kernels: bool = False, use_shared_buffer: bool = True,
                 enable_custom_allgather: bool = True):
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_of_hybrid_ep_ranks_per_nvlink_domain = self.group_size
        self.local_rank = self.rank % self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.node_rank = self.rank // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.num_of_nodes = 1
        self.hidden_dim = hidden_dim
        self.max_num_of_tokens_per_rank = max_num_of_tokens_per_rank
        self.num_local_experts = num_local_experts
        self.use_fp8 = use_fp8
        HybridEPBuffer.num_constructed += 1

    def dispatch(self, hidden, scaling_factor=None, topk_idx=None, topk_weights=None, num_of_experts=None,
                 probs=None, routing_map=None, num_dispatched_tokens_tensor=None, num_dispatched_tokens=None,
                 handle=None):
        assert isinstance(hidden, torch.Tensor) and hidden.dim() == 2
        assert hidden.dtype == torch.bfloat16 or (self.use_fp8 and hidden.dtype in _FP8), "hidden must be bf16"
        num_tokens = hidden.shape[0]
        assert hidden.shape[1] <= self.hidden_dim, f"hidden {hidden.shape[1]} > buffer hidden_dim {self.hidden_dim}"
        assert num_tokens <= self.max_num_of_tokens_per_rank, (
            "The number of tokens should be less than or equal to the max number of tokens per rank.")
        rpn = self.num_of_hybrid_ep_ranks_per_nvlink_domain
        if routing_map is not None:
            assert routing_map.dtype == torch.bool, "routing_map must be bool"
            num_of_experts = routing_map.shape[1]
        elif topk_idx is not None:
            assert num_of_experts is not None, "The number of experts should be provided on index-based routing."
            if topk_idx.numel() and int(topk_idx.min()) < 0:
                raise RuntimeError("device-side assert: scatter index -1 out of bounds (HybridEP does not handle "
                                   "-1 in topk_idx)")
            routing_map = torch.zeros(num_tokens, num_of_experts, dtype=torch.bool)
            routing_map.scatter_(1, topk_idx.long(), True)
            if topk_weights is not None:
                probs = torch.zeros(num_tokens, num_of_experts, dtype=torch.float32).scatter(
                    1, topk_idx.long(), topk_weights)
        assert handle is not None or routing_map is not None, "The handle and routing_map should not be both None"
        if probs is not None:
            assert probs.dtype == torch.float32, "probs must be float32"
        me = self.rank
        if handle is None:
            # the real preprocessing all-gathers the routing maps: unequal T hangs there; raise instead
            sizes = _gather_objects(self.group, num_tokens)
            if len(set(sizes)) != 1:
                raise RuntimeError(f"HybridEP needs the same token count on every rank, got {sizes} "
                                   "(the real kernels hang here)")
            local = routing_map.shape[1] // self.group_size
            assert local == self.num_local_experts, "routing_map width != num_local_experts * group size"
            tensors = [hidden, routing_map] + ([probs] if probs is not None else [])
            gathered = _gather_rows(self.group, tensors)
            src_rank, src_idx, maps, rows, dprobs = [], [], [], [], []
            node = slice(self.node_rank * rpn * local, (self.node_rank + 1) * rpn * local)
            for src, g in enumerate(gathered):
                mine = g[1][:, me * local:(me + 1) * local]
                sel = mine.any(1).nonzero().flatten()
                src_rank.append(torch.full((sel.numel(),), src, dtype=torch.int64))
                src_idx.append(sel)
                maps.append(mine[sel])
                rows.append(g[0][sel])
                if probs is not None:
                    dprobs.append(g[2][sel][:, node])
            handle = (torch.cat(src_rank), torch.cat(src_idx), torch.cat(maps), num_tokens, num_of_experts)
            out_probs = torch.cat(dprobs) if probs is not None else None
            return torch.cat(rows), out_probs, None, handle
        src_rank, src_idx, _maps, handle_tokens, num_of_experts = handle
        assert num_tokens == handle_tokens, "cached dispatch: token count differs from the handle's"
        tensors = [hidden] + ([probs] if probs is not None else [])
        gathered = _gather_rows(self.group, tensors)
        recv = torch.empty(src_rank.numel(), hidden.shape[1], dtype=hidden.dtype)
        for src in range(self.group_size):
            m = src_rank == src
            recv[m] = gathered[src][0][src_idx[m]]
        return recv, None, None, handle

    def combine(self, hidden, probs=None, handle=None):
        assert handle is not None, "The handle is necessary for combine."
        src_rank, src_idx, _maps, num_tokens, num_of_experts = handle
        assert isinstance(hidden, torch.Tensor) and hidden.dtype == torch.bfloat16 and hidden.dim() == 2
        assert hidden.shape[0] == src_rank.numel(), "combine: row count differs from dispatch's"
        local = self.num_local_experts
        rpn = self.num_of_hybrid_ep_ranks_per_nvlink_domain
        mine = None
        if probs is not None:
            assert probs.dtype == torch.float32 and probs.shape == (hidden.shape[0], local * rpn)
            # each rank's own experts' columns go back, placed at their global expert ids
            mine = torch.zeros(hidden.shape[0], num_of_experts, dtype=torch.float32)
            lo = self.local_rank * local
            mine[:, self.rank * local:(self.rank + 1) * local] = probs[:, lo:lo + local]
        out, out_p = _combine_rows(self.group, hidden, src_rank, src_idx, num_tokens, mine)
        return out.to(hidden.dtype), out_p
