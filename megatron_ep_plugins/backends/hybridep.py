"""Backend ``hybridep``: DeepEP's ``HybridEPBuffer`` (branch ``hybrid-ep``) adapted to the token-major contract.

HybridEP's non-permute ``dispatch``/``combine`` differ from the contract in three ways; the adapter bridges
them:

* **Equal token counts.** HybridEP all-gathers routing maps and hangs when ranks pass different T. At a
  shape's first dispatch the adapter agrees on the largest T with one ``all_reduce(MAX)`` (which also
  carries bad ids and shape mismatches to every rank) and pads every rank's tokens to it, rounded up to a
  multiple of 4 (see the TMA rule below); afterwards every rank pads to the buffer's capacity, which is the
  same on every rank, with no collective and no host sync (``MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH=1``:
  agree at every dispatch, as elastic's variable of the same name). Padded rows have an all-False routing
  map, so they go nowhere and come back as zeros (dropped).
* **No ``-1`` indices.** HybridEP's ``topk_idx`` path scatters the indices (a ``-1`` faults). The adapter
  never passes ``topk_idx``: it builds the ``routing_map [T, E]`` bool / ``probs [T, E]`` fp32 form itself,
  where a ``-1`` entry simply sets nothing.
* **No per-slot routing on the receiving side.** HybridEP returns probs per expert, not the token's top-k
  slots. Its preprocessing, run with the per-expert counts (``enable_permute=True``, see "Hot path" below),
  returns ``dense_to_expert_map`` (``[T x ranks, L]`` int32, allocated at ``csrc/hybrid_ep/executor/executor.cu:
  124-126``; the scan's ``PERMUTE_FUSION`` build writes row ``n``, the ``n``-th dispatched token, with its slot in
  each local expert's block or ``-1``, ``hybrid_ep_backend.cuh:5414-5448``; rows past ``N`` stay unwritten). In
  that build the scan does not write ``local_expert_routing_map`` (``:5449-5459`` is the other build's branch),
  which stays as ``torch::empty`` left it. The adapter rebuilds ``recv_topk_idx`` from ``dense_to_expert_map[:N]
  >= 0`` (the owned local ids packed first in ascending order, ``-1`` after them: the contract fixes the pairs,
  not their slots) and the weights from the dispatched probs; the per-expert counts are the scan's own. So the
  tokens travel as they are: no columns appended, no copies before or after the library's own (an earlier
  version appended the expert ids to each row, which cost two extra passes over the rows per dispatch and one
  per combine on H200).
* **One bit per (token, expert).** A token naming one expert twice in its top-k (routers never do: they take
  ``topk`` of the scores) arrives as one pair whose weight is the sum, and dispatch's backward gives both
  source slots that pair's gradient (the derivative of the sum); ``Capabilities(repeated_experts=False)``.

The real Python object (``deep_ep/hybrid_ep_buffer.py`` at 94a9f8f6) is called with its exact signature:
``HybridEPBuffer(group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, use_fp8, num_sms_...)``;
``dispatch(hidden=, routing_map=, probs=, num_of_experts=)`` (``num_of_experts`` also with a cached ``handle``:
it is asserted whenever ``routing_map`` is None); ``combine(hidden=, probs=, handle=)``. The object has no
``num_local_experts``/``hidden_dim`` attributes: the adapter keeps the experts per rank and the buffer's
hidden size itself and reads only ``num_of_hybrid_ep_ranks_per_nvlink_domain`` and ``local_rank``, which it has.

Buffer: one per process group, ``max_num_of_tokens_per_rank`` from ``MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK`` or
the agreed largest T rounded up to a multiple of 64 (grown, on every rank together, when a larger T arrives
at an agreement; in steady state a larger T is a local error naming the variables to set). Only bf16 tokens
(HybridEP moves 2-byte elements); FP8 is not supported by this adapter. Hot path: the argument checks, size
rules and T agreement run once per call key (see ``_deepep_common``); every dispatch still builds the routing
map and probs above (seven small kernels; on CUDA one CUDA graph replay per input shape from its second
dispatch on, ``MCORE_EP_HYBRIDEP_CUDA_GRAPHS``) and rebuilds the received ids (small elementwise kernels, a cumsum and
one scatter, no sort) and weights (one gather) behind HybridEP's dispatch kernel. One host sync per dispatch,
HybridEP's own (``MCORE_EP_HYBRIDEP_SCAN_COUNTS=1``, the default): the adapter calls ``HybridEPBuffer.dispatch``'s
two halves itself, the preprocessing (``runtime.metadata_preprocessing`` with ``enable_permute=True``, the scan of
HybridEP's unfused permute path, which also counts the rows per local expert and syncs the stream once) and then
``dispatch`` with the row count and handle it produced, which skips the wrapper's own stream sync. The contract's
CPU counts are that scan's ``padded_tokens_per_expert`` (pinned, pad 0). With ``0``, ``HybridEPBuffer.dispatch``
syncs in its wrapper and a copy of the counts to the host syncs a second time, exposing every launch around it:
on 2 x H200 at T=4096, in one process, dispatch + combine took 782-794 us with one sync against 1019 with two
(the bare library 631). A dispatch with a cached handle passes the row count too and syncs nothing.

Size rules of the real library, checked up front (``InvalidInputError`` on every rank alike, after the
rank agreement). Sources: DeepEP branch ``hybrid-ep`` 94a9f8f6.

* Buffer config (``csrc/hybrid_ep/config.cuh`` ``BufferConfig::is_valid``, lines 84-101, thrown as
  "The buffer config is not valid." by ``Configurer`` at :398; the per-dispatch template config repeats the
  checks at :161-178, asserted in ``deep_ep/hybrid_ep_buffer.py:162`` "The config is not valid."):
  bf16 ``hidden_dim % 16 == 0`` (:89; FP8 ``% 512`` at :87), ``(num_local_experts x ranks per NVLink
  domain) % 4 == 0`` (:91), ``(NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API x ranks per domain) % 4 == 0`` (:93,
  chunk 64 by default), and with more than one NVLink domain ``3 x max tokens + 1 < 65536`` (:22-48, the
  max tokens first padded to ``max(T, 512)`` rounded up to the combine chunk, :386).
* ``group size % ranks per NVLink domain == 0``: ``deep_ep/hybrid_ep_buffer.py:74``. Ranks per domain =
  ``NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN`` if set, else the NVLink-accessible ranks (:61-72); the
  adapter predicts the whole group (it declares ``internode=False``) and reports the real verdict too.
* Per dispatch: ``(T % NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API) x ranks per domain x 4`` bytes a multiple of 16
  (TMA load of the last partial chunk of the all-gathered routing map): ``TORCH_CHECK`` in
  ``csrc/hybrid_ep/executor/executor.cu:72-78`` ("TMA 16B alignment error", seen on 2 x H200 with T = 9).
  The adapter satisfies it by padding T to a multiple of 4 (with ``chunk x ranks % 4 == 0`` from the buffer
  config, ``T % 4 == 0`` makes the remainder's product a multiple of 4).
* SM counts at most the device's: ``csrc/hybrid_ep/config.cuh:371`` (``assert(sm_count >= sms_dispatch ...)``).
* ``num_of_experts`` required without a ``routing_map``, also with a handle: ``hybrid_ep_buffer.py:197``.
* Routing-map width = experts per rank x ranks per domain x domains: ``csrc/hybrid_ep/executor/executor.cu:35``.
* Equal T on every rank (all-gathered routing maps, ``executor.cu`` ``allgather_routing_map``) and no ``-1``
  (``indices_to_map`` scatters): handled by the padding / routing map above.
* Combine's rows have the handle's hidden size (``config.hidden_dim`` of the dispatch): a narrower ``x`` is
  padded with zero columns by the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import declare, read_bool, read_int
from ..errors import BackendUnavailableError, InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Boolean, Capabilities, DispatchResult, EnvVar, Integer
from ._cuda_graph import ShapeGraphs, capture_replay
from ._deepep_common import (agree_on_inputs, check_dispatch_args, check_handle, device_sm_count, dispatch_key,
                             probe_deep_ep, rule_error)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["HybridEPBackend", "HybridEPHandle", "check_hybridep_rules", "ep_register_backends"]

TOKEN_ALIGNMENT = 64  # Megatron's HYBRIDEP_TOKEN_ALIGNMENT
_ROW_ALIGN = 4  # pad T to a multiple of 4: (T % chunk) x ranks per domain x 4 bytes % 16 == 0 (executor.cu:72-78)
_MIN_BUFFER_TOKENS = 512  # config.cuh:386
_QP_MAX_TX_DEPTH = 65536  # config.cuh:18-20
_FALLBACK = "or the 'legacy'/'torch' backend"
_MAX_GRAPHS = 16  # routing-map graphs kept per backend; later shapes run eagerly


def _padded_max_tokens(max_tokens: int, chunk_combine: int) -> int:
    """What ``Configurer`` makes of ``max_num_of_tokens_per_rank`` (``config.cuh:386``)."""
    n = max(max_tokens, _MIN_BUFFER_TOKENS)
    return -(-n // chunk_combine) * chunk_combine if chunk_combine > 0 else n


def check_hybridep_rules(world: int, hidden: int, num_experts: int, ranks_per_domain: int, chunk_dispatch: int = 64,
                         chunk_combine: int = 64, max_tokens: Optional[int] = None, num_sms: Optional[int] = None,
                         device_sms: Optional[int] = None, use_fp8: bool = False, backend: str = "hybridep") -> None:
    """Raise :class:`InvalidInputError` when ``HybridEPBuffer`` would reject this configuration (module doc).

    ``hidden`` is the tokens' hidden size (the buffer's ``hidden_dim``); ``use_fp8`` the buffer's token type (this
    adapter builds bf16 buffers; the FP8 rule is here for completeness).
    """
    if ranks_per_domain <= 0 or world % ranks_per_domain:
        raise rule_error(backend, "HybridEP", "group size % ranks per NVLink domain == 0",
                         f"{world} ranks, {ranks_per_domain} per domain",
                         "fix NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN (or unset it)")
    local = num_experts // world
    align = 512 if use_fp8 else 16  # config.cuh:87 (FP8 scaling factors via TMA) / :89
    if hidden % align:
        raise rule_error(backend, "HybridEP's buffer config", f"{'FP8' if use_fp8 else 'bf16'} hidden_dim % {align} "
                         "== 0 (TMA)", f"hidden={hidden}", f"use a hidden size that is a multiple of {align} {_FALLBACK}")
    if (local * ranks_per_domain) % 4:
        raise rule_error(backend, "HybridEP's buffer config", "(experts per rank x ranks per NVLink domain) % 4 "
                         "== 0", f"{local} x {ranks_per_domain} (num_experts={num_experts} on {world} ranks)",
                         "use a number of experts per rank that makes the product a multiple of 4 " + _FALLBACK)
    if (chunk_dispatch * ranks_per_domain) % 4:
        raise rule_error(backend, "HybridEP's buffer config", "(NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API x ranks per "
                         "NVLink domain) % 4 == 0", f"{chunk_dispatch} x {ranks_per_domain}",
                         "set NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API to a multiple of 4 (default 64)")
    nodes = world // ranks_per_domain
    if max_tokens is not None and nodes > 1:
        padded = _padded_max_tokens(max_tokens, chunk_combine)
        if 3 * padded + 1 >= _QP_MAX_TX_DEPTH:
            limit = (_QP_MAX_TX_DEPTH - 2) // 3
            raise rule_error(backend, "HybridEP across NVLink domains", f"max tokens per rank <= {limit} (IB QP "
                             "depth)", f"{padded} (padded from {max_tokens})",
                             "lower the tokens per rank or MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK")
    if num_sms and device_sms is not None and num_sms > device_sms:
        raise rule_error(backend, "HybridEP", f"num_sms <= the GPU's {device_sms} SMs", f"num_sms={num_sms}",
                         "lower moe_flex_dispatcher_num_sms")


@dataclass
class HybridEPHandle:
    raw: Any  # HybridEP's handle tuple
    buffer: Any
    topk_idx: "torch.Tensor"  # [T, K] this rank's original global ids (unpadded), for probs' backward
    recv_topk_idx: "torch.Tensor"  # [N, K] local ids, -1 elsewhere
    num_tokens: int  # T on this rank
    padded_tokens: int  # agreed T of the dispatch
    hidden: int
    num_experts: int
    prob_offset: int  # first column of this rank's experts in the dispatched probs
    probs_width: int = 0  # columns of HybridEP's per-rank probs: local experts x ranks per NVLink domain


@dataclass
class _GroupState:
    """One group's buffer and the facts read from it once (never from attributes the real object lacks)."""

    world: int
    rank: int
    buffer: Any = None
    max_tokens: int = 0
    hidden: int = 0
    local: int = 0
    ranks_per_domain: int = 0
    prob_offset: int = 0


class HybridEPBackend:
    """HybridEP behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol (see module docstring)."""

    name = "hybridep"

    def __init__(self) -> None:
        self._pinned = read_int("MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK", minimum=1)
        self._check_each = read_bool("MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH")
        self._agreed: set = set()  # dispatch keys agreed across ranks once (unless check-each)
        # HybridEP's own knobs (read by its C++ Configurer); only used here to predict its validity rules
        self._domain_env = _env_int("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        self._chunk_dispatch = _env_int("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API") or 64
        self._chunk_combine = _env_int("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API") or 64
        import deep_ep
        import torch

        self._torch = torch
        cls = getattr(deep_ep, "HybridEPBuffer", None)
        if cls is None:
            raise ImportError("deep_ep has no HybridEPBuffer: install DeepEP from its 'hybrid-ep' branch")
        self._HybridEPBuffer = cls
        self.num_sms: Optional[int] = None
        self._groups: dict[Any, _GroupState] = {}
        self._ok: set[tuple] = set()  # validated dispatch keys
        self._cuda_graphs = read_bool("MCORE_EP_HYBRIDEP_CUDA_GRAPHS")
        self._scan_counts = read_bool("MCORE_EP_HYBRIDEP_SCAN_COUNTS")
        self._id_cols: dict[tuple, Any] = {}  # (L, K, device) -> _id_columns(...), made once
        self._graph_devices = ("cuda",)  # device types whose shapes get a graph (tests add "cpu" to see capture fail)
        self._graphs = ShapeGraphs(_MAX_GRAPHS)  # input shape -> routing-map graph (None: capture failed)

    def set_num_sms(self, num_sms: int) -> None:
        if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0:
            raise InvalidInputError(f"num_sms={num_sms!r} is invalid: use a positive int")
        if num_sms != self.num_sms:
            self._ok.clear()  # the SM-count rule is part of each key's validation
        self.num_sms = num_sms  # used for the next buffer (HybridEP fixes SM counts at construction)

    def agreement_key(self) -> Mapping[str, Any]:
        return {"algorithm": "deep_ep.HybridEPBuffer", "max_tokens_per_rank": self._pinned, "num_sms": self.num_sms}

    def _state(self, group) -> _GroupState:
        st = self._groups.get(group)
        if st is None:
            import torch.distributed as dist

            st = self._groups[group] = _GroupState(world=dist.get_world_size(group), rank=dist.get_rank(group))
        return st

    def _ranks_per_domain(self, world: int) -> int:
        return self._domain_env or world

    def _get_buffer(self, group, st: _GroupState, max_tokens: int, local: int, hidden: int,
                    num_experts: int) -> _GroupState:
        if self._pinned is not None:
            if max_tokens > self._pinned:
                raise InvalidInputError(
                    f"a rank of the group passed {max_tokens} tokens, more than MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK="
                    f"{self._pinned}: raise it or unset it")
            need = self._pinned
        else:
            need = -(-max(max_tokens, 1) // TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT
        if st.buffer is not None:
            if st.max_tokens >= need and st.hidden == hidden and st.local == local:
                return st
            if st.hidden == hidden and st.local == local:
                need = max(need, st.max_tokens)  # grow, never shrink
        check_hybridep_rules(st.world, hidden, num_experts, self._ranks_per_domain(st.world), self._chunk_dispatch,
                             self._chunk_combine, need)
        kwargs = {}
        if self.num_sms is not None:
            kwargs = {"num_sms_dispatch_api": self.num_sms, "num_sms_combine_api": self.num_sms}
        try:
            buffer = self._HybridEPBuffer(group=group, hidden_dim=hidden, max_num_of_tokens_per_rank=need,
                                          num_local_experts=local, use_fp8=False, **kwargs)
        except RuntimeError as exc:
            if "config is not valid" not in str(exc):
                raise
            raise InvalidInputError(
                f"backend 'hybridep': HybridEPBuffer rejected its buffer config ({exc}): it needs bf16 hidden_dim "
                "% 16 == 0, (experts per rank x ranks per NVLink domain) % 4 == 0 and (tokens per dispatch chunk x "
                f"ranks per domain) % 4 == 0; got hidden_dim={hidden}, "
                f"{local} experts per rank, ranks per domain predicted {self._ranks_per_domain(st.world)} (HybridEP "
                "detects them: set NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN if the prediction is wrong); use a "
                "valid configuration " + _FALLBACK) from None
        if self._scan_counts and not (callable(getattr(buffer, "update_template_config", None)) and callable(
                getattr(getattr(buffer, "runtime", None), "metadata_preprocessing", None))):
            raise BackendUnavailableError(
                "backend 'hybridep': this HybridEPBuffer has no update_template_config / runtime.metadata_preprocessing "
                "(DeepEP's hybrid-ep branch at 94a9f8f has both), which MCORE_EP_HYBRIDEP_SCAN_COUNTS=1 (the default) "
                "needs to sync the host once per dispatch; set MCORE_EP_HYBRIDEP_SCAN_COUNTS=0 to call "
                "HybridEPBuffer.dispatch as it is (two host syncs per dispatch)")
        rpd = int(buffer.num_of_hybrid_ep_ranks_per_nvlink_domain)
        local_rank = getattr(buffer, "local_rank", None)
        st.buffer, st.max_tokens, st.hidden, st.local, st.ranks_per_domain = buffer, need, hidden, local, rpd
        st.prob_offset = int(local_rank if local_rank is not None else st.rank % rpd) * local
        return st

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        torch = self._torch
        st = self._state(group)
        key = dispatch_key(x, topk_idx, topk_weights, num_experts, group)
        try:
            valid = key is not None and key in self._ok
        except TypeError:
            valid = False
        if not valid:  # slow path, once per key: argument checks (local)
            check_dispatch_args(self.name, x, topk_idx, topk_weights, num_experts, st.world, fp8=False)
        if topk_idx.dtype is not torch.int64:
            topk_idx = topk_idx.long()
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = num_experts // st.world
        device = x.device
        if valid and not self._check_each and key in self._agreed:
            # agreed before: every rank pads to the buffer's capacity (the same on every rank, built from agreed
            # sizes), so no collective and no host sync; a larger batch cannot grow the buffer on one rank alone
            if num_tokens > st.max_tokens:
                raise InvalidInputError(
                    f"backend 'hybridep': {num_tokens} tokens exceed the buffer's max_num_of_tokens_per_rank="
                    f"{st.max_tokens} agreed at this shape's first dispatch (detected on this rank only); set "
                    f"MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK={-(-num_tokens // TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT} (or "
                    "the largest batch) on every rank, or MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH=1 to let all ranks "
                    "grow the buffer together")
            max_t = st.max_tokens
        else:
            max_t = agree_on_inputs(self.name, group, num_tokens, hidden, topk, topk_idx, num_experts, device)
            # every rank pads to the agreed T, rounded up to a multiple of 4: HybridEP's preprocessing TMA-loads the
            # last partial chunk of (T % chunk) x ranks-per-domain int32s and needs a multiple of 16 bytes
            max_t = -(-max_t // _ROW_ALIGN) * _ROW_ALIGN
            if key is not None and not self._check_each:
                self._agreed.add(key)
        if not valid:  # after the agreement every rank has the same sizes: the rules fail on all ranks alike
            check_hybridep_rules(st.world, hidden, num_experts, self._ranks_per_domain(st.world),
                                 self._chunk_dispatch, self._chunk_combine, num_sms=self.num_sms,
                                 device_sms=device_sm_count(device))
            self._ok.add(key)
        self._get_buffer(group, st, max_t, local, hidden, num_experts)
        buffer = st.buffer

        routing_map, probs = self._routing_inputs(topk_idx, topk_weights, max_t, num_experts)
        rows = x if max_t == num_tokens else _pad_rows(torch, x, max_t)

        if self._scan_counts:
            tokens, dprobs, raw, recv_idx, tokens_per_expert = self._dispatch_one_sync(
                buffer, rows, routing_map, probs, hidden, max_t, num_experts, topk)
        else:
            tokens, dprobs, _, raw = buffer.dispatch(hidden=rows, routing_map=routing_map, probs=probs,
                                                     num_of_experts=num_experts)
            owned = raw[4][:tokens.shape[0]]  # local_expert_routing_map: the first N rows are written
            tokens_per_expert = owned.sum(0).cpu()  # the second host sync
            recv_idx = _owned_ids(torch, owned, topk, self._columns(local, topk, owned.device))
        # the weights: the dispatched probs at this rank's columns (offset = its first expert among HybridEP's
        # per-domain columns); slots without an id take column 0's (the contract leaves them free)
        recv_w = dprobs.narrow(1, st.prob_offset, local).gather(1, recv_idx.clamp(min=0))
        handle = HybridEPHandle(raw, buffer, topk_idx, recv_idx, num_tokens, max_t, hidden, num_experts,
                                st.prob_offset, local * st.ranks_per_domain)
        return DispatchResult(tokens, recv_idx, recv_w, tokens_per_expert, handle)

    def _dispatch_one_sync(self, buffer, rows, routing_map, probs, hidden: int, max_t: int, num_experts: int,
                           topk: int):
        """``HybridEPBuffer.dispatch`` in its two halves, minus its stream sync (``MCORE_EP_HYBRIDEP_SCAN_COUNTS=1``).

        The preprocessing runs with the per-expert counts (``enable_permute=True``: the scan of HybridEP's unfused
        permute path), which syncs the stream once and leaves the received row count and the counts in pinned host
        memory; ``dispatch`` then gets the count and syncs nothing. That scan's build writes ``dense_to_expert_map``
        (row n's slot in each local expert's block, -1 where it does not name it) instead of
        ``local_expert_routing_map``, which it leaves as allocated. Returns ``(tokens, dispatched probs, handle tuple,
        recv_topk_idx [N, K], CPU counts)``."""
        torch = self._torch
        pre = buffer.runtime.metadata_preprocessing(
            config=buffer.update_template_config(hidden_dim=hidden, num_of_tokens_per_rank=max_t),
            routing_map=routing_map, num_of_tokens_per_rank=max_t, enable_permute=True, non_blocking=False)
        num_recv = int(pre.num_dispatched_tokens_tensor.item())  # pinned host memory, written before that sync
        raw = (pre.sparse_to_dense_map, pre.rdma_to_attn_map, pre.attn_to_rdma_map, pre.num_dispatched_tokens_tensor,
               pre.local_expert_routing_map, pre.num_of_tokens_per_rank, pre.config)  # HybridEP's handle tuple
        tokens, dprobs, _, _ = buffer.dispatch(hidden=rows, probs=probs, num_of_experts=num_experts, handle=raw,
                                               num_dispatched_tokens=num_recv)
        # on the current stream after the dispatch kernel: built beside it on a side stream instead, the pair took
        # 938 us against 782 on 2 x H200 (combine slowed by 94 us), results/2xH200/diag/hybridep_ab_lease12.md
        d2e = pre.dense_to_expert_map
        recv_idx = _owned_ids(torch, d2e[:num_recv] >= 0, topk, self._columns(d2e.shape[1], topk, d2e.device))
        # the counts: [L] int64 in pinned host memory, allocated by this preprocessing call (no later call writes it)
        return tokens, dprobs, raw, recv_idx, pre.padded_tokens_per_expert

    def _columns(self, local: int, topk: int, device):
        key = (local, topk, device)
        cols = self._id_cols.get(key)
        if cols is None:
            cols = self._id_cols[key] = _id_columns(self._torch, local, topk, device)
        return cols

    def _routing_inputs(self, topk_idx, topk_weights, max_t: int, num_experts: int):
        """:func:`_routing_inputs` for this dispatch; on CUDA, from the second dispatch of a shape on, one replay of a
        CUDA graph captured for that shape (``MCORE_EP_HYBRIDEP_CUDA_GRAPHS=0``: never)."""
        torch = self._torch
        if not self._cuda_graphs or topk_idx.device.type not in self._graph_devices or not topk_idx.shape[0]:
            return _routing_inputs(torch, topk_idx, topk_weights, max_t, num_experts)
        key = (topk_idx.device, topk_idx.shape, topk_weights.dtype, max_t, num_experts)
        replay = self._graphs.lookup(key, lambda: capture_replay(
            lambda idx, w: _routing_inputs(torch, idx, w, max_t, num_experts), (topk_idx, topk_weights),
            f"backend 'hybridep': routing map for T={topk_idx.shape[0]} (MCORE_EP_HYBRIDEP_CUDA_GRAPHS=0 turns "
            "capture off)"))
        if replay is None:  # first sight of the shape, too many shapes, or capture failed (logged once)
            return _routing_inputs(torch, topk_idx, topk_weights, max_t, num_experts)
        # the graph's own outputs, not copied: HybridEP has consumed them before the next replay (_routing_inputs)
        return replay(topk_idx, topk_weights)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        torch = self._torch
        h = check_handle(handle, HybridEPHandle, "hybridep")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != (h.num_tokens, h.hidden):
            raise InvalidInputError(f"dispatch with a cached handle expects x of shape [{h.num_tokens}, {h.hidden}], "
                                    f"got {tuple(getattr(x, 'shape', ()))}")
        _check_dtype(x, torch.bfloat16)
        rows = x.contiguous() if h.padded_tokens == h.num_tokens else _pad_rows(torch, x, h.padded_tokens)
        # the real dispatch asserts num_of_experts whenever routing_map is None, also with a handle; with the row
        # count given it skips its stream sync (the count is the handle's, known since the dispatch that made it)
        tokens, _, _, _ = h.buffer.dispatch(hidden=rows, num_of_experts=h.num_experts, handle=h.raw,
                                            num_dispatched_tokens=h.recv_topk_idx.shape[0])
        return tokens

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        torch = self._torch
        h = check_handle(handle, HybridEPHandle, "hybridep")
        num_recv = h.recv_topk_idx.shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != num_recv or x.shape[1] > h.hidden:
            raise InvalidInputError(f"combine expects x of shape [{num_recv}, {h.hidden}] (one row per row dispatch "
                                    f"delivered here, same order), got {tuple(getattr(x, 'shape', ()))}")
        _check_dtype(x, torch.bfloat16)
        width = x.shape[1]
        # the handle's config fixes the row width (the dispatch's hidden): a narrower x gets zero columns
        rows = x.contiguous() if width == h.hidden else torch.nn.functional.pad(x, (0, h.hidden - width))
        probs = None
        if topk_weights is not None:
            if topk_weights.shape != h.recv_topk_idx.shape:
                raise InvalidInputError(f"combine's topk_weights must have shape {tuple(h.recv_topk_idx.shape)}, "
                                        f"got {tuple(topk_weights.shape)}")
            owned = h.recv_topk_idx >= 0
            probs = torch.zeros(num_recv, h.probs_width, dtype=torch.float32, device=x.device)
            probs.scatter_add_(1, h.prob_offset + h.recv_topk_idx.clamp(min=0),
                               torch.where(owned, topk_weights.float(), 0.0))
        combined, combined_probs = h.buffer.combine(hidden=rows, probs=probs, handle=h.raw)
        # HybridEP allocates the output per call ([padded T, hidden], hybrid_ep.cu:238): the leading rows are ours
        out = combined if h.padded_tokens == h.num_tokens else combined[:h.num_tokens]
        if width != h.hidden:
            out = out[:, :width].contiguous()
        combined_w = None
        if topk_weights is not None:
            valid = h.topk_idx >= 0
            combined_w = torch.where(valid, combined_probs[:h.num_tokens].float().gather(1, h.topk_idx.clamp(min=0)),
                                     0.0)
        return out, combined_w


def _owned_ids(torch, owned, topk: int, cols=None):
    """``recv_topk_idx [N, K]`` from the received rows' local-expert bits ``owned [N, L]`` (bool): each row's set bits'
    local ids packed first in ascending order, ``-1`` after them (the contract fixes the pairs, not their slots).

    A row has at most K set bits (a token names at most K experts). The slot of a set bit is the count of set bits up
    to it (a cumsum) minus one; the unset bit of column j goes to spare slot K + j, so one scatter with no two writes
    to one place (deterministic) puts every column id in its slot, and the spare slots are dropped. No sort:
    ``topk`` of the ranked bits took 40 us per dispatch at N=8192, L=128 on H200 (``trace_slot.py``), its int64
    form 178 us. ``cols``: ``(arange(L), arange(L) + K)`` on the device, made here when not given (the backend
    keeps them per shape)."""
    num_rows, local = owned.shape
    cols, spare = cols if cols is not None else _id_columns(torch, local, topk, owned.device)
    slot = torch.where(owned, owned.cumsum(1).sub_(1).clamp_(max=topk - 1), spare)
    ids = torch.full((num_rows, topk + local), -1, dtype=torch.int64, device=owned.device)
    ids.scatter_(1, slot, cols.expand(num_rows, local))
    return ids[:, :topk].contiguous()


def _id_columns(torch, local: int, topk: int, device):
    """``(arange(L), arange(L) + K)``: the column ids and the spare slots :func:`_owned_ids` scatters with."""
    cols = torch.arange(local, device=device)
    return cols, cols + topk


def _routing_inputs(torch, topk_idx, topk_weights, max_t: int, num_experts: int):
    """HybridEP's ``routing_map [max_t, E]`` bool and ``probs [max_t, E]`` fp32 from the token-major top-k: rows past
    ``T`` (padding) and ``-1`` entries select no expert. The map is an amax over uint8 (viewed as bool), so a
    clamped ``-1`` (0 at column 0) never hides a real entry; the probs a sum (a masked entry adds 0). Seven
    kernels, fixed shapes, no host sync, so on CUDA they are captured as one graph per shape
    (``HybridEPBackend._routing_inputs``). Its outputs are then the graph's own tensors, rewritten by the next
    replay, and are not copied out: HybridEP has consumed them by then (its routing-map all-gather completes
    before ``dispatch``'s host sync; the dispatch kernel reads the probs on the current stream, ahead of any
    later replay there), and the handle keeps neither."""
    num_tokens = topk_idx.shape[0]
    valid = topk_idx >= 0
    safe = topk_idx.clamp(min=0)
    hits = torch.zeros(max_t, num_experts, dtype=torch.uint8, device=topk_idx.device)
    probs = torch.zeros(max_t, num_experts, dtype=torch.float32, device=topk_idx.device)
    if num_tokens:
        hits[:num_tokens].scatter_reduce_(1, safe, valid.view(torch.uint8), "amax")
        probs[:num_tokens].scatter_add_(1, safe, topk_weights * valid)
    return hits.view(torch.bool), probs


def _pad_rows(torch, x, num_rows: int):
    """``x`` followed by zero rows up to ``num_rows`` (every rank passes HybridEP the same T)."""
    rows = torch.empty(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    rows[:x.shape[0]].copy_(x)
    rows[x.shape[0]:].zero_()
    return rows


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None  # HybridEP's own atoi reading; its constructor reports it


def _check_dtype(x, bf16) -> None:
    if x.dtype != bf16:
        raise InvalidInputError(f"backend 'hybridep' moves bf16 tokens, got {x.dtype}; cast x to torch.bfloat16")


def _probe() -> Availability:
    facts = probe_deep_ep("HybridEPBuffer", "HybridEP ships in DeepEP's 'hybrid-ep' branch, no wheel",
                          "deep_ep has no HybridEPBuffer: install DeepEP from its 'hybrid-ep' branch",
                          "HybridEP needs an NVIDIA GPU", (8, 0))
    problems, details = facts.problems, facts.details
    if problems:
        return Availability.no("; ".join(problems), **details)
    return Availability.yes(f"deep_ep {details['deep_ep']}: HybridEPBuffer (token-major adapter, padded to equal T)",
                            **details)


#: The variables this backend reads (megatron-ep env and the README table list them).
SETTINGS = declare(
    EnvVar("MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK", "", "HybridEP `max_num_of_tokens_per_rank`; unset: the "
           "largest token count seen on any rank, rounded up to a multiple of 64.", Integer(1, 1 << 20)),
    EnvVar("MCORE_EP_HYBRIDEP_CUDA_GRAPHS", "1", "`1`: on CUDA, build HybridEP's routing map and probs from the "
           "top-k (seven small kernels before its preprocessing sync) as one CUDA graph replay per input shape, "
           "captured at the shape's second dispatch (at most 16 kept); `0`: launch them one by one.", Boolean()),
    EnvVar("MCORE_EP_HYBRIDEP_SCAN_COUNTS", "1", "`1`: run HybridEP's preprocessing with its per-expert counts (the "
           "scan of its permute path), so each dispatch syncs the host once, in HybridEP; `0`: HybridEP's `dispatch` "
           "as it is, then a copy of the counts to the host (two host syncs, a lighter scan).", Boolean()),
    EnvVar("MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH", "0", "`1`: agree on token count, shapes and expert ids across "
           "ranks at every dispatch (one small all_reduce + host sync), padding every rank to the largest T of "
           "that dispatch; `0`: once per input shape, then every rank pads to the buffer's capacity and a larger "
           "batch is a local error naming `MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK`.", Boolean()),
)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="hybridep",
            aliases=("hybrid-ep",),
            priority=100,
            factory=HybridEPBackend,
            probe=_probe,
            settings=SETTINGS,
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=False, uneven_tokens=True, async_overlap=False,
                                      deterministic_order=False, internode=False, repeated_experts=False),
            description="DeepEP HybridEPBuffer (hybrid-ep branch), padded to equal T; emulator-tested only",
        )
    ]
