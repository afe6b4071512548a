"""Backend ``ncclep``: NCCL's expert-parallel library ``nccl.ep`` (pip package ``nccl-extensions``).

Every number below is read from the nccl-extensions 0.1.0 wheel (its Python facade ``nccl/ep/*.py``,
its headers ``nccl/ep/include/**`` and the assertion texts compiled into ``libnccl_ep.so``); the
comments name the place.

**Mapping of the contract** (``docs/backend-contract.md``) onto nccl.ep:

* One NCCL communicator per torch process group, made once: group rank 0 calls
  ``nccl.core.get_unique_id()``, the 128 bytes are broadcast over the torch group, every rank calls
  ``nccl.core.Communicator.init(world, rank, uid)``. One ``nccl.ep.Group`` per (process group,
  algorithm, experts, SMs, mask, timeout), grown (never shrunk) when a larger token count or row
  width arrives; since the sizes are agreed across ranks, all ranks grow together.
* **HT** (``Algorithm.HIGH_THROUGHPUT``, the training path), ``Layout.FLAT``: ``[num_recv_slots, H]``
  with one slot per (source token, this rank) and ``recv_topk_idx`` in local ids or -1 -- the
  token-major layout of the contract. Eager mode (``max_recv_tokens_per_rank=0``):
  ``Group.create_handle`` returns ``recv_total_counter`` and the unpadded per-expert
  ``expert_counters`` (int32, one device-to-host copy), the outputs are sized from them, then
  ``Handle.dispatch(pass_direction=FWD)`` moves tokens and weights. ``combine`` =
  ``Handle.combine(FWD)`` (a plain sum: flat layout, the caller pre-reduces; fp32 accumulation).
  Dispatch's backward = ``Handle.combine(BWD)`` with ``inputs.topk_weights`` (entries owned elsewhere
  zeroed) -> ``outputs.topk_weights``. Combine's backward = ``Handle.dispatch(BWD)`` on the same handle
  (no weights): the slots were fixed at handle time, so the rows line up with the forward dispatch.
* **LL** (``Algorithm.LOW_LATENCY``), ``Layout.RANK_MAJOR``: ``[R, max_tokens, H]`` padded blocks
  plus ``src_rank_counters``; the adapter compacts the blocks to token-major rows and scatters them
  back into the padded shape for ``Handle.combine`` (rank-major: weight 1, one contribution per rank).
  LL is forward-only here: nccl.ep rejects a backward pass in LL ("ncclEpCombine: backward pass ... is
  not supported in LL mode") and LL assigns rank-major slots with ``atomicAdd`` (``ll_ep.cuh``), so a
  second dispatch on a handle cannot reproduce the row order combine's backward needs.

**Which algorithm** (``MCORE_EP_NCCLEP_ALGORITHM``): ``ht`` or ``ll`` force one; ``auto`` (default)
uses LL only when no rank's ``x``/``topk_weights`` requires grad (inference, no backward can follow),
the agreed largest token count is at most ``MCORE_EP_NCCLEP_LL_MAX_TOKENS`` (default 128, DeepEP-LL's
decode regime where LL's one-kernel latency beats HT's handle-time metadata exchange), the LL size
rules hold (hidden % 512, top-k <= 31) and the communicator reports GPU-initiated networking
(``libnccl_ep.so``: "[LL] Error: NCCL EP requires GIN"); otherwise HT.

**Ranks agree or fail together.** Every dispatch starts with one ``all_gather`` of a small int64 row per
rank (token count, hidden, top-k, experts, dtypes, out-of-range ids, a malformed-argument code, needs-grad)
over the torch group, moved to the CPU once. Every size rule is evaluated on that table, so a rule broken
on one rank raises the same :class:`InvalidInputError` on every rank; the agreed largest T sizes the
group. It also turns a rank that never reaches dispatch into an error of the torch group's timeout
(:class:`NcclEpRankFailure`) rather than a hang inside nccl.ep's HT kernels, which have no GPU-side timeout
(their waits in ``ht_ep.cuh`` are unbounded).

**Timeouts and the active mask** (LL only, ``nccl_ep.h``/``ll_ep.cuh``): ``MCORE_EP_NCCLEP_TIMEOUT_MS``
sets ``GroupConfig.timeout_ns`` (the library's own ``NCCL_EP_TIMEOUT_MS`` overrides it). A peer that does
not answer within it makes the LL kernel trap (a sticky CUDA error on the surviving ranks: an error, not a
hang), or, with ``MCORE_EP_NCCLEP_ACTIVE_MASK=1`` (``enable_mask``), masks that peer and raises the
group's async-error flag; the adapter then synchronises after each LL operation, reads the flag and the
mask (``ncclEpGetAsyncError``/``ncclEpMaskQuery`` through ``nccl._extensions.bindings.nccl_ep``, which the
facade does not wrap) and raises :class:`NcclEpRankFailure` naming the masked ranks.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import current_environ, declare, read_bool, read_int, read_str
from ..errors import ConfigError, EPPluginError, InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Boolean, Capabilities, DispatchResult, EnvVar, Integer, OneOf
from ._deepep_common import check_handle, counts_tensor, cuda_problem

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["NcclEpBackend", "NcclEpHandle", "NcclEpRankFailure", "NcclEpSettings", "ep_register_backends",
           "loaded_nccl_version", "read_settings"]

PIP_PACKAGE = "nccl-extensions"
# nccl_extensions-0.1.0.dist-info/METADATA: "Requires-Dist: nvidia-nccl-cu12==2.30.7; extra == 'cu12'" (and
# cu13): the NCCL nccl.ep is built and tested against; libnccl_ep.so needs the device API (ncclDevCommCreate,
# ncclTeamLsa, ncclCommWindowRegister, ncclGetPeerDevicePointer) of that release.
MIN_NCCL = (2, 30, 7)
# nccl/ep/include/nccl_ep/device/cuda_compat_shims.cuh: cp.async.bulk "(PTX ISA 8.1+, SM_90+)" and mbarrier
# waits in every HT kernel (ht_ep.cuh).
MIN_CAPABILITY = (9, 0)
# nccl/ep/include/nccl_ep/common.hpp
MAX_SUPPORTED_TOKENS_PER_RANK = 8192  # "Must match kernel template in ht_ep_adapter.cu"
MAX_NUM_TOPK = 32  # MAX_NUM_TOPK; ncclEpInitHandle: "top-k %d must be in [1, min(num_experts, MAX_NUM_TOPK)]"
MAX_HIDDEN_DIM = 16384  # MAX_HIDDEN_DIM
NUM_MAX_LOCAL_EXPERTS = 1024  # NUM_MAX_LOCAL_EXPERTS
# ll_ep.cuh dispatch: EP_STATIC_ASSERT(kNumTopk > 0 && kNumTopk <= kWarpSize - kLlDispatchControlWarps)
LL_MAX_TOPK = 31
# HT: "HT max_token_bytes (%u) must be a multiple of 16 bytes", "HT dispatch requires token bytes per token
# to be 16B aligned for TMA" (libnccl_ep.so); every descriptor a TMA copy reads must start 16-byte aligned.
ROW_ALIGN_BYTES = 16
# ll_ep.cuh, bf16: dispatch EP_STATIC_ASSERT(kHidden % (32 * 8) == 0); combine EP_STATIC_ASSERT(kHidden %
# (kWarpSize * kNumRecvUnrolls(2) * 8) == 0) and kHidden % 128 == 0 -> hidden % 512 == 0.
LL_HIDDEN_MULTIPLE = 512
MIN_BUCKET = 128
DEFAULT_LL_MAX_TOKENS = 128
_ALGORITHMS = {"auto": "auto", "ht": "ht", "high_throughput": "ht", "high-throughput": "ht", "ll": "ll",
               "low_latency": "ll", "low-latency": "ll"}
_NVCC_HINT = ("nccl.ep compiles its kernels at run time with nvcc (NCCL_EP_JIT_NVCC, NVCC or CUDA_HOME/bin/nvcc, "
              "nccl-extensions README)")


class NcclEpRankFailure(EPPluginError):
    """A rank of the expert-parallel group stopped answering (nccl.ep timeout, active mask, or the torch
    process group's own timeout during the adapter's agreement step). The group cannot be used again."""


def bucket(num_tokens: int) -> int:
    """Next power of two >= ``num_tokens``, at least 128 (a multiple of 4, see the S2D rule)."""
    return max(MIN_BUCKET, 1 << max(0, int(num_tokens) - 1).bit_length())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class NcclEpSettings:
    algorithm: str = "auto"  # "auto" | "ht" | "ll"
    max_tokens_per_rank: Optional[int] = None
    ll_max_tokens: int = DEFAULT_LL_MAX_TOKENS
    num_sms: Optional[int] = None
    timeout_ms: Optional[int] = None
    active_mask: bool = False
    check_each_dispatch: bool = True


def read_settings(environ: Optional[Mapping[str, str]] = None) -> NcclEpSettings:
    """Parse the ``MCORE_EP_NCCLEP_*`` variables; :class:`ConfigError` on a bad value."""
    env = current_environ() if environ is None else environ
    raw = read_str("MCORE_EP_NCCLEP_ALGORITHM", env).lower()
    if raw not in _ALGORITHMS:
        raise ConfigError(f"MCORE_EP_NCCLEP_ALGORITHM={raw!r} is invalid: use auto, ht (high throughput, training) "
                          "or ll (low latency, forward-only)")
    algorithm = _ALGORITHMS[raw]
    pinned = read_int("MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK", env, minimum=1)
    if pinned is not None and (pinned % 4 or pinned > MAX_SUPPORTED_TOKENS_PER_RANK):
        raise ConfigError(
            f"MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK={pinned} is invalid: use a multiple of 4 (HT flat layout: "
            "max_tokens * lsa_team_size must be a multiple of 4) no larger than "
            f"{MAX_SUPPORTED_TOKENS_PER_RANK} (nccl.ep MAX_SUPPORTED_TOKENS_PER_RANK), e.g. 4096")
    ll_max = read_int("MCORE_EP_NCCLEP_LL_MAX_TOKENS", env, minimum=0)
    active_mask = read_bool("MCORE_EP_NCCLEP_ACTIVE_MASK", env)
    if active_mask and algorithm == "ht":
        raise ConfigError("MCORE_EP_NCCLEP_ACTIVE_MASK=1 with MCORE_EP_NCCLEP_ALGORITHM=ht: nccl.ep's active mask "
                          "(GroupConfig.enable_mask) exists in the LL algorithm only; use ll or auto, or unset the mask")
    return NcclEpSettings(
        algorithm=algorithm,
        max_tokens_per_rank=pinned,
        ll_max_tokens=DEFAULT_LL_MAX_TOKENS if ll_max is None else ll_max,
        num_sms=read_int("MCORE_EP_NCCLEP_NUM_SMS", env, minimum=0) or None,
        timeout_ms=read_int("MCORE_EP_NCCLEP_TIMEOUT_MS", env, minimum=1),
        active_mask=active_mask,
        check_each_dispatch=read_bool("MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH", env),
    )


# -- the per-dispatch agreement ------------------------------------------------------------------------------------
# One int64 row per rank; every rule below is evaluated on the gathered table, identically on every rank.
_T, _H, _K, _E, _XDT, _IDXDT, _WOK, _BAD, _GRAD, _FORM, _NCOL = range(11)
_X_DTYPES = ("bfloat16", "float16", "float32")  # codes 0..2 (other: 3); only bf16 is accepted
_FORM_TEXT = {
    1: "x is not a [num_tokens, hidden] tensor",
    2: "topk_idx is not a [num_tokens, topk] integer tensor with x's row count",
    3: "topk_weights does not have topk_idx's shape",
    4: "x, topk_idx and topk_weights are not on one device",
    5: "num_experts is not a positive int",
    6: "x is an FP8 (data, scales) pair: backend 'ncclep' moves bf16 tokens only",
}


@dataclass(frozen=True)
class _Agreed:
    table: list  # per group rank, the _NCOL values
    max_tokens: int
    hidden: int
    topk: int
    num_experts: int
    needs_grad: bool


@dataclass
class _Steady:
    """What a shape's first (agreed) dispatch settled: the group entry to use and the communicator."""

    entry: "_GroupEntry"
    comm: Any
    world: int


def _steady_key(x, topk_idx, topk_weights, num_experts, group) -> Optional[tuple]:
    """The agreement's cache key: every value but T (which may differ by rank), the form checks' facts as values
    and booleans, or None when the arguments are not even tensor-like. Attribute reads only (the dispatch's hot
    path); only keys of well-formed input are ever stored, so a stored key vouches for ``_local_form``."""
    try:
        if x.__class__ is tuple:
            return None
        return (group, num_experts.__class__, num_experts, x.dtype, x.shape[1:], topk_idx.dtype, topk_idx.shape[1:],
                topk_weights.dtype, topk_idx.shape[0] == x.shape[0], topk_weights.shape == topk_idx.shape, x.device,
                topk_idx.device, topk_weights.device, bool(x.requires_grad or topk_weights.requires_grad))
    except (AttributeError, IndexError, TypeError):
        return None


def _torch():
    import torch

    return torch


_RAW_STREAM: Any = None  # torch._C._cuda_getCurrentRawStream once looked up; False: this torch lacks it


def _raw_stream_getter():
    """``torch._C._cuda_getCurrentRawStream`` (device index -> the current stream's pointer) or False."""
    global _RAW_STREAM
    if _RAW_STREAM is None:
        _RAW_STREAM = getattr(_torch()._C, "_cuda_getCurrentRawStream", False)
    return _RAW_STREAM


def _local_form(x, topk_idx, topk_weights, num_experts) -> int:
    """The agreement's _FORM code for this rank's arguments (0 = well formed)."""
    if isinstance(x, tuple):
        return 6
    if not _tensor_ok(x) or x.dim() != 2:
        return 1
    if (not _tensor_ok(topk_idx) or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]
            or topk_idx.dtype not in (_torch().int64, _torch().int32)):
        return 2
    if not _tensor_ok(topk_weights) or topk_weights.shape != topk_idx.shape:
        return 3
    if not (x.device == topk_idx.device == topk_weights.device):
        return 4
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        return 5
    return 0


@dataclass
class _GroupEntry:
    """One nccl.ep Group and the sizes it was created with (a handle keeps its entry alive)."""

    group: Any  # nccl.ep.Group
    algorithm: str
    max_tokens: int
    token_bytes: int
    num_ranks: int
    num_experts: int
    mask: bool
    closed: bool = False  # set by NcclEpBackend.close(): handles must not be destroyed after their group


@dataclass
class NcclEpHandle:
    """One dispatch's nccl.ep handle plus what combine and the backward passes need."""

    algorithm: str  # "ht" | "ll"
    raw: Any  # nccl.ep.Handle
    entry: _GroupEntry
    recv_topk_idx: "torch.Tensor"  # [N, K] int64 local ids, -1 elsewhere
    num_tokens: int  # T on this rank
    padded_tokens: int  # rows given to nccl.ep (T, or 1 masked row when T == 0)
    num_recv: int  # N
    recv_rows: int  # rows of nccl.ep's dispatch output (HT: max(N, 1); LL: R * max_tokens)
    hidden: int
    positions: Optional["torch.Tensor"] = None  # LL: row of each received token in the [R*M] padded output
    _finalizer: Any = field(default=None, repr=False)


def _tensor_ok(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor)


def _aligned(t: "torch.Tensor") -> "torch.Tensor":
    """Contiguous and 16-byte aligned (nccl.ep descriptors carry a pointer and sizes only; TMA needs 16 B)."""
    t = t.contiguous()
    return t if t.data_ptr() % ROW_ALIGN_BYTES == 0 else t.clone()


class NcclEpBackend:
    """``nccl.ep`` behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol (see module docstring)."""

    name = "ncclep"

    def __init__(self) -> None:
        self.settings = read_settings()  # validate the environment before touching nccl.ep
        import nccl.core
        import nccl.ep

        self._core = nccl.core
        self._ep = nccl.ep
        try:
            from nccl._extensions.bindings import nccl_ep as bindings
        except ImportError:  # pragma: no cover - only the mask calls need it
            bindings = None
        self._bindings = bindings
        self.num_sms: Optional[int] = self.settings.num_sms
        self._comms: dict[Any, Any] = {}
        self._groups: dict[tuple, _GroupEntry] = {}
        self._retired: list[_GroupEntry] = []  # outgrown groups: handles may still use them
        self.last_algorithm: Optional[str] = None  # for tests and `explain`
        #: (group, hidden, top-k, experts, dtypes, device, grad) -> _Steady, once agreed (unless check-each)
        self._steady: dict[tuple, _Steady] = {}

    # -- EPBackend ---------------------------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 0:
            raise InvalidInputError(f"num_sms={num_sms!r} is invalid: use a non-negative int (0 = automatic)")
        if self.settings.num_sms is None:  # MCORE_EP_NCCLEP_NUM_SMS wins
            if (num_sms or None) != self.num_sms:
                self._steady.clear()  # another group config: the next dispatch of each shape agrees again
            self.num_sms = num_sms or None

    def agreement_key(self) -> Mapping[str, Any]:
        s = self.settings
        return {"algorithm": "nccl.ep/" + s.algorithm, "max_tokens_per_rank": s.max_tokens_per_rank,
                "ll_max_tokens": s.ll_max_tokens, "num_sms": self.num_sms, "timeout_ms": s.timeout_ms,
                "active_mask": s.active_mask}

    # -- agreement and size rules ------------------------------------------------------------------------------
    @staticmethod
    def _header_device(group):
        import torch
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _agree(self, x, topk_idx, topk_weights, num_experts, group) -> _Agreed:
        import torch
        import torch.distributed as dist

        row = [-1] * _NCOL
        row[_BAD] = row[_GRAD] = row[_WOK] = row[_IDXDT] = row[_FORM] = 0
        form = 0
        if isinstance(x, tuple):
            form = 6
        elif not _tensor_ok(x) or x.dim() != 2:
            form = 1
        else:
            row[_T], row[_H] = x.shape
            dtype_name = str(x.dtype).split(".")[-1]
            row[_XDT] = _X_DTYPES.index(dtype_name) if dtype_name in _X_DTYPES else len(_X_DTYPES)
            if (not _tensor_ok(topk_idx) or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]
                    or topk_idx.dtype not in (torch.int64, torch.int32)):
                form = 2
            else:
                row[_K] = topk_idx.shape[1]
                row[_IDXDT] = 1
                if not _tensor_ok(topk_weights) or topk_weights.shape != topk_idx.shape:
                    form = 3
                elif not (x.device == topk_idx.device == topk_weights.device):
                    form = 4
                else:
                    row[_WOK] = int(topk_weights.dtype == torch.float32)
                    row[_GRAD] = int(bool(x.requires_grad or topk_weights.requires_grad))
        if isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts > 0:
            row[_E] = num_experts
        elif not form:
            form = 5
        row[_FORM] = form
        device = self._header_device(group)
        mine = torch.tensor(row, dtype=torch.int64).to(device)
        if form == 0:
            bad = ((topk_idx < -1) | (topk_idx >= num_experts)).sum().to(device=device, dtype=torch.int64)
            mine[_BAD] = bad
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        try:
            dist.all_gather(gathered, mine, group=group)
        except RuntimeError as exc:
            raise NcclEpRankFailure(
                f"backend 'ncclep': the agreement step of dispatch failed ({type(exc).__name__}: {exc}); a rank of "
                "the expert-parallel group did not reach dispatch (dead, hung or desynchronised). The group cannot "
                "be used again: restart the job") from exc
        table = torch.stack(gathered).cpu().tolist()  # the one host sync of the agreement
        return self._check_table(table, group)

    def _check_table(self, table: list, group) -> _Agreed:
        import torch.distributed as dist

        def ranks(pred) -> list[int]:
            return [dist.get_global_rank(group, i) for i, r in enumerate(table) if pred(r)]

        formed = ranks(lambda r: r[_FORM] != 0)
        if formed:
            codes = sorted({r[_FORM] for r in table if r[_FORM]})
            raise InvalidInputError(
                "backend 'ncclep': malformed dispatch input on global rank(s) " f"{formed}: "
                + "; ".join(_FORM_TEXT[c] for c in codes)
                + ". Pass x [T, H] bf16, topk_idx [T, K] int64 (global expert ids, -1 = masked), topk_weights "
                "[T, K] float32 on one device and a positive int num_experts")
        for col, what in ((_H, "hidden size"), (_K, "top-k"), (_E, "num_experts"), (_XDT, "x dtype")):
            values = [r[col] for r in table]
            if len(set(values)) != 1:
                shown = [(_X_DTYPES + ("other",))[v] for v in values] if col == _XDT else values
                raise InvalidInputError(
                    f"backend 'ncclep': ranks disagree on the {what} of the dispatch input: {shown} by group rank "
                    f"(global ranks {ranks(lambda r: True)}); every rank must pass the same {what}")
        first = table[0]
        hidden, topk, num_experts = first[_H], first[_K], first[_E]
        if first[_XDT] != 0:
            raise InvalidInputError(
                f"backend 'ncclep': x must be bfloat16, got {(_X_DTYPES + ('another dtype',))[first[_XDT]]}; nccl.ep's "
                "HT combine moves 2-byte rows (ht_ep.cuh: uint16_t tokens) and the contract is bf16: cast x to "
                "torch.bfloat16")
        bad_w = ranks(lambda r: not r[_WOK])
        if bad_w:
            raise InvalidInputError(
                f"backend 'ncclep': topk_weights must be float32 on every rank (nccl.ep: 'topk_weights->datatype == "
                f"ncclFloat32'), not on global rank(s) {bad_w}; set moe_router_dtype='fp32'")
        bad_ids = ranks(lambda r: r[_BAD] > 0)
        if bad_ids:
            raise InvalidInputError(
                f"backend 'ncclep': expert ids out of range on global rank(s) {bad_ids} "
                f"({sum(r[_BAD] for r in table)} entries): topk_idx must be in [0, {num_experts}) or -1 for a masked "
                "entry")
        world = len(table)
        if num_experts % world:
            raise InvalidInputError(
                f"backend 'ncclep': num_experts={num_experts} is not divisible by the group size {world}: each rank "
                f"owns num_experts / num_ranks experts (nccl.ep: 'x->sizes[0] == num_experts / num_ranks'); use a "
                f"multiple of {world}")
        if num_experts // world > NUM_MAX_LOCAL_EXPERTS:
            raise InvalidInputError(
                f"backend 'ncclep': {num_experts // world} experts per rank exceed nccl.ep's NUM_MAX_LOCAL_EXPERTS="
                f"{NUM_MAX_LOCAL_EXPERTS} (common.hpp); use more ranks or fewer experts")
        if not 1 <= topk <= min(num_experts, MAX_NUM_TOPK):
            raise InvalidInputError(
                f"backend 'ncclep': top-k={topk} is outside [1, min(num_experts={num_experts}, MAX_NUM_TOPK="
                f"{MAX_NUM_TOPK})] (nccl.ep ncclEpInitHandle)")
        if hidden <= 0 or (hidden * 2) % ROW_ALIGN_BYTES or hidden > MAX_HIDDEN_DIM:
            raise InvalidInputError(
                f"backend 'ncclep': hidden={hidden} is invalid: bf16 rows must be a positive multiple of 16 bytes "
                f"(hidden % 8 == 0; nccl.ep 'token bytes per token to be 16B aligned for TMA') and at most "
                f"MAX_HIDDEN_DIM={MAX_HIDDEN_DIM} (common.hpp), e.g. hidden={max(8, _align(max(hidden, 1), 8))}")
        max_t = max(r[_T] for r in table)
        if max_t > MAX_SUPPORTED_TOKENS_PER_RANK:
            raise InvalidInputError(
                f"backend 'ncclep': global rank(s) {ranks(lambda r: r[_T] > MAX_SUPPORTED_TOKENS_PER_RANK)} passed "
                f"{max_t} tokens, more than nccl.ep's MAX_SUPPORTED_TOKENS_PER_RANK={MAX_SUPPORTED_TOKENS_PER_RANK} "
                "(common.hpp); split the micro-batch")
        pinned = self.settings.max_tokens_per_rank
        if pinned is not None and max_t > pinned:
            raise InvalidInputError(
                f"backend 'ncclep': global rank(s) {ranks(lambda r: r[_T] > pinned)} passed {max_t} tokens, more "
                f"than MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK={pinned} (nccl.ep: 'Token count exceeds HT buffer "
                "capacity'); raise it or unset it to size the group from the agreed token count")
        return _Agreed(table, max_t, hidden, topk, num_experts, any(r[_GRAD] for r in table))

    def _choose(self, agreed: _Agreed, comm, world: int) -> str:
        """HT or LL for this dispatch (identical on every rank: it reads only agreed values)."""
        s = self.settings
        ll_fits = agreed.hidden % LL_HIDDEN_MULTIPLE == 0 and agreed.topk <= LL_MAX_TOPK
        if s.algorithm == "ll":
            if agreed.needs_grad:
                raise InvalidInputError(
                    "backend 'ncclep': MCORE_EP_NCCLEP_ALGORITHM=ll but the dispatch input requires grad on some rank; "
                    "LL is forward-only (nccl.ep: 'backward pass ... is not supported in LL mode'; LL slots are "
                    "assigned by atomicAdd so a cached dispatch cannot reproduce them): use ht or auto for training")
            if not ll_fits:
                raise InvalidInputError(
                    f"backend 'ncclep': the LL algorithm needs hidden % {LL_HIDDEN_MULTIPLE} == 0 and top-k <= "
                    f"{LL_MAX_TOPK} (ll_ep.cuh static asserts 'Invalid hidden', kNumTopk <= kWarpSize - 1), got "
                    f"hidden={agreed.hidden}, top-k={agreed.topk}: use ht or auto")
            return "ll"
        if s.algorithm == "ht":
            return "ht"
        if agreed.needs_grad or agreed.max_tokens > s.ll_max_tokens or not ll_fits:
            return "ht"
        return "ll" if _has_gin(comm) else "ht"

    def _check_ht(self, agreed: _Agreed, comm, world: int, max_tokens: int) -> None:
        lsa = _lsa_team_size(comm, world)
        per_lsa = agreed.num_experts // world * lsa
        if (per_lsa * 4) % 16:
            raise InvalidInputError(
                f"backend 'ncclep': the HT algorithm needs the experts of one NVLink (LSA) team to be a multiple of "
                f"4 (nccl.ep: 'HT dispatch requires experts_per_lsa_team to be multiple of 4 (16B prob TMA "
                f"alignment)'), got {agreed.num_experts // world} experts per rank x {lsa} ranks per LSA team = "
                f"{per_lsa}; use e.g. num_experts={_align(per_lsa, 4) // lsa * world}")
        if (max_tokens * lsa) % 4:
            raise InvalidInputError(
                f"backend 'ncclep': max_tokens_per_rank={max_tokens} x lsa_team_size={lsa} is not a multiple of 4 "
                "(nccl.ep: 'Dispatch S2D cp.async.bulk: num_tokens_per_rank * s2d_inner_dim must be a multiple of "
                "4'); set MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK to a multiple of 4")

    # -- communicator and groups ---------------------------------------------------------------------------------
    def _comm(self, group, device):
        comm = self._comms.get(group)
        if comm is not None:
            return comm
        import torch
        import torch.distributed as dist

        core = self._core
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        uid = core.get_unique_id(empty=rank != 0)
        buf = torch.frombuffer(bytearray(uid.as_bytes), dtype=torch.uint8).to(self._header_device(group))
        dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
        uid = core.UniqueId.from_bytes(bytes(buf.cpu().tolist()))
        if device.type == "cuda":
            with torch.cuda.device(device):
                comm = core.Communicator.init(world, rank, uid)
        else:
            comm = core.Communicator.init(world, rank, uid)
        self._comms[group] = comm
        return comm

    def _group(self, group, comm, algorithm: str, agreed: _Agreed, max_tokens: int, device) -> _GroupEntry:
        ep = self._ep
        world = comm.nranks
        mask = self.settings.active_mask and algorithm == "ll"
        key = (group, algorithm, agreed.num_experts, self.num_sms or 0, mask, self.settings.timeout_ms)
        token_bytes = _align(agreed.hidden * 2, ROW_ALIGN_BYTES)
        entry = self._groups.get(key)
        if entry is not None and entry.max_tokens >= max_tokens and entry.token_bytes >= token_bytes:
            return entry
        if entry is not None:  # grow, never shrink (all ranks agree on the sizes, so all grow together)
            max_tokens, token_bytes = max(max_tokens, entry.max_tokens), max(token_bytes, entry.token_bytes)
            self._retired.append(entry)
        num_sms = self.num_sms or 0
        if num_sms and device.type == "cuda":
            import torch

            available = torch.cuda.get_device_properties(device).multi_processor_count
            if num_sms > available:
                raise ConfigError(f"backend 'ncclep': num_sms={num_sms} exceeds the GPU's {available} SMs (nccl.ep: "
                                  "'requires max_num_sms <= device_sm_count'); lower MCORE_EP_NCCLEP_NUM_SMS")
        config = ep.GroupConfig(
            algorithm=ep.Algorithm.HIGH_THROUGHPUT if algorithm == "ht" else ep.Algorithm.LOW_LATENCY,
            num_experts=agreed.num_experts,
            max_dispatch_tokens_per_rank=max_tokens,
            max_recv_tokens_per_rank=0,  # HT eager mode: outputs sized from recv_total_counter; LL ignores it
            max_token_bytes=token_bytes,
            max_num_sms=num_sms,
            enable_mask=mask,
            timeout_ns=(self.settings.timeout_ms or 0) * 1_000_000,
        )
        if device.type == "cuda":
            import torch

            with torch.cuda.device(device):
                raw = ep.Group.create(comm, config)
        else:
            raw = ep.Group.create(comm, config)
        entry = _GroupEntry(raw, algorithm, max_tokens, token_bytes, world, agreed.num_experts, mask)
        self._groups[key] = entry
        return entry

    def _stream(self, device) -> int:
        if device.type != "cuda":
            return 0
        raw = _raw_stream_getter()
        if raw:  # the pointer itself, no Stream object (per call; torch's own codegen reads it so)
            return raw(device.index if device.index is not None else _torch().cuda.current_device())
        return int(_torch().cuda.current_stream(device).cuda_stream)

    def _sync(self, device) -> None:
        if device.type == "cuda":
            import torch

            torch.cuda.current_stream(device).synchronize()

    def _check_mask(self, entry: _GroupEntry, device, what: str) -> None:
        """Active mask: after the stream is synchronised, raise if nccl.ep masked a peer."""
        if not entry.mask:
            return
        import torch

        b = self._bindings
        self._sync(device)
        if not b.get_async_error(entry.group.ptr):
            return
        status = torch.ones(entry.num_ranks, dtype=torch.int32, device=device)
        b.mask_query(entry.group.ptr, status.data_ptr(), self._stream(device))
        self._sync(device)
        masked = [i for i, v in enumerate(status.cpu().tolist()) if v == 0]
        raise NcclEpRankFailure(
            f"backend 'ncclep': nccl.ep timed out waiting for group rank(s) {masked} during {what} and masked them "
            f"(active mask, MCORE_EP_NCCLEP_ACTIVE_MASK=1; timeout MCORE_EP_NCCLEP_TIMEOUT_MS="
            f"{self.settings.timeout_ms or 'library default ~100 s'}). The result would miss their tokens, so it is "
            "not returned; the group stays degraded: restart the job (or re-admit the ranks with ncclEpMaskClean)")

    # -- operations --------------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch.distributed as dist

        if group is None:
            group = dist.group.WORLD
        key = _steady_key(x, topk_idx, topk_weights, num_experts, group)
        steady = self._steady.get(key) if key is not None else None
        if steady is not None:  # agreed before: no collective, no host sync, a free local bound check
            entry = steady.entry
            if x.shape[0] > entry.max_tokens:
                raise InvalidInputError(
                    f"backend 'ncclep': {x.shape[0]} tokens on this rank exceed the {entry.max_tokens} per rank the "
                    "group was agreed with at this shape's first dispatch; only an agreement can grow it on every rank "
                    "together: set MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK to the largest batch (a multiple of 4, at most "
                    f"{MAX_SUPPORTED_TOKENS_PER_RANK}) or MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH=1")
            self.last_algorithm = entry.algorithm
            if entry.algorithm == "ht":
                return self._dispatch_ht(entry, x, topk_idx, topk_weights, steady.comm, steady.world)
            return self._dispatch_ll(entry, x, topk_idx, topk_weights, steady.comm, steady.world)
        form = _local_form(x, topk_idx, topk_weights, num_experts)
        if form and any(k[0] is group for k in self._steady):
            # malformed input in steady state: the other ranks are not in an agreement now; raise here (the
            # core's fault propagation stops them), with what the agreement would have said
            raise InvalidInputError(f"backend 'ncclep': malformed dispatch input: {_FORM_TEXT[form]}")
        agreed = self._agree(x, topk_idx, topk_weights, num_experts, group)
        world = dist.get_world_size(group)
        device = x.device
        comm = self._comm(group, device)
        algorithm = self._choose(agreed, comm, world)
        max_tokens = self.settings.max_tokens_per_rank or bucket(agreed.max_tokens)
        if algorithm == "ht":
            self._check_ht(agreed, comm, world, max_tokens)
        entry = self._group(group, comm, algorithm, agreed, max_tokens, device)
        if key is not None and not form and not self.settings.check_each_dispatch:
            self._steady[key] = _Steady(entry, comm, world)
        self.last_algorithm = algorithm
        if algorithm == "ht":
            return self._dispatch_ht(entry, x, topk_idx, topk_weights, comm, world)
        return self._dispatch_ll(entry, x, topk_idx, topk_weights, comm, world)

    def _pad_inputs(self, x, topk_idx, topk_weights):
        """int64 ids, fp32 weights; a rank with T == 0 gives nccl.ep one masked row (ids -1: routed nowhere)."""
        import torch

        topk_idx = topk_idx.to(torch.int64)
        if x.shape[0] == 0:
            x = x.new_zeros(1, x.shape[1])
            topk_idx = torch.full((1, topk_idx.shape[1]), -1, dtype=torch.int64, device=x.device)
            topk_weights = torch.zeros(1, topk_idx.shape[1], dtype=torch.float32, device=x.device)
        return _aligned(x), _aligned(topk_idx), _aligned(topk_weights)

    def _make_handle(self, **kwargs) -> NcclEpHandle:
        handle = NcclEpHandle(**kwargs)
        # ncclEpHandleDestroy frees the handle's device memory (a local call) once autograd drops the handle;
        # not at interpreter exit (the process frees everything) and never after close() destroyed the group.
        handle._finalizer = weakref.finalize(handle, _destroy_quietly, handle.raw, handle.entry)
        handle._finalizer.atexit = False
        return handle

    def _dispatch_ht(self, entry, x, topk_idx, topk_weights, comm, world) -> DispatchResult:
        import torch

        ep = self._ep
        device = x.device
        stream = self._stream(device)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = entry.num_experts // world
        xs, idx, w = self._pad_inputs(x, topk_idx, topk_weights)
        counters = torch.zeros(1 + local, dtype=torch.int32, device=device)  # [recv_total, per expert...]
        info = ep.LayoutInfo(recv_total_counter=ep.Tensor(counters[:1]), expert_counters=ep.Tensor(counters[1:]),
                             recv_topk_idx_kind=ep.ExpertIdKind.LOCAL)
        raw = entry.group.create_handle(ep.Layout.FLAT, ep.Tensor(idx), layout_info=info, stream=stream)
        try:
            host = counters.cpu().tolist()  # host sync: eager mode sizes the outputs from the counters
            num_recv = host[0]
            rows = max(num_recv, 1)
            recv_x = torch.empty(rows, hidden, dtype=x.dtype, device=device)
            recv_w = torch.empty(rows, topk, dtype=torch.float32, device=device)
            recv_idx = torch.empty(rows, topk, dtype=torch.int64, device=device)
            raw.dispatch(ep.DispatchInputs(tokens=ep.Tensor(xs), topk_weights=ep.Tensor(w)),
                         ep.DispatchOutputs(tokens=ep.Tensor(recv_x), topk_weights=ep.Tensor(recv_w),
                                            topk_idx=ep.Tensor(recv_idx)),
                         config=ep.DispatchConfig(pass_direction=ep.PassDir.FWD), stream=stream)
        except BaseException:
            _destroy_quietly(raw)
            raise
        tokens_per_expert = counts_tensor(host[1:])
        if rows != num_recv:  # only T_recv == 0 allocates a spare row (nccl.ep needs one); no views otherwise
            recv_x, recv_idx, recv_w = recv_x[:num_recv], recv_idx[:num_recv], recv_w[:num_recv]
        handle = self._make_handle(algorithm="ht", raw=raw, entry=entry, recv_topk_idx=recv_idx,
                                   num_tokens=num_tokens, padded_tokens=xs.shape[0], num_recv=num_recv,
                                   recv_rows=rows, hidden=hidden)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def _dispatch_ll(self, entry, x, topk_idx, topk_weights, comm, world) -> DispatchResult:
        import torch

        ep = self._ep
        device = x.device
        stream = self._stream(device)
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = entry.num_experts // world
        m = entry.max_tokens
        xs, idx, w = self._pad_inputs(x, topk_idx, topk_weights)
        out_x = torch.empty(world, m, hidden, dtype=x.dtype, device=device)
        out_w = torch.empty(world, m, topk, dtype=torch.float32, device=device)
        out_idx = torch.empty(world, m, topk, dtype=torch.int32, device=device)
        counts = torch.zeros(world, dtype=torch.int32, device=device)
        raw = entry.group.create_handle(ep.Layout.RANK_MAJOR, ep.Tensor(idx), stream=stream)  # LL: no layout_info
        try:
            raw.dispatch(ep.DispatchInputs(tokens=ep.Tensor(xs), topk_weights=ep.Tensor(w)),
                         ep.DispatchOutputs(tokens=ep.Tensor(out_x), topk_weights=ep.Tensor(out_w),
                                            topk_idx=ep.Tensor(out_idx)),
                         layout_info=ep.LayoutInfo(src_rank_counters=ep.Tensor(counts),
                                                   recv_topk_idx_kind=ep.ExpertIdKind.LOCAL),
                         stream=stream)
            # per-expert counts on the device (unwritten rank-major rows are all -1, ll_ep.cuh control warp)
            flat_idx = out_idx.view(-1).long()
            per_expert = torch.zeros(local + 1, dtype=torch.int64, device=device)
            per_expert.index_add_(0, torch.where(flat_idx >= 0, flat_idx, local),
                                  torch.ones_like(flat_idx))
            host = torch.cat([counts.long(), per_expert[:local]]).cpu().tolist()  # the host sync
            self._check_mask(entry, device, "LL dispatch")
        except BaseException:
            _destroy_quietly(raw)
            raise
        recv_counts = [max(c, 0) for c in host[:world]]
        num_recv = sum(recv_counts)
        positions = torch.cat([torch.arange(c, dtype=torch.int64) + r * m for r, c in enumerate(recv_counts)]) \
            if num_recv else torch.zeros(0, dtype=torch.int64)
        positions = positions.to(device)
        recv_x = out_x.view(world * m, hidden).index_select(0, positions)
        recv_idx = out_idx.view(world * m, topk).index_select(0, positions).long()
        recv_w = out_w.view(world * m, topk).index_select(0, positions)
        tokens_per_expert = torch.tensor(host[world:], dtype=torch.int64)
        handle = self._make_handle(algorithm="ll", raw=raw, entry=entry, recv_topk_idx=recv_idx,
                                   num_tokens=num_tokens, padded_tokens=xs.shape[0], num_recv=num_recv,
                                   recv_rows=world * m, hidden=hidden, positions=positions)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        import torch

        h = check_handle(handle, NcclEpHandle, self.name)
        if not _tensor_ok(x) or x.dim() != 2 or x.shape[0] != h.num_tokens or x.shape[1] != h.hidden:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, {h.hidden}] (the dispatch that "
                f"made the handle), got {tuple(x.shape) if _tensor_ok(x) else type(x).__name__}")
        if x.dtype != torch.bfloat16:
            raise InvalidInputError(f"backend 'ncclep' moves bf16 rows, got {x.dtype}; cast to torch.bfloat16")
        if h.algorithm == "ll":
            raise InvalidInputError(
                "backend 'ncclep': this handle came from an LL dispatch, which is forward-only (nccl.ep assigns LL "
                "rank-major slots with atomicAdd, so a second dispatch cannot reproduce the rows; LL has no backward "
                "pass direction): run training with MCORE_EP_NCCLEP_ALGORITHM=ht or auto")
        ep = self._ep
        device = x.device
        xs = _aligned(x) if h.num_tokens else x.new_zeros(1, h.hidden)
        recv = torch.empty(h.recv_rows, h.hidden, dtype=x.dtype, device=device)
        h.raw.dispatch(ep.DispatchInputs(tokens=ep.Tensor(xs)), ep.DispatchOutputs(tokens=ep.Tensor(recv)),
                       config=ep.DispatchConfig(pass_direction=ep.PassDir.BWD), stream=self._stream(device))
        return recv[:h.num_recv]

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        import torch

        h = check_handle(handle, NcclEpHandle, self.name)
        if not _tensor_ok(x) or x.dim() != 2 or x.shape[0] != h.num_recv or x.shape[1] != h.hidden:
            raise InvalidInputError(
                f"combine expects x of shape [{h.num_recv}, {h.hidden}] (one row per row dispatch delivered here, "
                f"same order), got {tuple(x.shape) if _tensor_ok(x) else type(x).__name__}")
        if x.dtype != torch.bfloat16:
            raise InvalidInputError(f"backend 'ncclep' combines bf16 rows, got {x.dtype}; cast to torch.bfloat16")
        if topk_weights is not None and tuple(topk_weights.shape) != tuple(h.recv_topk_idx.shape):
            raise InvalidInputError(f"combine's topk_weights must have shape {tuple(h.recv_topk_idx.shape)}, "
                                    f"got {tuple(topk_weights.shape)}")
        ep = self._ep
        device = x.device
        stream = self._stream(device)
        out = torch.empty(h.padded_tokens, h.hidden, dtype=x.dtype, device=device)
        if h.algorithm == "ll":
            if topk_weights is not None:
                raise InvalidInputError(
                    "backend 'ncclep': combine with topk_weights (dispatch's backward) on an LL handle: nccl.ep "
                    "rejects a backward pass in LL ('ncclEpCombine: backward pass ... is not supported in LL mode'); "
                    "run training with MCORE_EP_NCCLEP_ALGORITHM=ht or auto")
            world, m = h.entry.num_ranks, h.entry.max_tokens
            padded = torch.zeros(world * m, h.hidden, dtype=x.dtype, device=device)
            padded.index_copy_(0, h.positions, x)
            h.raw.combine(ep.CombineInputs(tokens=ep.Tensor(padded.view(world, m, h.hidden))),
                          ep.CombineOutputs(tokens=ep.Tensor(out)), stream=stream)
            self._check_mask(h.entry, device, "LL combine")
            return out[:h.num_tokens], None
        rows = _aligned(x) if h.num_recv == h.recv_rows else torch.cat(
            [x, x.new_zeros(h.recv_rows - h.num_recv, h.hidden)])
        if topk_weights is None:
            h.raw.combine(ep.CombineInputs(tokens=ep.Tensor(rows)), ep.CombineOutputs(tokens=ep.Tensor(out)),
                          config=ep.CombineConfig(pass_direction=ep.PassDir.FWD), stream=stream)
            return (out if h.padded_tokens == h.num_tokens else out[:h.num_tokens]), None
        # dispatch's backward: each entry has one owner; zero the entries this rank does not own
        w = torch.where(h.recv_topk_idx >= 0, topk_weights.float(), 0.0)
        if h.num_recv != h.recv_rows:
            w = torch.cat([w, w.new_zeros(h.recv_rows - h.num_recv, w.shape[1])])
        w = _aligned(w)
        out_w = torch.empty(h.padded_tokens, w.shape[1], dtype=torch.float32, device=device)
        h.raw.combine(ep.CombineInputs(tokens=ep.Tensor(rows), topk_weights=ep.Tensor(w)),
                      ep.CombineOutputs(tokens=ep.Tensor(out), topk_weights=ep.Tensor(out_w)),
                      config=ep.CombineConfig(pass_direction=ep.PassDir.BWD), stream=stream)
        return out[:h.num_tokens], out_w[:h.num_tokens]

    def close(self) -> None:
        """Destroy the nccl.ep groups and communicators (collective: call on every rank, when no handle is live)."""
        for entry in [*self._groups.values(), *self._retired]:
            entry.closed = True
            entry.group.destroy()
        self._groups.clear()
        self._retired.clear()
        for comm in self._comms.values():
            comm.destroy()
        self._comms.clear()


def _destroy_quietly(raw, entry: Optional[_GroupEntry] = None) -> None:
    if entry is not None and entry.closed:
        return
    try:
        raw.destroy()
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        pass


def _has_gin(comm) -> bool:
    try:
        return int(comm.gin_type) != 0  # nccl.core.NcclGinType.NONE
    except Exception:  # noqa: BLE001 - no property: assume none, HT works without GIN intranode
        return False


def _lsa_team_size(comm, world: int) -> int:
    """Ranks per NVLink (load/store accessible) team: world / comm.n_lsa_teams."""
    try:
        teams = int(comm.n_lsa_teams)
    except Exception:  # noqa: BLE001
        teams = 1
    return world // teams if teams > 0 and world % teams == 0 else world


# -- probe -----------------------------------------------------------------------------------------------------------
def loaded_nccl_version() -> tuple[int, ...]:
    """Version of the ``libnccl.so.2`` this process loaded (torch loads it; nccl.ep uses the same library)."""
    import torch  # noqa: F401 - loads torch's libnccl.so.2 first, so the lookup below finds that one

    lib = ctypes.CDLL("libnccl.so.2")
    code = ctypes.c_int()
    if lib.ncclGetVersion(ctypes.byref(code)) != 0:
        raise RuntimeError("ncclGetVersion failed")
    v = code.value
    return (v // 10000, v // 100 % 100, v % 100) if v >= 10000 else (v // 1000, v // 100 % 10, v % 100)


def _nvcc_found() -> Optional[str]:
    import shutil

    for var in ("NCCL_EP_JIT_NVCC", "NVCC"):
        if os.environ.get(var):
            return os.environ[var]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _probe() -> Availability:
    problems: list[str] = []
    details: dict[str, str] = {}
    try:
        import nccl.ep as ep
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken extension
        problems.append(f"nccl.ep not importable: {exc} (pip install {PIP_PACKAGE}, with nccl4py and an NVIDIA NCCL "
                        f">= {'.'.join(map(str, MIN_NCCL))}, e.g. pip install '{PIP_PACKAGE}[cu13]')")
    else:
        try:
            from importlib.metadata import version as dist_version

            details[PIP_PACKAGE] = dist_version(PIP_PACKAGE)
        except Exception:  # noqa: BLE001 - informational only
            details[PIP_PACKAGE] = str(getattr(ep, "__version__", "unknown"))
        try:
            details["libnccl_ep"] = str(ep.get_lib_version())
        except Exception as exc:  # noqa: BLE001 - libnccl_ep.so is loaded lazily
            details["libnccl_ep"] = f"unknown ({exc})"
    try:
        read_settings()
    except ConfigError as exc:
        problems.append(str(exc))
    cuda = cuda_problem(f"nccl.ep kernels need an NVIDIA GPU of compute capability "
                        f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Hopper or newer)")
    if cuda:
        problems.append(cuda)
    else:
        import torch

        try:
            major, minor = torch.cuda.get_device_capability()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"cannot read the GPU compute capability: {exc}")
        else:
            details["compute_capability"] = f"{major}.{minor}"
            if (major, minor) < MIN_CAPABILITY:
                problems.append(f"GPU compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: "
                                "nccl.ep's kernels use SM90 instructions (cp.async.bulk, mbarrier)")
    try:
        nccl = loaded_nccl_version()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"cannot read the loaded NCCL version (libnccl.so.2 ncclGetVersion): {exc}")
    else:
        details["nccl"] = ".".join(map(str, nccl))
        if tuple(nccl) < MIN_NCCL:
            need = ".".join(map(str, MIN_NCCL))
            problems.append(f"loaded NCCL {details['nccl']} is too old: {PIP_PACKAGE} 0.1.0 needs NCCL >= {need} "
                            f"(it pins nvidia-nccl-cu12/cu13=={need}); install nvidia-nccl-cu13=={need} (or cu12) and "
                            "a torch that loads it")
    nvcc = _nvcc_found()
    details["nvcc"] = nvcc or "not found"
    if problems:
        return Availability.no("; ".join(problems), **details)
    reason = (f"{PIP_PACKAGE} {details.get(PIP_PACKAGE, '?')} (libnccl_ep {details.get('libnccl_ep', '?')}), NCCL "
              f"{details['nccl']}, SM {details.get('compute_capability', '?')}")
    if not nvcc:
        reason += f" (warning: no nvcc found; {_NVCC_HINT})"
    return Availability.yes(reason, **details)


#: The variables this backend reads (megatron-ep env and the README table list them).
SETTINGS = declare(
    EnvVar("MCORE_EP_NCCLEP_ALGORITHM", "auto", "`ht` (high throughput, training), `ll` (low latency, "
           "forward-only) or `auto`: LL when no input requires grad, the agreed token count is at most "
           "`MCORE_EP_NCCLEP_LL_MAX_TOKENS`, hidden % 512 == 0, top-k <= 31 and NCCL reports GIN; else HT.",
           OneOf(*_ALGORITHMS)),
    EnvVar("MCORE_EP_NCCLEP_LL_MAX_TOKENS", "128", "Largest agreed tokens per rank for which `auto` picks LL "
           "(0: never).", Integer(0, MAX_SUPPORTED_TOKENS_PER_RANK)),
    EnvVar("MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK", "", "Pin `max_dispatch_tokens_per_rank` (a multiple of 4, at "
           "most 8192). Unset: the agreed largest token count rounded up to a power of two (min 128); a larger "
           "batch later grows the group on every rank together.",
           Integer(4, MAX_SUPPORTED_TOKENS_PER_RANK, multiple_of=4)),
    EnvVar("MCORE_EP_NCCLEP_NUM_SMS", "", "`max_num_sms` of the nccl.ep group (0 = library default); unset: "
           "Megatron's `moe_flex_dispatcher_num_sms`.", Integer(0, 1024)),
    EnvVar("MCORE_EP_NCCLEP_TIMEOUT_MS", "", "GPU-side wait timeout of nccl.ep's LL kernels (`timeout_ns`); "
           "unset: the library default (~100 s). A peer silent for longer traps the kernel (an error on the "
           "other ranks, not a hang), or is masked with `MCORE_EP_NCCLEP_ACTIVE_MASK=1`. nccl.ep's own "
           "`NCCL_EP_TIMEOUT_MS` overrides it.", Integer(1, 86_400_000)),
    EnvVar("MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH", "1", "`1`: agree on sizes, dtypes and expert ids across ranks at "
           "every dispatch (one small all_gather + host sync on the torch group): a larger batch grows the group "
           "on every rank together, bad ids fail on every rank, and in HT a dead peer becomes "
           "`NcclEpRankFailure` at the group's timeout. `0`: once per (group, hidden, top-k, experts, dtypes, "
           "grad mode), faster; then a token count above the agreed bucket is a local error, and a dead peer "
           "in HT hangs in nccl.ep's handle creation, which has no timeout.", Boolean()),
    EnvVar("MCORE_EP_NCCLEP_ACTIVE_MASK", "0", "`1`: LL groups mask a timed-out peer instead of trapping "
           "(`enable_mask`); the adapter then checks nccl.ep's async-error flag after each LL operation and "
           "raises `NcclEpRankFailure` naming the masked ranks. Not available with `ALGORITHM=ht`.", Boolean()),
)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="ncclep",
            aliases=("nccl-ep", "nccl_ep"),
            priority=20,  # above torch only: validated on the CPU emulator, not yet on GPUs
            factory=NcclEpBackend,
            probe=_probe,
            settings=SETTINGS,
            validate=lambda env: read_settings(env.environ),
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=False, uneven_tokens=True, async_overlap=False,
                                      deterministic_order=False, internode=True),
            description="NCCL EP (nccl-extensions nccl.ep): HT flat layout for training, LL rank-major for "
                        "small forward-only batches; GPU-side timeout and active mask",
        )
    ]
