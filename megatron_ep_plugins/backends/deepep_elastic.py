"""Backend ``elastic``: DeepEP V2 ``deep_ep.ElasticBuffer`` (2.0-2.1) or V2.5 ``EPBuffer`` (NCCL GIN / NVLink).

**API generation** (:class:`ElasticApi`, resolved once, by the probe and the constructor; never per call): the
class the installed DeepEP provides decides, not its version string. ``deep_ep.EPBuffer`` = V2.5,
``deep_ep.ElasticBuffer`` = V2 (2.0-2.1); when ``deep_ep`` has neither (or does not import), SGLang's
``sgl-deep-ep-v25`` wheel (DeepEP 2.5 as the package ``deep_ep_v25``) is tried. The signatures of the installed
class are then checked once for every keyword the adapter passes (a DeepEP that renamed one fails at
construction, naming it, instead of at the first dispatch). The probe's ``details`` say which DeepEP was found:
``deep_ep`` (version), ``deep_ep_module``, ``deep_ep_api`` (``V2``/``V2.5``), ``deep_ep_class``,
``nccl_needed`` vs ``nccl`` (loaded).

What differs in V2.5 (read from the wheel ``sgl-deep-ep-v25`` 0.1.0rc0 = upstream ``deep_ep/buffers/ep.py``,
package renamed; cited as ``buffers/ep.py:N``, ``csrc/buffers/ep.hpp:N``):

* ``ElasticBuffer`` renamed ``EPBuffer`` without an alias and the V1 ``Buffer`` removed (``__init__.py:70-78``).
* NCCL >= 2.32.3 (``prerequisites.py:9`` ``_MIN_NCCL_VERSION``; V2: >= 2.30.4).
* A non-zero ``num_sms`` is rounded up to even by dispatch and combine (``buffers/ep.py:643`` / ``:816``
  ``align(num_sms, 2)``): the adapter does the same rounding itself when the SM count is set, so the size rules,
  the handle and ``agreement_key`` all see the count that runs.
* ``do_handle_copy`` defaults to ``False`` and must stay ``False`` (``buffers/ep.py:575`` / ``:638``): the handle
  keeps the caller's ``topk_idx`` by reference and asserts it was not modified (``buffers/ep.py:103-111``). The
  adapter passes its own copy of ``topk_idx`` instead, so, as with V2's default copy, the caller may reuse its
  ``topk_idx`` after dispatch.
* ``previous_event_before_epilogue`` removed, ``defer_epilogue`` added (``buffers/ep.py:562-580`` / ``:770-779``):
  the adapter passes neither (only keywords both generations accept, checked against the signatures).
* ``num_cpu_bytes`` removed from the constructor, ``lb_allocation_plan_or_num_bytes`` added, ``sl_idx`` default
  ``None`` (``buffers/ep.py:242-261``): not passed either.
* The size rules below are unchanged; V2.5's lines: ``include/deep_ep/impls/ep/combine.cuh:110`` (hidden % 256),
  ``csrc/buffers/ep.hpp:343`` / ``:257`` (hidden bytes), ``:816`` (bf16 combine), ``dispatch.cuh:92`` (top-k),
  ``ep.hpp:394`` (experts % R), ``:344`` (T), ``:312`` (SMs <= device), ``:42`` / ``:442`` (160 hybrid SMs),
  ``hybrid_dispatch.cuh:261`` / ``hybrid_combine.cuh:179`` / ``hybrid_dispatch.cuh:336`` (hybrid topology),
  ``ep.hpp:355`` (4-byte FP8 scales), ``utils/envs.py:184`` (deterministic check); ``EP_DISABLE_GIN`` is still
  read (``csrc/kernels/comm/context.cpp:124``). SM90+ is assumed as for V2 (V2.5's sources have no explicit check).

Safeguards (see ``docs/backend-contract.md``; DeepEP V2 facts below):

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
  ``_NUM_TOPK`` override), with the class's ``get_buffer_size_hint`` when it has one.
* Dispatch is the 5-tuple call with ``do_expand=False`` (token-major layout) and no layout call; the
  per-expert counts come from ``handle.num_recv_tokens_per_expert_list``. Megatron's ``async_finish`` /
  ``allocate_on_comm_stream`` give DeepEP's synchronous mode by default (``_deepep_common.STREAM_OVERLAP_NOTE``);
  with ``stream_overlap = True``, ``async_finish`` maps to ``async_with_compute_stream`` (then
  ``event.current_stream_wait()``) and ``previous_event`` (from ``buffer.capture()``) is passed only with
  ``allocate_on_comm_stream=True``, which V2 requires.
* Combine always passes ``num_sms=0`` (reuse the dispatch handle's SM count; any other value is a sticky
  CUDA error 719). Combine's backward passes ``num_experts=handle.num_experts``. Combine with
  ``topk_weights`` masks entries whose expert lives elsewhere before the kernel sums over ranks.
* ``num_allocated_qps`` from ``MCORE_EP_ELASTIC_NUM_QPS`` (0 = automatic; AWS EFA needs a small budget);
  ``allow_hybrid_mode`` from ``MCORE_EP_ELASTIC_HYBRID_MODE`` (``auto``: off when ``EP_DISABLE_GIN=1``).

* **Per-group buffers.** One ``ElasticBuffer``/``EPBuffer`` (and its bucket) per process group, so two EP groups used
  alternately never rebuild (a V2 rebuild re-JITs its kernels).
* **Hot path.** The argument checks and the size rules below run once per call key (group, dtype, hidden,
  top-k, experts; see ``_deepep_common``); a steady-state dispatch does one dict lookup, a token-count
  comparison, the DeepEP call and Megatron's own ``torch.tensor(num_recv_tokens_per_expert_list)``.

Size rules of the real kernels, checked up front (``InvalidInputError`` on every rank alike, before any
DeepEP call: they only depend on values all ranks share). Sources: DeepEP ``main`` dd758caf (``deep_ep``
2.1.0); a JIT ``static_assert`` fails as an NVCC compile error when the kernel is first built.

* Combine: ``hidden % 256 == 0`` (``EP_STATIC_ASSERT(kHidden % (32 * sizeof(int4) / sizeof(nv_bfloat16))
  == 0, "Invalid hidden")`` in ``deep_ep/include/deep_ep/impls/combine.cuh:109`` and
  ``hybrid_combine.cuh:219``; the reduce epilogue's unroll factor, ``combine_utils.cuh:65`` /
  ``combine_reduce_epilogue.cuh:100``). Checked at dispatch, since its tokens come back through combine
  with the same hidden size (seen on 2 x H200: NVCC "Invalid hidden" at the first combine).
* Dispatch: hidden bytes a multiple of 16 (``csrc/elastic/buffer.hpp:755``; implied by the rule above) and
  ``ceil(hidden / 32) * 4 <= hidden`` (``buffer.hpp:660``, buffer sizing).
* Combine takes bf16 rows: ``csrc/elastic/buffer.hpp:1203``.
* Top-k <= 32: ``deep_ep/include/deep_ep/impls/dispatch.cuh:93`` / ``:315`` / ``:372``,
  ``dispatch_copy_epilogue.cuh:97``, ``combine_reduce_epilogue.cuh:65``.
* ``num_experts % R == 0``: ``deep_ep/include/deep_ep/impls/dispatch.cuh:47`` (JIT), ``csrc/elastic/buffer.hpp:805``,
  ``deep_ep/buffers/elastic.py`` ``get_theoretical_num_sms``.
* ``T <= num_max_tokens_per_rank``: ``csrc/elastic/buffer.hpp:756`` (handled by the bucket above).
* SM count at most the device's (``csrc/elastic/buffer.hpp:979``); in hybrid mode (more than one scale-out
  rank) at most 160 (``buffer.hpp:853``), ``experts per rank + scale-up ranks <= 128``
  (``hybrid_dispatch.cuh:261``), at most 64 scale-up (``hybrid_combine.cuh:178``) and 32 scale-out ranks
  (``hybrid_dispatch.cuh:336``).
* FP8 scales of 4-byte elements: ``csrc/elastic/buffer.hpp:767`` (the adapter accepts float32).
* Not with ``torch.use_deterministic_algorithms(True)`` plus ``fill_uninitialized_memory``:
  ``deep_ep/utils/envs.py`` ``check_torch_deterministic``.
* NCCL >= 2.30.4 loaded at run time (the probe asks the loaded ``libnccl.so.2``, not
  ``torch.cuda.nccl.version()``, which is the NCCL torch was compiled with).

Note: V2 clones ``topk_idx`` into its handle by default (``do_handle_copy=True``), so the caller may reuse
its ``topk_idx`` after dispatch; on V2.5 the adapter hands DeepEP a copy (above), with the same effect.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from ..config import current_environ, declare, read_bool, read_int, read_str
from ..errors import ConfigError, InvalidInputError, RankMismatchError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Boolean, Capabilities, DispatchResult, EnvVar, Integer, OneOf
from . import _deepep_common
from ._deepep_common import (DEEP_EP_V25_MODULE, agree_on_inputs, check_combine_args, check_dispatch_args, check_gpu,
                             check_handle, check_token_rows, check_torch_deterministic, combine_key, counts_tensor,
                             decode_nccl_version, deep_ep_api, deep_ep_classes, deep_ep_version, device_sm_count,
                             call_key, module_installed, owned_weights, ProbeFacts, remember, rule_error)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DeepEPElasticBackend", "ElasticApi", "ElasticHandle", "ElasticSettings", "check_v2_rules",
           "ep_register_backends", "read_settings", "resolve_elastic_api"]

MIN_BUCKET = 256
MIN_NCCL = (2, 30, 4)  # DeepEP V2 (2.0-2.1): NCCL GIN
MIN_NCCL_V25 = (2, 32, 3)  # DeepEP V2.5: sgl-deep-ep-v25 0.1.0rc0 prerequisites.py:9 _MIN_NCCL_VERSION
MIN_CAPABILITY = (9, 0)
HIDDEN_ALIGNMENT = 256  # combine.cuh:109 "Invalid hidden" (V2.5: combine.cuh:110)
MAX_TOPK = 32
MAX_HYBRID_SMS = 160  # buffer.hpp kNumMaxSMs (V2.5: csrc/buffers/ep.hpp:42)
GIN_HINT = ("if the ElasticBuffer/EPBuffer constructor fails or crashes on a host without GPU-initiated networking "
            "(NVLink-only), set EP_DISABLE_GIN=1")
GPU_NEED = "DeepEP V2/V2.5 needs an SM90+ GPU (Hopper or newer)"
_COMBINE, _CACHED = "combine", "cached"  # call-key tags
_FALLBACK = "or the 'legacy'/'torch' backend"
INSTALL_HINT = ("install DeepEP V2 (2.0-2.1: ElasticBuffer, https://github.com/deepseek-ai/DeepEP) or V2.5 (EPBuffer, "
                "e.g. pip install sgl-deep-ep-v25), or use the 'legacy' backend for DeepEP's V1 Buffer")

#: The buffer classes the adapter drives, newest first: (class, API generation, NCCL needed, num_sms rounded up
#: to even by the library). V2.5 rounding: sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py:643 (dispatch) and :816
#: (combine), ``align(num_sms, 2)``.
ELASTIC_CLASSES = (("EPBuffer", "V2.5", MIN_NCCL_V25, True), ("ElasticBuffer", "V2", MIN_NCCL, False))
#: The modules searched, in order: upstream ``deep_ep``; then SGLang's V2.5 wheel (``deep_ep_v25``).
ELASTIC_MODULES = ("deep_ep", DEEP_EP_V25_MODULE)
#: Every keyword the adapter passes, per method: both generations take them (dd758caf elastic.py; V2.5
#: buffers/ep.py:242-261, :562-580, :770-779, :374-378); the installed signatures are checked once against these.
PASSED_KEYWORDS = {
    "__init__": ("group", "num_bytes", "num_max_tokens_per_rank", "hidden", "num_topk", "use_fp8_dispatch",
                 "deterministic", "allow_hybrid_mode", "num_allocated_qps"),
    "dispatch": ("x", "topk_idx", "topk_weights", "num_experts", "num_sms", "previous_event",
                 "async_with_compute_stream", "allocate_on_comm_stream", "handle", "do_expand"),
    "combine": ("x", "handle", "topk_weights", "num_sms", "previous_event", "async_with_compute_stream",
                "allocate_on_comm_stream"),
}
SIZE_HINT_KEYWORDS = ("group", "num_max_tokens_per_rank", "hidden", "num_topk", "use_fp8_dispatch",
                      "allow_hybrid_mode")


def _version_text(version: tuple) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class ElasticApi:
    """Which DeepEP buffer class the installed package provides and that generation's rules.

    Resolved once (:func:`resolve_elastic_api`, by the probe and the constructor), so the hot path never looks
    anything up: ``cls`` is called directly, ``even_sms`` is applied when the SM count is set, ``copies_topk``
    picks whether dispatch hands DeepEP a copy of ``topk_idx``.
    """

    generation: str  # "V2" (ElasticBuffer, deep_ep 2.0-2.1) or "V2.5" (EPBuffer)
    module_name: str  # "deep_ep", or "deep_ep_v25" (sgl-deep-ep-v25)
    class_name: str
    cls: Any
    version: str
    min_nccl: tuple
    even_sms: bool  # the library rounds a non-zero num_sms up to even (V2.5)
    copies_topk: bool  # dispatch keeps its own copy of topk_idx in the handle (V2: do_handle_copy=True)
    size_hint: Optional[Callable] = None  # cls.get_buffer_size_hint when it takes the adapter's keywords
    module: Any = None
    note: str = ""  # e.g. another DeepEP that is installed but not used

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.class_name}"

    @property
    def library(self) -> str:
        return f"DeepEP {self.generation}"

    def effective_sms(self, num_sms: Optional[int]) -> Optional[int]:
        """The SM count the library runs for a requested one (``None``/0: automatic)."""
        if num_sms and self.even_sms and num_sms % 2:
            return num_sms + 1
        return num_sms

    def details(self) -> dict[str, str]:
        out = {"deep_ep": self.version, "deep_ep_module": self.module_name, "deep_ep_api": self.generation,
               "deep_ep_class": self.qualname, "nccl_needed": _version_text(self.min_nccl)}
        if self.module is not None:
            out["deep_ep_classes"] = deep_ep_classes(self.module)
        if self.note:
            out["note"] = self.note
        return out


def _parameters(fn) -> Optional[Mapping[str, inspect.Parameter]]:
    """``fn``'s parameters, ``None`` when it cannot be introspected or takes ``**kwargs`` (anything goes)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return params


def _make_api(module, module_name: str, class_name: str, generation: str, min_nccl: tuple, even_sms: bool,
              note: str = "") -> ElasticApi:
    """Check the installed class's signatures against what the adapter passes; raise ImportError naming a gap."""
    cls = getattr(module, class_name)
    version = deep_ep_version(module)
    copies_topk = generation == "V2"  # fallback when dispatch cannot be introspected
    for method, names in PASSED_KEYWORDS.items():
        params = _parameters(getattr(cls, method, None))
        if params is None:
            continue  # not introspectable: trust the class name
        missing = [n for n in names if n not in params]
        if missing:
            raise ImportError(
                f"{module_name}.{class_name}.{method} ({module_name} {version}) takes no {', '.join(missing)}: this "
                f"DeepEP {generation} differs from the API the 'elastic' adapter drives (ElasticBuffer of DeepEP "
                "2.0-2.1, EPBuffer of DeepEP 2.5); install one of those, or use the 'torch' backend")
        if method == "dispatch":
            # V2: do_handle_copy=True clones topk_idx into the handle; V2.5: False, and must stay False
            # (sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py:575 default, :638 assert)
            copy = params.get("do_handle_copy")
            copies_topk = copy is not None and copy.default is True
    hint = getattr(cls, "get_buffer_size_hint", None)
    if hint is not None:
        params = _parameters(hint)
        if params is not None and not all(n in params for n in SIZE_HINT_KEYWORDS):
            hint = None  # size the buffer from the constructor's own MoE settings instead
    return ElasticApi(generation, module_name, class_name, cls, version, min_nccl, even_sms, copies_topk, hint,
                      module, note)


def resolve_elastic_api(found: Optional[dict] = None) -> ElasticApi:
    """The DeepEP buffer class to drive: ``deep_ep.EPBuffer`` (V2.5), else ``deep_ep.ElasticBuffer`` (V2), else
    ``deep_ep_v25.EPBuffer`` (sgl-deep-ep-v25). Raises :class:`ImportError` saying what each module offered and
    what to install. ``found`` (optional) receives what was seen of ``deep_ep`` even when nothing fits.
    """
    seen = []
    for module_name in ELASTIC_MODULES:
        if module_name != "deep_ep" and not module_installed(module_name):
            continue  # never import an optional second DeepEP that is not there
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - ImportError or a broken extension (V2.5 checks its host here)
            seen.append(f"{module_name} not importable: {exc}")
            continue
        if found is not None and module_name == "deep_ep":
            found.update(deep_ep=deep_ep_version(module), deep_ep_api=deep_ep_api(module),
                         deep_ep_classes=deep_ep_classes(module))
        for class_name, generation, min_nccl, even_sms in ELASTIC_CLASSES:
            if hasattr(module, class_name):
                note = ""
                if module_name == "deep_ep" and module_installed(DEEP_EP_V25_MODULE):
                    note = (f"{DEEP_EP_V25_MODULE} (sgl-deep-ep-v25, DeepEP V2.5) is installed too but not used: "
                            f"deep_ep's {class_name} comes first")
                return _make_api(module, module_name, class_name, generation, min_nccl, even_sms, note)
        generation = deep_ep_api(module)
        what = f"this DeepEP is {generation}-only" if generation == "V1" else "no DeepEP buffer class"
        seen.append(f"{module_name} {deep_ep_version(module)} has no ElasticBuffer or EPBuffer: {what} "
                    f"({deep_ep_classes(module)})")
    raise ImportError("; ".join(seen) + f" ({INSTALL_HINT})")


def bucket(num_tokens: int) -> int:
    """Next power of two >= ``num_tokens``, at least 256."""
    return max(MIN_BUCKET, 1 << max(0, int(num_tokens) - 1).bit_length())


def check_v2_rules(world: int, hidden: int, elem_size: int, topk: int, num_experts: Optional[int],
                   num_sms: Optional[int] = None, device_sms: Optional[int] = None, op: str = "dispatch",
                   backend: str = "elastic", library: str = "DeepEP V2", even_sms: bool = False) -> None:
    """Raise :class:`InvalidInputError` when DeepEP V2/V2.5 would reject these sizes (see the module docstring).

    ``op``: ``"dispatch"`` (the rows come back through combine, so combine's rule applies too) or
    ``"combine"``; ``num_experts`` ``None`` when the call has none (combine, cached dispatch). ``num_sms`` is
    the count the library runs (:meth:`ElasticApi.effective_sms`); ``even_sms``: the library rounds an odd
    request up to even (V2.5), which the message then says. The rules are the same in V2 and V2.5.
    """
    if hidden % HIDDEN_ALIGNMENT:
        raise rule_error(backend, f"{library} combine", f"hidden % {HIDDEN_ALIGNMENT} == 0", f"hidden={hidden}",
                         f"use a hidden size that is a multiple of {HIDDEN_ALIGNMENT} {_FALLBACK}")
    if (hidden * elem_size) % 16 or -(-hidden // 32) * 4 > hidden:  # implied by the rule above; kept explicit
        raise rule_error(backend, f"{library} {op}", "hidden bytes % 16 == 0", f"hidden={hidden}",
                         f"use a hidden size that is a multiple of {HIDDEN_ALIGNMENT} {_FALLBACK}")
    if topk > MAX_TOPK:
        raise rule_error(backend, library, f"top-k <= {MAX_TOPK}", f"topk={topk}",
                         f"route each token to at most {MAX_TOPK} experts or use the 'torch' backend")
    if num_experts is not None and num_experts % world:
        raise rule_error(backend, library, "num_experts % group size == 0",
                         f"num_experts={num_experts} on {world} ranks", f"use a multiple of {world} experts")
    if num_sms and device_sms is not None and num_sms > device_sms:
        rounded = f" ({library} rounds an odd SM count up to even)" if even_sms else ""
        raise rule_error(backend, library, f"num_sms <= the GPU's {device_sms} SMs", f"num_sms={num_sms}{rounded}",
                         "lower moe_flex_dispatcher_num_sms / MCORE_EP_ELASTIC_NUM_SMS")


def check_v2_hybrid_rules(buffer, world: int, num_experts: int, num_sms: Optional[int],
                          backend: str = "elastic", library: str = "DeepEP V2") -> None:
    """Rules of V2's (and V2.5's) hybrid (scale-out > 1) kernels, read from the built buffer's logical topology."""
    scaleout = int(getattr(buffer, "num_scaleout_ranks", 1) or 1)
    if scaleout <= 1:
        return
    scaleup = int(getattr(buffer, "num_scaleup_ranks", world) or world)
    local = num_experts // world
    fix = "use hybrid mode off (MCORE_EP_ELASTIC_HYBRID_MODE=0), fewer experts per rank " + _FALLBACK
    if local + scaleup > 128:
        raise rule_error(backend, f"{library} hybrid dispatch", "experts per rank + scale-up ranks <= 128",
                         f"{local} + {scaleup}", fix)
    if scaleup > 64 or scaleout > 32:
        raise rule_error(backend, f"{library} hybrid mode", "at most 64 scale-up and 32 scale-out ranks",
                         f"{scaleup} x {scaleout}", fix)
    if num_sms and num_sms > MAX_HYBRID_SMS:
        raise rule_error(backend, f"{library} hybrid mode", f"num_sms <= {MAX_HYBRID_SMS}", f"num_sms={num_sms}",
                         "lower moe_flex_dispatcher_num_sms / MCORE_EP_ELASTIC_NUM_SMS")


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
    env = current_environ() if environ is None else environ
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
    buffer_hidden: int = 0  # the hidden size that buffer was built for (combine/cached dispatch fit under it)


@dataclass
class _GroupState:
    """One group's buffer and what it was built for; shared (mutated in place) by every call key of the group."""

    buffer: Any = None
    max_tokens: int = 0  # num_max_tokens_per_rank of buffer
    hidden: int = 0
    topk: int = 0
    world: int = 0


class DeepEPElasticBackend:
    """DeepEP V2 ``ElasticBuffer`` / V2.5 ``EPBuffer`` behind the :class:`~megatron_ep_plugins.spec.EPBackend`
    protocol. ``api`` (:class:`ElasticApi`) says which one, resolved here once."""

    #: Pass Megatron's async_finish / allocate_on_comm_stream to DeepEP (see _deepep_common.STREAM_OVERLAP_NOTE).
    stream_overlap: bool = False

    name = "elastic"

    def __init__(self) -> None:
        self.settings = read_settings()  # validate the environment before touching deep_ep
        self.api = api = resolve_elastic_api()  # ImportError saying what is installed and what would work
        import torch

        self._buffer_cls = api.cls
        self._library = api.library
        self._clone_topk = not api.copies_topk  # V2.5 keeps the caller's topk_idx in its handle: pass a copy
        self._int64 = torch.int64
        self._check_each = self.settings.check_each_dispatch
        self.num_sms: Optional[int] = api.effective_sms(self.settings.num_sms)
        self._groups: dict[Any, _GroupState] = {}  # group -> its buffer (grown, never shrunk)
        self._ready: dict[tuple, _GroupState] = {}  # validated dispatch key -> its group's state
        self._ok: set[tuple] = set()  # validated combine / cached-dispatch keys
        self._pinned_checked: set[Any] = set()  # groups whose pinned max tokens were compared across ranks
        self._agreed: set[Any] = set()  # groups whose first dispatch agreed on T/H/K

    # -- EPBackend -----------------------------------------------------------------------------
    def set_num_sms(self, num_sms: int) -> None:
        if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 0:
            raise InvalidInputError(f"num_sms={num_sms!r} is invalid: use a non-negative int (0 = automatic)")
        if self.settings.num_sms is None:  # MCORE_EP_ELASTIC_NUM_SMS wins
            num_sms = self.api.effective_sms(num_sms) or None  # V2.5 would round an odd count up itself
            if num_sms != self.num_sms:
                self._ready.clear()  # the SM-count rules are part of each key's validation
            self.num_sms = num_sms

    def agreement_key(self) -> Mapping[str, Any]:
        s = self.settings
        return {"algorithm": self.api.qualname, "max_tokens_per_rank": s.max_tokens_per_rank,
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
        self._pinned_checked.add(group)

    def _get_buffer(self, group, st: _GroupState, max_tokens: int, hidden: int, topk: int, device) -> _GroupState:
        s = self.settings
        want_hidden, want_topk = s.hidden or hidden, s.num_topk or topk
        if want_hidden < hidden or want_topk < topk:
            raise InvalidInputError(
                f"dispatch input has hidden={hidden}, topk={topk}, above MCORE_EP_ELASTIC_HIDDEN={s.hidden} / "
                f"MCORE_EP_ELASTIC_NUM_TOPK={s.num_topk}: raise them or unset them")
        if s.max_tokens_per_rank is not None:
            if group not in self._pinned_checked:
                self._check_pinned(group, device)
            if max_tokens > s.max_tokens_per_rank:
                raise InvalidInputError(
                    f"a rank of the group passed {max_tokens} tokens, more than "
                    f"MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK={s.max_tokens_per_rank}: raise it (or unset it to size "
                    "the buffer automatically)")
            need = s.max_tokens_per_rank
        else:
            need = bucket(max_tokens)
        if st.buffer is not None:
            if st.max_tokens >= need and st.hidden >= want_hidden and st.topk >= want_topk:
                return st
            # grow, never shrink: keep the compiled kernels' bucket and sizes
            need = max(need, st.max_tokens) if s.max_tokens_per_rank is None else need
            want_hidden, want_topk = max(want_hidden, st.hidden), max(want_topk, st.topk)
        num_bytes = None
        hint = self.api.size_hint
        if hint is not None:
            num_bytes = hint(group, need, want_hidden, num_topk=want_topk, use_fp8_dispatch=s.fp8,
                             allow_hybrid_mode=s.hybrid_mode)
        st.buffer = self._buffer_cls(
            group, num_bytes=num_bytes, num_max_tokens_per_rank=need, hidden=want_hidden, num_topk=want_topk,
            use_fp8_dispatch=s.fp8, deterministic=s.deterministic, allow_hybrid_mode=s.hybrid_mode,
            num_allocated_qps=s.num_qps)
        st.max_tokens, st.hidden, st.topk = need, want_hidden, want_topk
        return st

    def _state(self, group) -> _GroupState:
        st = self._groups.get(group)
        if st is None:
            import torch.distributed as dist

            st = self._groups[group] = _GroupState(world=dist.get_world_size(group))
        return st

    def _overflow(self, num_tokens: int, limit: int) -> InvalidInputError:
        if self.settings.max_tokens_per_rank is not None:
            return InvalidInputError(
                f"backend 'elastic': {num_tokens} tokens on this rank, more than "
                f"MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK={limit} (detected on this rank only, before any DeepEP "
                f"call): set MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK to at least {num_tokens} (the same value on every "
                "rank), or unset it to size the buffer automatically")
        return InvalidInputError(
            f"backend 'elastic': {num_tokens} tokens exceed the num_max_tokens_per_rank={limit} agreed at the first "
            "dispatch (detected on this rank only, before any DeepEP call). Pin MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK "
            f"to the largest token count of the run (e.g. MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK={bucket(num_tokens)} "
            "on every rank), or set MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH=1 to let all ranks grow the buffer together")

    def _lookup(self, key) -> Optional[_GroupState]:
        try:
            return self._ready.get(key)
        except TypeError:  # unhashable argument: the full checks will say what is wrong
            return None

    def _prepare_dispatch(self, key, x, topk_idx, topk_weights, num_experts, group) -> _GroupState:
        """Slow path, once per call key (and every call with the per-dispatch check): the full argument checks,
        the cross-rank header (first dispatch of a group), the V2 size rules, the group's buffer."""
        st = self._state(group)
        data, topk_idx, is_fp8 = check_dispatch_args(self.name, x, topk_idx, topk_weights, num_experts, st.world)
        if is_fp8 != self.settings.fp8:
            raise InvalidInputError(
                "backend 'elastic': FP8 (e4m3, scales) input needs a buffer built for it: set "
                "MCORE_EP_ELASTIC_FP8=1" if is_fp8 else
                "backend 'elastic': MCORE_EP_ELASTIC_FP8=1 builds the buffer for FP8 input, got bf16 tokens: "
                "pass (e4m3, scales) or unset MCORE_EP_ELASTIC_FP8")
        num_tokens, hidden = data.shape
        topk = topk_idx.shape[1]
        device = data.device
        agree = self._check_each or group not in self._agreed
        if agree:
            # first: every rank learns the same T/H/K, so the rules below fail on all ranks alike
            max_t = agree_on_inputs(self.name, group, num_tokens, hidden, topk, topk_idx, num_experts, device)
        else:
            max_t = num_tokens
            if st.buffer is not None and num_tokens > st.max_tokens:
                raise self._overflow(num_tokens, st.max_tokens)
        check_torch_deterministic(self.name)
        check_v2_rules(st.world, hidden, data.element_size(), topk, num_experts, self.num_sms,
                       device_sm_count(device), library=self._library, even_sms=self.api.even_sms)
        self._get_buffer(group, st, max_t, hidden, topk, device)
        check_v2_hybrid_rules(st.buffer, st.world, num_experts, self.num_sms, library=self._library)
        if agree:  # only once the group has a buffer sized from an agreed T (never from one rank's own T)
            self._agreed.add(group)
        remember(self._ready, key, st)
        return st

    def _check_tokens(self, key, x, h: ElasticHandle, op: str) -> None:
        """Slow path of combine / cached dispatch, once per call key."""
        data = check_token_rows(self.name, x, op)
        if data.shape[1] > h.buffer_hidden:
            raise InvalidInputError(f"backend {self.name!r}: {op} got hidden={data.shape[1]}, above the hidden size "
                                    f"{h.buffer_hidden} of the buffer that made this handle; pass the dispatch's "
                                    "hidden size")
        check_torch_deterministic(self.name)
        check_v2_rules(1, data.shape[1], data.element_size(), 0, None, op="combine" if op == "combine" else "dispatch",
                       library=self._library)
        self._ok.add(key)

    def _stream(self, buffer, async_finish: bool, allocate_on_comm_stream: bool):
        """``(async_with_compute_stream, previous_event, allocate_on_comm_stream)`` to pass to the buffer: Megatron's
        flags with ``stream_overlap``, else the synchronous mode (``_deepep_common.STREAM_OVERLAP_NOTE``)."""
        if not self.stream_overlap:
            return False, None, False
        return async_finish, buffer.capture() if allocate_on_comm_stream else None, allocate_on_comm_stream

    def release(self, group=None) -> None:
        """Drop this backend's buffer for ``group`` (every group when ``None``) and what was validated for it.

        Called on every rank right before ``destroy_process_group(group)`` (``megatron_ep_plugins.teardown``): an
        ``ElasticBuffer`` runs a GPU barrier with its peers when freed, which faults once the group is gone. The
        buffer is freed here unless a handle still holds it; the next dispatch on a live group builds a new one."""
        gone = set(self._groups) if group is None else {group}
        for g in gone:
            self._groups.pop(g, None)
            self._agreed.discard(g)
            self._pinned_checked.discard(g)
        self._ready = {key: st for key, st in self._ready.items() if key[0] not in gone}

    # -- operations ----------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        key = call_key(x, topk_idx, topk_weights, num_experts, group)
        st = self._lookup(key)
        if st is None or self._check_each:
            st = self._prepare_dispatch(key, x, topk_idx, topk_weights, num_experts, group)
        num_tokens = (x[0] if x.__class__ is tuple else x).shape[0]
        if num_tokens > st.max_tokens:  # steady state: no collective, no host sync; a free local bound check
            raise self._overflow(num_tokens, st.max_tokens)
        if topk_idx.dtype is not self._int64:
            topk_idx = topk_idx.long()  # a fresh tensor: the handle may keep it
        elif self._clone_topk:  # V2.5 keeps this tensor in its handle (do_handle_copy=False): V2's copy semantics
            topk_idx = topk_idx.clone()
        buffer = st.buffer
        async_finish, previous, allocate_on_comm_stream = self._stream(buffer, async_finish, allocate_on_comm_stream)
        recv_x, recv_idx, recv_w, raw, event = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, num_sms=self.num_sms or 0,
            previous_event=previous, async_with_compute_stream=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream, do_expand=False)
        if async_finish:
            event.current_stream_wait()
        num_recv = (recv_x[0] if recv_x.__class__ is tuple else recv_x).shape[0]
        tokens_per_expert = counts_tensor(raw.num_recv_tokens_per_expert_list)
        handle = ElasticHandle(raw, buffer, recv_idx, num_tokens, num_recv, st.hidden)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        h = handle if handle.__class__ is ElasticHandle else check_handle(handle, ElasticHandle, self.name)
        key = (_CACHED, combine_key(x), h.buffer_hidden)
        if key not in self._ok:
            self._check_tokens(key, x, h, "dispatch with a cached handle")
        data = x[0] if x.__class__ is tuple else x
        if data.shape[0] != h.num_tokens:
            raise InvalidInputError(
                f"dispatch with a cached handle expects x of shape [{h.num_tokens}, H] (the token count of the "
                f"dispatch that made the handle), got {tuple(data.shape)}")
        if data is x:
            x = x.contiguous()
        buffer = h.buffer
        async_finish, previous, allocate_on_comm_stream = self._stream(buffer, async_finish, allocate_on_comm_stream)
        recv_x, _, _, _, event = buffer.dispatch(
            x, handle=h.raw, num_experts=h.raw.num_experts, num_sms=h.raw.num_sms,
            previous_event=previous, async_with_compute_stream=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream, do_expand=False)
        if async_finish:
            event.current_stream_wait()
        return recv_x

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        h = handle if handle.__class__ is ElasticHandle else check_handle(handle, ElasticHandle, self.name)
        key = (_COMBINE, combine_key(x), h.buffer_hidden)
        if key not in self._ok:
            check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, None)
            self._check_tokens(key, x, h, "combine")
        if x.shape[0] != h.num_recv:
            check_combine_args(self.name, x, h.num_recv, h.recv_topk_idx, None)  # raises with the shapes
        if topk_weights is not None:
            topk_weights = owned_weights(h.recv_topk_idx, topk_weights)
        buffer = h.buffer
        async_finish, previous, allocate_on_comm_stream = self._stream(buffer, async_finish, allocate_on_comm_stream)
        combined, combined_w, event = buffer.combine(
            x.contiguous(), h.raw, topk_weights=topk_weights, num_sms=0, previous_event=previous,
            async_with_compute_stream=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        if async_finish:
            event.current_stream_wait()
        return combined, (combined_w if topk_weights is not None else None)


def _nccl_facts(problems: list, details: dict, api: Optional[ElasticApi] = None) -> None:
    """Report the NCCL torch was compiled with and the one loaded; decide on the loaded one against what the
    installed DeepEP generation needs (``api``; ``None``: none found, V2's minimum, the lowest, applies)."""
    import torch

    compiled = None
    try:
        compiled = decode_nccl_version(torch.cuda.nccl.version())
        details["nccl_compiled"] = ".".join(map(str, compiled))
    except Exception as exc:  # noqa: BLE001
        details["nccl_compiled"] = f"unknown ({exc})"
    try:
        loaded = _deepep_common.loaded_nccl_version()  # via the module: tests and tools may replace it
        details["nccl_loaded"] = ".".join(map(str, loaded))
        decided, source = loaded, "the loaded libnccl.so.2"
    except Exception as exc:  # noqa: BLE001 - fall back, saying why
        details["nccl_loaded"] = f"unknown ({exc})"
        decided, source = compiled, f"torch's compiled NCCL; the loaded libnccl.so.2 could not be asked: {exc}"
    if decided is None:
        problems.append(f"cannot read the NCCL version: loaded {details['nccl_loaded']}, torch.cuda.nccl.version() "
                        f"{details['nccl_compiled']}")
        return
    details["nccl"] = ".".join(map(str, decided))
    details["nccl_source"] = source
    need = api.min_nccl if api is not None else MIN_NCCL
    text = _version_text(need)
    who = (f"{api.library} ({api.qualname} {api.version})" if api is not None else
           f"DeepEP V2 (V2.5: >= {_version_text(MIN_NCCL_V25)})")
    if decided < need:
        problems.append(f"NCCL {details['nccl']} < {text} ({source}): {who} needs NCCL >= {text} (GIN) at run time; "
                        f"install nvidia-nccl >= {text} so that torch loads it")


def _probe() -> Availability:
    facts = ProbeFacts(None, False)
    problems, details = facts.problems, facts.details
    api = None
    try:
        api = resolve_elastic_api(details)
    except ImportError as exc:
        problems.append(str(exc))
    else:
        facts.deep_ep = api.module
        details.update(api.details())
    check_gpu(facts, GPU_NEED, MIN_CAPABILITY)
    try:
        read_settings()
    except ConfigError as exc:
        problems.append(str(exc))
    if facts.has_gpu:
        _nccl_facts(problems, details, api)
    gin = os.environ.get("EP_DISABLE_GIN")
    details["EP_DISABLE_GIN"] = gin if gin is not None else "unset"
    if gin is None:
        details["hint"] = GIN_HINT
    if problems:
        return Availability.no("; ".join(problems), **details)
    reason = (f"{api.qualname} ({api.library}, {api.module_name} {api.version}), NCCL {details.get('nccl', '?')} "
              f"(needs >= {details['nccl_needed']})")
    if gin is None:
        reason += f" ({GIN_HINT})"
    return Availability.yes(reason, **details)


#: The variables this backend reads (megatron-ep env and the README table list them).
SETTINGS = declare(
    EnvVar("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", "", "Pin `num_max_tokens_per_rank` (must be equal on all "
           "ranks). Unset: the first dispatch's token count rounded up to a power of two (min 256), agreed across "
           "ranks; a larger batch later rebuilds the buffer at the next power of two.", Integer(1, 1 << 20)),
    EnvVar("MCORE_EP_ELASTIC_HIDDEN", "", "Hidden size used to size the buffer; unset: taken from the first "
           "dispatch's `x`.", Integer(1, 1 << 16)),
    EnvVar("MCORE_EP_ELASTIC_NUM_TOPK", "", "Top-k used to size the buffer; unset: from the first dispatch.",
           Integer(1, 1024)),
    EnvVar("MCORE_EP_ELASTIC_NUM_QPS", "0", "`num_allocated_qps` (0 = automatic; AWS EFA needs a small budget, "
           "e.g. 4).", Integer(0, 1024)),
    EnvVar("MCORE_EP_ELASTIC_NUM_SMS", "", "SMs per dispatch (combine reuses the dispatch handle's); unset: "
           "Megatron's `moe_flex_dispatcher_num_sms`.", Integer(0, 1024)),
    EnvVar("MCORE_EP_ELASTIC_DETERMINISTIC", "0", "`1`: deterministic receive order (slower).", Boolean()),
    EnvVar("MCORE_EP_ELASTIC_HYBRID_MODE", "auto", "`allow_hybrid_mode`: `auto` (off when GPU-initiated "
           "networking is disabled via `EP_DISABLE_GIN=1`), `1` or `0`.",
           OneOf("auto", "1", "0", "true", "false", "yes", "no", "on", "off")),
    EnvVar("MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH", "0", "`1`: agree on token count/shape/ids across ranks at every "
           "dispatch (one small all_reduce + host sync) so the buffer can grow and bad ids fail on all ranks; "
           "`0`: only at a group's first dispatch.", Boolean()),
    EnvVar("MCORE_EP_ELASTIC_FP8", "0", "`1`: build the buffer for FP8 dispatch input.", Boolean()),
)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="elastic",
            aliases=("deepep-v2", "v2", "deepepv2"),
            priority=300,
            factory=DeepEPElasticBackend,
            probe=_probe,
            settings=SETTINGS,
            validate=lambda env: read_settings(env.environ),
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=True, uneven_tokens=True, async_overlap=False,
                                      deterministic_order=False, internode=True),
            description="DeepEP V2 deep_ep.ElasticBuffer or V2.5 EPBuffer (NCCL GIN; pinned/bucketed "
                        "num_max_tokens_per_rank)",
        )
    ]
