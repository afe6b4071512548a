"""The CPU test double's implementation (see the package docstring: never installed, tests only).

Algorithm (deliberately unlike the reference ``torch`` backend's all-to-all): every communication call
all-gathers every rank's rows plus their routing metadata (one padded ``all_gather`` of raw bytes) and
each rank selects the rows meant for it locally; combine all-gathers the received rows with their
source coordinates and each source rank sums the rows that name it.

Strictness rule: this double is at least as strict as the library it stands for. Every rule below carries a
``# mirrors DeepEP <file>:<line>`` comment naming the source it copies: DeepEP ``main`` at ``DEEPEP_MAIN``
(``deep_ep`` 2.1.0: V1 ``Buffer``, V2 ``ElasticBuffer``) and branch ``hybrid-ep`` at ``DEEPEP_HYBRID_EP``
(``HybridEPBuffer``); DeepEP V2.5's ``EPBuffer`` lives in ``_ep_v25.py`` (it reuses the helpers below).
Failure modes are mimicked:

* a C++ ``EP_HOST_ASSERT`` raises ``RuntimeError("Assertion exception (<file>:<line>): <condition>")``
  (``deep_ep/include/deep_ep/common/exception.cuh``: an ``EPException`` that pybind turns into RuntimeError);
* a Python ``assert`` of DeepEP raises ``AssertionError`` with DeepEP's message;
* a V2 JIT ``EP_STATIC_ASSERT`` raises the NVCC compile failure ``csrc/jit/compiler.hpp:239`` reports
  (``RuntimeError`` naming the static assertion, e.g. "Invalid hidden");
* an ``EP_DEVICE_ASSERT`` (``trap``) raises a sticky "device-side assert" ``RuntimeError`` on every rank and
  kills the buffer (the real kernel traps or hangs the group; every later call of a dead buffer fails);
* where the real library hangs (ranks disagree, one rank overflows) the double raises on every rank.

V2 delivers rows inside one source rank's block in random order unless ``deterministic=True`` (the real
kernel orders them by an atomic counter), so tests cannot depend on the order.

The emulated classes expose only attributes the real objects have (test bookkeeping lives at module level:
:func:`constructed`). ``EMULATED_DEVICE_SMS`` stands for the GPU's SM count (an H200 has 132).
"""

from __future__ import annotations

import os
import random
import warnings
import weakref
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from .utils.event import EventHandle, EventOverlap, _PENDING, consume, new_event

DEEPEP_MAIN = "dd758caf451848bd150e1046af3d0a73e5fff38d"
DEEPEP_HYBRID_EP = "94a9f8f6b146c07d97ec58f67cd6d303296d6098"
EMULATED_DEVICE_SMS = 132

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
# mirrors DeepEP deep_ep/buffers/legacy.py:get_dispatch_config/get_combine_config config_map keys (dd758caf)
_SUPPORTED_V1_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
_CONSTRUCTED = {"Buffer": 0, "ElasticBuffer": 0, "EPBuffer": 0, "HybridEPBuffer": 0}


def pending_async_events() -> int:
    """How many async events a call returned that nobody waited on (tests assert 0)."""
    return len(_PENDING)


def constructed(name: str) -> int:
    """How many ``Buffer``/``ElasticBuffer``/``EPBuffer``/``HybridEPBuffer`` objects were built (test bookkeeping)."""
    return _CONSTRUCTED[name]


def reset_emulator_state() -> None:
    _PENDING.clear()
    Buffer.num_sms = 20
    for name in _CONSTRUCTED:
        _CONSTRUCTED[name] = 0


# -- failure modes ----------------------------------------------------------------------------------------
def _host_assert(cond: bool, where: str, text: str) -> None:
    """``EP_HOST_ASSERT``: an ``EPException`` pybind turns into RuntimeError."""
    # mirrors DeepEP deep_ep/include/deep_ep/common/exception.cuh:28 EP_HOST_ASSERT (dd758caf)
    if not cond:
        raise RuntimeError(f"Assertion exception ({where}): {text}")


def _jit_static_assert(cond: bool, where: str, reason: str, detail: str) -> None:
    """A V2 JIT kernel's ``EP_STATIC_ASSERT``: NVCC fails and DeepEP's compiler host-asserts."""
    # mirrors DeepEP csrc/jit/compiler.hpp:239 "NVCC compilation failed" (dd758caf)
    if not cond:
        raise RuntimeError(f"Assertion exception (csrc/jit/compiler.hpp:239): false and \"NVCC compilation failed\" "
                           f"[NVCC: {where}: error: static assertion failed with \"{reason}\"; {detail}]")


class _Sticky:
    """A dead-buffer flag: after a device trap every later call of that buffer fails (sticky CUDA error)."""

    def __init__(self) -> None:
        self.error: Optional[str] = None

    def check(self) -> None:
        if self.error:
            raise RuntimeError(self.error)

    def trap(self, cond: bool, where: str, text: str) -> None:
        # mirrors DeepEP deep_ep/include/deep_ep/common/exception.cuh:41 EP_DEVICE_ASSERT -> trap (dd758caf)
        if not cond:
            self.error = (f"CUDA error: device-side assert triggered ({where}: {text}); the real kernel traps "
                          "(or the group hangs) and the error is sticky")
            raise RuntimeError(self.error)

    def fail(self, message: str) -> None:
        self.error = message
        raise RuntimeError(message)


def _check_torch_deterministic() -> None:
    # mirrors DeepEP deep_ep/utils/envs.py:183 check_torch_deterministic (dd758caf)
    assert not (torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory)


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


def _select(per_rank, me, shuffle: bool):
    """Rows of every source rank routed to ``me``, source-rank-major (shuffled inside a block if asked)."""
    picks = []
    for src, in_rank in enumerate(per_rank):
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


def _finish_dispatch(gathered, picks, me, local, has_sf, alignment, zero_foreign_weights):
    """Received rows of a non-cached dispatch (shared by V1 and V2): x, local ids, weights, counts, sources."""
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
    recv_sf = torch.cat(rows_sf) if has_sf else None
    return _pack_x(recv_x, recv_sf), recv_idx, recv_w, counts, torch.cat(src_rank), torch.cat(src_idx)


# == V1 ===================================================================================================
class Config:
    """``deep_ep.Config``: size hints grow with hidden bytes, rank count and SM count."""

    def __init__(self, num_sms: int, nvl_send: int, nvl_recv: int, rdma_send: int = 6, rdma_recv: int = 128):
        self.num_sms, self.nvl_send, self.nvl_recv = num_sms, nvl_send, nvl_recv
        self.rdma_send, self.rdma_recv = rdma_send, rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return _align((hidden_bytes + 128) * self.nvl_recv * min(num_ranks, 8) * (self.num_sms // 2), 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks <= 8:
            return 0
        return _align((hidden_bytes + 128) * self.rdma_recv * (num_ranks // 8) * (self.num_sms // 2) * 2, 128)


def _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream):
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
    consume(previous_event)
    if allocate_on_comm_stream:
        # mirrors DeepEP csrc/legacy/buffer.hpp:512 EP_HOST_ASSERT(previous_event.has_value() and async) (dd758caf)
        _host_assert(previous_event is not None and async_finish, "csrc/legacy/buffer.hpp:512",
                     "previous_event.has_value() and async (allocate_on_comm_stream requires previous_event and "
                     "async_finish)")


def _v1_hidden_rules(sticky: _Sticky, num_ranks: int, hidden: int, elem: int, num_scales: int, num_topk: int,
                     op: str) -> None:
    """The V1 kernels' hidden/top-k rules for one call (``op``: dispatch, cached dispatch or combine)."""
    hidden_bytes = hidden * elem
    internode = num_ranks > 8
    if op == "combine":
        # mirrors DeepEP csrc/legacy/buffer.hpp:750 (intranode) / :1285 (internode) hidden bytes % sizeof(int4) (dd758caf)
        _host_assert(hidden_bytes % 16 == 0, "csrc/legacy/buffer.hpp:750", "(hidden * x.element_size()) % sizeof(int4) == 0")
        # mirrors DeepEP csrc/kernels/legacy/intranode.cu:730 / internode.cu:1754 EP_DEVICE_ASSERT(num_topk <= 32) (dd758caf)
        sticky.trap(num_topk <= 32, "csrc/kernels/legacy/intranode.cu:730", "num_topk <= 32")
        if internode:
            # mirrors DeepEP csrc/kernels/legacy/internode.cu:1588 EP_DEVICE_ASSERT(hidden_int4 % 32 == 0) (dd758caf)
            sticky.trap((hidden_bytes // 16) % 32 == 0, "csrc/kernels/legacy/internode.cu:1588", "hidden_int4 % 32 == 0")
            token = _align(hidden_bytes + 8 + 4 * num_topk, 16)
            # mirrors DeepEP csrc/kernels/legacy/internode.cu:1816 (kNumTMABytesPerSenderWarp = 16384 at :2313) (dd758caf)
            sticky.trap(token + 8 <= 16384, "csrc/kernels/legacy/internode.cu:1816",
                        "num_bytes_per_token + sizeof(uint64_t) <= kNumTMABytesPerSenderWarp")
        return
    # mirrors DeepEP csrc/legacy/buffer.hpp:458 (intranode) / :930 (internode) hidden bytes % sizeof(int4) (dd758caf)
    _host_assert(hidden_bytes % 16 == 0, "csrc/legacy/buffer.hpp:458", "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
    # mirrors DeepEP csrc/kernels/legacy/intranode.cu:251 / internode.cu:519 EP_DEVICE_ASSERT(num_topk <= 32) (dd758caf)
    sticky.trap(num_topk <= 32, "csrc/kernels/legacy/intranode.cu:251", "num_topk <= 32")
    if internode:
        token = _align(hidden_bytes + 8 + 4 * num_scales + 8 * num_topk, 16)
        # mirrors DeepEP csrc/kernels/legacy/internode.cu:578 (kNumTMABytesPerWarp = 16384 at :1254) (dd758caf)
        sticky.trap(token + 8 <= 16384, "csrc/kernels/legacy/internode.cu:578",
                    "num_bytes_per_token + sizeof(uint64_t) <= kNumTMABytesPerWarp")
    else:
        hidden_int4 = hidden_bytes // 16
        half_bytes = hidden_int4 // 2 * 16
        # mirrors DeepEP csrc/kernels/legacy/intranode.cu:304 (kNumTMABytesPerWarp = 8192 at :577) (dd758caf)
        sticky.trap(hidden_int4 % 2 == 0 and half_bytes + 8 <= 8192, "csrc/kernels/legacy/intranode.cu:304",
                    f"hidden_int4 % 2 == 0 and half_hidden_bytes + sizeof(uint64_t) <= kNumTMABytesPerWarp "
                    f"(hidden={hidden}, {elem}-byte elements)")


def _v1_nvl_fits(buf, config, data, where: str) -> None:
    needed = config.get_nvl_buffer_size_hint(data.shape[1] * max(data.element_size(), 2), buf.group_size)
    # mirrors DeepEP csrc/legacy/buffer.hpp:627 (dispatch) / :807 (combine) buffer-size host asserts (dd758caf)
    _host_assert(needed <= buf.num_nvl_bytes, where, f"<buffer layout for this config> <= num_nvl_bytes (need "
                 f"{needed}, have {buf.num_nvl_bytes})")


def _v1_num_channels(config) -> int:
    # mirrors DeepEP csrc/legacy/buffer.hpp:436 EP_HOST_ASSERT(config.num_sms % 2 == 0) (dd758caf)
    _host_assert(config.num_sms % 2 == 0, "csrc/legacy/buffer.hpp:436", "config.num_sms % 2 == 0")
    return config.num_sms // 2


def _v1_sources(buf, rank_prefix_matrix, num_recv):
    """Source rank of each received row: rows arrive source-rank-major (V1's ``rank_prefix_matrix``)."""
    counts = torch.diff(rank_prefix_matrix[:, buf.rank].long(), prepend=torch.zeros(1, dtype=torch.long))
    return torch.repeat_interleave(torch.arange(buf.group_size), counts)[:num_recv]


class Buffer:
    """``deep_ep.Buffer`` (V1) on CPU gloo ranks (the intranode data path; internode rules are checked too)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None):
        # mirrors DeepEP deep_ep/buffers/legacy.py:Buffer.__init__ signature and attributes (dd758caf)
        if group is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.rank = group.rank()
        self.group = group
        self.group_size = group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        n = self.group_size
        # mirrors DeepEP csrc/legacy/buffer.hpp:107-116 constructor host asserts (dd758caf)
        _host_assert(num_nvl_bytes % 128 == 0, "csrc/legacy/buffer.hpp:107", "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0")
        _host_assert(num_rdma_bytes % 128 == 0, "csrc/legacy/buffer.hpp:109", "num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0")
        _host_assert(n <= 8 * 20 or low_latency_mode, "csrc/legacy/buffer.hpp:113", "num_ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS")
        _host_assert(n < 8 or n % 8 == 0, "csrc/legacy/buffer.hpp:114", "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        if num_rdma_bytes > 0:
            _host_assert(n > 8 or low_latency_mode, "csrc/legacy/buffer.hpp:116", "num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode")
        self.runtime = _Sticky()  # the C++ runtime; here: the sticky-error state
        _gather_objects(group, self.rank)  # the real constructor all-gathers device ids and IPC handles
        _CONSTRUCTED["Buffer"] += 1

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        # mirrors DeepEP deep_ep/buffers/legacy.py:Buffer.set_num_sms (dd758caf)
        assert new_num_sms % 2 == 0, 'The SM count must be even'
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        # mirrors DeepEP deep_ep/buffers/legacy.py:get_dispatch_config config_map (dd758caf)
        assert num_ranks in _SUPPORTED_V1_RANKS, f'Unsupported number of EP ranks: {num_ranks}'
        return Config(Buffer.num_sms, 24, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        # mirrors DeepEP deep_ep/buffers/legacy.py:get_combine_config config_map (dd758caf)
        assert num_ranks in _SUPPORTED_V1_RANKS, f'Unsupported number of EP ranks: {num_ranks}'
        return Config(Buffer.num_sms, 10, 256, 6, 128)

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        self.runtime.check()
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        # mirrors DeepEP csrc/legacy/buffer.hpp:343-345 get_dispatch_layout host asserts (dd758caf)
        _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "csrc/legacy/buffer.hpp:343", "topk_idx.dim() == 2")
        _host_assert(num_experts > 0, "csrc/legacy/buffer.hpp:345", "num_experts > 0")
        _check_topk(topk_idx, None, topk_idx.shape[0], num_experts)
        world = self.group_size
        local = max(num_experts // world, 1)
        dest = torch.where(topk_idx >= 0, topk_idx // local, world).clamp(max=world)
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
        self.runtime.check()
        _check_torch_deterministic()
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if self.group_size > 8:
            # mirrors DeepEP deep_ep/buffers/legacy.py:Buffer.dispatch internode branch (dd758caf)
            assert num_worst_tokens == 0, 'Internode dispatch does not support `num_worst_tokens > 0`'
        num_channels = _v1_num_channels(config)
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        data, sf = _unpack_x(x)
        # mirrors DeepEP csrc/legacy/buffer.hpp:457 EP_HOST_ASSERT(x.dim() == 2 and x.is_contiguous()) (dd758caf)
        _host_assert(data.is_contiguous(), "csrc/legacy/buffer.hpp:457", "x.dim() == 2 and x.is_contiguous()")
        me, world = self.rank, self.group_size
        num_scales = 0 if sf is None else sf.shape[1]
        if sf is not None:
            # mirrors DeepEP csrc/legacy/buffer.hpp:498-501 FP8 scale host asserts (dd758caf)
            _host_assert(data.element_size() == 1, "csrc/legacy/buffer.hpp:498", "x.element_size() == 1")
            _host_assert(sf.dtype in (torch.float32, torch.int32), "csrc/legacy/buffer.hpp:499",
                         "x_scales->scalar_type() == torch::kFloat32 or x_scales->scalar_type() == torch::kInt")
        if handle is not None:
            # mirrors DeepEP deep_ep/buffers/legacy.py:Buffer.dispatch cached branch (dd758caf)
            assert topk_idx is None and topk_weights is None
            rank_prefix_matrix, channel_prefix_matrix, _, recv_src_idx, in_rank, _ = handle
            # mirrors DeepEP csrc/legacy/buffer.hpp:460 / :465 cached-mode host asserts (dd758caf)
            _host_assert(in_rank.shape[0] == data.shape[0], "csrc/legacy/buffer.hpp:460",
                         "is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == num_ranks")
            _host_assert(channel_prefix_matrix.shape[1] == num_channels, "csrc/legacy/buffer.hpp:465",
                         "cached_channel_prefix_matrix->size(1) == num_channels (the SM count changed since the "
                         "handle's dispatch)")
            _v1_nvl_fits(self, config, data, "csrc/legacy/buffer.hpp:627")
            _v1_hidden_rules(self.runtime, world, data.shape[1], data.element_size(), num_scales, 0, "dispatch")
            num_recv = recv_src_idx.shape[0]
            gathered = _gather_rows(self.group, [data] + ([sf] if sf is not None else []))
            src_rank, src_idx = _v1_sources(self, rank_prefix_matrix, num_recv), recv_src_idx.long()
            recv = torch.empty(num_recv, data.shape[1], dtype=data.dtype)
            recv_sf = None if sf is None else torch.empty(num_recv, sf.shape[1], dtype=sf.dtype)
            for src in range(world):
                m = src_rank == src
                recv[m] = gathered[src][0][src_idx[m]]
                if sf is not None:
                    recv_sf[m] = gathered[src][1][src_idx[m]]
            return _pack_x(recv, recv_sf), None, None, None, None, new_event(async_finish)

        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        num_experts = int(num_tokens_per_expert.numel())
        # mirrors DeepEP csrc/legacy/buffer.hpp:468-469 expert-count host asserts (dd758caf)
        _host_assert(num_experts % world == 0, "csrc/legacy/buffer.hpp:468", "num_tokens_per_expert->size(0) % num_ranks == 0")
        _host_assert(num_experts // world <= 1024, "csrc/legacy/buffer.hpp:469",
                     "num_tokens_per_expert->size(0) / num_ranks <= NUM_MAX_LOCAL_EXPERTS")
        # mirrors DeepEP csrc/legacy/buffer.hpp:481-489 top-k host asserts (dd758caf)
        _host_assert((topk_idx is None) == (topk_weights is None), "csrc/legacy/buffer.hpp:481",
                     "topk_idx.has_value() == topk_weights.has_value()")
        assert topk_idx is not None, "emulator: a non-cached dispatch without top-k arguments is not emulated"
        _host_assert(topk_weights.dtype == torch.float32, "csrc/legacy/buffer.hpp:489",
                     "topk_weights->scalar_type() == torch::kFloat32 (DeepEP only supports float32 probs)")
        _check_topk(topk_idx, topk_weights, data.shape[0], num_experts)
        assert is_token_in_rank.dtype == torch.bool and is_token_in_rank.shape == (data.shape[0], world)
        assert torch.equal(is_token_in_rank.sum(0).to(torch.int32), num_tokens_per_rank.to(torch.int32)), (
            "num_tokens_per_rank is inconsistent with is_token_in_rank")
        if world <= 8:
            # mirrors DeepEP csrc/kernels/legacy/intranode.cu:167-168 notify_dispatch host asserts (dd758caf)
            _host_assert(num_experts % world == 0, "csrc/kernels/legacy/intranode.cu:167", "num_experts % num_ranks == 0")
            _host_assert(num_experts // world <= 128 and world <= 128, "csrc/kernels/legacy/intranode.cu:168",
                         "num_experts / num_ranks <= kNumThreads and num_ranks <= kNumThreads")
        else:
            # mirrors DeepEP csrc/kernels/legacy/internode.cu:227 EP_DEVICE_ASSERT(num_rdma_experts <= num_threads) (dd758caf)
            self.runtime.trap(num_experts // (world // 8) <= 512, "csrc/kernels/legacy/internode.cu:227",
                              "num_rdma_experts <= num_threads")
        _v1_nvl_fits(self, config, data, "csrc/legacy/buffer.hpp:627")
        _v1_hidden_rules(self.runtime, world, data.shape[1], data.element_size(), num_scales, topk_idx.shape[1],
                         "dispatch")
        local = num_experts // world
        tensors = [data, topk_idx, topk_weights, is_token_in_rank]  # each rank reads its own column
        if sf is not None:
            tensors.append(sf)
        gathered = _gather_rows(self.group, tensors)
        picks = _select([g[3][:, me] for g in gathered], me, shuffle=False)
        recv_x, recv_idx, recv_w, counts, src_rank, src_idx = _finish_dispatch(
            gathered, picks, me, local, sf is not None, expert_alignment, zero_foreign_weights=True)
        # the handle is V1's 6-tuple; rank_prefix_matrix[i, j] = tokens from ranks <= i to rank j
        per_pair = torch.stack([g[3].sum(0) for g in gathered]).to(torch.int32)
        rank_prefix_matrix = per_pair.cumsum(0).to(torch.int32)
        channel_prefix_matrix = torch.zeros(world, num_channels, dtype=torch.int32)
        send_head = torch.zeros(data.shape[0], world, dtype=torch.int32)
        handle = (rank_prefix_matrix, channel_prefix_matrix, channel_prefix_matrix.clone(),
                  src_idx.to(torch.int32), is_token_in_rank, send_head)
        return recv_x, recv_idx, recv_w, counts, handle, new_event(async_finish)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        self.runtime.check()
        _check_torch_deterministic()
        config = self.get_combine_config(self.group_size) if config is None else config
        num_channels = _v1_num_channels(config)
        _v1_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        # mirrors DeepEP deep_ep/buffers/legacy.py:Buffer.combine handle unpacking (dd758caf)
        rank_prefix_matrix, _, channel_prefix_matrix, src_idx, is_recv_token_in_rank, send_head = handle
        num_recv = src_idx.shape[0]
        assert isinstance(x, torch.Tensor) and x.dim() == 2
        # mirrors DeepEP csrc/kernels/legacy/launch.cuh SWITCH_TYPES (CUDA_R_16BF only) (dd758caf)
        _host_assert(x.dtype == torch.bfloat16, "csrc/kernels/legacy/launch.cuh:109", "false and \"Unsupported type\"")
        # mirrors DeepEP csrc/legacy/buffer.hpp:732 / :746 / :749 combine host asserts (dd758caf)
        _host_assert(x.is_contiguous(), "csrc/legacy/buffer.hpp:732", "x.dim() == 2 and x.is_contiguous()")
        _host_assert(x.shape[0] == num_recv, "csrc/legacy/buffer.hpp:746", "src_idx.size(0) == num_tokens")
        _host_assert(channel_prefix_matrix.shape[1] == num_channels, "csrc/legacy/buffer.hpp:749",
                     "channel_prefix_matrix.size(1) == num_channels (the SM count changed since the dispatch)")
        num_topk = 0
        if topk_weights is not None:
            # mirrors DeepEP csrc/legacy/buffer.hpp:772-774 (dd758caf)
            _host_assert(topk_weights.dim() == 2 and topk_weights.shape[0] == num_recv, "csrc/legacy/buffer.hpp:773",
                         "topk_weights->size(0) == num_tokens")
            _host_assert(topk_weights.dtype == torch.float32, "csrc/legacy/buffer.hpp:774",
                         "topk_weights->scalar_type() == torch::kFloat32")
            num_topk = topk_weights.shape[1]
        _v1_nvl_fits(self, config, x, "csrc/legacy/buffer.hpp:807")
        _v1_hidden_rules(self.runtime, self.group_size, x.shape[1], x.element_size(), 0, num_topk, "combine")
        src_rank = _v1_sources(self, rank_prefix_matrix, num_recv)
        out, out_w = _combine_rows(self.group, x, src_rank, src_idx.long(), is_recv_token_in_rank.shape[0],
                                   topk_weights)
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                out += b.float()
        return out.to(x.dtype), out_w, new_event(async_finish)


# == V2 ===================================================================================================
_HANDLE_TOPK = weakref.WeakKeyDictionary()  # EPHandle -> (topk_idx, its version at dispatch)


class EPHandle:
    """``deep_ep.EPHandle`` subset: the counts, ``num_experts``, ``num_sms``, ``topk_idx``, source metadata.

    With ``do_handle_copy=False`` the handle holds the caller's ``topk_idx``; modifying it in place while the
    handle lives silently corrupts the real combine, which this double turns into an assert."""

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
        _HANDLE_TOPK[self] = (topk_idx, topk_idx._version)

    @property
    def topk_idx(self):
        topk_idx, version = _HANDLE_TOPK[self]
        assert topk_idx._version == version, (
            "`topk_idx` must not be modified while the EP handle is in use (dispatch with do_handle_copy=False)")
        return topk_idx


def _v2_stream_args(previous_event, allocate_on_comm_stream):
    if previous_event is not None:
        if not isinstance(previous_event, EventHandle):
            raise TypeError(f"previous_event must be a raw EventHandle (from capture()), got "
                            f"{type(previous_event).__name__}")
        # mirrors DeepEP csrc/elastic/buffer.hpp:540 EP_HOST_ASSERT(allocate_on_comm_stream) (dd758caf)
        _host_assert(allocate_on_comm_stream, "csrc/elastic/buffer.hpp:540",
                     "allocate_on_comm_stream (`previous_event` requires `allocate_on_comm_stream=True`)")


class _ElasticBuffer:
    """``deep_ep.ElasticBuffer`` (V2) on CPU gloo ranks (one NVLink domain: no hybrid mode kernels)."""

    def __init__(self, group, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False):
        # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.__init__ signature and attributes (dd758caf)
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        if num_bytes is None:
            num_bytes = self.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                                  allow_hybrid_mode, allow_multiple_reduction)
        # mirrors DeepEP csrc/elastic/buffer.hpp:98 EP_HOST_ASSERT(num_buffer_bytes % kNumAlignmentBytes == 0) (dd758caf)
        _host_assert(num_bytes > 0 and num_bytes % (2 << 20) == 0, "csrc/elastic/buffer.hpp:98",
                     "num_buffer_bytes > 0 and num_buffer_bytes % symmetric::kNumAlignmentBytes == 0")
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.__init__ automatic QP count (dd758caf)
        if num_allocated_qps == 0:
            num_allocated_qps = 129 if allow_hybrid_mode else 17
        self.num_allocated_qps = num_allocated_qps
        self.explicitly_destroy = explicitly_destroy
        # the C++ runtime; here: what the emulator needs to check sizes, and the sticky-error state
        self.runtime = SimpleNamespace(hidden=hidden, num_topk=num_topk, use_fp8_dispatch=use_fp8_dispatch,
                                       sticky=_Sticky())
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        values = _gather_objects(group, num_max_tokens_per_rank)
        if len(set(values)) != 1:
            raise RuntimeError(f"num_max_tokens_per_rank differs across ranks {values}: all ranks must hold the "
                               "same value (the real ElasticBuffer hangs here)")
        _CONSTRUCTED["ElasticBuffer"] += 1

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        # mirrors DeepEP csrc/elastic/buffer.hpp:657 / :660 calculate_buffer_size host asserts (dd758caf)
        _host_assert(num_max_tokens_per_rank > 0 and hidden > 0, "csrc/elastic/buffer.hpp:657",
                     "num_max_tokens_per_rank > 0 and hidden > 0")
        _host_assert(-(-hidden // 32) * 4 <= hidden, "csrc/elastic/buffer.hpp:660",
                     "math::ceil_div(hidden, 32) * sizeof(float) <= hidden")
        elem = 1 if use_fp8_dispatch else 2
        num_topk = num_topk or 32
        raw = group.size() * num_max_tokens_per_rank * (hidden * elem + num_topk * 16) * 4
        return _align(max(raw, 1), 2 << 20)

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        # mirrors DeepEP deep_ep/buffers/elastic.py:get_theoretical_num_sms asserts (dd758caf); the count is fixed here
        assert num_scaleout_topk == 0
        assert num_experts % self.num_ranks == 0  # get_expected_topk: a TypeError for num_experts=None, as the real one
        return 24

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        # mirrors DeepEP deep_ep/buffers/elastic.py:get_theoretical_num_qps (dd758caf)
        num_qps = min(num_sms, 8 + 1)
        if self.allow_hybrid_mode:
            num_qps = num_sms * 16 + 1
        return min(num_qps, self.num_allocated_qps)

    def get_physical_domain_size(self):
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self):
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0, previous_event=None,
                 previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False, handle=None, do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False):
        # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.dispatch signature and defaults (dd758caf)
        sticky = self.runtime.sticky
        sticky.check()
        _check_torch_deterministic()
        assert not do_expand, "emulator: do_expand=True (expert-major layout) is not emulated"
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else num_sms
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, 'Allocated QPs are not enough'
        _v2_stream_args(previous_event, allocate_on_comm_stream)
        data, sf = _unpack_x(x)
        rt = self.runtime
        me, world = self.rank_idx, self.num_ranks
        if handle is not None:
            assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
            # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.dispatch cached-handle asserts (dd758caf)
            assert topk_idx is None
            assert do_cpu_sync is None or not do_cpu_sync, 'Cannot do CPU sync with cached handle'
            num_max_tokens_per_rank = handle.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
            num_experts = handle.num_experts if num_experts is None else num_experts
            expert_alignment = handle.expert_alignment if expert_alignment is None else expert_alignment
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                   (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        max_t = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
        alignment = 1 if expert_alignment is None else expert_alignment
        # mirrors DeepEP csrc/elastic/buffer.hpp:728 EP_HOST_ASSERT(num_sms > 0) (dd758caf)
        _host_assert(num_sms > 0, "csrc/elastic/buffer.hpp:728", "num_sms > 0")
        # mirrors DeepEP csrc/elastic/buffer.hpp:754-756 data host asserts (dd758caf)
        _host_assert(data.is_contiguous(), "csrc/elastic/buffer.hpp:754", "x.is_cuda() and x.is_contiguous()")
        _host_assert((data.shape[1] * data.element_size()) % 16 == 0, "csrc/elastic/buffer.hpp:755",
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        if sf is not None:
            # mirrors DeepEP csrc/elastic/buffer.hpp:765-767 SF host asserts (dd758caf)
            _host_assert(sf.shape[0] == data.shape[0], "csrc/elastic/buffer.hpp:765", "num_tokens == num_tokens_")
            _host_assert(sf.element_size() == 4, "csrc/elastic/buffer.hpp:767", "sf->element_size() == sizeof(sf_pack_t)")
        if rt.use_fp8_dispatch:
            assert sf is not None, "buffer built for FP8 dispatch (1 byte/element): bf16 tokens do not fit"
        if rt.hidden:
            # mirrors DeepEP csrc/elastic/buffer.hpp:963 EP_HOST_ASSERT(get_dispatch_buffer_size(...) <= num_buffer_bytes) (dd758caf)
            _host_assert(data.shape[1] <= rt.hidden and num_topk <= (rt.num_topk or 32), "csrc/elastic/buffer.hpp:963",
                         f"get_dispatch_buffer_size(...) <= num_buffer_bytes (hidden {data.shape[1]} / top-k {num_topk} "
                         f"above the buffer's {rt.hidden} / {rt.num_topk})")
        # mirrors DeepEP csrc/elastic/buffer.hpp:979 EP_HOST_ASSERT(num_sms <= device SMs) (dd758caf)
        _host_assert(num_sms <= EMULATED_DEVICE_SMS, "csrc/elastic/buffer.hpp:979", "num_sms <= jit::device_runtime->get_num_sms()")
        # mirrors DeepEP deep_ep/include/deep_ep/impls/dispatch.cuh:93 EP_STATIC_ASSERT(kNumTopk <= 32, "Insufficient lanes") (dd758caf)
        _jit_static_assert(num_topk <= 32, "deep_ep/include/deep_ep/impls/dispatch.cuh:93", "Insufficient lanes",
                           f"kNumTopk={num_topk}")

        if handle is not None:
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
        # mirrors DeepEP csrc/elastic/buffer.hpp:777-778 topk_idx host asserts (dd758caf)
        _host_assert(topk_idx.dtype == torch.int64 and topk_idx.is_contiguous(), "csrc/elastic/buffer.hpp:777",
                     "topk_idx.scalar_type() == topk_idx_t and topk_idx.is_contiguous()")
        # mirrors DeepEP csrc/elastic/buffer.hpp:805 EP_HOST_ASSERT(num_experts % num_ranks == 0) (dd758caf)
        _host_assert(num_experts % world == 0, "csrc/elastic/buffer.hpp:805", "num_experts % nccl_context->num_ranks == 0")
        _check_topk(topk_idx, topk_weights, data.shape[0], num_experts)
        error = None
        if data.shape[0] > max_t:
            # mirrors DeepEP csrc/elastic/buffer.hpp:756 EP_HOST_ASSERT(num_tokens <= num_max_tokens_per_rank) (dd758caf)
            error = (f"Assertion exception (csrc/elastic/buffer.hpp:756): num_tokens <= num_max_tokens_per_rank "
                     f"({data.shape[0]} > {max_t}; the other ranks hang in the real kernel)")
        _raise_if_any(self.group, error, RuntimeError)
        local = num_experts // world
        weights = topk_weights if topk_weights is not None else torch.zeros(topk_idx.shape, dtype=torch.float32)
        dest = torch.where(topk_idx >= 0, topk_idx // local, world)
        in_rank = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool)
        in_rank.scatter_(1, dest, True)
        tensors = [data, topk_idx, weights, in_rank[:, :world]] + ([sf] if sf is not None else [])
        gathered = _gather_rows(self.group, tensors)
        picks = _select([g[3][:, me] for g in gathered], me, shuffle=not self.deterministic)
        rx, ri, rw, counts, src_rank, src_idx = _finish_dispatch(gathered, picks, me, local, sf is not None,
                                                                  alignment, zero_foreign_weights=False)
        # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.dispatch EPHandle(..., cloned_topk_idx if do_handle_copy else topk_idx) (dd758caf)
        kept_idx = topk_idx.clone() if do_handle_copy else topk_idx
        handle = EPHandle(num_experts, alignment, max_t, num_sms, kept_idx, src_rank, src_idx, counts)
        return rx, ri, (rw if topk_weights is not None else None), handle, new_event(async_with_compute_stream)

    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False):
        # mirrors DeepEP deep_ep/buffers/elastic.py:ElasticBuffer.combine signature and defaults (dd758caf)
        sticky = self.runtime.sticky
        sticky.check()
        _check_torch_deterministic()
        assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
        num_sms = handle.num_sms if num_sms == 0 else num_sms
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, 'Allocated QPs are not enough'
        _v2_stream_args(previous_event, allocate_on_comm_stream)
        if num_sms != handle.num_sms:
            sticky.fail("CUDA error: unspecified launch failure (cudaErrorLaunchFailure = 719, sticky): "
                        f"combine ran with num_sms={num_sms} but its dispatch handle used {handle.num_sms}")
        topk_idx = handle.topk_idx  # version check
        assert isinstance(x, torch.Tensor) and x.dim() == 2
        # mirrors DeepEP csrc/elastic/buffer.hpp:1202-1204 combine host asserts (dd758caf)
        _host_assert(x.is_contiguous(), "csrc/elastic/buffer.hpp:1202", "x.is_cuda() and x.is_contiguous()")
        _host_assert(x.dtype == torch.bfloat16, "csrc/elastic/buffer.hpp:1203", "x.scalar_type() == torch::kBFloat16")
        _host_assert((x.shape[1] * x.element_size()) % 16 == 0, "csrc/elastic/buffer.hpp:1204",
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        # mirrors DeepEP csrc/elastic/buffer.hpp:1219 num_reduced_tokens == num_tokens (dd758caf)
        _host_assert(x.shape[0] == handle.num_recv_tokens, "csrc/elastic/buffer.hpp:1219",
                     f"num_reduced_tokens == num_tokens ({x.shape[0]} rows, dispatch delivered {handle.num_recv_tokens})")
        if topk_weights is not None:
            # mirrors DeepEP csrc/elastic/buffer.hpp:1231-1234 (dd758caf)
            _host_assert(topk_weights.shape == (x.shape[0], topk_idx.shape[1]), "csrc/elastic/buffer.hpp:1231",
                         "num_tokens == num_tokens__ and num_topk == num_topk__")
            _host_assert(topk_weights.dtype == torch.float32, "csrc/elastic/buffer.hpp:1234",
                         "topk_weights->scalar_type() == torch::kFloat")
        rt = self.runtime
        if rt.hidden:
            # mirrors DeepEP csrc/elastic/buffer.hpp:1254 EP_HOST_ASSERT(get_combine_buffer_size(...) <= num_buffer_bytes) (dd758caf)
            _host_assert(x.shape[1] <= rt.hidden, "csrc/elastic/buffer.hpp:1254",
                         f"get_combine_buffer_size(...) <= num_buffer_bytes (hidden {x.shape[1]} > {rt.hidden})")
        # mirrors DeepEP deep_ep/include/deep_ep/impls/combine.cuh:109 EP_STATIC_ASSERT(kHidden % 256 == 0, "Invalid hidden") (dd758caf)
        _jit_static_assert(x.shape[1] % (32 * 16 // 2) == 0, "deep_ep/include/deep_ep/impls/combine.cuh:109",
                           "Invalid hidden", f"kHidden={x.shape[1]}")
        # mirrors DeepEP deep_ep/include/deep_ep/impls/combine_reduce_epilogue.cuh:65 EP_STATIC_ASSERT(kNumTopk <= 32) (dd758caf)
        _jit_static_assert(topk_idx.shape[1] <= 32, "deep_ep/include/deep_ep/impls/combine_reduce_epilogue.cuh:65",
                           "Too many top-k selections", f"kNumTopk={topk_idx.shape[1]}")
        # mirrors DeepEP csrc/elastic/buffer.hpp:1214 EP_HOST_ASSERT(num_combined_tokens <= num_max_tokens_per_rank) (dd758caf)
        _host_assert(topk_idx.shape[0] <= handle.num_max_tokens_per_rank, "csrc/elastic/buffer.hpp:1214",
                     "num_combined_tokens <= num_max_tokens_per_rank")
        out, out_w = _combine_rows(self.group, x, handle.recv_src_metadata[:, 0], handle.recv_src_metadata[:, 1],
                                   topk_idx.shape[0], topk_weights)
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                out += b.float()
        return out.to(x.dtype), out_w, new_event(async_with_compute_stream)


ElasticBuffer = _ElasticBuffer


# == HybridEP =============================================================================================
_UINT8, _UINT16 = "UINT8", "UINT16"  # APP_TOKEN_DATA_TYPE


def _env_int(name: str, default: int) -> int:
    # mirrors DeepEP csrc/hybrid_ep/config.cuh get_env_int (atoi) (94a9f8f6)
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        return 0


def _hybrid_config_is_valid(c: SimpleNamespace) -> bool:
    """``BufferConfig::is_valid`` / ``HybridEpConfigInstance::is_valid`` (the same checks)."""
    # mirrors DeepEP csrc/hybrid_ep/config.cuh:84-101 BufferConfig::is_valid and :161-178 (94a9f8f6)
    valid = c.hidden_dim % (512 if c.token_data_type == _UINT8 else 16) == 0  # config.cuh:87 / :89
    valid &= (c.num_of_experts_per_rank * c.num_of_ranks_per_node) % 4 == 0  # config.cuh:91
    valid &= (c.num_of_tokens_per_chunk_dispatch_api * c.num_of_ranks_per_node) % 4 == 0  # config.cuh:93
    if c.num_of_nodes > 1:  # config.cuh:22-48 hybrid_ep_token_capacity_is_valid
        valid &= 3 * c.max_num_of_tokens_per_rank + 1 < 65536
    return valid


class _Configurer:
    """``hybrid_ep_cpp.Configurer`` (``csrc/hybrid_ep/config.cuh``): fills and validates the buffer config."""

    def __init__(self, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, num_of_ranks_per_node,
                 num_of_nodes, use_fp8=False, num_sms_dispatch_api=None, num_sms_combine_api=None,
                 num_sms_preprocessing_api=None, num_blocks_permute=None, num_blocks_unpermute=None):
        self.sm_count = EMULATED_DEVICE_SMS
        sms_dispatch = num_sms_dispatch_api if num_sms_dispatch_api is not None else (24 if num_of_nodes == 1 else 8)
        sms_combine = num_sms_combine_api if num_sms_combine_api is not None else (24 if num_of_nodes == 1 else 8)
        # mirrors DeepEP csrc/hybrid_ep/config.cuh:371 assert(sm_count >= sms_dispatch && sm_count >= sms_combine) (94a9f8f6)
        if not (self.sm_count >= sms_dispatch and self.sm_count >= sms_combine):
            raise RuntimeError("config.cuh:371: Assertion `sm_count >= sms_dispatch && sm_count >= sms_combine' failed "
                               "(a C assert: the real process aborts)")
        chunk_dispatch = _env_int("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", 64)
        chunk_combine = _env_int("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", 64)
        # mirrors DeepEP csrc/hybrid_ep/config.cuh:386 hybrid_ep_pad_num_of_tokens_per_rank(max(T, 512), chunk) (94a9f8f6)
        padded = max(max_num_of_tokens_per_rank, 512)
        if chunk_combine > 0:
            padded = _align(padded, chunk_combine)
        self.buffer_config = SimpleNamespace(
            hidden_dim=hidden_dim, max_num_of_tokens_per_rank=padded, num_of_experts_per_rank=num_local_experts,
            num_of_ranks_per_node=num_of_ranks_per_node, num_of_nodes=num_of_nodes,
            token_data_type=_UINT8 if use_fp8 else _UINT16, num_of_blocks_dispatch_api=sms_dispatch,
            num_of_blocks_combine_api=sms_combine,
            num_of_tokens_per_chunk_dispatch_api=chunk_dispatch, num_of_tokens_per_chunk_combine_api=chunk_combine)
        # mirrors DeepEP csrc/hybrid_ep/config.cuh:393-398 throw std::runtime_error("The buffer config is not valid.") (94a9f8f6)
        if not _hybrid_config_is_valid(self.buffer_config):
            raise RuntimeError("The buffer config is not valid.")

    def get_default_config(self, fuse_permute_dispatch: bool = False) -> SimpleNamespace:
        return SimpleNamespace(**vars(self.buffer_config))


def _hybrid_metadata_preprocessing(buf, config, routing_map, num_of_tokens):
    """All-gather the routing maps; each rank keeps the rows naming one of its experts (the handle)."""
    # mirrors DeepEP csrc/hybrid_ep/executor/executor.cu:35 assert(num_of_expert == local * rpn * nodes) (94a9f8f6)
    width = config.num_of_experts_per_rank * config.num_of_ranks_per_node * config.num_of_nodes
    if routing_map.shape[1] != width:
        raise RuntimeError(f"executor.cu:35: Assertion `num_of_expert == config.num_of_experts_per_rank * "
                           f"config.num_of_ranks_per_node * config.num_of_nodes' failed ({routing_map.shape[1]} "
                           f"!= {width}; a C assert: the real process aborts)")
    # the real preprocessing all-gathers the routing maps: unequal T hangs there; raise instead
    sizes = _gather_objects(buf.group, num_of_tokens)
    if len(set(sizes)) != 1:
        raise RuntimeError(f"HybridEP needs the same token count on every rank, got {sizes} "
                           "(the real kernels hang here)")
    # mirrors DeepEP csrc/hybrid_ep/executor/executor.cu:72-78 TORCH_CHECK (after the all-gather, :144) "TMA 16B alignment error" (94a9f8f6)
    remainder = num_of_tokens % config.num_of_tokens_per_chunk_dispatch_api
    if remainder and (remainder * config.num_of_ranks_per_node * 4) % 16:
        raise RuntimeError(f"TMA 16B alignment error: tma_load_size = remainder_chunk({remainder}) * ranks_per_node("
                           f"{config.num_of_ranks_per_node}) * 4 = {remainder * config.num_of_ranks_per_node * 4}B, "
                           "must be multiple of 16B.")
    local = config.num_of_experts_per_rank
    me = buf.rank
    maps = _gather_rows(buf.group, [routing_map])
    src_rank, src_idx, local_maps = [], [], []
    for src, (g,) in enumerate(maps):
        mine = g[:, me * local:(me + 1) * local]
        sel = mine.any(1).nonzero().flatten()
        src_rank.append(torch.full((sel.numel(),), src, dtype=torch.int64))
        src_idx.append(sel)
        local_maps.append(mine[sel])
    src_map = torch.stack([torch.cat(src_rank), torch.cat(src_idx)])
    num_dispatched = torch.tensor([src_map.shape[1]], dtype=torch.int32)
    # the real handle's 7 fields: sparse_to_dense_map, rdma_to_attn_map, attn_to_rdma_map,
    # num_dispatched_tokens_tensor, local_expert_routing_map, num_of_tokens_per_rank, config
    return (src_map, None, None, num_dispatched, torch.cat(local_maps), num_of_tokens, config)


class HybridEPBuffer:
    """``deep_ep.HybridEPBuffer`` (branch hybrid-ep) non-permute API on CPU gloo ranks.

    Attributes are the real object's: ``group``, ``rank``, ``group_size``,
    ``num_of_hybrid_ep_ranks_per_nvlink_domain``, ``local_rank``, ``node_rank``, ``num_of_nodes``,
    ``configurer``, ``runtime`` (no ``num_local_experts``, ``hidden_dim`` or ``max_num_of_tokens_per_rank``).
    """

    def __init__(self, group, hidden_dim: int, max_num_of_tokens_per_rank: int, num_local_experts: int,
                 use_fp8: bool = False, num_sms_dispatch_api: int = None, num_sms_combine_api: int = None,
                 num_sms_preprocessing_api: int = None, num_blocks_permute: int = None,
                 num_blocks_unpermute: int = None, load_cached_kernels: bool = False, use_shared_buffer: bool = True,
                 enable_custom_allgather: bool = False, num_of_hybrid_ep_ranks_per_nvlink_domain: int = None,
                 use_mnnvl: bool = None):
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:HybridEPBuffer.__init__ signature, defaults and attributes (94a9f8f6)
        self.group = group
        self.rank = self.group.rank()
        self.group_size = self.group.size()
        detected_ranks = self.group_size  # every emulated rank is NVLink-accessible (one domain)
        env_value = os.getenv("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        if env_value is not None:
            self.num_of_hybrid_ep_ranks_per_nvlink_domain = int(env_value)
            if self.num_of_hybrid_ep_ranks_per_nvlink_domain != detected_ranks:
                warnings.warn(
                    f"[Warning] NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN={self.num_of_hybrid_ep_ranks_per_nvlink_domain} "
                    f"differs from detected value {detected_ranks}. Using environment variable.")
        else:
            self.num_of_hybrid_ep_ranks_per_nvlink_domain = detected_ranks
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:74 group-size divisibility assert (94a9f8f6)
        assert (
            self.group_size % self.num_of_hybrid_ep_ranks_per_nvlink_domain == 0
        ), f"The number of ranks {self.group_size} should be divisible by the number of ranks per node {self.num_of_hybrid_ep_ranks_per_nvlink_domain} at rank={self.rank}."
        self.local_rank = self.rank % self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.node_rank = self.rank // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.num_of_nodes = self.group_size // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.configurer = _Configurer(
            hidden_dim=hidden_dim, max_num_of_tokens_per_rank=max_num_of_tokens_per_rank,
            num_local_experts=num_local_experts, num_of_ranks_per_node=self.num_of_hybrid_ep_ranks_per_nvlink_domain,
            num_of_nodes=self.num_of_nodes, use_fp8=use_fp8, num_sms_dispatch_api=num_sms_dispatch_api,
            num_sms_combine_api=num_sms_combine_api, num_sms_preprocessing_api=num_sms_preprocessing_api,
            num_blocks_permute=num_blocks_permute, num_blocks_unpermute=num_blocks_unpermute)
        self.runtime = SimpleNamespace(num_reallocations=0)  # hybrid_ep_cpp.HybridEPBuffer
        _gather_objects(group, self.rank)  # the real runtime exchanges memory handles
        _CONSTRUCTED["HybridEPBuffer"] += 1

    def update_template_config(self, hidden_dim: int = None, num_of_tokens_per_rank: int = None,
                               num_local_experts: int = None, pad_multiple: int = None, use_fp8: bool = None,
                               fuse_permute_dispatch: bool = False, **kwargs):
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:HybridEPBuffer.update_template_config (94a9f8f6)
        config = self.configurer.get_default_config(fuse_permute_dispatch)
        if hidden_dim is not None:
            config.hidden_dim = hidden_dim
        if num_of_tokens_per_rank is not None:
            num_of_tokens_per_rank = (num_of_tokens_per_rank + 15) // 16 * 16
            config.max_num_of_tokens_per_rank = max(num_of_tokens_per_rank,
                                                    self.configurer.buffer_config.max_num_of_tokens_per_rank)
            self.configurer.buffer_config.max_num_of_tokens_per_rank = config.max_num_of_tokens_per_rank
        if num_local_experts is not None:
            config.num_of_experts_per_rank = num_local_experts
        if use_fp8 is not None:
            config.token_data_type = _UINT8 if use_fp8 else _UINT16
        for key, value in kwargs.items():
            setattr(config, key, value)
        assert _hybrid_config_is_valid(config), "The config is not valid."
        # mirrors DeepEP csrc/hybrid_ep/hybrid_ep.cu:109 update_buffer: grow (reallocate) for a larger config (94a9f8f6)
        bc = self.configurer.buffer_config
        if config.hidden_dim > bc.hidden_dim or config.max_num_of_tokens_per_rank > bc.max_num_of_tokens_per_rank:
            bc.hidden_dim = max(bc.hidden_dim, config.hidden_dim)
            self.runtime.num_reallocations += 1
        return config

    def dispatch(self, hidden, scaling_factor=None, topk_idx=None, topk_weights=None, num_of_experts=None,
                 probs=None, routing_map=None, num_dispatched_tokens_tensor=None, num_dispatched_tokens=None,
                 handle=None):
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:HybridEPBuffer.dispatch (94a9f8f6)
        num_of_tokens, hidden_dim = hidden.shape
        if routing_map is not None:
            assert routing_map.dtype == torch.bool
            num_of_experts = routing_map.size(-1)
        else:
            assert (
                num_of_experts is not None
            ), "The number of experts should be provided on index-based routing."
            if topk_idx is not None:
                if topk_idx.numel() and int(topk_idx.min()) < 0:
                    # indices_to_map scatters the indices: a -1 is a device-side assert on the GPU
                    raise RuntimeError("device-side assert: scatter index -1 out of bounds (HybridEP does not handle "
                                       "-1 in topk_idx)")
                routing_map = torch.zeros(num_of_tokens, num_of_experts, dtype=torch.bool).scatter(
                    1, topk_idx.to(torch.int64), 1).bool()
                probs = None if topk_weights is None else torch.zeros(
                    num_of_tokens, num_of_experts, dtype=torch.float32).scatter(1, topk_idx.to(torch.int64), topk_weights)
        assert (
            handle is not None or routing_map is not None
        ), "The handle and routing_map should not be both None"
        # mirrors DeepEP csrc/hybrid_ep/hybrid_ep.cu:173-179 C asserts of dispatch (94a9f8f6)
        if not hidden.is_contiguous() or (probs is not None and probs.dtype != torch.float32):
            raise RuntimeError("hybrid_ep.cu:173-179: Assertion `hidden.is_contiguous()' / "
                               "`probs.value().dtype() == torch::kFloat32' failed (a C assert: the real process aborts)")
        if handle is None:
            config = self.update_template_config(hidden_dim=hidden_dim, num_of_tokens_per_rank=num_of_tokens)
            handle = _hybrid_metadata_preprocessing(self, config, routing_map, num_of_tokens)
        (src_map, _rdma_to_attn, _attn_to_rdma, num_dispatched, local_map, handle_tokens, config) = handle
        if config.token_data_type == _UINT16:
            assert hidden.element_size() == 2, "hidden must hold 2-byte elements (bf16) for a UINT16 config"
        # the real kernel reads config.hidden_dim columns and the handle's token count: other shapes are garbage
        assert hidden_dim == config.hidden_dim and num_of_tokens == handle_tokens, (
            f"emulator: hidden {tuple(hidden.shape)} does not match the handle's [{handle_tokens}, {config.hidden_dim}]")
        src_rank, src_idx = src_map[0], src_map[1]
        tensors = [hidden] + ([probs] if probs is not None else [])
        gathered = _gather_rows(self.group, tensors)
        recv = torch.empty(src_rank.numel(), hidden_dim, dtype=hidden.dtype)
        out_probs = None
        if probs is not None:
            rpn, local = config.num_of_ranks_per_node, config.num_of_experts_per_rank
            node = slice(self.node_rank * rpn * local, (self.node_rank + 1) * rpn * local)
            out_probs = torch.empty(src_rank.numel(), rpn * local, dtype=torch.float32)
        for src in range(self.group_size):
            m = src_rank == src
            recv[m] = gathered[src][0][src_idx[m]]
            if probs is not None:
                out_probs[m] = gathered[src][1][src_idx[m]][:, node]
        return recv, out_probs, None, handle

    def combine(self, hidden, probs=None, handle=None):
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:HybridEPBuffer.combine (94a9f8f6)
        assert handle is not None, "The handle is necessary for combine."
        (src_map, _rdma_to_attn, _attn_to_rdma, num_dispatched, local_map, num_tokens, config) = handle
        local, rpn = config.num_of_experts_per_rank, config.num_of_ranks_per_node
        # mirrors DeepEP csrc/hybrid_ep/hybrid_ep.cu:223-233 C asserts of combine (94a9f8f6)
        ok = hidden.element_size() == 2 and hidden.is_contiguous() and hidden.dim() == 2
        if probs is not None:
            ok &= probs.dtype == torch.float32 and (probs.numel() == 0 or probs.shape[1] == local * rpn)
        if not ok:
            raise RuntimeError("hybrid_ep.cu:223-233: Assertion on combine's hidden (2-byte, contiguous) / probs "
                               "(float32, [N, experts per rank x ranks per node]) failed (a C assert: the real process "
                               "aborts)")
        src_rank, src_idx = src_map[0], src_map[1]
        assert hidden.shape[0] == src_rank.numel(), "emulator: combine's row count differs from dispatch's"
        assert hidden.shape[1] == config.hidden_dim, "emulator: combine's hidden differs from the handle's hidden_dim"
        mine = None
        if probs is not None:
            # each rank's own experts' columns go back, placed at their global expert ids
            num_of_experts = local * rpn * config.num_of_nodes
            mine = torch.zeros(hidden.shape[0], num_of_experts, dtype=torch.float32)
            lo = self.local_rank * local
            mine[:, self.rank * local:(self.rank + 1) * local] = probs[:, lo:lo + local]
        out, out_p = _combine_rows(self.group, hidden, src_rank, src_idx, num_tokens, mine)
        return out.to(hidden.dtype), out_p
