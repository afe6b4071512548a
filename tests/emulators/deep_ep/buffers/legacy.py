"""Emulated DeepEP V1 ``deep_ep.Buffer`` and ``Config`` (mirrors ``deep_ep/buffers/legacy.py`` and
``csrc/legacy``, DeepEP main ``DEEPEP_MAIN``). CPU TEST DOUBLE: see the package docstring."""

from __future__ import annotations

import torch

from .._collective import (_CONSTRUCTED, _SUPPORTED_V1_RANKS, _Sticky, _align, _check_topk, _check_torch_deterministic,
                           _combine_rows, _finish_dispatch, _gather_objects, _gather_rows, _host_assert, _pack_x,
                           _select, _unpack_x)
from ..utils.event import EventHandle, EventOverlap, consume, new_event


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


