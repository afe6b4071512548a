"""The shared layer of the CPU test double (see the package docstring: never installed, tests only): bookkeeping,
DeepEP's failure modes and the collectives every emulated buffer class is built on.

Algorithm (deliberately unlike the reference ``torch`` backend's all-to-all): every communication call
all-gathers every rank's rows plus their routing metadata (one padded ``all_gather`` of raw bytes) and
each rank selects the rows meant for it locally; combine all-gathers the received rows with their
source coordinates and each source rank sums the rows that name it.

Layout, as DeepEP's: one module per buffer class -- ``buffers/legacy.py`` (V1 ``Buffer``, ``Config``),
``buffers/elastic.py`` (V2 ``ElasticBuffer``, ``EPHandle``), ``buffers/ep.py`` (V2.5 ``EPBuffer``, ``EPHandle``),
``hybrid_ep_buffer.py`` (``HybridEPBuffer``) -- over this module, and ``utils/event.py``.

Strictness rule: this double is at least as strict as the library it stands for. Every rule carries a
``# mirrors DeepEP <file>:<line>`` comment naming the source it copies: DeepEP ``main`` at ``DEEPEP_MAIN``
(``deep_ep`` 2.1.0: V1 ``Buffer``, V2 ``ElasticBuffer``), branch ``hybrid-ep`` at ``DEEPEP_HYBRID_EP``
(``HybridEPBuffer``) and the ``sgl-deep-ep-v25`` wheel (V2.5 ``EPBuffer``, ``buffers/ep.py``).
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

import random
from typing import Optional

import torch
import torch.distributed as dist

from .utils.event import _PENDING

DEEPEP_MAIN = "dd758caf451848bd150e1046af3d0a73e5fff38d"
DEEPEP_HYBRID_EP = "94a9f8f6b146c07d97ec58f67cd6d303296d6098"
EMULATED_DEVICE_SMS = 132

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
# mirrors DeepEP deep_ep/buffers/legacy.py:get_dispatch_config/get_combine_config config_map keys (dd758caf)
_SUPPORTED_V1_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
_CONSTRUCTED = {"Buffer": 0, "ElasticBuffer": 0, "EPBuffer": 0, "HybridEPBuffer": 0}
_HOST_SYNCS = {"HybridEPBuffer": 0}


def pending_async_events() -> int:
    """How many async events a call returned that nobody waited on (tests assert 0)."""
    return len(_PENDING)


def constructed(name: str) -> int:
    """How many ``Buffer``/``ElasticBuffer``/``EPBuffer``/``HybridEPBuffer`` objects were built (test bookkeeping)."""
    return _CONSTRUCTED[name]


def host_syncs(name: str) -> int:
    """How many host syncs the emulated library made where the real one synchronizes a stream (test bookkeeping:
    ``HybridEPBuffer``'s wrapper sync and its blocking preprocessing with per-expert counts)."""
    return _HOST_SYNCS[name]


def reset_emulator_state() -> None:
    _PENDING.clear()
    from .buffers.legacy import Buffer

    Buffer.num_sms = 20
    for name in _CONSTRUCTED:
        _CONSTRUCTED[name] = 0
    for name in _HOST_SYNCS:
        _HOST_SYNCS[name] = 0


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


def _cached_dispatch_rows(group, data, sf, handle):
    """A V2/V2.5 dispatch along a cached handle (collective): each received row from its source rank and token, as
    the handle's ``recv_src_metadata`` records them; returns ``(rows, scales or None)``."""
    assert data.shape[0] == handle.topk_idx.shape[0], "cached dispatch: token count differs from the handle's"
    gathered = _gather_rows(group, [data] + ([sf] if sf is not None else []))
    src_rank, src_idx = handle.recv_src_metadata[:, 0], handle.recv_src_metadata[:, 1]
    recv = torch.empty(handle.num_recv_tokens, data.shape[1], dtype=data.dtype)
    recv_sf = None if sf is None else torch.empty(handle.num_recv_tokens, sf.shape[1], dtype=sf.dtype)
    for src in range(len(gathered)):
        m = src_rank == src
        recv[m] = gathered[src][0][src_idx[m]]
        if sf is not None:
            recv_sf[m] = gathered[src][1][src_idx[m]]
    return recv, recv_sf


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
        if flat.numel() and flat.stride(-1) != 1:  # a 1-row column view counts as contiguous but keeps its stride
            flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
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


def _route_and_dispatch(group, data, sf, topk_idx, topk_weights, num_experts, me, world, alignment, shuffle):
    """V2/V2.5 non-cached dispatch after their host asserts: each rank's destinations from its own top-k ids
    (the kernels compute ``is_token_in_rank`` themselves), the rows gathered, and ``_finish_dispatch``'s result."""
    local = num_experts // world
    weights = topk_weights if topk_weights is not None else torch.zeros(topk_idx.shape, dtype=torch.float32)
    dest = torch.where(topk_idx >= 0, topk_idx // local, world)
    in_rank = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool)
    in_rank.scatter_(1, dest, True)
    tensors = [data, topk_idx, weights, in_rank[:, :world]] + ([sf] if sf is not None else [])
    gathered = _gather_rows(group, tensors)
    picks = _select([g[3][:, me] for g in gathered], me, shuffle=shuffle)
    return _finish_dispatch(gathered, picks, me, local, sf is not None, alignment, zero_foreign_weights=False)
