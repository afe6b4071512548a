"""CPU emulation of ``libnccl_ep.so`` 0.2.0 (shipped in nccl-extensions 0.1.0) -- test double only.

Checks cite their source: ``nccl_ep.h`` (the public header in ``nccl/ep/include``), the device headers
(``ll_ep.cuh``, ``ht_ep.cuh``, ``common.hpp``, ``ll_ep_smem.cuh``) and, for host checks compiled into the
library, the assertion text found in ``libnccl_ep.so`` (quoted). ``EP_HOST_ASSERT`` throws a C++
``EPException("Failed: Assertion error <file>:<line> '<cond>'")`` (``device/macros.cuh``); the wheel does
not show whether the C entry points turn it into an ``ncclResult_t`` (the bindings' ``NCCLEpError``) or let
it abort the process, so the emulator raises :class:`NCCLEpError` with that text. Device-side faults
(``EP_DEVICE_ASSERT``, a timeout ``trap()``, an HT recv overflow with ``OVERFLOW_TRAP``, a TMA access to a
misaligned address) become a sticky emulated CUDA error: that call and every later one fail.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from nccl.core._transport import device_fault, raise_if_faulted
from nccl.core.typing import NcclDataType, NcclGinType
from nccl.ep.enums import (Algorithm, CombineQuantizationRecipe, DispatchQuantizationRecipe, ExpertIdKind, Layout,
                           OverflowPolicy, PassDir, ZeroCopyMode)
from nccl.ep.tensor import ELEMENT_SIZE

NCCL_EP_VERSION_CODE = 200  # nccl_ep.h: NCCL_EP_MAJOR 0, NCCL_EP_MINOR 2, NCCL_EP_PATCH 0
MAX_NUM_TOPK = 32  # common.hpp
LL_MAX_TOPK = 31  # ll_ep.cuh: kNumTopk <= kWarpSize - kLlDispatchControlWarps
DEFAULT_TIMEOUT_S = 100.0  # common.hpp NUM_TIMEOUT_CYCLES "200G cycles ~= 100s"; nccl_ep.h "0 = use default (~100 s)"
_STATUS = {3: "ncclInternalError", 4: "ncclInvalidArgument", 5: "ncclInvalidUsage"}
_ids = itertools.count(0x1000)


class NCCLEpError(Exception):
    """What the bindings raise for a non-success ``ncclResult_t`` (``nccl_ep`` Cython module: NCCLEpError)."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        super().__init__(f"{_STATUS.get(status, status)}: {message}" if message else _STATUS.get(status, str(status)))


def _assert(cond: bool, text: str, status: int = 5) -> None:
    if not cond:
        raise NCCLEpError(status, f"Failed: Assertion error '{text}'")


def _fail(text: str, status: int = 5) -> None:
    raise NCCLEpError(status, text)


def _jit_static_assert(cond: bool, kernel: str, text: str) -> None:
    """A JIT kernel's EP_STATIC_ASSERT fails at run-time compilation (NVCC compile failed)."""
    if not cond:
        raise NCCLEpError(3, f"NVCC compile failed: {kernel}: static assertion failed with \"{text}\"")


def _t(desc, what: str):
    """The torch tensor behind an ``nccl.ep.Tensor`` (None stays None)."""
    if desc is None:
        return None
    tensor = getattr(desc, "_torch", None)
    if tensor is None:
        _fail(f"NCCL EP: {what} is not an ncclEpTensor_t (use nccl.ep.Tensor)")
    return tensor


def _required(desc, what: str):
    if desc is None:
        _fail(f"NCCL EP: required {what} is NULL")  # "NCCL EP: required %s is NULL"
    return _t(desc, what)


def _aligned16(tensor, what: str) -> None:
    """HT moves rows with TMA bulk copies: a misaligned global address faults on the device."""
    if tensor is not None and tensor.data_ptr() % 16:
        raise device_fault(f"misaligned address: {what} at {tensor.data_ptr():#x} is not 16-byte aligned (TMA)")


@dataclass
class _Group:
    comm: Any
    algorithm: Algorithm
    num_experts: int
    max_tokens: int
    max_recv: int
    max_token_bytes: int
    num_topk: int
    overflow: OverflowPolicy
    timeout_s: float
    nranks: int
    rank: int
    local: int
    lsa: int
    mask: Optional[list[bool]]  # None unless enable_mask
    async_error: int = 0
    handles: int = 0


@dataclass
class _Handle:
    group: _Group
    layout: Layout
    topk_idx: torch.Tensor  # [T, K] int64 (this rank's routing)
    num_tokens: int
    num_topk: int
    kind: ExpertIdKind
    # HT: the slots (src rank, token id) of this rank, fixed at handle time; every rank's routing
    slots: list = field(default_factory=list)
    all_idx: list = field(default_factory=list)
    dispatch_rows: Optional[int] = None  # rows of the outputs of the last FWD dispatch (combine input shape)
    hidden: Optional[int] = None
    # LL: slot order of the last dispatch, per source rank
    ll_slots: Optional[list] = None


_GROUPS: dict[int, _Group] = {}
_HANDLES: dict[int, _Handle] = {}


def _device_sms() -> int:
    return int(os.environ.get("NCCL_EP_EMULATOR_NUM_SMS", "132"))  # an H200


def get_version() -> int:
    return NCCL_EP_VERSION_CODE


def get_library_path() -> str:
    return __file__


# -- groups ------------------------------------------------------------------------------------------------------
def create_group(comm, config) -> int:
    """``ncclEpCreateGroup`` (collective)."""
    raise_if_faulted()
    nranks = comm.nranks if getattr(comm, "is_valid", False) else 0
    _assert(nranks > 0, "comm != nullptr && ncclCommCount(comm, &nRanks) == ncclSuccess && nRanks > 0")
    algorithm = config.algorithm
    _assert(algorithm in (Algorithm.LOW_LATENCY, Algorithm.HIGH_THROUGHPUT),
            "ncclEpCreateGroup: invalid algorithm, supported: low_latency, high_throughput")
    algorithm = Algorithm(algorithm)
    _assert(config.num_experts > 0, "ncclEpCreateGroup: num_experts must be greater than 0")
    _assert(config.max_token_bytes > 0, "ncclEpCreateGroup: max_token_bytes must be greater than 0")
    ht = algorithm == Algorithm.HIGH_THROUGHPUT
    if ht and config.max_token_bytes % 16:
        _fail(f"NCCL EP: HT max_token_bytes ({config.max_token_bytes}) must be a multiple of 16 bytes", 4)
    _assert(not (not ht and config.max_dispatch_tokens_per_rank == 0),
            "ncclEpCreateGroup: max_dispatch_tokens_per_rank must be greater than 0 for low latency mode")
    _assert(not (ht and config.max_dispatch_tokens_per_rank == 0),
            "ncclEpCreateGroup: max_dispatch_tokens_per_rank must be set for HT backend")
    alloc = config.alloc
    if bool(alloc.alloc_fn) != bool(alloc.free_fn):
        _fail("NCCL EP: Failed to create group: Both alloc and free callbacks must be provided", 4)
    if alloc.alloc_fn:
        _fail("nccl emulator: custom allocators are not emulated", 4)
    if config.max_num_sms > _device_sms():
        _fail("Error: NCCL EP requires max_num_sms <= device_sm_count", 4)
    _assert(not (ht and config.max_recv_tokens_per_rank != 0
                 and config.max_recv_tokens_per_rank < config.max_dispatch_tokens_per_rank),
            "ncclEpCreateGroup: HT mode requires max_recv_tokens_per_rank >= max_dispatch_tokens_per_rank")
    _assert(not (config.num_topk != 0 and config.num_topk > config.num_experts),
            "ncclEpCreateGroup: num_topk must be <= num_experts")
    overflow = OverflowPolicy(config.overflow_policy)
    if ht and config.max_recv_tokens_per_rank == 0:
        _assert(overflow != OverflowPolicy.DROP, "ncclEpCreateGroup: eager mode (max_recv_tokens_per_rank = "
                "NCCL_EP_AUTO) does not support NCCL_EP_OVERFLOW_DROP")
        bound = nranks * config.max_dispatch_tokens_per_rank * max(config.num_topk, 1)
        _assert(bound <= 0xFFFFFFFF, "ncclEpCreateGroup: eager recv bound overflows unsigned int")
    if ZeroCopyMode(config.zero_copy) == ZeroCopyMode.ON:
        _fail("nccl emulator: zero_copy=ON (window-backed tensors) is not emulated", 4)
    teams = comm.n_lsa_teams
    lsa = nranks // teams
    if ht:
        _assert(lsa * teams == nranks, "ncclEpCreateGroup: HT requires rdma_team_size * lsa_team_size == nRanks")
        if teams > 1 and comm.gin_type == NcclGinType.NONE:
            _fail("[HT GIN] Error: NCCL EP internode requires GIN, but GIN is not supported", 3)
    elif comm.gin_type == NcclGinType.NONE:
        _fail("[LL] Error: NCCL EP requires GIN, but GIN is not supported", 3)
    timeout_s = config.timeout_ns / 1e9 if config.timeout_ns else DEFAULT_TIMEOUT_S
    env_ms = os.environ.get("NCCL_EP_TIMEOUT_MS")
    if env_ms:  # "NCCL EP: NCCL_EP_TIMEOUT_MS=%lu overrides config.timeout_ns=%lu"
        print(f"NCCL EP: NCCL_EP_TIMEOUT_MS={env_ms} overrides config.timeout_ns={config.timeout_ns}", file=sys.stderr)
        timeout_s = int(env_ms) / 1e3
    mine = (int(algorithm), config.num_experts, config.max_dispatch_tokens_per_rank, config.max_recv_tokens_per_rank,
            config.max_token_bytes, bool(config.enable_mask), config.num_topk)
    everyone, _ = comm._mailbox.exchange("ncclEpCreateGroup", mine, what="ncclEpCreateGroup")
    budgets = [e[3] for e in everyone]
    _assert(all(b == budgets[0] for b in budgets),
            "all_budgets[r] == all_budgets[0] && \"ncclEpCreateGroup: max_recv_tokens_per_rank must be identical "
            "across ranks\"")
    if any(e != everyone[0] for e in everyone):
        # nccl_ep.h: max_dispatch_tokens_per_rank "Must be the same across all ranks"; the library does not check
        # the other fields and would exchange garbage: the emulator refuses.
        raise NCCLEpError(4, f"nccl emulator: ranks created one EP group with different configurations {everyone} "
                             "(algorithm, num_experts, max_dispatch, max_recv, max_token_bytes, enable_mask, num_topk); "
                             "the real library would hang or corrupt memory")
    if config.num_experts % nranks:
        raise NCCLEpError(4, f"nccl emulator: num_experts={config.num_experts} is not divisible by nRanks={nranks} "
                             "(the library computes num_local_experts = num_experts / nRanks)")
    group = _Group(comm, algorithm, config.num_experts, config.max_dispatch_tokens_per_rank,
                   config.max_recv_tokens_per_rank, config.max_token_bytes, config.num_topk, overflow, timeout_s,
                   nranks, comm.rank, config.num_experts // nranks, lsa,
                   [True] * nranks if config.enable_mask else None)
    ptr = next(_ids)
    _GROUPS[ptr] = group
    return ptr


def _group(ptr: int) -> _Group:
    group = _GROUPS.get(ptr)
    if group is None:
        _fail("NCCL EP: invalid or destroyed ncclEpGroup_t", 4)
    return group


def group_destroy(ptr: int) -> None:
    _GROUPS.pop(ptr, None)


# -- handles -----------------------------------------------------------------------------------------------------
def _owner_local(idx: torch.Tensor, group: _Group, rank: int) -> torch.Tensor:
    """Local expert id on ``rank`` per entry, -1 where the expert lives elsewhere or the entry is masked (-1)."""
    lo = rank * group.local
    return torch.where((idx >= lo) & (idx < lo + group.local), idx - lo, -1)


def _ht_owned_order(local: torch.Tensor) -> torch.Tensor:
    """Top-k positions of the entries a rank owns (``local >= 0``), in ascending local id (stable): the order of
    an HT FLAT received row's packed entries, as real nccl.ep returns them (see _ht_dispatch)."""
    pos = torch.nonzero(local >= 0).flatten()
    return pos[torch.argsort(local[pos], stable=True)]


def _check_ids(idx: torch.Tensor, group: _Group) -> None:
    bad = (idx < -1) | (idx >= group.num_experts)
    if bool(bad.any()):
        raise device_fault(f"illegal memory access: topk_idx holds expert ids outside [-1, {group.num_experts})")


def create_handle(group_ptr: int, layout: int, topk_idx, layout_info, config, stream: int) -> int:
    """``ncclEpCreateHandle`` = ``ncclEpInitHandle`` + ``ncclEpUpdateHandle``."""
    raise_if_faulted()
    group = _group(group_ptr)
    layout = Layout(layout)
    _assert(layout != Layout.UNSET, "layout != NCCL_EP_LAYOUT_UNSET && \"ncclEpInitHandle: layout must be set "
                                    "explicitly\"")
    ht = group.algorithm == Algorithm.HIGH_THROUGHPUT
    _assert(not (ht and layout not in (Layout.FLAT, Layout.EXPERT_MAJOR)),
            "ncclEpInitHandle: HT mode supports flat and expert-major layouts")
    _assert(not (not ht and layout not in (Layout.EXPERT_MAJOR, Layout.RANK_MAJOR)),
            "ncclEpInitHandle: LL mode supports only expert-major and rank-major layouts")
    if layout == Layout.EXPERT_MAJOR:
        _fail("nccl emulator: the expert-major layout is not emulated", 4)
    if config is not None:
        align = config.dispatch_output_per_expert_alignment
        _assert(align & (align - 1) == 0 if align else True,
                "(em_align & (em_align - 1)) == 0 && \"dispatch_output_per_expert_alignment must be a power of two\"")
    idx = _required(topk_idx, "topk_idx")
    _assert(topk_idx.datatype in (NcclDataType.INT32, NcclDataType.INT64),
            "(topk_idx->datatype == ncclInt32 || topk_idx->datatype == ncclInt64) && \"topk_idx must be ncclInt32 or "
            "ncclInt64\"")
    _assert(topk_idx.ndim == 2, "topk_idx must be 2D [num_tokens, top_k]")
    num_tokens, num_topk = topk_idx.sizes
    kind = ExpertIdKind.AUTO if layout_info is None else ExpertIdKind(layout_info.recv_topk_idx_kind)
    idx = idx.to(torch.int64)
    if ht:
        _assert(num_topk > 0, "HT mode requires num_topk > 0 (pass top_k to ncclEpInitHandle)")
        if group.num_topk:
            _assert(num_topk <= group.num_topk, "NCCL EP: num_topk exceeds ncclEpGroupConfig_t::num_topk")
        _assert(num_tokens <= group.max_tokens, "handle->num_tokens <= static_cast<int>(ep_group->config."
                                                "max_dispatch_tokens_per_rank) && \"Token count exceeds HT buffer "
                                                "capacity\"")
        counters = []
        if layout_info is not None:
            if layout_info.src_rank_counters is not None or layout_info.expert_offsets is not None:
                _fail("nccl emulator: HT flat handle time fills expert_counters and recv_total_counter only "
                      "(src_rank_counters: LL rank-major dispatch; expert_offsets: expert-major)", 4)
            ec = layout_info.expert_counters
            if ec is not None:
                _assert(ec.ndim == 1, "recv_expert_counter->ndim == 1 && \"recv_expert_counter must be 1D\"")
                _assert(ec.datatype == NcclDataType.INT32,
                        "recv_expert_counter->datatype == ncclInt32 && \"HT flat: recv_expert_counter must be ncclInt32\"")
                _assert(ec.sizes[0] >= group.local, "recv_expert_counter->sizes[0] >= num_local_experts && "
                                                    "\"recv_expert_counter size must be >= num_local_experts\"")
                counters.append(ec)
            rt = layout_info.recv_total_counter
            if rt is not None:
                _assert(rt.ndim == 1, "recv_total_counter_tensor->ndim == 1")
                _assert(rt.sizes[0] >= 1, "recv_total_counter_tensor->sizes[0] >= 1")
                _assert(rt.datatype in (NcclDataType.INT32, NcclDataType.INT64),
                        "recv_total_counter_tensor->datatype == ncclInt32 || recv_total_counter_tensor->datatype == "
                        "ncclInt64")
                counters.append(rt)
            _assert(len({c.datatype for c in counters}) <= 1,
                    "is64 == out_is_int64 && \"all preprocessing int output tensors must share dtype\"")
        _check_ids(idx, group)
        # "HT mode performs metadata exchange as part of this call" (group.py create_handle): no timeout
        everyone, _ = group.comm._mailbox.exchange("ncclEpCreateHandle/HT", idx, what="ncclEpCreateHandle (HT)")
        handle = _Handle(group, layout, idx, num_tokens, num_topk, kind, all_idx=everyone)
        rng = random.Random(f"{group.rank}/{next(_ids)}")
        for src, src_idx in enumerate(everyone):  # slots grouped by source rank; order inside a block: the slot map
            mine = (_owner_local(src_idx, group, group.rank) >= 0).any(1).nonzero().flatten().tolist()
            rng.shuffle(mine)
            handle.slots.extend((src, t) for t in mine)
        num_recv = len(handle.slots)
        if group.max_recv and num_recv > group.max_recv:
            if group.overflow == OverflowPolicy.DROP:
                handle.slots = handle.slots[:group.max_recv]
            else:  # AUTO resolves to TRAP
                raise device_fault(f"HT recv overflow: {num_recv} tokens > max_recv_tokens_per_rank={group.max_recv}")
        if layout_info is not None:
            if layout_info.expert_counters is not None:
                per_expert = torch.zeros(group.local, dtype=torch.int64)
                for src, t in handle.slots:
                    local_ids = _owner_local(everyone[src][t], group, group.rank)
                    for e in local_ids[local_ids >= 0].tolist():
                        per_expert[e] += 1
                out = _t(layout_info.expert_counters, "expert_counters")
                out[:group.local].copy_(per_expert.to(out.dtype))
            if layout_info.recv_total_counter is not None:
                _t(layout_info.recv_total_counter, "recv_total_counter")[0] = len(handle.slots)
    else:
        _assert(layout_info is None,
                "layout_info == nullptr && \"LL mode does not accept local tensors in ncclEpUpdateHandle\"")
        if not 1 <= num_topk <= min(group.num_experts, MAX_NUM_TOPK):
            _fail(f"ncclEpInitHandle: LL top-k {num_topk} must be in [1, min(num_experts={group.num_experts}, "
                  f"MAX_NUM_TOPK={MAX_NUM_TOPK})]", 4)
        _check_ids(idx, group)
        # nccl_ep.h: with auto-sized RDMA buffers "This function MAY be collective ... All ranks must call this
        # function in lockstep with the same (layout, num_topk)": emulated as a collective without timeout.
        everyone, _ = group.comm._mailbox.exchange("ncclEpCreateHandle/LL", (int(layout), num_topk),
                                                   what="ncclEpCreateHandle (LL)")
        if any(e != everyone[0] for e in everyone):
            raise NCCLEpError(5, f"nccl emulator: LL handles created with different (layout, num_topk) {everyone}; "
                                 "nccl_ep.h requires lockstep calls with the same values")
        handle = _Handle(group, layout, idx, num_tokens, num_topk, kind)
    ptr = next(_ids)
    _HANDLES[ptr] = handle
    group.handles += 1
    return ptr


def update_handle(handle_ptr: int, topk_idx, layout_info, stream: int) -> None:
    raise NCCLEpError(5, "nccl emulator: Handle.update (ncclEpUpdateHandle on an existing handle) is not emulated; "
                         "create a new handle")


def handle_destroy(ptr: int) -> None:
    handle = _HANDLES.pop(ptr, None)
    if handle is not None:
        handle.group.handles -= 1


def _handle(ptr: int) -> _Handle:
    handle = _HANDLES.get(ptr)
    if handle is None:
        _fail("NCCL EP: invalid or destroyed ncclEpHandle_t", 4)
    return handle


def _kind(handle: _Handle, layout_info) -> ExpertIdKind:
    kind = handle.kind if layout_info is None else ExpertIdKind(layout_info.recv_topk_idx_kind)
    return ExpertIdKind.LOCAL if kind == ExpertIdKind.AUTO else kind  # "AUTO ... resolves to LOCAL today"


def _recv_ids(src_idx: torch.Tensor, group: _Group, kind: ExpertIdKind) -> torch.Tensor:
    local = _owner_local(src_idx, group, group.rank)
    if kind == ExpertIdKind.GLOBAL:
        return torch.where(local >= 0, src_idx, -1)
    return local


# -- the LL timeout ----------------------------------------------------------------------------------------------
def _ll_exchange(group: _Group, kind: str, payload, what: str) -> list:
    """ll_ep.cuh receive loops: wait at most timeoutCycles per source, then trap() or mask the source."""
    everyone, timed_out = group.comm._mailbox.exchange(kind, payload, timeout_s=group.timeout_s, active=group.mask,
                                                       what=what)
    for peer in timed_out:
        print(f"Warning: NCCL EP timeout for {what} receive, rank {group.rank}, src_rank {peer}", file=sys.stderr)
        if group.mask is None:  # "if (rankMask == nullptr) trap();"
            raise device_fault(f"NCCL EP timeout for {what} receive, rank {group.rank}, src_rank {peer} "
                               f"(timeout {group.timeout_s:g} s, no active mask)")
        group.mask[peer] = False  # atomicExch(rankMask + srcRank, 0)
        group.async_error = 1  # atomicExch_system(asyncErrorFlag, 1)
    return everyone


# -- dispatch ----------------------------------------------------------------------------------------------------
def dispatch(handle_ptr: int, inputs, outputs, layout_info, config, stream: int) -> None:
    """``ncclEpDispatch``."""
    raise_if_faulted()
    handle = _handle(handle_ptr)
    group = handle.group
    if config is None:  # NULL = defaults
        from nccl.ep.handle import DispatchConfig

        config = DispatchConfig()
    recipe = DispatchQuantizationRecipe(config.quantization_recipe)
    if recipe != DispatchQuantizationRecipe.NONE:
        _fail("nccl emulator: dispatch quantization recipes are not emulated", 4)
    x = _required(inputs.tokens, "inputs->tokens")
    out_x = _required(outputs.tokens, "outputs->tokens")
    _assert(inputs.scales is None, "inputs->scales must be null for NONE")
    _assert(outputs.scales is None, "outputs->scales must be null for NONE")
    _assert(inputs.tokens.ndim == 2, "tokens must be 2D [tokens, hidden]")
    num_tokens, hidden = inputs.tokens.sizes
    elem = ELEMENT_SIZE[inputs.tokens.datatype]
    if config.send_only:
        _fail("nccl emulator: send_only (staged dispatch + ncclEpComplete) is not emulated", 4)
    direction = PassDir(config.pass_direction)
    if group.algorithm == Algorithm.HIGH_THROUGHPUT:
        _ht_dispatch(handle, group, inputs, outputs, layout_info, direction, x, out_x, num_tokens, hidden, elem)
    else:
        _ll_dispatch(handle, group, inputs, outputs, layout_info, direction, x, out_x, num_tokens, hidden, elem)


def _ht_dispatch(handle, group, inputs, outputs, layout_info, direction, x, out_x, num_tokens, hidden, elem):
    if layout_info is not None:  # nccl_ep.h ncclEpDispatch: "For HT mode should be NULL"
        _fail("NCCL EP: HT dispatch takes no layout_info (counters come from ncclEpCreateHandle/ncclEpUpdateHandle)",
              4)
    _assert(handle.topk_idx is not None,
            "handle->ht.topk_idx != nullptr && \"HT FWD dispatch: ht.topk_idx missing (ncclEpUpdateHandle not called?)\"")
    _assert(num_tokens == handle.num_tokens, "x->sizes[0] == handle->num_tokens")
    _assert(num_tokens <= group.max_tokens, "x->sizes[0] <= group->config.max_dispatch_tokens_per_rank")
    if elem != 2:
        _fail(f"NCCL EP warning: unsupported HT dispatch token size {elem}", 4)
    token_bytes = hidden * elem
    _assert(token_bytes <= group.max_token_bytes, "x->sizes[1] * ncclTypeSize(x->datatype) <= group->config."
                                                  "max_token_bytes && \"HT dispatch token bytes must not exceed group's "
                                                  "max_token_bytes\"")
    _assert(token_bytes % 16 == 0, "(token_bytes % 16) == 0 && \"HT dispatch requires token bytes per token to be 16B "
                                   "aligned for TMA\"")
    _assert((group.local * group.lsa * 4) % 16 == 0,
            "(experts_per_lsa_team * static_cast<int>(sizeof(float))) % 16 == 0 && \"HT dispatch requires "
            "experts_per_lsa_team to be multiple of 4 (16B prob TMA alignment)\"")
    _assert((group.max_tokens * group.lsa) % 4 == 0,
            "(static_cast<int64_t>(params.tokens_per_lsa) * params.s2d_inner_dim) % 4 == 0 && \"Dispatch S2D "
            "cp.async.bulk: num_tokens_per_rank * s2d_inner_dim must be a multiple of 4 (flat layout with "
            "lsa_team_size <= 3 requires even num_tokens_per_rank)\"")
    _assert(outputs.tokens.ndim == 2 and outputs.tokens.datatype == inputs.tokens.datatype
            and outputs.tokens.sizes[1] == hidden,
            "HT outputs->tokens must match the input dtype and physical row width")
    num_recv = len(handle.slots)
    rows = outputs.tokens.sizes[0]
    if group.max_recv == 0 and rows < num_recv:
        _fail(f"NCCL EP: eager dispatch recv buffer too small: {rows} tokens < {num_recv} required (size from "
              "ncclEpLayoutInfo_t::recv_total_counter)", 4)
    if group.max_recv and rows < group.max_recv:
        _fail(f"NCCL EP: dispatch recv buffer has {rows} rows, static mode needs max_recv_tokens_per_rank="
              f"{group.max_recv}", 4)
    forward = direction == PassDir.FWD
    w = out_w = out_idx = None
    if forward:
        w = _t(inputs.topk_weights, "inputs->topk_weights")
        _assert(w is not None, "topk_weights != nullptr: HT forward dispatch requires inputs->topk_weights")
        d = inputs.topk_weights
        _assert(d.ndim == 2 and d.datatype == NcclDataType.FLOAT32, "topk_weights->ndim == 2 && topk_weights->datatype "
                                                                    "== ncclFloat32")
        _assert(d.sizes[0] == handle.num_tokens, "topk_weights->sizes[0] == handle->num_tokens")
        _assert(d.sizes[1] == handle.num_topk, "topk_weights->sizes[1] == handle->num_topk")
        out_w = _t(outputs.topk_weights, "outputs->topk_weights")
        out_idx = _t(outputs.topk_idx, "outputs->topk_idx")
        _assert(out_w is not None, "forward_dispatch ? (recv_topk_weights != nullptr) : (recv_topk_weights == nullptr)")
        _assert(outputs.topk_weights.ndim == 2,
                "recv_topk_weights->ndim == 2 && \"HT FLAT recv_topk_weights must be 2D [num_recv_tokens, top_k]\"")
        _assert(outputs.topk_weights.datatype == NcclDataType.FLOAT32, "recv_topk_weights->datatype == ncclFloat32")
        _assert(out_idx is not None, "recv_topk_idx != nullptr")
        _assert(outputs.topk_idx.ndim == 2, "recv_topk_idx->ndim == 2")
        _assert(outputs.topk_idx.datatype == NcclDataType.INT64, "recv_topk_idx->datatype == ncclInt64")
        for d in (outputs.topk_weights, outputs.topk_idx):
            _assert(d.sizes[0] >= num_recv and d.sizes[1] == handle.num_topk,
                    "HT FLAT outputs->topk_weights/topk_idx must be [num_recv_slots, top_k]")
    else:  # nccl_ep.h DispatchConfig: "BWD forbids it and forbids outputs->topk_weights / outputs->topk_idx"
        _assert(inputs.topk_weights is None, "topk_weights_in == nullptr")
        _assert(outputs.topk_weights is None, "recv_topk_weights == nullptr")
        _assert(outputs.topk_idx is None, "recv_topk_idx == nullptr")
    for tensor, what in ((x, "inputs->tokens"), (out_x, "outputs->tokens")):
        _aligned16(tensor, what)
    payload = (x.detach().cpu().clone(), None if w is None else w.detach().cpu().float().clone())
    everyone, _ = group.comm._mailbox.exchange("ncclEpDispatch/HT", payload, what="HT dispatch")
    kind = handle.kind if handle.kind != ExpertIdKind.AUTO else ExpertIdKind.LOCAL
    for slot, (src, t) in enumerate(handle.slots):
        src_x, src_w = everyone[src]
        out_x[slot].copy_(src_x[t].to(out_x.dtype))
        if forward:
            # Seen on 2 x H200 (nccl-extensions 0.1.0, HT FLAT, LOCAL ids): a received row's owned entries come
            # packed to the front in ascending local expert id, each with its weight, then -1 / 0.0 -- not in the
            # source's top-k slot positions (e.g. slots [-1, 74, 116, -1, 111, -1, -1, 108] arrive as
            # [74, 108, 111, 116, -1, -1, -1, -1]). HT BWD combine maps them back (_ht_owned_order).
            ids = _recv_ids(handle.all_idx[src][t], group, kind)
            order = _ht_owned_order(_owner_local(handle.all_idx[src][t], group, group.rank))
            packed_ids = torch.full_like(ids, -1)
            packed_w = torch.zeros(ids.shape[0], dtype=torch.float32)
            packed_ids[:order.numel()] = ids[order]
            packed_w[:order.numel()] = src_w[t][order]  # dense->sparse: only local experts' probs
            out_idx[slot].copy_(packed_ids)
            out_w[slot].copy_(packed_w)
    if forward:
        handle.dispatch_rows, handle.hidden = rows, hidden


def _ll_dispatch(handle, group, inputs, outputs, layout_info, direction, x, out_x, num_tokens, hidden, elem):
    if direction == PassDir.BWD:
        _fail(f"ncclEpDispatch: backward pass (pass_direction={int(direction)}) is not supported in LL mode", 4)
    _assert(num_tokens == handle.num_tokens, "x->sizes[0] == handle->num_tokens")
    _assert(num_tokens <= group.max_tokens, "x->sizes[0] <= group->config.max_dispatch_tokens_per_rank")
    _assert((hidden * elem) % 16 == 0, "(x->sizes[1] * ncclTypeSize(x->datatype)) % sizeof(int4) == 0")
    _assert(hidden % 16 == 0, "x->sizes[1] % sizeof(int4) == 0")
    _assert(hidden * elem <= group.max_token_bytes, "x->sizes[1] * ncclTypeSize(x->datatype) <= group->config."
                                                    "max_token_bytes")
    _jit_static_assert(hidden % (32 * (16 // elem)) == 0, "ll dispatch", "Invalid hidden")  # ll_ep.cuh:723
    _jit_static_assert(0 < handle.num_topk <= LL_MAX_TOPK, "ll dispatch",
                       "kNumTopk > 0 && kNumTopk <= combine_smem::kWarpSize - kLlDispatchControlWarps")
    r, m, k = group.nranks, group.max_tokens, handle.num_topk
    _assert(outputs.tokens.ndim == 3, "LL outputs->tokens must be 3D")
    _assert(outputs.tokens.datatype == inputs.tokens.datatype, "LL outputs->tokens dtype must match inputs->tokens")
    _assert(outputs.tokens.sizes[0] == r, "recv_x->sizes[0] == static_cast<unsigned>(group->nRanks)")
    _assert(outputs.tokens.sizes[1] == m, "recv_x->sizes[1] == group->config.max_dispatch_tokens_per_rank")
    _assert(outputs.tokens.sizes[2] == hidden, "recv_x->sizes[2] == static_cast<unsigned>(hidden)")
    d = inputs.topk_weights  # rank-major: "inputs->topk_weights must be provided"
    _assert(d is not None, "topk_weights_in != nullptr")
    _assert(d.ndim == 2, "topk_weights_in->ndim == 2")
    _assert(d.datatype == NcclDataType.FLOAT32, "topk_weights_in->datatype == ncclFloat32")
    _assert(d.sizes[0] == num_tokens, "topk_weights_in->sizes[0] == static_cast<unsigned>(handle->num_tokens)")
    _assert(d.sizes[1] == k, "topk_weights_in->sizes[1] == static_cast<unsigned>(handle->num_topk)")
    ow, oi = outputs.topk_weights, outputs.topk_idx
    if ow is None or oi is None:  # EP_DEVICE_ASSERT(outRecvTopkIdx != nullptr && outRecvTopkWeights != nullptr)
        raise device_fault("Assertion failed: ll_ep.cuh, condition: outRecvTopkIdx != nullptr && outRecvTopkWeights "
                           "!= nullptr")
    _assert(ow.ndim == 3, "recv_topk_weights->ndim == 3")
    _assert(ow.datatype == NcclDataType.FLOAT32, "recv_topk_weights->datatype == ncclFloat32")
    _assert(tuple(ow.sizes) == (r, m, k), "recv_topk_weights->sizes == [nRanks, max_dispatch_tokens_per_rank, num_topk]")
    _assert(oi.ndim == 3, "recv_topk_idx->ndim == 3")
    _assert(oi.datatype == NcclDataType.INT32, "recv_topk_idx->datatype == ncclInt32")
    _assert(tuple(oi.sizes) == (r, m, k), "recv_topk_idx->sizes == [nRanks, max_dispatch_tokens_per_rank, num_topk]")
    counts = None
    if layout_info is not None:
        if layout_info.expert_counters is not None or layout_info.recv_total_counter is not None:
            _fail("nccl emulator: LL rank-major dispatch fills src_rank_counters only", 4)
        if layout_info.src_rank_counters is not None:
            c = layout_info.src_rank_counters
            _assert(c.datatype == NcclDataType.INT32, "src_rank_counter->datatype == ncclInt32")
            _assert(c.sizes[0] == r, "src_rank_counter->sizes[0] == static_cast<unsigned>(group->nRanks)")
            counts = _t(c, "src_rank_counters")
    w = _t(d, "inputs->topk_weights")
    out_w, out_idx = _t(ow, "outputs->topk_weights"), _t(oi, "outputs->topk_idx")
    payload = (x.detach().cpu().clone(), w.detach().cpu().float().clone(), handle.topk_idx.clone())
    everyone = _ll_exchange(group, "ncclEpDispatch/LL", payload, "dispatch")
    kind = _kind(handle, layout_info)
    out_idx.fill_(-1)  # the control warp clears every rank-major routing entry (ll_ep.cuh)
    rng = random.Random()  # slot = atomicAdd(rankSentCnt + dstRank, 1): a new order every call
    handle.ll_slots = []
    for src in range(r):
        if everyone[src] is None:  # timed out or masked: nothing received from it
            handle.ll_slots.append([])
            if counts is not None:
                counts[src] = 0
            continue
        src_x, src_w, src_idx = everyone[src]
        tokens = (_owner_local(src_idx, group, group.rank) >= 0).any(1).nonzero().flatten().tolist()
        rng.shuffle(tokens)
        handle.ll_slots.append(tokens)
        for slot, t in enumerate(tokens):
            out_x[src, slot].copy_(src_x[t].to(out_x.dtype))
            out_w[src, slot].copy_(src_w[t])  # every top-k weight travels on the wire (rtr[lane].topk_weight)
            out_idx[src, slot].copy_(_recv_ids(src_idx[t], group, kind).to(torch.int32))
        if counts is not None:
            counts[src] = len(tokens)


# -- combine -----------------------------------------------------------------------------------------------------
def combine(handle_ptr: int, inputs, outputs, config, stream: int) -> None:
    """``ncclEpCombine``."""
    raise_if_faulted()
    handle = _handle(handle_ptr)
    group = handle.group
    if config is None:  # NULL = defaults
        from nccl.ep.handle import CombineConfig

        config = CombineConfig()
    if CombineQuantizationRecipe(config.quantization_recipe) != CombineQuantizationRecipe.NONE:
        _fail("nccl emulator: combine quantization (NVFP4) is not emulated", 4)
    if config.send_only:
        _fail("nccl emulator: send_only (staged combine + ncclEpComplete) is not emulated", 4)
    x = _required(inputs.tokens, "inputs->tokens")
    out = _required(outputs.tokens, "outputs->tokens")
    direction = PassDir(config.pass_direction)
    if group.algorithm == Algorithm.HIGH_THROUGHPUT:
        _ht_combine(handle, group, inputs, outputs, direction, x, out)
    else:
        _ll_combine(handle, group, inputs, outputs, direction, x, out)


def _ht_combine(handle, group, inputs, outputs, direction, x, out):
    if handle.dispatch_rows is None:
        _fail("nccl emulator: HT combine before a forward dispatch on this handle", 5)
    _assert(inputs.tokens.ndim == 2 and tuple(inputs.tokens.sizes) == (handle.dispatch_rows, handle.hidden),
            "combine inputs->tokens must have the shape of the dispatch outputs->tokens [num_recv_slots, hidden] "
            "(nccl_ep.h ncclEpCombine)")
    if ELEMENT_SIZE[inputs.tokens.datatype] != 2:
        _fail(f"NCCL EP: combine unsupported token dtype {int(inputs.tokens.datatype)}", 4)
    hidden = inputs.tokens.sizes[1]
    _assert(outputs.tokens.ndim == 2, "combined_x->ndim == 2")
    _assert(outputs.tokens.sizes[0] == handle.num_tokens, "combined_x->sizes[0] == num_combined_tokens")
    _assert(outputs.tokens.sizes[1] == hidden, "combined_x->sizes[1] == hidden")
    _assert(outputs.tokens.datatype == inputs.tokens.datatype, "out->datatype == x->datatype")
    backward = direction == PassDir.BWD
    w = out_w = None
    if backward:  # nccl_ep.h CombineConfig: "BWD requires inputs->topk_weights and outputs->topk_weights"
        d = inputs.topk_weights
        _assert(d is not None, "topk_weights != nullptr: HT backward combine requires inputs->topk_weights")
        _assert(d.ndim == 2, "topk_weights->ndim == 2 && \"HT FLAT/RM BWD combine: input topk_weights must be 2D "
                             "[num_recv, top_k]\"")
        _assert(d.datatype == NcclDataType.FLOAT32, "topk_weights->datatype == ncclFloat32")
        _assert(d.sizes[1] == handle.num_topk, "static_cast<int>(topk_weights->sizes[1]) == num_topk && \"HT FLAT/RM "
                                               "BWD combine: input top_k must equal output top_k\"")
        _assert(d.sizes[0] == handle.dispatch_rows, "topk_weights->sizes[0] == num_recv_slots")
        od = outputs.topk_weights
        _assert(od is not None, "combined_topk_weights != nullptr: HT backward combine requires outputs->topk_weights")
        _assert(od.ndim == 2, "combined_topk_weights->ndim == 2")
        _assert(od.sizes[0] == handle.num_tokens, "combined_topk_weights->sizes[0] == num_combined_tokens")
        _assert(od.datatype == NcclDataType.FLOAT32, "combined_topk_weights->datatype == ncclFloat32")
        _assert(od.sizes[1] == handle.num_topk, "combined_topk_weights->sizes[1] == num_topk")
        w, out_w = _t(d, "inputs->topk_weights"), _t(od, "outputs->topk_weights")
    else:
        _assert(inputs.topk_weights is None, "FWD forbids inputs->topk_weights (nccl_ep.h ncclEpCombineConfig_t)")
    for tensor, what in ((x, "inputs->tokens"), (out, "outputs->tokens")):
        _aligned16(tensor, what)
    rows = x.detach().cpu()[:len(handle.slots)].clone()
    payload = (handle.slots, rows, None if w is None else w.detach().cpu()[:len(handle.slots)].clone())
    everyone, _ = group.comm._mailbox.exchange("ncclEpCombine/HT", payload, what="HT combine")
    acc = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32)
    acc_w = torch.zeros(handle.num_tokens, handle.num_topk, dtype=torch.float32)
    for dst, (slots, dst_rows, dst_w) in enumerate(everyone):
        for slot, (src, t) in enumerate(slots):
            if src != group.rank:
                continue
            acc[t] += dst_rows[slot].float()
            if dst_w is not None:  # only the experts dst owns, from the packed receive layout back to the slots
                order = _ht_owned_order(_owner_local(handle.topk_idx[t], group, dst))
                acc_w[t, order] += dst_w[slot][:order.numel()].float()
    out.copy_(acc.to(out.dtype))
    if out_w is not None:
        out_w.copy_(acc_w)


def _ll_combine(handle, group, inputs, outputs, direction, x, out):
    if direction == PassDir.BWD:
        _fail(f"ncclEpCombine: backward pass (pass_direction={int(direction)}) is not supported in LL mode", 4)
    if handle.ll_slots is None:
        _fail("nccl emulator: LL combine before a dispatch on this handle", 5)
    r, m = group.nranks, group.max_tokens
    d = inputs.tokens
    _assert(d.ndim == 3, "lazy_combined->ndim > 0 && LL combine inputs->tokens is [nRanks, max_tokens, hidden]")
    _assert(d.sizes[0] == r, "x->sizes[0] == static_cast<unsigned>(num_ranks)")
    _assert(d.sizes[1] == m, "x->sizes[1] == static_cast<unsigned>(num_max_dispatch_tokens_per_rank)")
    hidden = d.sizes[2]
    elem = ELEMENT_SIZE[d.datatype]
    if d.datatype not in (NcclDataType.BFLOAT16, NcclDataType.FLOAT16, NcclDataType.FLOAT32):
        _fail(f"NCCL EP: combine unsupported token dtype {int(d.datatype)}", 4)
    _assert((hidden * elem) % 16 == 0, "(hidden * ncclTypeSize(x->datatype)) % sizeof(int4) == 0")
    # ll_ep.cuh combine: kHidden % (kWarpSize * kNumRecvUnrolls(2) * kNumElemsPerInt4) and kHidden % 128
    _jit_static_assert(hidden % (32 * 2 * (16 // elem)) == 0 and hidden % 128 == 0, "ll combine", "Invalid hidden")
    _assert(outputs.tokens.sizes[0] == handle.num_tokens, "out->sizes[0] == num_combined_tokens")
    _assert(outputs.tokens.ndim == 2 and outputs.tokens.sizes[1] == hidden, "out->sizes[1] == hidden")
    _assert(outputs.tokens.datatype == d.datatype, "out->datatype == x->datatype")
    rows = x.detach().cpu()
    payload = [(src, t, rows[src, slot].clone()) for src, tokens in enumerate(handle.ll_slots)
               for slot, t in enumerate(tokens)]
    everyone = _ll_exchange(group, "ncclEpCombine/LL", payload, "combine")
    acc = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32)
    for dst, items in enumerate(everyone):
        if items is None:  # masked or timed out: "if (isRankMasked(rankMask, topkIdxReg / numLocalExperts)) continue"
            continue
        for src, t, row in items:
            if src == group.rank:
                acc[t] += row.float()  # rank-major: weight 1, first occurrence per rank
    out.copy_(acc.to(out.dtype))


def complete(handle_ptr: int, config: int, stream: int) -> None:
    raise_if_faulted()
    _handle(handle_ptr)
    raise NCCLEpError(5, "nccl emulator: ncclEpComplete without a staged (send_only) operation; staging is not emulated")


# -- active mask / async error (nccl_ep.h ncclEpMaskQuery ... ncclEpErrorClear) -----------------------------------
def get_async_error(group_ptr: int) -> int:
    group = _group(group_ptr)
    _assert(group.mask is not None,
            "ep_group->async_error_flag != nullptr && \"ncclEpGetAsyncError: enable_mask must be true\"")
    return group.async_error


def error_clear(group_ptr: int) -> None:
    group = _group(group_ptr)
    _assert(group.mask is not None, "ep_group->async_error_flag != nullptr && \"ncclEpErrorClear: enable_mask must "
                                    "be true\"")
    group.async_error = 0


def mask_query(group_ptr: int, mask_status: int, stream: int) -> None:
    """Copy the mask (1 = active, 0 = masked) to ``int[nRanks]`` at ``mask_status`` (here: host memory)."""
    raise_if_faulted()
    group = _group(group_ptr)
    _assert(group.mask is not None, "ep_group->mask_buffer != nullptr && \"ncclEpMaskQuery: enable_mask must be true\"")
    values = (ctypes.c_int32 * group.nranks)(*[int(v) for v in group.mask])
    ctypes.memmove(mask_status, values, ctypes.sizeof(values))


def mask_update(group_ptr: int, mask: int, stream: int) -> None:
    raise_if_faulted()
    group = _group(group_ptr)
    _assert(group.mask is not None, "ep_group->mask_buffer != nullptr && \"ncclEpMaskUpdate: enable_mask must be true\"")
    values = (ctypes.c_int32 * group.nranks).from_address(mask)
    group.mask[:] = [bool(v) for v in values]


def mask_clean(group_ptr: int, stream: int) -> None:
    """Collective over the surviving ranks: reset the masks (the async flag stays, as nccl_ep.h says)."""
    raise_if_faulted()
    group = _group(group_ptr)
    _assert(group.mask is not None, "ep_group->mask_buffer != nullptr && \"ncclEpMaskClean: enable_mask must be true\"")
    group.comm._mailbox.exchange("ncclEpMaskClean", None, active=group.mask, what="ncclEpMaskClean")
    group.mask[:] = [True] * group.nranks
