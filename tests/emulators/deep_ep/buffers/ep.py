"""DeepEP V2.5 ``EPBuffer``/``EPHandle`` on CPU gloo ranks (CPU TEST DOUBLE; see the package docstring).

Exported by the ``v25`` layout (``DEEP_EP_EMULATOR_API=v25``), which has no ``Buffer``/``ElasticBuffer``. Source:
the PyPI wheel ``sgl-deep-ep-v25`` 0.1.0rc0 (``DEEPEP_V25``), SGLang's build of DeepEP 2.5 from upstream ``main``
with the Python package renamed ``deep_ep_v25``; it ships the Python sources, the host C++ sources and the kernel
headers DeepJIT compiles. Each ``# mirrors DeepEP V2.5 <path>:<line>`` comment names a path inside that package:
``buffers/ep.py`` (upstream ``deep_ep/buffers/ep.py``), ``csrc/buffers/ep.hpp``, ``include/deep_ep/...``.

What V2.5 changed against V2 (``buffers/elastic.py``), all modelled here:

* ``EPBuffer`` replaces ``ElasticBuffer`` (no alias); constructor without ``num_cpu_bytes``, with
  ``lb_allocation_plan_or_num_bytes``; ``sl_idx`` defaults to ``None``;
* a non-zero ``num_sms`` is rounded up to even (``align(num_sms, 2)``) by dispatch and combine, and the handle
  keeps the rounded count;
* ``do_handle_copy`` defaults to ``False`` and asserts ``False``: the handle keeps the caller's ``topk_idx`` and
  asserts (through torch's version counter) that it was not modified in place;
* ``previous_event_before_epilogue`` is gone; ``defer_epilogue=True`` (needs ``async_with_compute_stream``)
  returns only the event, whose ``current_stream_wait()`` runs and returns the epilogue's result;
* with ``deterministic=True`` and ``async_with_compute_stream=True`` the receive order is fixed only when the
  event is waited on (a hook after the wait): before that the rows are in arbitrary order.

Not verified against a running V2.5 (no GPU here): the text of a DeepJIT compile failure (a JIT
``static_assert``; raised like V2's, naming the static assertion), and the sticky CUDA error 719 of a combine
whose SM count differs from its dispatch handle's (seen with V2 2.1 on 2 x H200, assumed unchanged).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .._collective import (EMULATED_DEVICE_SMS, _CONSTRUCTED, _Sticky, _align, _cached_dispatch_rows, _check_topk,
                           _combine_rows, _host_assert, _pack_x, _raise_if_any, _route_and_dispatch, _unpack_x)
from ._v2_common import V2RuntimeFacts, agree_on_max_tokens, set_one_domain, v2_buffer_bytes
from ..utils.event import EventHandle, _V25EventOverlap, new_event

DEEPEP_V25 = "sgl-deep-ep-v25 0.1.0rc0"
# mirrors DeepEP V2.5 include/deep_ep/common/compiled.cuh:69 kNumAllocationAlignmentBytes = 2 MiB (sgl-deep-ep-v25 0.1.0rc0)
_ALLOCATION_ALIGNMENT = 2 << 20


def _jit_static_assert(cond: bool, where: str, reason: str, detail: str) -> None:
    """A V2.5 JIT kernel's ``EP_STATIC_ASSERT`` (``include/deep_ep/common/exception.cuh:8``: a plain
    ``static_assert``): DeepJIT's NVCC run fails when the kernel is first built. V2's ``csrc/jit/compiler.hpp`` is
    gone (DeepJIT is a compiled-in library); the exact text it reports is NOT verified (no V2.5 GPU run): this raises
    a RuntimeError naming the file and the static assertion's reason, as NVCC's own output does."""
    if not cond:
        raise RuntimeError(f"NVCC compilation failed (DeepJIT; V2.5 text unverified) [NVCC: {where}: error: static "
                           f"assertion failed with \"{reason}\"; {detail}]")


def _check_torch_deterministic() -> None:
    # mirrors DeepEP V2.5 utils/envs.py:184-190 check_torch_deterministic (sgl-deep-ep-v25 0.1.0rc0)
    assert not (torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory)


def _value_or(value, default):
    # mirrors DeepEP V2.5 utils/semantic.py:5-6 value_or (sgl-deep-ep-v25 0.1.0rc0)
    return default if value is None else value


def _stream_args(previous_event, allocate_on_comm_stream) -> None:
    if previous_event is not None:
        if not isinstance(previous_event, EventHandle):
            raise TypeError(f"previous_event must be a raw EventHandle (from capture()), got "
                            f"{type(previous_event).__name__}")
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:141-142 EP_HOST_ASSERT(allocate_on_comm_stream) (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(allocate_on_comm_stream, "csrc/buffers/ep.hpp:142", "allocate_on_comm_stream")


def _order_fixed_at_wait(event: _V25EventOverlap, tensors: list) -> None:
    """V2.5 sorts a deterministic async dispatch after the wait (``buffers/ep.py:734-741``): rows are in arbitrary
    order until ``event.current_stream_wait()``, which restores the deterministic order in place."""
    tensors = [t for t in tensors if t is not None and t.shape[0] > 1]
    if not tensors:
        return
    perm = torch.randperm(tensors[0].shape[0])
    inverse = torch.argsort(perm)
    for t in tensors:
        t.copy_(t[perm])

    def sort():
        for t in tensors:
            t.copy_(t[inverse])

    event.register_hook_after_wait(sort)


class EPHandle:
    """``deep_ep.EPHandle`` of V2.5, the attributes the emulator computes (a subset of the real ones).

    ``_topk_idx``/``_topk_idx_version`` are real attributes: V2.5 keeps the caller's ``topk_idx`` by reference
    and checks its version counter on every use."""

    def __init__(self, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx,
                 num_recv_tokens_per_expert_list, recv_src_metadata):
        # mirrors DeepEP V2.5 buffers/ep.py:64-105 EPHandle.__init__ (sgl-deep-ep-v25 0.1.0rc0)
        assert topk_idx is not None
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata = recv_src_metadata  # here: [source rank, source row]
        self.num_recv_tokens = int(recv_src_metadata.shape[0])
        self._topk_idx = topk_idx
        self._topk_idx_version = None if topk_idx.is_inference() else topk_idx._version

    @property
    def topk_idx(self) -> torch.Tensor:
        # mirrors DeepEP V2.5 buffers/ep.py:107-111 (sgl-deep-ep-v25 0.1.0rc0)
        assert self._topk_idx_version is None or self._topk_idx._version == self._topk_idx_version, \
            '`topk_idx` must not be modified while the EP handle is in use'
        return self._topk_idx


class EPBuffer(V2RuntimeFacts):
    """``deep_ep.EPBuffer`` (V2.5) on CPU gloo ranks (one NVLink domain: no hybrid mode kernels)."""

    def __init__(self, group, num_bytes: Optional[int] = None, num_max_tokens_per_rank: int = 0, hidden: int = 0,
                 num_topk: int = 0, use_fp8_dispatch: bool = False, lb_allocation_plan_or_num_bytes=0,
                 deterministic: bool = False, allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: Optional[int] = None, num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False):
        # mirrors DeepEP V2.5 buffers/ep.py:242-261 signature and :289-363 attributes (sgl-deep-ep-v25 0.1.0rc0)
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        if num_bytes is None:  # buffers/ep.py:302-307: _C.calculate_ep_buffer_size, the hint's function
            num_bytes = self.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                                  allow_hybrid_mode, allow_multiple_reduction)
        self.num_bytes = num_bytes
        # mirrors DeepEP V2.5 buffers/ep.py:318 (an allocation plan object is not emulated) (sgl-deep-ep-v25 0.1.0rc0)
        assert isinstance(lb_allocation_plan_or_num_bytes, int) and lb_allocation_plan_or_num_bytes >= 0
        self.num_lb_bytes = lb_allocation_plan_or_num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        # mirrors DeepEP V2.5 buffers/ep.py:328-335 automatic QP count; check_fast_rdma_atomic_support() is False
        # without an MT4131 NIC (utils/envs.py:238-257) (sgl-deep-ep-v25 0.1.0rc0)
        if num_allocated_qps == 0:
            num_allocated_qps = 129 if allow_hybrid_mode else 17
        self.num_allocated_qps = num_allocated_qps
        self.explicitly_destroy = explicitly_destroy
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:66-67 (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(num_bytes > 0 and num_bytes % _ALLOCATION_ALIGNMENT == 0, "csrc/buffers/ep.hpp:66",
                     "num_buffer_bytes > 0 and num_buffer_bytes % kNumAllocationAlignmentBytes == 0")
        _host_assert(self.num_lb_bytes % _ALLOCATION_ALIGNMENT == 0, "csrc/buffers/ep.hpp:67",
                     "num_lb_buffer_bytes >= 0 and num_lb_buffer_bytes % kNumAllocationAlignmentBytes == 0")
        # the C++ runtime; here: what the emulator needs to check sizes, and the sticky-error state
        self.runtime = SimpleNamespace(hidden=hidden, num_topk=num_topk, use_fp8_dispatch=use_fp8_dispatch,
                                       sticky=_Sticky())
        set_one_domain(self)
        # the real constructor ends in group.barrier()
        agree_on_max_tokens(group, num_max_tokens_per_rank, "assumed to hang like V2's ElasticBuffer")
        _CONSTRUCTED["EPBuffer"] += 1

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        # mirrors DeepEP V2.5 buffers/ep.py:374-399 signature; csrc/buffers/ep.hpp:254 / :257 calculate_buffer_size
        # host asserts (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(num_max_tokens_per_rank > 0 and hidden > 0, "csrc/buffers/ep.hpp:254",
                     "num_max_tokens_per_rank > 0 and hidden > 0")
        _host_assert(-(-hidden // 32) * 4 <= hidden, "csrc/buffers/ep.hpp:257",
                     "math::ceil_div(hidden, 32) * sizeof(float) <= hidden")
        return v2_buffer_bytes(group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch, _ALLOCATION_ALIGNMENT)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 0,
                                sm_write_gbs: float = 0) -> int:
        # mirrors DeepEP V2.5 buffers/ep.py:430-541 signature and asserts (sgl-deep-ep-v25 0.1.0rc0); the count is
        # fixed here (the real one is even, at least 4: ep.py:530-532)
        assert num_scaleout_topk == 0
        assert num_experts % self.num_ranks == 0  # get_expected_topk (ep.py:474): a TypeError for None, as the real one
        return 24

    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0, previous_event=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = False, do_cpu_sync: Optional[bool] = None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False,
                 defer_epilogue: bool = False):
        # mirrors DeepEP V2.5 buffers/ep.py:562-580 signature and defaults (sgl-deep-ep-v25 0.1.0rc0)
        # mirrors DeepEP V2.5 buffers/ep.py:638 (sgl-deep-ep-v25 0.1.0rc0)
        assert not do_handle_copy, '`do_handle_copy` must be False; handle copying is no longer supported'
        _check_torch_deterministic()
        sticky = self.runtime.sticky
        sticky.check()
        assert not do_expand, "emulator: do_expand=True (expert-major layout) is not emulated"
        # mirrors DeepEP V2.5 buffers/ep.py:642-645: SM count rounded up to even (sgl-deep-ep-v25 0.1.0rc0)
        num_topk = (handle.topk_idx if topk_idx is None else topk_idx).shape[1]
        num_sms = self.get_theoretical_num_sms(num_experts, num_topk) if num_sms == 0 else _align(num_sms, 2)
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, 'Allocated QPs are not enough'
        data, sf = _unpack_x(x)
        if handle is not None:
            assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
            # mirrors DeepEP V2.5 buffers/ep.py:652-663 cached-handle asserts (sgl-deep-ep-v25 0.1.0rc0)
            assert topk_idx is None
            assert do_cpu_sync is None or not do_cpu_sync, 'Cannot do CPU sync with cached handle'
            topk_idx = handle.topk_idx
            num_max_tokens_per_rank = _value_or(num_max_tokens_per_rank, handle.num_max_tokens_per_rank)
            num_experts = _value_or(num_experts, handle.num_experts)
            expert_alignment = _value_or(expert_alignment, handle.expert_alignment)
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                   (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        # mirrors DeepEP V2.5 buffers/ep.py:674-676 (sgl-deep-ep-v25 0.1.0rc0)
        max_t = _value_or(num_max_tokens_per_rank, self.num_max_tokens_per_rank)
        alignment = _value_or(expert_alignment, 1)
        rt = self.runtime
        me, world = self.rank_idx, self.num_ranks
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:312 / :317 (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(0 < num_sms <= EMULATED_DEVICE_SMS, "csrc/buffers/ep.hpp:312",
                     "num_sms > 0 and num_sms <= jit->device.get_num_sms()")
        _host_assert(not do_zero_padding or do_expand, "csrc/buffers/ep.hpp:317", "not do_zero_padding or do_expand")
        _stream_args(previous_event, allocate_on_comm_stream)
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:342-343 data host asserts (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(data.is_contiguous(), "csrc/buffers/ep.hpp:342", "x.is_cuda() and x.is_contiguous()")
        _host_assert((data.shape[1] * data.element_size()) % 16 == 0, "csrc/buffers/ep.hpp:343",
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        if sf is not None:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:353-355 SF host asserts (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(sf.shape[0] == data.shape[0], "csrc/buffers/ep.hpp:353", "num_tokens == num_tokens_")
            _host_assert(sf.element_size() == 4, "csrc/buffers/ep.hpp:355", "sf->element_size() == sizeof(sf_pack_t)")
        if rt.use_fp8_dispatch:
            assert sf is not None, "buffer built for FP8 dispatch (1 byte/element): bf16 tokens do not fit"
        if rt.hidden:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:544 get_dispatch_buffer_size(...) <= num_buffer_bytes (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(data.shape[1] <= rt.hidden and num_topk <= (rt.num_topk or 32), "csrc/buffers/ep.hpp:544",
                         f"get_dispatch_buffer_size(...) <= num_buffer_bytes (hidden {data.shape[1]} / top-k {num_topk} "
                         f"above the buffer's {rt.hidden} / {rt.num_topk})")
        if defer_epilogue:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:772-773 EP_HOST_ASSERT(async_with_compute_stream) (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(async_with_compute_stream, "csrc/buffers/ep.hpp:773", "async_with_compute_stream")
        # mirrors DeepEP V2.5 include/deep_ep/impls/ep/dispatch.cuh:92 EP_STATIC_ASSERT(kNumTopk <= 32, "Insufficient lanes") (sgl-deep-ep-v25 0.1.0rc0)
        _jit_static_assert(num_topk <= 32, "include/deep_ep/impls/ep/dispatch.cuh:92", "Insufficient lanes",
                           f"kNumTopk={num_topk}")
        event = new_event(async_with_compute_stream, _V25EventOverlap)

        if handle is not None:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:344 EP_HOST_ASSERT(num_tokens <= num_max_tokens_per_rank) (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(data.shape[0] <= max_t, "csrc/buffers/ep.hpp:344", "num_tokens <= num_max_tokens_per_rank")
            recv, recv_sf = _cached_dispatch_rows(self.group, data, sf, handle)
            result = (_pack_x(recv, recv_sf), None, None, handle)
            if self.deterministic and async_with_compute_stream and not defer_epilogue:
                _order_fixed_at_wait(event, [recv, recv_sf])
        else:
            assert num_experts is not None, "num_experts is required unless a handle is given"
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:365-366 topk_idx host asserts (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(topk_idx.dtype == torch.int64 and topk_idx.is_contiguous(), "csrc/buffers/ep.hpp:365",
                         "topk_idx.scalar_type() == topk_idx_t and topk_idx.is_contiguous()")
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:394 EP_HOST_ASSERT(num_experts % num_ranks == 0) (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(num_experts % world == 0, "csrc/buffers/ep.hpp:394", "num_experts % context->num_ranks == 0")
            _check_topk(topk_idx, topk_weights, data.shape[0], num_experts)
            error = None
            if data.shape[0] > max_t:
                # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:344 EP_HOST_ASSERT(num_tokens <= num_max_tokens_per_rank) (sgl-deep-ep-v25 0.1.0rc0)
                error = (f"Assertion exception (csrc/buffers/ep.hpp:344): num_tokens <= num_max_tokens_per_rank "
                         f"({data.shape[0]} > {max_t}; the other ranks hang in the real kernel)")
            _raise_if_any(self.group, error, RuntimeError)
            rx, ri, rw, counts, src_rank, src_idx = _route_and_dispatch(
                self.group, data, sf, topk_idx, topk_weights, num_experts, me, world, alignment, not self.deterministic)
            # mirrors DeepEP V2.5 buffers/ep.py:718-731 EPHandle(..., num_sms, topk_idx, ...): the caller's topk_idx
            # itself and the rounded SM count (sgl-deep-ep-v25 0.1.0rc0)
            new_handle = EPHandle(do_expand, num_experts, alignment, max_t, num_sms, topk_idx, counts,
                                  torch.stack([src_rank, src_idx], dim=1))
            result = (rx, ri, (rw if topk_weights is not None else None), new_handle)
            if self.deterministic and async_with_compute_stream and not defer_epilogue:
                data_x, data_sf = (rx if isinstance(rx, tuple) else (rx, None))
                _order_fixed_at_wait(event, [data_x, data_sf, ri, result[2], new_handle.recv_src_metadata])
        if defer_epilogue:
            # mirrors DeepEP V2.5 buffers/ep.py:749-753: only the event; its wait returns the epilogue's result
            # (sgl-deep-ep-v25 0.1.0rc0)
            event.register_hook_after_wait(lambda: result)
            return event
        return (*result, event)

    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                defer_epilogue: bool = False):
        # mirrors DeepEP V2.5 buffers/ep.py:770-779 signature and defaults (sgl-deep-ep-v25 0.1.0rc0)
        _check_torch_deterministic()
        sticky = self.runtime.sticky
        sticky.check()
        assert isinstance(handle, EPHandle), "handle must be an EPHandle of this buffer"
        # mirrors DeepEP V2.5 buffers/ep.py:816-818: SM count rounded up to even (sgl-deep-ep-v25 0.1.0rc0)
        num_sms = handle.num_sms if num_sms == 0 else _align(num_sms, 2)
        num_qps = self.get_theoretical_num_qps(num_sms) if num_qps == 0 else num_qps
        assert num_qps <= self.num_allocated_qps, 'Allocated QPs are not enough'
        # mirrors DeepEP V2.5 buffers/ep.py:759-768 _unpack_bias (sgl-deep-ep-v25 0.1.0rc0)
        biases = (bias,) if isinstance(bias, torch.Tensor) else (bias if isinstance(bias, tuple) else ())
        if isinstance(bias, tuple):
            assert len(bias) == 2
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:808 / :811 (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(0 < num_sms <= EMULATED_DEVICE_SMS, "csrc/buffers/ep.hpp:808",
                     "num_sms > 0 and num_sms <= jit->device.get_num_sms()")
        _host_assert(not defer_epilogue or async_with_compute_stream, "csrc/buffers/ep.hpp:811",
                     "not defer_epilogue or async_with_compute_stream")
        _stream_args(previous_event, allocate_on_comm_stream)
        if num_sms != handle.num_sms:  # seen with V2 2.1 (sticky error 719); assumed unchanged in V2.5
            sticky.fail("CUDA error: unspecified launch failure (cudaErrorLaunchFailure = 719, sticky): "
                        f"combine ran with num_sms={num_sms} but its dispatch handle used {handle.num_sms}")
        topk_idx = handle.topk_idx  # the version check of buffers/ep.py:107-111
        assert isinstance(x, torch.Tensor) and x.dim() == 2
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:815-817 combine host asserts (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(x.is_contiguous(), "csrc/buffers/ep.hpp:815", "x.is_cuda() and x.is_contiguous()")
        _host_assert(x.dtype == torch.bfloat16, "csrc/buffers/ep.hpp:816", "x.scalar_type() == torch::kBFloat16")
        _host_assert((x.shape[1] * x.element_size()) % 16 == 0, "csrc/buffers/ep.hpp:817",
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:827 / :832 (sgl-deep-ep-v25 0.1.0rc0)
        _host_assert(topk_idx.shape[0] <= handle.num_max_tokens_per_rank, "csrc/buffers/ep.hpp:827",
                     "num_combined_tokens <= num_max_tokens_per_rank")
        _host_assert(x.shape[0] == handle.num_recv_tokens, "csrc/buffers/ep.hpp:832",
                     f"num_reduced_tokens == num_tokens ({x.shape[0]} rows, dispatch delivered {handle.num_recv_tokens})")
        if topk_weights is not None:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:844-847 (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(topk_weights.shape == (x.shape[0], topk_idx.shape[1]), "csrc/buffers/ep.hpp:844",
                         "num_tokens == num_tokens__ and num_topk == num_topk__")
            _host_assert(topk_weights.dtype == torch.float32, "csrc/buffers/ep.hpp:847",
                         "topk_weights->scalar_type() == torch::kFloat")
        for b in biases:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:854-856 (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(b.dim() == 2 and b.is_contiguous(), "csrc/buffers/ep.hpp:854",
                         "bias.dim() == 2 and bias.is_cuda() and bias.is_contiguous()")
            _host_assert(b.dtype == x.dtype, "csrc/buffers/ep.hpp:855", "bias.scalar_type() == x.scalar_type()")
            _host_assert(tuple(b.shape) == (topk_idx.shape[0], x.shape[1]), "csrc/buffers/ep.hpp:856",
                         "bias.size(0) == num_combined_tokens and bias.size(1) == hidden")
        rt = self.runtime
        if rt.hidden:
            # mirrors DeepEP V2.5 csrc/buffers/ep.hpp:866 get_combine_buffer_size(...) <= num_buffer_bytes (sgl-deep-ep-v25 0.1.0rc0)
            _host_assert(x.shape[1] <= rt.hidden, "csrc/buffers/ep.hpp:866",
                         f"get_combine_buffer_size(...) <= num_buffer_bytes (hidden {x.shape[1]} > {rt.hidden})")
        # mirrors DeepEP V2.5 include/deep_ep/impls/ep/combine.cuh:110 EP_STATIC_ASSERT(kHidden % 256 == 0, "Invalid hidden") (sgl-deep-ep-v25 0.1.0rc0)
        _jit_static_assert(x.shape[1] % (32 * 16 // 2) == 0, "include/deep_ep/impls/ep/combine.cuh:110",
                           "Invalid hidden", f"kHidden={x.shape[1]}")
        # mirrors DeepEP V2.5 include/deep_ep/impls/ep/combine_reduce_epilogue.cuh:65 EP_STATIC_ASSERT(kNumTopk <= 32) (sgl-deep-ep-v25 0.1.0rc0)
        _jit_static_assert(topk_idx.shape[1] <= 32, "include/deep_ep/impls/ep/combine_reduce_epilogue.cuh:65",
                           "Too many top-k selections", f"kNumTopk={topk_idx.shape[1]}")
        out, out_w = _combine_rows(self.group, x, handle.recv_src_metadata[:, 0], handle.recv_src_metadata[:, 1],
                                   topk_idx.shape[0], topk_weights)
        for b in biases:
            out += b.float()
        result = (out.to(x.dtype), out_w)
        event = new_event(async_with_compute_stream, _V25EventOverlap)
        if defer_epilogue:
            # mirrors DeepEP V2.5 buffers/ep.py:837-839 (sgl-deep-ep-v25 0.1.0rc0)
            event.register_hook_after_wait(lambda: result)
            return event
        return (*result, event)
