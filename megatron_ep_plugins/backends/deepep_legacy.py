"""Backend ``legacy``: DeepEP V1 ``deep_ep.Buffer``, called the way Megatron-Core's ``fused_a2a`` calls it.

* One ``Buffer`` per process group, sized from ``Buffer.get_dispatch_config(R)``/``get_combine_config(R)``
  hints for the token's hidden bytes and the current SM count (as Megatron's ``get_buffer``), reused, and
  rebuilt only when that group needs a larger size (grow, never shrink: the new buffer is at least as large
  as the old one in both NVL and RDMA bytes). Two EP groups used alternately keep one buffer each. Only the
  core constructor arguments are passed (``group, num_nvl_bytes, num_rdma_bytes``): the optional keywords
  drift between DeepEP builds.
* Dispatch = ``get_dispatch_layout`` then ``dispatch`` (6-tuple); combine's backward = ``dispatch(x,
  handle=...)``; combine = ``combine`` (3-tuple). FP8 ``(e4m3, scales)`` input is passed through.
* ``async_finish`` / ``allocate_on_comm_stream``: by default DeepEP's synchronous mode, whatever Megatron
  passes (same stream ordering, less host work: ``_deepep_common.STREAM_OVERLAP_NOTE``). With
  ``stream_overlap = True``: like Megatron, ``previous_event=EventOverlap(EventHandle())`` and
  ``event.current_stream_wait()`` afterwards; ``allocate_on_comm_stream`` only together with ``async_finish``
  (DeepEP V1 asserts that combination).
* Combine with ``topk_weights`` (dispatch's backward) masks the entries whose expert lives elsewhere
  before the kernel sums over ranks, so each source entry comes from the rank owning its expert.
* ``EventOverlap``/``EventHandle`` are imported from ``deep_ep.utils``, else ``deep_ep.utils.event``, else
  ``deep_ep`` (DeepEP V2 stopped re-exporting them from ``deep_ep.utils``, which makes Megatron 0.19.2's own
  probe report DeepEP missing on a V2 install).
* DeepEP V2.5 (``EPBuffer`` only; upstream ``deep_ep`` or SGLang's ``sgl-deep-ep-v25`` wheel, import name
  ``deep_ep_v25``) removed the V1 ``Buffer``: the probe and the constructor say so and point to ``elastic``
  (which drives ``EPBuffer``) or to DeepEP <= 2.1 (e.g. ``sgl-deep-ep``, import name ``deep_ep``).
* Hot path: the argument checks, the size rules below and the buffer lookup run once per call key (group,
  dtype, hidden, top-k, experts; see ``_deepep_common``); a steady-state call does one dict lookup plus the
  DeepEP calls and Megatron's own ``torch.tensor(num_recv_tokens_per_expert_list)``. A new SM count
  (``set_num_sms``, or ``Buffer.num_sms`` changed directly) re-checks the buffer size, since the size hints
  grow with it.

Size rules of the real kernels, checked up front (``InvalidInputError`` on every rank alike: they only
depend on values all ranks share). Sources: DeepEP ``main`` dd758caf (``deep_ep`` 2.1.0).

* Group size R in {2, 4, 8} (intranode, NVLink) or {16, 24, 32, 48, 64, 96, 128, 144, 160} (internode):
  ``deep_ep/buffers/legacy.py`` ``get_dispatch_config``/``get_combine_config`` (``config_map``),
  ``csrc/kernels/legacy/launch.cuh`` ``SWITCH_RANKS`` / ``SWITCH_RDMA_RANKS``, ``csrc/legacy/buffer.hpp:113-114``.
* Hidden bytes a multiple of 16 (``int4``) for dispatch, cached dispatch and combine:
  ``csrc/legacy/buffer.hpp:458`` (intranode dispatch), ``:750`` (intranode combine), ``:930`` / ``:1285``
  (internode).
* Intranode dispatch: ``hidden_int4 % 2 == 0`` (hidden bytes a multiple of 32: bf16 hidden % 16, FP8
  hidden % 32) and half a token plus an 8-byte mbarrier within the 8192-byte TMA slot per warp (bf16 hidden
  <= 8176, FP8 hidden <= 16352): device asserts in ``csrc/kernels/legacy/intranode.cu:304``
  (``kNumTMABytesPerWarp = 8192`` at ``:577``) of the SM90 build. A violation traps the kernel (on the
  2 x H200 machine the test hung).
* Internode dispatch: one token (hidden bytes + 8-byte ``SourceMeta`` + 4 bytes per scale + 8 bytes per
  top-k slot, rounded up to 16) plus 8 within 16384 bytes: ``csrc/kernels/legacy/internode.cu:578``
  (``kNumTMABytesPerWarp = 16384`` at ``:1254``).
* Internode combine: bf16 hidden % 256 (``hidden_int4 % 32 == 0`` in the TMA reduction,
  ``csrc/kernels/legacy/internode.cu:1588``, used at ``:2091``) and one token (hidden bytes + 8 + 4 per
  top-k slot, rounded up to 16) plus 8 within 16384 bytes (``:1816``, ``kNumTMABytesPerSenderWarp`` at ``:2313``).
* Combine takes bf16 only: ``csrc/kernels/legacy/launch.cuh`` ``SWITCH_TYPES`` (``CUDA_R_16BF``),
  ``csrc/kernels/legacy/internode.cu:2373``.
* Top-k <= 32: ``csrc/kernels/legacy/intranode.cu:251`` / ``:730``, ``internode.cu:519`` / ``:1754``.
* ``num_experts % R == 0`` and at most 128 experts per rank intranode (``notify_dispatch``'s 128 threads):
  ``csrc/kernels/legacy/intranode.cu:167-168``; internode at most 512 experts per RDMA rank
  (``internode.cu:227``/``:265``, 512 threads at ``:415``); at most 1024 local experts
  (``csrc/legacy/buffer.hpp:469``, ``LEGACY_NUM_MAX_LOCAL_EXPERTS`` in ``csrc/kernels/legacy/compiled.cuh``).
* SM count even: ``deep_ep/buffers/legacy.py`` ``Buffer.set_num_sms``; ``csrc/legacy/buffer.hpp:436``.
* FP8 scales ``[T, S]`` of 4-byte elements: ``csrc/legacy/buffer.hpp:498-501`` (the adapter accepts float32).
* Not with ``torch.use_deterministic_algorithms(True)`` plus ``fill_uninitialized_memory``:
  ``deep_ep/utils/envs.py`` ``check_torch_deterministic`` (asserted by every dispatch/combine).

Limits: the expert ids are not range-checked (that would cost a host sync; DeepEP does not either).
``MCORE_EP_LEGACY_NUM_SMS`` overrides Megatron's SM budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import declare, read_int
from ..errors import ConfigError, InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Capabilities, DispatchResult, EnvVar, Integer
from ._deepep_common import (check_combine_args, check_dispatch_args, check_handle, check_token_rows,
                             check_torch_deterministic, combine_key, counts_tensor, deep_ep_api, deep_ep_version,
                             call_key, import_event_classes, owned_weights, probe_deep_ep, remember,
                             rule_error, v25_module_note)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DeepEPLegacyBackend", "LegacyHandle", "check_v1_rules", "ep_register_backends", "missing_buffer_reason"]

#: What a DeepEP V2.5 user can do instead (V2.5 removed the V1 ``Buffer``: sgl-deep-ep-v25 0.1.0rc0
#: ``__init__.py:70-78`` exports ``EPBuffer``, ``EngramBuffer``, ``PPBuffer``, ``BucketBuffer`` and no ``Buffer``).
V25_HINT = ("use the 'elastic' backend (it drives V2.5's EPBuffer), or install DeepEP <= 2.1 (e.g. sgl-deep-ep, "
            "import name deep_ep) for 'legacy'")


def missing_buffer_reason(deep_ep: Any) -> str:
    """Why this ``deep_ep`` cannot serve the ``legacy`` backend (it has no V1 ``Buffer``)."""
    if deep_ep_api(deep_ep) == "V2.5":
        return (f"this DeepEP (V2.5, deep_ep {deep_ep_version(deep_ep)}, EPBuffer only) removed the V1 Buffer that "
                f"the 'legacy' backend drives; {V25_HINT}")
    return "deep_ep has no Buffer class (this DeepEP build lacks the V1 API)"

INTRANODE_RANKS = (2, 4, 8)  # launch.cuh SWITCH_RANKS
INTERNODE_RANKS = (16, 24, 32, 48, 64, 96, 128, 144, 160)  # launch.cuh SWITCH_RDMA_RANKS x 8
SUPPORTED_RANKS = INTRANODE_RANKS + INTERNODE_RANKS  # = legacy.py config_map keys
MAX_TOPK = 32
MAX_EXPERTS_PER_RANK_INTRANODE = 128  # intranode.cu:168, notify_dispatch kNumThreads
MAX_EXPERTS_PER_RDMA_RANK = 512  # internode.cu:227, notify_dispatch kNumThreads
MAX_LOCAL_EXPERTS = 1024  # LEGACY_NUM_MAX_LOCAL_EXPERTS
INTRANODE_TMA_BYTES = 8192  # intranode.cu:577
INTERNODE_TMA_BYTES = 16384  # internode.cu:1254 (dispatch), :2313 (combine sender)
_SOURCE_META_BYTES = 8  # internode.cu SourceMeta: two ints
_COMBINE, _CACHED = "combine", "cached"  # call-key tags
_FALLBACK = "or the 'elastic'/'torch' backend"


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def check_v1_rules(world: int, hidden: int, elem_size: int, topk: int, num_experts: Optional[int],
                   num_scales: int = 0, op: str = "dispatch", backend: str = "legacy") -> None:
    """Raise :class:`InvalidInputError` when DeepEP V1 would reject or trap on these sizes (see module doc).

    ``op``: ``"dispatch"`` (also the cached dispatch, same kernel) or ``"combine"``; ``elem_size``: 2 (bf16)
    or 1 (FP8); ``num_experts`` ``None`` for a combine.
    """
    if world not in SUPPORTED_RANKS:
        raise rule_error(backend, "DeepEP V1", "an expert-parallel group of 2, 4 or 8 ranks (NVLink) or 16, 24, "
                         "32, 48, 64, 96, 128, 144 or 160 ranks (internode)", f"{world} ranks (DeepEP V1 has no "
                         "kernel configuration for it)", f"use a supported group size {_FALLBACK}")
    internode = world > 8
    dtype = "FP8" if elem_size == 1 else "bf16"
    hidden_bytes = hidden * elem_size
    if hidden_bytes % 16:
        raise rule_error(backend, f"DeepEP V1 {op}", f"hidden * element size % 16 == 0 (whole int4 vectors), i.e. "
                         f"{dtype} hidden % {16 // elem_size} == 0", f"hidden={hidden}",
                         f"use a hidden size that is a multiple of {16 // elem_size} {_FALLBACK}")
    if topk > MAX_TOPK:
        raise rule_error(backend, "DeepEP V1", f"top-k <= {MAX_TOPK}", f"topk={topk}",
                         f"route each token to at most {MAX_TOPK} experts or use the 'torch' backend")
    if op == "combine":
        if internode and hidden % 256:
            raise rule_error(backend, "DeepEP V1 internode combine", "hidden % 256 == 0 (TMA reduction of "
                             "32 int4 per lane)", f"hidden={hidden} on {world} ranks",
                             f"use a hidden size that is a multiple of 256 {_FALLBACK}")
        if internode and _align16(hidden * 2 + _SOURCE_META_BYTES + 4 * topk) + 8 > INTERNODE_TMA_BYTES:
            raise rule_error(backend, "DeepEP V1 internode combine", f"one token (hidden * 2 + 8 + 4 * topk bytes) "
                             f"to fit its {INTERNODE_TMA_BYTES}-byte TMA buffer", f"hidden={hidden}, topk={topk}",
                             f"use a smaller hidden size {_FALLBACK}")
        return
    if internode:
        token = _align16(hidden_bytes + _SOURCE_META_BYTES + 4 * num_scales + 8 * topk)
        if token + 8 > INTERNODE_TMA_BYTES:
            raise rule_error(backend, "DeepEP V1 internode dispatch", f"one token (hidden bytes + 8 + 4 * scales + "
                             f"8 * topk) to fit its {INTERNODE_TMA_BYTES}-byte TMA buffer",
                             f"{token} bytes (hidden={hidden} {dtype}, topk={topk})",
                             f"use a smaller hidden size {_FALLBACK}")
        if hidden % 256:  # the same tokens come back through the internode combine
            raise rule_error(backend, "DeepEP V1 internode combine", "hidden % 256 == 0 (TMA reduction of "
                             "32 int4 per lane)", f"hidden={hidden} on {world} ranks",
                             f"use a hidden size that is a multiple of 256 {_FALLBACK}")
    else:
        if hidden_bytes % 32:
            raise rule_error(backend, "DeepEP V1 intranode dispatch", f"{dtype} hidden % {32 // elem_size} == 0 "
                             "(hidden_int4 % 2 == 0: each token moves as two TMA halves; the kernel traps or "
                             "hangs otherwise)", f"hidden={hidden}",
                             f"use a hidden size that is a multiple of {32 // elem_size} {_FALLBACK}")
        limit = (INTRANODE_TMA_BYTES - 8) // 16 * 16 * 2 // elem_size
        if hidden > limit:
            raise rule_error(backend, "DeepEP V1 intranode dispatch", f"{dtype} hidden <= {limit} (half a token "
                             f"plus an 8-byte barrier in a {INTRANODE_TMA_BYTES}-byte TMA slot)", f"hidden={hidden}",
                             f"use a smaller hidden size {_FALLBACK}")
    if num_experts is None:
        return
    if num_experts % world:
        raise rule_error(backend, "DeepEP V1", "num_experts % group size == 0", f"num_experts={num_experts} on "
                         f"{world} ranks", f"use a multiple of {world} experts")
    local = num_experts // world
    if internode:
        per_rdma = num_experts // (world // 8)
        if per_rdma > MAX_EXPERTS_PER_RDMA_RANK or local > MAX_LOCAL_EXPERTS:
            raise rule_error(backend, "DeepEP V1 internode", f"at most {MAX_EXPERTS_PER_RDMA_RANK} experts per "
                             "node of 8 ranks", f"num_experts={num_experts} on {world} ranks",
                             f"use fewer experts or more ranks {_FALLBACK}")
    elif local > MAX_EXPERTS_PER_RANK_INTRANODE:
        raise rule_error(backend, "DeepEP V1 intranode", f"at most {MAX_EXPERTS_PER_RANK_INTRANODE} experts per "
                         "rank", f"{local} (num_experts={num_experts} on {world} ranks)",
                         f"use fewer experts or more ranks {_FALLBACK}")


@dataclass
class LegacyHandle:
    """DeepEP's handle plus what the adapter needs for backward."""

    raw: Any  # DeepEP V1's handle tuple
    recv_topk_idx: "torch.Tensor"  # [N, K] local ids, -1 = expert elsewhere (masks combine's topk_weights)
    num_tokens: int
    num_recv: int
    num_experts: int


def _hidden_bytes(data: "torch.Tensor") -> int:
    return data.size(1) * max(data.element_size(), 2)  # as Megatron's get_hidden_bytes


def _validate_num_sms(num_sms: Any, what: str, exc: type) -> int:
    if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0 or num_sms % 2:
        raise exc(f"{what}={num_sms!r} is invalid: DeepEP V1 needs a positive even SM count (e.g. 20 or 24)")
    return num_sms


class DeepEPLegacyBackend:
    """DeepEP V1 ``Buffer`` behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol."""

    #: Pass Megatron's async_finish / allocate_on_comm_stream to DeepEP (see _deepep_common.STREAM_OVERLAP_NOTE).
    stream_overlap: bool = False

    name = "legacy"

    def __init__(self) -> None:
        env_sms = read_int("MCORE_EP_LEGACY_NUM_SMS", minimum=2)
        if env_sms is not None:
            _validate_num_sms(env_sms, "MCORE_EP_LEGACY_NUM_SMS", ConfigError)
        try:
            import deep_ep
        except ImportError as exc:
            note = v25_module_note()
            if note is None:
                raise
            raise ImportError(f"deep_ep not importable: {exc}; {note}: {V25_HINT}") from exc
        import torch

        if not hasattr(deep_ep, "Buffer"):
            raise ImportError(missing_buffer_reason(deep_ep))
        self._Buffer = deep_ep.Buffer
        self._EventOverlap, self._EventHandle = import_event_classes()
        self._int64 = torch.int64
        self._env_num_sms = env_sms
        self.num_sms: Optional[int] = None
        self._buffers: dict[Any, Any] = {}  # group -> its Buffer (grown, never shrunk)
        self._world: dict[Any, int] = {}  # group -> size
        self._ready: dict[tuple, Any] = {}  # validated call key -> the buffer that fits it
        self._ready_sms: Optional[int] = None  # Buffer.num_sms the entries of _ready were sized for
        if env_sms is not None:
            self._Buffer.set_num_sms(env_sms)
            self.num_sms = env_sms

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        _validate_num_sms(num_sms, "num_sms", InvalidInputError)
        if self._env_num_sms is not None:
            return  # MCORE_EP_LEGACY_NUM_SMS wins over Megatron's moe_flex_dispatcher_num_sms
        self._Buffer.set_num_sms(num_sms)
        self.num_sms = num_sms
        self._ready.clear()  # the size hints grow with the SM count: re-check every buffer

    def agreement_key(self) -> Mapping[str, Any]:
        # The SM count fixes the channel count, which must match on every rank.
        return {"algorithm": "deep_ep.Buffer", "num_sms": self.num_sms}

    # -- buffers and the call-key cache --------------------------------------------------------
    def _lookup(self, key):
        """The buffer a validated call key maps to, or ``None`` (one dict lookup on the steady path)."""
        if self._ready_sms != self._Buffer.num_sms:  # changed behind our back (Buffer.set_num_sms)
            self._ready.clear()
            self._ready_sms = self._Buffer.num_sms
        try:
            return self._ready.get(key)
        except TypeError:  # unhashable argument: the full checks will say what is wrong
            return None

    def _world_size(self, group) -> int:
        world = self._world.get(group)
        if world is None:
            import torch.distributed as dist

            world = self._world[group] = dist.get_world_size(group)
        return world

    def _get_buffer(self, group, hidden_bytes: int, world: int):
        size = world
        configs = (self._Buffer.get_dispatch_config(size), self._Buffer.get_combine_config(size))
        num_nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, size) for c in configs)
        num_rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, size) for c in configs)
        old = self._buffers.get(group)
        if old is not None and old.num_nvl_bytes >= num_nvl and old.num_rdma_bytes >= num_rdma:
            return old
        if old is not None:  # grow, never shrink
            num_nvl, num_rdma = max(num_nvl, old.num_nvl_bytes), max(num_rdma, old.num_rdma_bytes)
            self._ready = {k: v for k, v in self._ready.items() if v is not old}
        # NOTES (DeepEP): the network's adaptive routing must be off for internode.
        buf = self._buffers[group] = self._Buffer(group, num_nvl, num_rdma)
        return buf

    def _prepare_dispatch(self, key, x, topk_idx, topk_weights, num_experts, group):
        """Slow path, once per call key: full argument checks, the V1 size rules, the buffer."""
        world = self._world_size(group)
        data, topk_idx, is_fp8 = check_dispatch_args(self.name, x, topk_idx, topk_weights, num_experts, world)
        check_torch_deterministic(self.name)
        check_v1_rules(world, data.shape[1], data.element_size(), topk_idx.shape[1], num_experts,
                       x[1].shape[1] if is_fp8 else 0)
        buffer = self._get_buffer(group, _hidden_bytes(data), world)
        remember(self._ready, key, buffer)
        return buffer

    def _prepare_tokens(self, key, x, group, op: str):
        """Slow path of combine / cached dispatch, once per call key."""
        world = self._world_size(group)
        data = check_token_rows(self.name, x, op)
        check_torch_deterministic(self.name)
        check_v1_rules(world, data.shape[1], data.element_size(), 0, None,
                       x[1].shape[1] if isinstance(x, tuple) else 0, op="combine" if op == "combine" else "dispatch")
        buffer = self._get_buffer(group, _hidden_bytes(data), world)
        remember(self._ready, key, buffer)
        return buffer

    def _events(self, async_finish: bool, allocate_on_comm_stream: bool):
        """``(async_finish, previous_event, allocate_on_comm_stream)`` to pass to DeepEP: Megatron's flags with
        ``stream_overlap``, else DeepEP's synchronous mode (``_deepep_common.STREAM_OVERLAP_NOTE``)."""
        if not (self.stream_overlap and async_finish):
            return False, None, False
        return True, self._EventOverlap(self._EventHandle()), bool(allocate_on_comm_stream)

    # -- operations ----------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        key = call_key(x, topk_idx, topk_weights, num_experts, group)
        buffer = self._lookup(key)
        if buffer is None:
            buffer = self._prepare_dispatch(key, x, topk_idx, topk_weights, num_experts, group)
        if topk_idx.dtype is not self._int64:
            topk_idx = topk_idx.long()
        async_finish, previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        per_rank, per_rdma_rank, per_expert, in_rank, event = buffer.get_dispatch_layout(
            topk_idx, num_experts, previous_event=previous, async_finish=async_finish,
            allocate_on_comm_stream=on_comm)
        recv_x, recv_idx, recv_w, counts, raw, after = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            previous_event=event, async_finish=async_finish, allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        num_recv = (recv_x[0] if recv_x.__class__ is tuple else recv_x).shape[0]
        num_tokens = (x[0] if x.__class__ is tuple else x).shape[0]
        handle = LegacyHandle(raw, recv_idx, num_tokens, num_recv, num_experts)
        return DispatchResult(recv_x, recv_idx, recv_w, counts_tensor(counts), handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        h = handle if handle.__class__ is LegacyHandle else check_handle(handle, LegacyHandle, self.name)
        key = (group, _CACHED, combine_key(x))
        buffer = self._lookup(key)
        if buffer is None:
            buffer = self._prepare_tokens(key, x, group, "dispatch with a cached handle")
        data = x[0] if x.__class__ is tuple else x
        if data.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(data.shape)}")
        if data is x:
            x = x.contiguous()
        async_finish, previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        recv_x, _, _, _, _, after = buffer.dispatch(x, handle=h.raw, previous_event=previous,
                                                     async_finish=async_finish, allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        return recv_x

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        h = handle if handle.__class__ is LegacyHandle else check_handle(handle, LegacyHandle, self.name)
        key = (group, _COMBINE, combine_key(x))
        buffer = self._lookup(key)
        if buffer is None:
            check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, None)
            buffer = self._prepare_tokens(key, x, group, "combine")
        if x.shape[0] != h.num_recv:
            check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, None)  # raises with the shapes
        if topk_weights is not None:
            topk_weights = owned_weights(h.recv_topk_idx, topk_weights)
        async_finish, previous, on_comm = self._events(async_finish, allocate_on_comm_stream)
        combined, combined_w, after = buffer.combine(
            x.contiguous(), h.raw, topk_weights=topk_weights, previous_event=previous, async_finish=async_finish,
            allocate_on_comm_stream=on_comm)
        if async_finish:
            after.current_stream_wait()
        return combined, (combined_w if topk_weights is not None else None)


def _probe() -> Availability:
    facts = probe_deep_ep("Buffer", "install DeepEP <= 2.1, https://github.com/deepseek-ai/DeepEP",
                          missing_buffer_reason, "DeepEP V1 needs an NVIDIA GPU, Ampere (SM80) or newer", (8, 0))
    problems, details = facts.problems, facts.details
    if facts.deep_ep is None and v25_module_note():
        problems.append(f"{v25_module_note()}: {V25_HINT}")
    if facts.deep_ep is not None:
        try:
            import_event_classes()
        except ImportError as exc:
            problems.append(str(exc))
    if problems:
        return Availability.no("; ".join(problems), **details)
    return Availability.yes(f"deep_ep {details['deep_ep']}: V1 Buffer (NVLink intranode, NVSHMEM internode)",
                            **details)


#: The variables this backend reads (megatron-ep env and the README table list them).
SETTINGS = declare(
    EnvVar("MCORE_EP_LEGACY_NUM_SMS", "", "SMs for DeepEP V1 kernels; default Megatron's "
           "`moe_flex_dispatcher_num_sms` (20).", Integer(2, 1024, multiple_of=2)),
)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="legacy",
            aliases=("deepep", "deepep-v1", "v1"),
            priority=200,
            factory=DeepEPLegacyBackend,
            probe=_probe,
            settings=SETTINGS,
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=True, uneven_tokens=True, async_overlap=False,
                                      deterministic_order=False, internode=True),
            description="DeepEP V1 deep_ep.Buffer (what Megatron's fused_a2a calls)",
        )
    ]
