"""Helpers shared by the DeepEP adapters (argument checks, handle checks, event classes, probe facts).

Not a backend and not a plugin: the ``legacy``, ``elastic`` and ``hybridep`` modules import it so they
never import each other. Imports nothing heavy at module level.

Hot-path contract of the adapters: a steady-state dispatch/combine costs one dict/set lookup of a call key
(:func:`dispatch_key` / :func:`combine_key`: every value the argument checks and the kernels' size rules
depend on, except the token count) plus the library calls. The full checks (:func:`check_dispatch_args` and
each adapter's size rules, which raise :class:`~megatron_ep_plugins.errors.InvalidInputError` before any
kernel runs) run once per key.

The source citations in the adapters refer to DeepEP ``main`` at ``DEEPEP_MAIN`` (``deep_ep`` 2.1.0: V1
``Buffer``, V2 ``ElasticBuffer``), to the ``hybrid-ep`` branch at ``DEEPEP_HYBRID_EP`` and, for DeepEP V2.5
(``EPBuffer``; no V1 ``Buffer``, no ``ElasticBuffer``), to the wheel ``DEEPEP_V25`` (SGLang's build of DeepEP
2.5 from upstream ``main``, Python package renamed ``deep_ep_v25``; a path ``buffers/ep.py:N`` there is upstream's
``deep_ep/buffers/ep.py``).

API generations (:func:`deep_ep_api`) are told apart by class names, never by version strings: ``EPBuffer``
= V2.5, ``ElasticBuffer`` = V2 (2.0-2.1, which also ship the V1 ``Buffer``), ``Buffer`` alone = V1.
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..errors import InvalidInputError

__all__ = ["STREAM_OVERLAP_NOTE", "DEEPEP_HYBRID_EP", "DEEPEP_MAIN", "DEEPEP_V25", "DEEP_EP_V25_MODULE", "ProbeFacts",
           "MAX_CALL_KEYS", "call_key", "counts_tensor", "remember",
           "agree_on_inputs", "check_combine_args", "check_dispatch_args", "check_gpu", "check_handle",
           "check_torch_deterministic", "combine_key", "cuda_problem", "decode_nccl_version", "deep_ep_api",
           "deep_ep_classes", "deep_ep_version", "device_sm_count", "dispatch_key", "import_event_classes",
           "loaded_nccl_version", "module_installed", "owned_weights", "probe_deep_ep", "rule_error", "v25_module_note"]

#: Why the DeepEP adapters run DeepEP's synchronous stream mode whatever ``async_finish`` /
#: ``allocate_on_comm_stream`` say (``stream_overlap = False``, the default of both adapters).
STREAM_OVERLAP_NOTE = (
    "The slot must return tensors that are ready on the current stream, so an adapter that passed Megatron's "
    "async_finish=True would wait on DeepEP's event right away, as Megatron's fused_a2a.py does: the overlap "
    "is never used. DeepEP's synchronous mode (async_finish=False, no previous event, outputs allocated on the "
    "compute stream) gives the same ordering: the comm stream waits for the compute stream, the compute "
    "stream waits for the comm stream. It saves the host work of the asynchronous mode (an EventHandle per "
    "call, the comm stream's allocations and record_stream on every output, so every later free of those "
    "tensors records and polls events), which at small token counts is what the caller waits for. Set "
    "backend.stream_overlap = True to pass the flags through."
)

#: The DeepEP commits whose sources the adapters' size rules (and the CPU test double) mirror.
DEEPEP_MAIN = "dd758caf451848bd150e1046af3d0a73e5fff38d"  # deepseek-ai/DeepEP main, deep_ep 2.1.0
DEEPEP_HYBRID_EP = "94a9f8f6b146c07d97ec58f67cd6d303296d6098"  # deepseek-ai/DeepEP branch hybrid-ep
DEEPEP_V25 = "sgl-deep-ep-v25 0.1.0rc0"  # PyPI wheel: DeepEP 2.5 (__init__.py:87 __version__ = '2.5.0')

#: Where a DeepEP may be installed: upstream builds (and SGLang's ``sgl-deep-ep``, V1 + 2.1) install
#: ``deep_ep``; SGLang's ``sgl-deep-ep-v25`` wheel installs DeepEP V2.5 as ``deep_ep_v25`` (it may sit beside a
#: ``deep_ep``).
DEEP_EP_V25_MODULE = "deep_ep_v25"
_DISTRIBUTIONS = {"deep_ep": ("deep_ep", "deep-ep", "sgl-deep-ep"), DEEP_EP_V25_MODULE: ("sgl-deep-ep-v25",)}
#: Buffer classes by API generation, newest first (:func:`deep_ep_api`).
_GENERATIONS = (("EPBuffer", "V2.5"), ("ElasticBuffer", "V2"), ("Buffer", "V1"))

_EVENT_MODULES = ("deep_ep.utils", "deep_ep.utils.event", "deep_ep")


def import_event_classes() -> tuple[Any, Any]:
    """``(EventOverlap, EventHandle)`` from the first module that has both (V1 and V2 layouts)."""
    tried = []
    for module_name in _EVENT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            tried.append(f"{module_name}: {exc}")
            continue
        overlap, handle = getattr(module, "EventOverlap", None), getattr(module, "EventHandle", None)
        if overlap is not None and handle is not None:
            return overlap, handle
        tried.append(f"{module_name}: no EventOverlap/EventHandle")
    raise ImportError("deep_ep's EventOverlap/EventHandle not found (" + "; ".join(tried) + ")")


def check_dispatch_args(backend: str, x, topk_idx, topk_weights, num_experts, world, *, fp8: bool = True):
    """Free metadata checks (no device sync); returns ``(data, topk_idx as int64, is_fp8)``."""
    import torch

    is_fp8 = isinstance(x, tuple)
    if is_fp8 and not fp8:
        raise InvalidInputError(f"backend {backend!r} does not support FP8 dispatch input; pass bf16 tokens or use "
                                "the 'legacy'/'elastic' backend")
    if is_fp8:
        if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
            raise InvalidInputError(f"backend {backend!r}: FP8 input must be a (e4m3 tensor, fp32 scales) pair")
        data, scales = x
        if data.dim() != 2 or scales.dim() != 2 or scales.shape[0] != data.shape[0]:
            raise InvalidInputError(
                f"backend {backend!r}: FP8 input must be ([T, H] e4m3, [T, ceil(H/128)] fp32 scales), got "
                f"{tuple(data.shape)} and {tuple(scales.shape)}")
        if scales.dtype != torch.float32 or data.element_size() != 1:
            raise InvalidInputError(
                f"backend {backend!r}: FP8 input must be (float8_e4m3fn, float32 scales), got ({data.dtype}, "
                f"{scales.dtype})")
    else:
        data = x
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise InvalidInputError(f"backend {backend!r}: x must be a [num_tokens, hidden] tensor, got {x!r:.80}")
        if data.dtype != torch.bfloat16:
            raise InvalidInputError(
                f"backend {backend!r}: DeepEP dispatches bf16 tokens (or an FP8 (e4m3, scales) pair), got "
                f"{data.dtype}; cast x to torch.bfloat16 or use the 'torch' backend")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != data.shape[0]:
        raise InvalidInputError(
            f"backend {backend!r}: topk_idx must be [num_tokens={data.shape[0]}, topk] int64, got "
            f"{getattr(topk_idx, 'shape', topk_idx)!r}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"backend {backend!r}: topk_idx must be int64 (global expert ids, -1 = masked), "
                                f"got {topk_idx.dtype}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape:
        raise InvalidInputError(f"backend {backend!r}: topk_weights must have topk_idx's shape "
                                f"{tuple(topk_idx.shape)}, got {getattr(topk_weights, 'shape', topk_weights)!r}")
    if topk_weights.dtype != torch.float32:
        raise InvalidInputError(f"backend {backend!r}: topk_weights must be float32 (DeepEP only supports fp32 "
                                f"probs; set moe_router_dtype='fp32'), got {topk_weights.dtype}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise InvalidInputError(f"backend {backend!r}: num_experts must be a positive int, got {num_experts!r}")
    if num_experts % world:
        raise InvalidInputError(f"backend {backend!r}: num_experts={num_experts} is not divisible by the group "
                                f"size {world}; use a multiple of {world}")
    if topk_idx.dtype != torch.int64:
        topk_idx = topk_idx.long()
    return data, topk_idx, is_fp8


def check_handle(handle: Any, cls: type, backend: str) -> Any:
    if not isinstance(handle, cls):
        raise InvalidInputError(
            f"backend {backend!r} got a handle of type {type(handle).__name__}; pass the handle returned by this "
            "backend's dispatch (handles of different backends are not interchangeable)")
    return handle


def deep_ep_version(deep_ep: Any) -> str:
    version = getattr(deep_ep, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import version as dist_version

    for dist in _DISTRIBUTIONS.get(getattr(deep_ep, "__name__", "deep_ep"), ("deep_ep",)):
        try:
            return dist_version(dist)
        except Exception:  # noqa: BLE001 - informational only
            continue
    return "unknown"


def deep_ep_api(deep_ep: Any) -> str:
    """The DeepEP API generation a module provides, told by its class names: ``"V2.5"`` (``EPBuffer``; V2.5
    removed ``Buffer`` and renamed ``ElasticBuffer`` without an alias), ``"V2"`` (``ElasticBuffer``, 2.0-2.1),
    ``"V1"`` (``Buffer`` only), ``"unknown"`` (none of them)."""
    for cls, generation in _GENERATIONS:
        if hasattr(deep_ep, cls):
            return generation
    return "unknown"


def deep_ep_classes(deep_ep: Any) -> str:
    """The buffer classes a DeepEP module has, e.g. ``"ElasticBuffer, Buffer"`` (for probe details)."""
    names = [cls for cls, _ in _GENERATIONS] + ["HybridEPBuffer"]
    return ", ".join(n for n in names if hasattr(deep_ep, n)) or "none"


def module_installed(name: str) -> bool:
    """Whether ``name`` could be imported, without importing it (importing DeepEP V2.5 runs its host checks)."""
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def v25_module_note() -> Optional[str]:
    """What to tell a user whose ``deep_ep`` does not import while ``deep_ep_v25`` is installed, else ``None``."""
    if not module_installed(DEEP_EP_V25_MODULE):
        return None
    return (f"{DEEP_EP_V25_MODULE} is installed (sgl-deep-ep-v25: DeepEP V2.5, EPBuffer only; V2.5 removed the V1 "
            "Buffer and renamed ElasticBuffer)")


@dataclass
class ProbeFacts:
    """What :func:`probe_deep_ep` found; a backend appends its own problems before deciding."""

    deep_ep: Any  # the module, or None when it does not import
    has_gpu: bool
    problems: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)


def probe_deep_ep(class_name: str, install_hint: str, missing_class: Union[str, Callable[[Any], str]],
                  gpu_need: str, min_capability: tuple[int, int]) -> ProbeFacts:
    """The common part of every DeepEP probe; never raises (every failure becomes a reason).

    Imports ``deep_ep``, checks that ``class_name`` exists (else the reason is ``missing_class``, or
    ``missing_class(deep_ep)``), that a CUDA device is visible and that its compute capability is at least
    ``min_capability``. ``details`` name the DeepEP found: version, API generation, buffer classes.
    """
    facts = ProbeFacts(None, False)
    try:
        import deep_ep
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken extension
        facts.problems.append(f"deep_ep not importable: {exc} ({install_hint})")
        note = v25_module_note()
        if note:
            facts.details[DEEP_EP_V25_MODULE] = note
    else:
        facts.deep_ep = deep_ep
        facts.details["deep_ep"] = deep_ep_version(deep_ep)
        facts.details["deep_ep_api"] = deep_ep_api(deep_ep)
        facts.details["deep_ep_classes"] = deep_ep_classes(deep_ep)
        if not hasattr(deep_ep, class_name):
            facts.problems.append(missing_class if isinstance(missing_class, str) else missing_class(deep_ep))
    check_gpu(facts, gpu_need, min_capability)
    return facts


def check_gpu(facts: ProbeFacts, gpu_need: str, min_capability: tuple[int, int]) -> None:
    """Add to ``facts`` whether a CUDA device is visible and its compute capability is ``min_capability`` or more."""
    cuda = cuda_problem(gpu_need)
    if cuda:
        facts.problems.append(cuda)
        return
    facts.has_gpu = True
    import torch

    try:
        major, minor = torch.cuda.get_device_capability()
    except Exception as exc:  # noqa: BLE001
        facts.problems.append(f"cannot read the GPU compute capability: {exc}")
        return
    facts.details["compute_capability"] = f"{major}.{minor}"
    if (major, minor) < min_capability:
        facts.problems.append(f"GPU compute capability {major}.{minor} < {min_capability[0]}.{min_capability[1]}: "
                              f"{gpu_need}")


def cuda_problem(gpu_need: str = "DeepEP kernels need an NVIDIA GPU") -> Optional[str]:
    """``None`` when a CUDA device is visible, else the reason (shared wording of the DeepEP probes)."""
    import torch

    try:
        if torch.cuda.is_available():
            return None
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return f"no CUDA device (torch.cuda.is_available() raised {exc!r})"
    return f"no CUDA device (torch.cuda.is_available() is False): {gpu_need}"


def agree_on_inputs(backend: str, group, num_tokens: int, hidden: int, topk: int, topk_idx, num_experts: int,
                    device) -> int:
    """One ``all_reduce(MAX)`` of ``[T, H, K, -H, -K, bad_ids]``; returns the group's largest T.

    Every rank learns the same facts, so a bad id or a hidden/top-k mismatch on one rank raises the same
    error on all ranks instead of one raising and the others hanging in the next collective.
    """
    import torch
    import torch.distributed as dist

    bad = ((topk_idx < -1) | (topk_idx >= num_experts)).any().to(torch.int64).reshape(1)
    header = torch.cat([torch.tensor([num_tokens, hidden, topk, -hidden, -topk], dtype=torch.int64,
                                     device=device), bad])
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
    max_t, max_h, max_k, min_h, min_k, any_bad = header.tolist()
    if any_bad:
        raise InvalidInputError(f"backend {backend!r}: expert ids out of range on some rank of the group: "
                                f"topk_idx must be in [0, {num_experts}) or -1 for a masked entry")
    if max_h != -min_h or max_k != -min_k:
        raise InvalidInputError(
            f"ranks disagree on the dispatch input: hidden in [{-min_h}, {max_h}], topk in [{-min_k}, {max_k}]; "
            "every rank must pass the same hidden size and top-k")
    return max_t


def check_combine_args(backend: str, x, num_recv: int, recv_topk_idx, topk_weights):
    """Free checks of a DeepEP combine; returns ``topk_weights`` masked to the entries this rank owns.

    DeepEP sums every rank's weight entries, so entries whose expert lives elsewhere must be zero.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != num_recv:
        raise InvalidInputError(
            f"combine expects x of shape [{num_recv}, H] (one row per row dispatch delivered here, same "
            f"order), got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype != torch.bfloat16:
        raise InvalidInputError(f"backend {backend!r}: DeepEP combines bf16 rows, got {x.dtype}; cast to bf16")
    if topk_weights is None:
        return None
    return owned_weights(recv_topk_idx, topk_weights)


def owned_weights(recv_topk_idx, topk_weights):
    """``topk_weights`` (float32) with the entries whose expert lives on another rank zeroed.

    The one tensor op an adapter adds to dispatch's backward: DeepEP's combine sums every rank's entries, so
    a gradient written into a slot this rank does not own would otherwise leak into the result.
    """
    if topk_weights.shape != recv_topk_idx.shape:
        raise InvalidInputError(f"combine's topk_weights must have shape {tuple(recv_topk_idx.shape)}, "
                                f"got {tuple(topk_weights.shape)}")
    return topk_weights.float().masked_fill(recv_topk_idx < 0, 0.0)


def check_torch_deterministic(backend: str) -> None:
    """DeepEP main asserts this before every dispatch/combine (``deep_ep/utils/envs.py``
    ``check_torch_deterministic``): ``torch.empty`` would then launch fill kernels racing its streams."""
    import torch

    if torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory:
        raise InvalidInputError(
            f"backend {backend!r}: DeepEP needs torch.utils.deterministic.fill_uninitialized_memory=False when "
            "torch.use_deterministic_algorithms(True) is on, got both on; set "
            "torch.utils.deterministic.fill_uninitialized_memory = False (or use the 'torch' backend)")


# -- size rules and the per-call key ----------------------------------------------------------------------
def rule_error(backend: str, library: str, need: str, got: str, fix: str) -> InvalidInputError:
    """The error an adapter raises for a broken kernel rule: what needs what, what it got, what would work."""
    return InvalidInputError(f"backend {backend!r}: {library} needs {need}, got {got}; {fix}")


def dispatch_key(x, topk_idx, topk_weights, num_experts, group) -> Optional[tuple]:
    """Everything a dispatch's checks and size rules depend on, except the token count; ``None`` when the
    arguments are not even tensor-like (the full checks then say what is wrong).

    Row agreement (``topk_idx``/``topk_weights``/FP8 scales have ``x``'s token count) is part of the key as
    booleans, so a validated key also vouches for it. Costs attribute reads and one tuple: no device work.
    """
    try:
        if x.__class__ is tuple:
            data, scales = x
            num_tokens = data.shape[0]
            fp8 = (scales.dtype, scales.shape[1:], scales.shape[0] == num_tokens)
        else:
            data, fp8 = x, None
            num_tokens = data.shape[0]
        return (group, num_experts, data.dtype, data.shape[1:], fp8, topk_idx.dtype, topk_idx.shape[1:],
                topk_weights.dtype, topk_weights.shape[1:], topk_idx.shape[0] == num_tokens,
                topk_weights.shape[0] == num_tokens)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


#: Validated call keys an adapter keeps before it forgets them all (a :func:`call_key` holds the token count, so a
#: job whose token count changes every step, as in decoding, would otherwise grow the cache without bound).
MAX_CALL_KEYS = 1024


def call_key(x, topk_idx, topk_weights, num_experts, group) -> Optional[tuple]:
    """:func:`dispatch_key` with full shapes, the token count included, for adapters whose per-key slow path runs no
    collective (``legacy``, ``elastic``: their group agreement is once per group), so that a token count seen on one
    rank only is safe to validate there. Cheaper than slicing the row count off (0.46 against 1.26 us per call with
    the dict lookup, ``benchmarks/host_overhead.py``); a validated key vouches for the inputs' row counts agreeing.
    ``hybridep`` agrees once per key, so it keeps :func:`dispatch_key` (no token count)."""
    try:
        if x.__class__ is tuple:
            data, scales = x
            return (group, num_experts, data.dtype, data.shape, scales.dtype, scales.shape, topk_idx.dtype,
                    topk_idx.shape, topk_weights.dtype, topk_weights.shape)
        return (group, num_experts, x.dtype, x.shape, topk_idx.dtype, topk_idx.shape, topk_weights.dtype,
                topk_weights.shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def remember(cache: dict, key, value) -> None:
    """``cache[key] = value`` for a validated call key, forgetting every key once :data:`MAX_CALL_KEYS` are held;
    an unhashable key (an argument the full checks accepted but a dict cannot hold) is simply not cached."""
    if len(cache) >= MAX_CALL_KEYS:
        cache.clear()
    try:
        cache[key] = value
    except TypeError:
        pass


def combine_key(x) -> Optional[tuple]:
    """``(dtype, shape without the row count)`` of a combine/cached-dispatch input, ``None`` if not tensor-like."""
    try:
        if x.__class__ is tuple:
            data, scales = x
            return (data.dtype, data.shape[1:], scales.dtype, scales.shape[1:], scales.shape[0] == data.shape[0])
        return (x.dtype, x.shape[1:])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def device_sm_count(device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA ``device``; ``None`` for other devices (or when unreadable)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    try:
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    except Exception:  # noqa: BLE001 - the rule is then left to the library
        return None


# -- NCCL version actually loaded -------------------------------------------------------------------------
def decode_nccl_version(code: Any) -> tuple[int, int, int]:
    """``NCCL_VERSION_CODE`` (``23007`` -> ``(2, 30, 7)``; before 2.9: ``2708`` -> ``(2, 7, 8)``) or a tuple."""
    if isinstance(code, int):
        if code >= 10000:
            return code // 10000, code // 100 % 100, code % 100
        return code // 1000, code // 100 % 10, code % 100
    major, minor, patch = (int(v) for v in code)
    return major, minor, patch


def loaded_nccl_version() -> tuple[int, int, int]:
    """The version of the ``libnccl.so.2`` this process has loaded, from its own ``ncclGetVersion``.

    ``torch.cuda.nccl.version()`` reports the NCCL torch was *compiled* with, which is not the library that
    runs when a newer ``nvidia-nccl`` wheel is installed (DeepEP V2 needs the loaded one to be >= 2.30.4, V2.5
    >= 2.32.3).
    ``import torch`` loads ``libnccl.so.2`` (else a CUDA init does); it is then looked up with
    ``RTLD_NOLOAD``, so ctypes reuses torch's copy and never loads another one (a plain ``CDLL`` without
    torch's copy in place would find the system's, possibly older, library). Raises :class:`RuntimeError`
    with the reason when the loaded library cannot be asked (e.g. torch links NCCL statically).
    """
    import ctypes

    import torch

    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        raise RuntimeError("this platform has no RTLD_NOLOAD: cannot tell which libnccl.so.2 torch loaded")
    mode = noload | getattr(os, "RTLD_LAZY", 1)

    def find():
        try:
            return ctypes.CDLL("libnccl.so.2", mode=mode)
        except OSError:
            return None

    lib = find()
    if lib is None:
        try:
            if torch.cuda.is_available():
                torch.cuda.init()
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"libnccl.so.2 is not loaded and CUDA failed to initialise: {exc}") from None
        lib = find()
    if lib is None:
        raise RuntimeError("libnccl.so.2 is not loaded in this process (torch may link NCCL statically, or is a "
                           "CPU build): the loaded version cannot be asked")
    try:
        get_version = lib.ncclGetVersion
    except AttributeError:
        raise RuntimeError("the loaded libnccl.so.2 has no ncclGetVersion") from None
    code = ctypes.c_int(0)
    status = get_version(ctypes.byref(code))
    if status != 0:
        raise RuntimeError(f"ncclGetVersion failed with ncclResult_t {status}")
    return decode_nccl_version(int(code.value))


def counts_tensor(counts) -> "torch.Tensor":
    """DeepEP's per-expert receive counts (a Python list) as the CPU int64 tensor Megatron expects.

    It is on every dispatch's host path, after DeepEP's host sync (the GPU idle): the ints are packed by a
    ``struct.Struct`` made once per list length and wrapped by ``torch.frombuffer``, 1.4 us for 128 experts against
    2.0 us through an ``array('q')`` and 8 us for ``torch.tensor(list)`` (``benchmarks/host_overhead.py``).
    """
    n = len(counts)
    if not n:
        import torch

        return torch.zeros(0, dtype=torch.int64)
    packer = _PACKERS.get(n)
    if packer is None:
        packer = _PACKERS[n] = struct.Struct(f"={n}q").pack
    return _frombuffer()(bytearray(packer(*counts)), dtype=_int64)


_PACKERS: dict = {}  # list length -> struct pack of that many native int64s


def _frombuffer():
    global _FROMBUFFER, _int64
    if _FROMBUFFER is None:
        import torch

        _FROMBUFFER, _int64 = torch.frombuffer, torch.int64
    return _FROMBUFFER


_FROMBUFFER = None
_int64 = None


def check_token_rows(backend: str, x, op: str):
    """The rows of a combine or cached dispatch: ``[N, H]``, bf16 (FP8 pairs only for dispatch); returns the
    data tensor. Shared by the DeepEP adapters' once-per-call-key slow paths."""
    import torch

    data = x[0] if isinstance(x, tuple) else x
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise InvalidInputError(f"backend {backend!r}: {op} expects x of shape [N, H], got "
                                f"{getattr(data, 'shape', type(data).__name__)!r}")
    if op == "combine" and (isinstance(x, tuple) or data.dtype != torch.bfloat16):
        raise InvalidInputError(f"backend {backend!r}: DeepEP combines bf16 rows, got "
                                f"{'an FP8 pair' if isinstance(x, tuple) else data.dtype}; cast to bf16")
    if op != "combine" and not isinstance(x, tuple) and data.dtype != torch.bfloat16:
        raise InvalidInputError(f"backend {backend!r}: DeepEP dispatches bf16 tokens (or an FP8 (e4m3, "
                                f"scales) pair), got {data.dtype}; cast x to torch.bfloat16")
    return data
