"""Backend ``elastic``: DeepEP V2 ``deep_ep.ElasticBuffer`` (NCCL GIN / NVLink), with V2's pitfalls handled.

Safeguards (see ``backend-contract.md``, DeepEP V2 section):

* **One header collective on a group's first dispatch** (on every dispatch with
  ``MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH=1``). An ``all_reduce(MAX)`` of ``[T, H, K, -H, -K, bad_ids]``
  gives every rank the same largest token count and detects ranks disagreeing on hidden/top-k or passing
  out-of-range expert ids, so every rank raises the same error instead of one raising and the others
  hanging. Afterwards the hot path adds no collective and no host sync: a token count above the agreed
  bucket is a local error asking to pin ``MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK`` or to turn the per-dispatch
  check on (which also lets all ranks grow the buffer together).
* **``num_max_tokens_per_rank`` is identical on every rank and bucketed.** Pinned by
  ``MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK`` (checked once across ranks with an ``all_gather``; a mismatch is a
  :class:`~megatron_ep_plugins.errors.RankMismatchError` naming each rank's value), else the agreed largest
  T rounded up to a power of two (min 256), so a new token count does not JIT a new kernel. A larger T
  later rebuilds the buffer at the next bucket; since T is agreed, all ranks rebuild together. A handle
  keeps the buffer that produced it, so a rebuild never strands an in-flight backward.
* Buffer sized from the real hidden size and top-k of the first dispatch (``MCORE_EP_ELASTIC_HIDDEN``/
  ``_NUM_TOPK`` override), with ``ElasticBuffer.get_buffer_size_hint`` when the build has it.
* Dispatch is the 5-tuple call with ``do_expand=False`` (token-major layout) and no layout call; the
  per-expert counts come from ``handle.num_recv_tokens_per_expert_list``. ``async_finish`` maps to
  ``async_with_compute_stream`` (then ``event.current_stream_wait()``); ``previous_event`` (from
  ``buffer.capture()``) is passed only with ``allocate_on_comm_stream=True``, which V2 requires.
* Combine always passes ``num_sms=0`` (reuse the dispatch handle's SM count; any other value is a sticky
  CUDA error 719). Combine's backward passes ``num_experts=handle.num_experts``. Combine with
  ``topk_weights`` masks entries whose expert lives elsewhere before the kernel sums over ranks.
* ``num_allocated_qps`` from ``MCORE_EP_ELASTIC_NUM_QPS`` (0 = automatic; AWS EFA needs a small budget);
  ``allow_hybrid_mode`` from ``MCORE_EP_ELASTIC_HYBRID_MODE`` (``auto``: off when ``EP_DISABLE_GIN=1``).

Note: V2 keeps a reference to ``topk_idx`` in its handle and asserts it is not modified in place until the
handle's backward is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import read_bool, read_int, read_str
from ..errors import ConfigError, InvalidInputError, RankMismatchError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Capabilities, DispatchResult
from ._deepep_common import agree_on_inputs, check_combine_args, check_dispatch_args, check_handle, probe_deep_ep

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DeepEPElasticBackend", "ElasticHandle", "ElasticSettings", "ep_register_backends", "read_settings"]

MIN_BUCKET = 256
MIN_NCCL = (2, 30, 4)
MIN_CAPABILITY = (9, 0)
GIN_HINT = ("if the ElasticBuffer constructor fails or crashes on a host without GPU-initiated networking "
            "(NVLink-only), set EP_DISABLE_GIN=1")


def bucket(num_tokens: int) -> int:
    """Next power of two >= ``num_tokens``, at least 256."""
    return max(MIN_BUCKET, 1 << max(0, int(num_tokens) - 1).bit_length())


@dataclass(frozen=True)
class ElasticSettings:
    max_tokens_per_rank: Optional[int]
    hidden: Optional[int]
    num_topk: Optional[int]
    num_qps: int
    num_sms: Optional[int]
    deterministic: bool
    hybrid_mode: bool
    fp8: bool
    check_each_dispatch: bool = False


def read_settings(environ: Optional[Mapping[str, str]] = None) -> ElasticSettings:
    """Parse the ``MCORE_EP_ELASTIC_*`` variables; :class:`ConfigError` on a bad value."""
    env = os.environ if environ is None else environ
    hybrid_raw = read_str("MCORE_EP_ELASTIC_HYBRID_MODE", env).lower()
    if hybrid_raw in ("auto", ""):
        hybrid = env.get("EP_DISABLE_GIN", "").strip() != "1"
    elif hybrid_raw in ("1", "true", "yes", "on"):
        hybrid = True
    elif hybrid_raw in ("0", "false", "no", "off"):
        hybrid = False
    else:
        raise ConfigError(f"MCORE_EP_ELASTIC_HYBRID_MODE={hybrid_raw!r} is invalid: use auto, 1 or 0")
    return ElasticSettings(
        max_tokens_per_rank=read_int("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", env, minimum=1),
        hidden=read_int("MCORE_EP_ELASTIC_HIDDEN", env, minimum=1),
        num_topk=read_int("MCORE_EP_ELASTIC_NUM_TOPK", env, minimum=1),
        num_qps=read_int("MCORE_EP_ELASTIC_NUM_QPS", env, minimum=0) or 0,
        num_sms=read_int("MCORE_EP_ELASTIC_NUM_SMS", env, minimum=0) or None,
        deterministic=read_bool("MCORE_EP_ELASTIC_DETERMINISTIC", env),
        hybrid_mode=hybrid,
        fp8=read_bool("MCORE_EP_ELASTIC_FP8", env),
        check_each_dispatch=read_bool("MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH", env),
    )


@dataclass
class ElasticHandle:
    """DeepEP's ``EPHandle`` plus the buffer that made it and what backward needs."""

    raw: Any  # deep_ep.EPHandle
    buffer: Any  # the ElasticBuffer that produced raw (kept alive across rebuilds)
    recv_topk_idx: "torch.Tensor"
    num_tokens: int
    num_recv: int


class DeepEPElasticBackend:
    """DeepEP V2 ``ElasticBuffer`` behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol."""

    name = "elastic"

    def __init__(self) -> None:
        self.settings = read_settings()  # validate the environment before touching deep_ep
        import deep_ep

        cls = getattr(deep_ep, "ElasticBuffer", None)
        if cls is None:
            raise ImportError("deep_ep has no ElasticBuffer: this is a V1-only DeepEP; install DeepEP V2 "
                              "(PR #605 or later) or use the 'legacy' backend")
        self._ElasticBuffer = cls
        self.num_sms: Optional[int] = self.settings.num_sms
        self._buffer = None
        self._shape: Optional[tuple] = None  # (group, max_tokens, hidden, topk) of self._buffer
        self._pinned_checked: set[int] = set()
        self._agreed: set[Any] = set()  # groups whose first dispatch agreed on T/H/K

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 0:
            raise InvalidInputError(f"num_sms={num_sms!r} is invalid: use a non-negative int (0 = automatic)")
        if self.settings.num_sms is None:  # MCORE_EP_ELASTIC_NUM_SMS wins
            self.num_sms = num_sms or None

    def agreement_key(self) -> Mapping[str, Any]:
        s = self.settings
        return {"algorithm": "deep_ep.ElasticBuffer", "max_tokens_per_rank": s.max_tokens_per_rank,
                "fp8": s.fp8, "deterministic": s.deterministic, "allow_hybrid_mode": s.hybrid_mode,
                "num_allocated_qps": s.num_qps, "num_sms": self.num_sms}

    # -- buffer --------------------------------------------------------------------------------
    def _check_pinned(self, group, device) -> None:
        import torch
        import torch.distributed as dist

        pinned = self.settings.max_tokens_per_rank
        world = dist.get_world_size(group)
        mine = torch.tensor([pinned], dtype=torch.int64, device=device)
        values = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(values, mine, group=group)
        values = [int(v.item()) for v in values]
        if len(set(values)) != 1:
            by_rank = ", ".join(f"rank {dist.get_global_rank(group, i)}: {v}" for i, v in enumerate(values))
            raise RankMismatchError(
                f"MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK differs across the ranks of one group ({by_rank}); DeepEP V2 "
                "needs the same num_max_tokens_per_rank on every rank: set the same value everywhere")
        self._pinned_checked.add(id(group))

    def _get_buffer(self, group, max_tokens: int, hidden: int, topk: int, device):
        s = self.settings
        want_hidden, want_topk = s.hidden or hidden, s.num_topk or topk
        if want_hidden < hidden or want_topk < topk:
            raise InvalidInputError(
                f"dispatch input has hidden={hidden}, topk={topk}, above MCORE_EP_ELASTIC_HIDDEN={s.hidden} / "
                f"MCORE_EP_ELASTIC_NUM_TOPK={s.num_topk}: raise them or unset them")
        if s.max_tokens_per_rank is not None:
            if id(group) not in self._pinned_checked:
                self._check_pinned(group, device)
            if max_tokens > s.max_tokens_per_rank:
                raise InvalidInputError(
                    f"a rank of the group passed {max_tokens} tokens, more than "
                    f"MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK={s.max_tokens_per_rank}: raise it (or unset it to size "
                    "the buffer automatically)")
            need = s.max_tokens_per_rank
        else:
            need = bucket(max_tokens)
        if self._shape is not None:
            g, m, h, k = self._shape
            if g is group and m >= need and h >= want_hidden and k >= want_topk:
                return self._buffer
            if g is group and s.max_tokens_per_rank is None:
                need = max(need, m)  # grow, never shrink: keep the compiled kernel's bucket
        num_bytes = None
        hint = getattr(self._ElasticBuffer, "get_buffer_size_hint", None)
        if hint is not None:
            num_bytes = hint(group, need, want_hidden, num_topk=want_topk, use_fp8_dispatch=s.fp8,
                             allow_hybrid_mode=s.hybrid_mode)
        self._buffer = self._ElasticBuffer(
            group, num_bytes=num_bytes, num_max_tokens_per_rank=need, hidden=want_hidden, num_topk=want_topk,
            use_fp8_dispatch=s.fp8, deterministic=s.deterministic, allow_hybrid_mode=s.hybrid_mode,
            num_allocated_qps=s.num_qps)
        self._shape = (group, need, want_hidden, want_topk)
        return self._buffer

    def _agree(self, group, num_tokens, hidden, topk, topk_idx, num_experts, device) -> int:
        """Agree on the group's largest T (and fail together on bad input); remember the group."""
        max_t = agree_on_inputs(self.name, group, num_tokens, hidden, topk, topk_idx, num_experts, device)
        self._agreed.add(group)
        return max_t

    # -- operations ----------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist

        data, topk_idx, is_fp8 = check_dispatch_args(self.name, x, topk_idx, topk_weights, num_experts,
                                                      dist.get_world_size(group))
        if is_fp8 != self.settings.fp8:
            raise InvalidInputError(
                "backend 'elastic': FP8 (e4m3, scales) input needs a buffer built for it: set "
                "MCORE_EP_ELASTIC_FP8=1" if is_fp8 else
                "backend 'elastic': MCORE_EP_ELASTIC_FP8=1 builds the buffer for FP8 input, got bf16 tokens: "
                "pass (e4m3, scales) or unset MCORE_EP_ELASTIC_FP8")
        num_tokens, hidden = data.shape
        topk = topk_idx.shape[1]
        device = data.device
        if self.settings.check_each_dispatch or group not in self._agreed:
            max_t = self._agree(group, num_tokens, hidden, topk, topk_idx, num_experts, device)
        else:  # steady state: no collective, no host sync; only a free local bound check
            max_t = num_tokens
            limit = self._shape[1] if self._shape is not None else 0
            if num_tokens > limit:
                raise InvalidInputError(
                    f"backend 'elastic': {num_tokens} tokens exceed the num_max_tokens_per_rank={limit} agreed at the "
                    "first dispatch. Pin MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK to the largest token count of the run, "
                    "or set MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH=1 to let all ranks grow the buffer together")
        buffer = self._get_buffer(group, max_t, hidden, topk, device)
        previous = buffer.capture() if allocate_on_comm_stream else None
        recv_x, recv_idx, recv_w, raw, event = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, num_sms=self.num_sms or 0,
            previous_event=previous, async_with_compute_stream=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream, do_expand=False)
        if async_finish:
            event.current_stream_wait()
        num_recv = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
        tokens_per_expert = torch.tensor(list(raw.num_recv_tokens_per_expert_list), dtype=torch.int64)
        handle = ElasticHandle(raw, buffer, recv_idx, num_tokens, num_recv)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        h = check_handle(handle, ElasticHandle, "elastic")
        data = x[0] if isinstance(x, tuple) else x
        if data.dim() != 2 or data.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(data.shape)}")
        if not isinstance(x, tuple):
            x = x.contiguous()
        buffer = h.buffer
        previous = buffer.capture() if allocate_on_comm_stream else None
        recv_x, _, _, _, event = buffer.dispatch(
            x, handle=h.raw, num_experts=h.raw.num_experts, num_sms=getattr(h.raw, "num_sms", 0),
            previous_event=previous, async_with_compute_stream=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream, do_expand=False)
        if async_finish:
            event.current_stream_wait()
        return recv_x

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        h = check_handle(handle, ElasticHandle, "elastic")
        topk_weights = check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, topk_weights)
        buffer = h.buffer
        previous = buffer.capture() if allocate_on_comm_stream else None
        combined, combined_w, event = buffer.combine(
            x.contiguous(), h.raw, topk_weights=topk_weights, num_sms=0, previous_event=previous,
            async_with_compute_stream=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            event.current_stream_wait()
        return combined, (combined_w if topk_weights is not None else None)


def _version_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):  # NCCL_VERSION_CODE, e.g. 23004
        return (value // 10000, value // 100 % 100, value % 100) if value >= 10000 else (value // 1000,
                                                                                          value // 100 % 10,
                                                                                          value % 100)
    return tuple(int(v) for v in value)


def _probe() -> Availability:
    import torch

    facts = probe_deep_ep("ElasticBuffer", "install DeepEP V2, https://github.com/deepseek-ai/DeepEP",
                          "deep_ep has no ElasticBuffer: this DeepEP is V1-only; install DeepEP V2 (PR #605 or "
                          "later) or use the 'legacy' backend", "DeepEP V2 needs an SM90+ GPU (Hopper or newer)",
                          MIN_CAPABILITY)
    problems, details = facts.problems, facts.details
    try:
        read_settings()
    except ConfigError as exc:
        problems.append(str(exc))
    if facts.has_gpu:
        try:
            nccl = _version_tuple(torch.cuda.nccl.version())
            details["nccl"] = ".".join(map(str, nccl))
            if nccl < MIN_NCCL:
                problems.append(f"NCCL {details['nccl']} < 2.30.4: DeepEP V2 needs NCCL >= 2.30.4 (GIN); install "
                                "a newer nvidia-nccl and a torch built against it")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"cannot read the NCCL version (torch.cuda.nccl.version()): {exc}")
    gin = os.environ.get("EP_DISABLE_GIN")
    details["EP_DISABLE_GIN"] = gin if gin is not None else "unset"
    if gin is None:
        details["hint"] = GIN_HINT
    if problems:
        return Availability.no("; ".join(problems), **details)
    reason = f"deep_ep {details['deep_ep']}: V2 ElasticBuffer, NCCL {details.get('nccl', '?')}"
    if gin is None:
        reason += f" ({GIN_HINT})"
    return Availability.yes(reason, **details)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="elastic",
            aliases=("deepep-v2", "v2", "deepepv2"),
            priority=300,
            factory=DeepEPElasticBackend,
            probe=_probe,
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=True, uneven_tokens=True, async_overlap=True,
                                      deterministic_order=False, internode=True),
            description="DeepEP V2 deep_ep.ElasticBuffer (NCCL GIN; pinned/bucketed num_max_tokens_per_rank)",
        )
    ]
