"""Emulated ``deep_ep.HybridEPBuffer`` (mirrors ``deep_ep/hybrid_ep_buffer.py`` and ``csrc/hybrid_ep`` of
DeepEP branch ``hybrid-ep``, ``DEEPEP_HYBRID_EP``). CPU TEST DOUBLE: see the package docstring."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import torch
from ._collective import EMULATED_DEVICE_SMS, _CONSTRUCTED, _HOST_SYNCS, _align, _combine_rows, _gather_objects, _gather_rows


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
            num_of_tokens_per_chunk_dispatch_api=chunk_dispatch, num_of_tokens_per_chunk_combine_api=chunk_combine,
            pad_multiple=1)  # config.cuh:442
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
    num_recv = src_map.shape[1]
    num_dispatched = torch.tensor([num_recv], dtype=torch.int32)
    # mirrors DeepEP csrc/hybrid_ep/executor/executor.cu:110-112 local_expert_routing_map = torch::empty(
    # {T * ranks_per_node * nodes, experts_per_rank}) (94a9f8f6): only the first num_dispatched rows are written (by
    # the preprocessing kernel, row n = the n-th dispatched token, hybrid_ep_backend.cuh:5450-5456); the rest is
    # uninitialised memory, filled here with set bits so that a reader ignoring num_dispatched counts garbage
    rows = num_of_tokens * config.num_of_ranks_per_node * config.num_of_nodes
    local_map = torch.ones(max(rows, num_recv), local, dtype=torch.bool)
    local_map[:num_recv] = torch.cat(local_maps)
    return src_map, num_dispatched, local_map


class _HandleImpl:
    """``hybrid_ep_cpp.HandleImpl`` (``csrc/hybrid_ep/pybind_hybrid_ep.cu:156-170``): its fields; a tensor the
    preprocessing did not make (pybind's undefined ``torch::Tensor``) is ``None``."""

    __slots__ = ("sparse_to_dense_map", "rdma_to_attn_map", "attn_to_rdma_map", "num_dispatched_tokens_tensor",
                 "local_expert_routing_map", "num_of_tokens_per_rank", "config", "tokens_per_expert",
                 "padded_tokens_per_expert", "overflow_flag", "num_permuted_tokens", "dense_chunk_layout",
                 "dense_to_expert_map")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)
        self.num_permuted_tokens = -1


class _Runtime:
    """``hybrid_ep_cpp.HybridEPBuffer`` (the object's ``runtime``): ``metadata_preprocessing`` only, the half of
    ``dispatch`` an adapter may call itself."""

    def __init__(self, buf):
        self._buf = buf
        self.num_reallocations = 0  # emulator bookkeeping (update_template_config's grow)

    def metadata_preprocessing(self, *, config, routing_map, num_of_tokens_per_rank, num_permuted_tokens=None,
                               pad_multiple=None, enable_permute=False, fuse_permute_dispatch=False,
                               non_blocking=False):
        # mirrors DeepEP csrc/hybrid_ep/pybind_hybrid_ep.cu:184-193 (keyword-only arguments) and
        # csrc/hybrid_ep/executor/executor.cu:57-181 metadata_preprocess_core (94a9f8f6)
        if fuse_permute_dispatch and not enable_permute:
            raise RuntimeError("hybrid_ep.cu:139-141: Assertion `enable_permute' failed (fuse_permute_dispatch needs it; "
                               "a C assert: the real process aborts)")
        src_map, num_dispatched, local_map = _hybrid_metadata_preprocessing(self._buf, config, routing_map,
                                                                            num_of_tokens_per_rank)
        h = _HandleImpl()
        h.sparse_to_dense_map, h.num_dispatched_tokens_tensor, h.local_expert_routing_map = (src_map, num_dispatched,
                                                                                            local_map)
        h.num_of_tokens_per_rank, h.config = num_of_tokens_per_rank, config
        h.overflow_flag = torch.zeros(1, dtype=torch.int32)
        if enable_permute:
            num_recv = int(num_dispatched)
            bits = local_map[:num_recv].clone()
            # mirrors DeepEP csrc/hybrid_ep/backend/hybrid_ep_backend.cuh:5414-5459 (94a9f8f6): the scan's
            # PERMUTE_FUSION build (the preprocessing kernel with enable_permute) writes dense_to_expert_map and NOT
            # local_expert_routing_map (:5449-5458 is the #else branch), which keeps the garbage torch::empty left
            # (executor.cu:110-112; here all bits set); dense_to_expert_map ([T x ranks x nodes, L] int32,
            # torch::empty at executor.cu:124-126) gets, for row n < N, each local expert's slot in the permuted
            # block (an exclusive scan over earlier rows, experts laid out one after another, each padded to
            # config.pad_multiple, 1 by default, config.cuh:442) or -1 where the row does not name that expert;
            # rows past N stay unwritten (here 0x7fffffff, a value >= 0 that names every expert)
            local_map[:] = True
            tile = max(int(config.pad_multiple), 1)
            counts = bits.sum(0, dtype=torch.int32)
            blocks = (counts + tile - 1) // tile * tile
            starts = torch.cumsum(blocks, 0) - blocks
            slots = torch.where(bits, torch.cumsum(bits.to(torch.int32), 0) - 1 + starts, -1).to(torch.int32)
            h.dense_to_expert_map = torch.full((local_map.shape[0], local_map.shape[1]), 0x7FFFFFFF,
                                               dtype=torch.int32)
            h.dense_to_expert_map[:num_recv] = slots
            # the scan also counts the received rows per local expert (:5234, num_of_local_experts_tokens);
            # pad_tokens_per_expert rounds each count up to pad_multiple (permute.cu:46-56; the argument None -> 0 ->
            # no rounding) into padded_tokens_per_expert, pinned host int64 when blocking (executor.cu:151-158),
            # then the stream is synchronized (:166-176)
            pad = pad_multiple or 0
            padded = counts.to(torch.int64) if pad <= 0 else (counts.to(torch.int64) + pad - 1) // pad * pad
            h.tokens_per_expert, h.padded_tokens_per_expert = counts, padded
            if not non_blocking:
                _HOST_SYNCS["HybridEPBuffer"] += 1  # executor.cu:167 cudaStreamSynchronize
                if h.num_permuted_tokens < 0:
                    h.num_permuted_tokens = int(padded.sum())
        return h


def _handle_tuple(h: _HandleImpl) -> tuple:
    """The non-permute ``dispatch``'s handle: ``HandleImpl``'s first 7 fields as a tuple
    (``deep_ep/hybrid_ep_buffer.py:247-259``)."""
    return (h.sparse_to_dense_map, h.rdma_to_attn_map, h.attn_to_rdma_map, h.num_dispatched_tokens_tensor,
            h.local_expert_routing_map, h.num_of_tokens_per_rank, h.config)


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
        self.runtime = _Runtime(self)  # hybrid_ep_cpp.HybridEPBuffer
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
            handle = _handle_tuple(self.runtime.metadata_preprocessing(
                config=config, routing_map=routing_map, num_of_tokens_per_rank=num_of_tokens, enable_permute=False,
                non_blocking=False))
        # mirrors DeepEP deep_ep/hybrid_ep_buffer.py:233-235: without num_dispatched_tokens the wrapper synchronizes
        # the current stream (the count sits in pinned memory the preprocessing kernel writes) (94a9f8f6)
        if num_dispatched_tokens is None:
            _HOST_SYNCS["HybridEPBuffer"] += 1
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
