"""The one place that knows Megatron's internals: which modules hold which names, per version.

Megatron imports ``fused_dispatch`` & co. *by value* (``token_dispatcher.py`` does
``from ...fused_a2a import fused_dispatch``), so a patch must rebind the name in every module
that holds a copy. :data:`PATCH_TABLE` lists those (module, name) slots per megatron-core
version range; a new Megatron release is a new row here, nothing else.

Two slot groups exist:

* the flex dispatcher's ``deepep`` backend (``fused_dispatch``, ``fused_combine``,
  ``set_deepep_num_sms``, ``HAVE_DEEP_EP``): in every release 0.15-0.19 and on Megatron-LM main;
* the flex dispatcher's ``deepepv2`` backend (``deepepv2_dispatch``, ``deepepv2_combine``,
  ``get_elastic_buffer``, ``HAVE_DEEP_EP_V2``) of Megatron-LM's ``dev`` branch: an *optional* group,
  patched when a Megatron has it, so ``MCORE_EP_BACKEND`` decides whichever DeepEP flex backend the
  Megatron config names. Its shims (:func:`_deepepv2_roles`) adapt that call shape to the same slot.

Patching ``HAVE_DEEP_EP`` to ``True`` also fixes a user-visible Megatron problem: with DeepEP 2.x
installed, stock Megatron 0.15-0.19 imports ``EventOverlap`` from ``deep_ep.utils`` (which 2.x no
longer exports) and reports ``HAVE_DEEP_EP=False``, so its own DeepEP path is off; through this
package the slot works with either DeepEP.

:func:`apply` verifies every target before touching any (module importable, attribute present,
signature as expected), then rebinds them all; :func:`revert` restores the exact original objects.
Both are idempotent.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from .autograd import SLOT_MARK, Slot
from .errors import PatchError

__all__ = ["FLEX_DEEPEP", "FLEX_DEEPEPV2", "PATCH_TABLE", "PatchEntry", "Target", "apply", "compatibility_markdown",
           "current", "entry_for", "megatron_version", "revert"]

_MOE = "megatron.core.transformer.moe"
FUSED_A2A = f"{_MOE}.fused_a2a"
TOKEN_DISPATCHER = f"{_MOE}.token_dispatcher"

#: Expected parameter names of each role's original function (checked when it is not None).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "dispatch": ("x", "token_indices", "token_probs", "num_experts", "group", "async_finish",
                 "allocate_on_comm_stream"),
    "combine": ("x", "group", "handle", "async_finish", "allocate_on_comm_stream"),
    "set_num_sms": ("num_sms",),
    # Megatron-LM dev (d48bd6b) fused_a2a.py: the flex dispatcher's "deepepv2" backend
    "v2_dispatch": ("buffer", "x", "token_indices", "token_probs", "num_experts", "num_max_tokens_per_rank",
                    "expert_alignment", "num_sms", "async_finish", "allocate_on_comm_stream"),
    "v2_combine": ("buffer", "x", "handle", "num_sms", "async_finish", "allocate_on_comm_stream"),
    "v2_buffer": ("group", "num_max_tokens_per_rank", "hidden", "num_topk"),
}


VERIFIED_MATRIX = "CI matrix (CPU, 2 gloo ranks): patch/uninstall, flex round trip, MoELayer fwd+bwd"
VERIFIED_SUITE = "the whole test suite (CPU) and the 2 x H200 GPU runs"
VERIFIED_SOURCE = ("source checkout, CPU: tests/megatron_matrix_check.py --source (patch, round trip, MoELayer; "
                   "results in benchmarks/results/megatron/); no release exists for CI to install")

@dataclass(frozen=True)
class Target:
    """One slot: ``module.name`` gets the value of ``role`` (dispatch | combine | set_num_sms | flag)."""

    module: str
    name: str
    role: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class PatchEntry:
    """Slots for megatron-core versions in ``[min_version, max_version)``.

    ``targets`` must all exist; each group in ``optional`` is patched when all of its targets exist
    and skipped when none does (a group present in part is an error: a Megatron mid-way between shapes).
    """

    min_version: tuple[int, int]
    max_version: tuple[int, int]
    verified_with: str
    targets: tuple[Target, ...]
    #: Module imported to make sure every target module is loaded (it imports the others).
    anchor: str = TOKEN_DISPATCHER
    notes: str = ""
    optional: tuple[tuple[Target, ...], ...] = ()
    #: How ``verified_with`` was verified (tests/test_megatron_versions.py keeps this honest).
    verified_by: str = VERIFIED_MATRIX

    def describe(self) -> str:
        lo, hi = ".".join(map(str, self.min_version)), ".".join(map(str, self.max_version))
        return f">={lo},<{hi} (verified with {self.verified_with})"


#: The flex dispatcher's "deepep" backend: identical names and signatures from 0.15 to Megatron-LM main.
FLEX_DEEPEP = (
    Target(FUSED_A2A, "fused_dispatch", "dispatch"),
    Target(FUSED_A2A, "fused_combine", "combine"),
    Target(FUSED_A2A, "set_deepep_num_sms", "set_num_sms"),
    Target(FUSED_A2A, "HAVE_DEEP_EP", "flag"),
    Target(TOKEN_DISPATCHER, "fused_dispatch", "dispatch"),
    Target(TOKEN_DISPATCHER, "fused_combine", "combine"),
    Target(TOKEN_DISPATCHER, "set_deepep_num_sms", "set_num_sms"),
)

#: The flex dispatcher's "deepepv2" backend (Megatron-LM dev d48bd6b; open PRs #4632/#5153 for main).
FLEX_DEEPEPV2 = (
    Target(FUSED_A2A, "deepepv2_dispatch", "v2_dispatch"),
    Target(FUSED_A2A, "deepepv2_combine", "v2_combine"),
    Target(FUSED_A2A, "get_elastic_buffer", "v2_buffer"),
    Target(FUSED_A2A, "HAVE_DEEP_EP_V2", "flag"),
    Target(TOKEN_DISPATCHER, "deepepv2_dispatch", "v2_dispatch"),
    Target(TOKEN_DISPATCHER, "deepepv2_combine", "v2_combine"),
    Target(TOKEN_DISPATCHER, "get_elastic_buffer", "v2_buffer"),
)

_BY_VALUE = ("token_dispatcher imports fused_dispatch/fused_combine/set_deepep_num_sms by value; HAVE_DEEP_EP "
             "lives in fused_a2a only")

PATCH_TABLE: tuple[PatchEntry, ...] = (
    PatchEntry((0, 15), (0, 16), "0.15.3", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,),
               notes=_BY_VALUE + "; the config selects DeepEP with moe_enable_deepep (no moe_flex_dispatcher_backend) "
                     "and _DeepepManager reads moe_deepep_num_sms; on a CPU-only host `import megatron.core` needs "
                     "TORCH_CUDA_ARCH_LIST set (a Megatron bug)"),
    PatchEntry((0, 16), (0, 17), "0.16.1", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,),
               notes=_BY_VALUE + "; _DeepepManager reads moe_deepep_num_sms; without TransformerEngine the router's "
                     "fused gating fails on CPU (te_general_gemm undefined): the CPU example computes it in torch"),
    PatchEntry((0, 17), (0, 18), "0.17.1", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,),
               notes=_BY_VALUE + "; _DeepepManager reads moe_deepep_num_sms"),
    PatchEntry((0, 18), (0, 19), "0.18.2", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,),
               notes=_BY_VALUE + "; _DeepepManager reads moe_deepep_num_sms"),
    PatchEntry((0, 19), (0, 20), "0.19.2", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,), verified_by=VERIFIED_SUITE,
               notes=_BY_VALUE + "; _DeepepManager reads moe_flex_dispatcher_num_sms"),
    PatchEntry((0, 20), (0, 21), "Megatron-LM main d98e8a6 (0.20.0)", FLEX_DEEPEP, optional=(FLEX_DEEPEPV2,),
               verified_by=VERIFIED_SOURCE,
               notes=_BY_VALUE + "; Megatron-LM dev (d48bd6b, reports 0.19.0) adds the deepepv2 flex backend: the "
                     "optional slot group, run through its own _DeepepV2Manager from a dev checkout"),
)


def _package_info_version(path: str) -> Optional[str]:
    """``MAJOR.MINOR.PATCH`` + ``PRE_RELEASE`` read from ``package_info.py`` without executing it (its
    ``__version__`` runs ``git rev-parse`` and appends the hash of whatever repository surrounds it)."""
    import ast

    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return None
    consts: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    if not all(isinstance(consts.get(k), int) for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    return f"{consts['MAJOR']}.{consts['MINOR']}.{consts['PATCH']}{consts.get('PRE_RELEASE', '') or ''}"


def megatron_version() -> str:
    """The megatron-core version of the code that ``import megatron.core`` loads.

    Read from ``megatron/core/package_info.py`` (present in releases and in source checkouts alike;
    parsed, not imported), else from the distribution metadata. Reading the file first also gets a
    source checkout on ``PYTHONPATH`` right when another megatron-core distribution is installed.
    """
    import importlib.metadata
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or ()) if spec is not None else ():
        version = _package_info_version(os.path.join(folder, "package_info.py"))
        if version:
            return version
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        raise PatchError("megatron-core is not importable; install it (pip install megatron-core) or put a "
                         "Megatron-LM checkout on PYTHONPATH") from None


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        raise PatchError(f"cannot parse megatron-core version {version!r}") from None


def entry_for(version: str, allow_untested: bool = False) -> PatchEntry:
    """The table row for ``version``; unknown versions need ``allow_untested`` (newest row used)."""
    key = _parse(version)
    for entry in PATCH_TABLE:
        if entry.min_version <= key < entry.max_version:
            return entry
    if allow_untested:
        return PATCH_TABLE[-1]
    raise PatchError(
        f"megatron-core {version} is not in megatron_ep_plugins' patch table (supported: "
        f"{', '.join(e.describe() for e in PATCH_TABLE)}). Set MCORE_EP_ALLOW_UNTESTED_MEGATRON=1 to try "
        f"the newest entry (targets and signatures are still verified), or add a row to patching.PATCH_TABLE."
    )


@dataclass
class _State:
    version: str
    entry: PatchEntry
    originals: dict[Target, Any] = field(default_factory=dict)
    backend_name: str = ""


_state: Optional[_State] = None


def current() -> Optional[dict[str, Any]]:
    """What is patched now (``None`` when nothing is)."""
    if _state is None:
        return None
    return {"megatron_core": _state.version, "backend": _state.backend_name,
            "table_entry": _state.entry.describe(), "targets": [t.path for t in _state.originals]}


def _check_target(target: Target, value: Any, entry: PatchEntry, version: str) -> None:
    want = SIGNATURES.get(target.role)
    if want is not None and value is not None and getattr(value, SLOT_MARK, None) is None:
        try:
            params = tuple(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            params = ()
        if params != want:
            raise PatchError(
                f"megatron-core {version}: {target.path} has parameters {params}, expected {want}; "
                f"refusing to patch a slot whose contract changed (update patching.PATCH_TABLE)."
            )


def _verify(entry: PatchEntry, version: str) -> dict[Target, Any]:
    """The current value of every target to patch (required ones, plus optional groups present in full)."""
    try:
        importlib.import_module(entry.anchor)
    except Exception as exc:
        raise PatchError(f"cannot import {entry.anchor} of megatron-core {version}: {type(exc).__name__}: {exc}") from exc
    found: dict[Target, Any] = {}
    for target in entry.targets:
        module = importlib.import_module(target.module)
        if not hasattr(module, target.name):
            raise PatchError(
                f"megatron-core {version}: {target.path} does not exist, but the patch table entry "
                f"{entry.describe()} expects it. This Megatron is not supported as is: add a row to "
                f"megatron_ep_plugins.patching.PATCH_TABLE."
            )
        value = getattr(module, target.name)
        _check_target(target, value, entry, version)
        found[target] = value
    for group in entry.optional:
        present = [t for t in group if hasattr(importlib.import_module(t.module), t.name)]
        if not present:
            continue
        if len(present) != len(group):
            missing = [t.path for t in group if t not in present]
            raise PatchError(
                f"megatron-core {version} has part of an optional slot group ({[t.path for t in present]}) but "
                f"not {missing}; this Megatron is between shapes the patch table knows: add a row to "
                f"megatron_ep_plugins.patching.PATCH_TABLE.")
        for target in group:
            value = getattr(importlib.import_module(target.module), target.name)
            _check_target(target, value, entry, version)
            found[target] = value
    return found


class _GroupBuffer:
    """What the patched ``get_elastic_buffer`` returns: Megatron hands it back to ``deepepv2_*``, which
    need only its process group (the selected backend owns the real buffers)."""

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group


def _deepepv2_roles(slot: Slot) -> dict[str, Any]:
    """Functions in Megatron-LM dev's ``deepepv2`` call shape (``fused_a2a.py``, d48bd6b), routed to ``slot``.

    Megatron passes its own ``num_max_tokens_per_rank`` (the local token count) and ``num_sms`` per call;
    the selected backend decides both itself (``elastic`` agrees on one bucket across ranks), so only a
    change of ``num_sms`` is forwarded, once, through ``set_num_sms``.
    """
    from .errors import InvalidInputError

    fused_dispatch, fused_combine, set_num_sms = slot.fused_dispatch, slot.fused_combine, slot.set_deepep_num_sms
    buffers: dict[Any, _GroupBuffer] = {}
    last_sms: list[Any] = [None]

    def get_elastic_buffer(group, num_max_tokens_per_rank, hidden, num_topk):
        buf = buffers.get(group)
        if buf is None:
            buf = buffers[group] = _GroupBuffer(group)
        return buf

    def deepepv2_dispatch(buffer, x, token_indices, token_probs, num_experts, num_max_tokens_per_rank,
                          expert_alignment=1, num_sms=0, async_finish=False, allocate_on_comm_stream=False):
        if num_sms != last_sms[0]:
            if num_sms:
                set_num_sms(num_sms)
            last_sms[0] = num_sms
        if expert_alignment != 1:
            raise InvalidInputError(
                f"deepepv2_dispatch(expert_alignment={expert_alignment}): the token-major contract delivers exact "
                "per-expert counts; megatron_ep_plugins backends support expert_alignment=1 only")
        return fused_dispatch(x, token_indices, token_probs, num_experts, buffer.group, async_finish,
                              allocate_on_comm_stream)

    def deepepv2_combine(buffer, x, handle, num_sms=0, async_finish=False, allocate_on_comm_stream=False):
        return fused_combine(x, buffer.group, handle, async_finish, allocate_on_comm_stream)

    for fn in (get_elastic_buffer, deepepv2_dispatch, deepepv2_combine):
        setattr(fn, SLOT_MARK, slot.backend.name)
    return {"v2_dispatch": deepepv2_dispatch, "v2_combine": deepepv2_combine, "v2_buffer": get_elastic_buffer}


def apply(slot: Slot, version: str, allow_untested: bool = False) -> list[str]:
    """Rebind every slot of the version's table row to ``slot``; returns the patched paths."""
    global _state
    entry = entry_for(version, allow_untested)
    present = _verify(entry, version)
    if _state is None:
        _state = _State(version, entry, originals=present)
    values = slot.by_role() | {"flag": True}
    if any(t.role.startswith("v2_") for t in present):
        values |= _deepepv2_roles(slot)
    for target in present:
        setattr(importlib.import_module(target.module), target.name, values[target.role])
    _state.backend_name = slot.backend.name
    return [t.path for t in present]


def revert() -> list[str]:
    """Restore the original objects; a no-op (returning ``[]``) when nothing is patched."""
    global _state
    if _state is None:
        return []
    for target, original in _state.originals.items():
        setattr(importlib.import_module(target.module), target.name, original)
    paths = [t.path for t in _state.originals]
    _state = None
    return paths


def compatibility_markdown() -> str:
    """The README's Megatron compatibility table, generated from :data:`PATCH_TABLE` (``megatron-ep compat``)."""
    lines = ["| megatron-core | verified with | how | slots patched | notes |", "| --- | --- | --- | --- | --- |"]
    for e in PATCH_TABLE:
        lo, hi = ".".join(map(str, e.min_version)), ".".join(map(str, e.max_version))
        groups = "flex `deepep`" + "".join(
            " + flex `deepepv2` when present" for g in e.optional if g == FLEX_DEEPEPV2)
        lines.append(f"| >={lo},<{hi} | {e.verified_with} | {e.verified_by} | {groups} | {e.notes} |")
    return "\n".join(lines) + "\n"
