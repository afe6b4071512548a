"""Emulated DeepEP V2 ``deep_ep.ElasticBuffer`` and ``EPHandle`` (mirrors ``deep_ep/buffers/elastic.py`` and
``csrc/elastic``, DeepEP main ``DEEPEP_MAIN``). CPU TEST DOUBLE: see the package docstring."""

from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Optional

import torch

from .._collective import (EMULATED_DEVICE_SMS, _CONSTRUCTED, _Sticky, _cached_dispatch_rows, _check_topk,
                           _check_torch_deterministic, _combine_rows, _host_assert, _jit_static_assert, _pack_x,
                           _raise_if_any, _route_and_dispatch, _unpack_x)
from ._v2_common import V2RuntimeFacts, agree_on_max_tokens, set_one_domain, v2_buffer_bytes
from ..utils.event import EventHandle, new_event


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


class _ElasticBuffer(V2RuntimeFacts):
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
        set_one_domain(self)
        agree_on_max_tokens(group, num_max_tokens_per_rank, "the real ElasticBuffer hangs here")
        self.runtime.registered_group = bool(_alive(group))  # built on a real process group, not a test's stand-in
        _CONSTRUCTED["ElasticBuffer"] += 1

    def destroy(self) -> None:
        # mirrors DeepEP deep_ep/buffers/elastic.py:369 ElasticBuffer.destroy (dd758caf): explicit destruction only
        assert self.explicitly_destroy
        if self.runtime is not None:
            if self.runtime.registered_group:
                _destroy_barrier(self.group)
            self.runtime = None  # Cannot use anymore

    def __del__(self):
        # mirrors DeepEP csrc/elastic/buffer.hpp:142-165 ~ElasticBuffer / destroy() (dd758caf): without
        # explicitly_destroy the destructor calls destroy(), which runs barrier(true, true), a GPU barrier over the
        # group's NCCL window. Once the process group is destroyed that barrier faults (cudaErrorIllegalAddress at
        # buffer.hpp:203), the EPException leaves the destructor and the process aborts: seen on 2 x H200 for a job
        # that called destroy_process_group() while the buffer was alive (benchmarks/gpu/exit_check.py, elastic
        # destroy: exit code -6, benchmarks/results/2xH200/logs/steps_lease18.txt).
        if getattr(self, "explicitly_destroy", True) or getattr(self, "runtime", None) is None:
            return
        if getattr(self.runtime, "registered_group", False):
            _destroy_barrier(self.group)

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        # mirrors DeepEP csrc/elastic/buffer.hpp:657 / :660 calculate_buffer_size host asserts (dd758caf)
        _host_assert(num_max_tokens_per_rank > 0 and hidden > 0, "csrc/elastic/buffer.hpp:657",
                     "num_max_tokens_per_rank > 0 and hidden > 0")
        _host_assert(-(-hidden // 32) * 4 <= hidden, "csrc/elastic/buffer.hpp:660",
                     "math::ceil_div(hidden, 32) * sizeof(float) <= hidden")
        return v2_buffer_bytes(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, 2 << 20)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        # mirrors DeepEP deep_ep/buffers/elastic.py:get_theoretical_num_sms asserts (dd758caf); the count is fixed here
        assert num_scaleout_topk == 0
        assert num_experts % self.num_ranks == 0  # get_expected_topk: a TypeError for num_experts=None, as the real one
        return 24

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
            recv, recv_sf = _cached_dispatch_rows(self.group, data, sf, handle)
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
        rx, ri, rw, counts, src_rank, src_idx = _route_and_dispatch(
            self.group, data, sf, topk_idx, topk_weights, num_experts, me, world, alignment, not self.deterministic)
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


def _alive(group) -> Optional[bool]:
    """Whether ``group`` is a live process group; ``None`` when that cannot be told (interpreter teardown)."""
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        return bool(dist.is_initialized() and group in c10d._world.pg_map)
    except Exception:  # noqa: BLE001
        return None


def _destroy_barrier(group) -> None:
    """The destructor's GPU barrier with the peers (buffer.hpp:156): aborts the process, as the real one does, when
    ``group`` no longer exists (its NCCL window is gone). Interpreter teardown, where ``torch.distributed`` may be
    half torn down, is left alone (the real one exits cleanly there when the group was never destroyed)."""
    if _alive(group) is False:
        import os
        import sys

        sys.stderr.write("terminate called after throwing an instance of 'EPException'\n  what():  CUDA runtime "
                         "exception (csrc/elastic/buffer.hpp:203): 700 (cudaErrorIllegalAddress, an illegal memory "
                         "access was encountered) [emulated: ElasticBuffer freed after destroy_process_group()]\n")
        sys.stderr.flush()
        os.abort()


ElasticBuffer = _ElasticBuffer


