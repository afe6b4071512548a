"""The one place that knows Megatron's internals: which modules hold which names, per version.

Megatron imports ``fused_dispatch`` & co. *by value* (``token_dispatcher.py`` does
``from ...fused_a2a import fused_dispatch``), so a patch must rebind the name in every module
that holds a copy. :data:`PATCH_TABLE` lists those (module, name) slots per megatron-core
version range; a new Megatron release is a new row here, nothing else.

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

__all__ = ["PATCH_TABLE", "PatchEntry", "Target", "apply", "current", "entry_for", "megatron_version", "revert"]

_MOE = "megatron.core.transformer.moe"
FUSED_A2A = f"{_MOE}.fused_a2a"
TOKEN_DISPATCHER = f"{_MOE}.token_dispatcher"

#: Expected parameter names of each role's original function (checked when it is not None).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "dispatch": ("x", "token_indices", "token_probs", "num_experts", "group", "async_finish",
                 "allocate_on_comm_stream"),
    "combine": ("x", "group", "handle", "async_finish", "allocate_on_comm_stream"),
    "set_num_sms": ("num_sms",),
}


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
    """Slots for megatron-core versions in ``[min_version, max_version)``."""

    min_version: tuple[int, int]
    max_version: tuple[int, int]
    verified_with: str
    targets: tuple[Target, ...]
    #: Module imported to make sure every target module is loaded (it imports the others).
    anchor: str = TOKEN_DISPATCHER
    notes: str = ""

    def describe(self) -> str:
        lo, hi = ".".join(map(str, self.min_version)), ".".join(map(str, self.max_version))
        return f">={lo},<{hi} (verified with {self.verified_with})"


_V019 = (
    Target(FUSED_A2A, "fused_dispatch", "dispatch"),
    Target(FUSED_A2A, "fused_combine", "combine"),
    Target(FUSED_A2A, "set_deepep_num_sms", "set_num_sms"),
    Target(FUSED_A2A, "HAVE_DEEP_EP", "flag"),
    Target(TOKEN_DISPATCHER, "fused_dispatch", "dispatch"),
    Target(TOKEN_DISPATCHER, "fused_combine", "combine"),
    Target(TOKEN_DISPATCHER, "set_deepep_num_sms", "set_num_sms"),
)

PATCH_TABLE: tuple[PatchEntry, ...] = (
    PatchEntry((0, 19), (0, 20), "0.19.2", _V019,
               notes="token_dispatcher imports fused_dispatch/fused_combine/set_deepep_num_sms by value; "
                     "HAVE_DEEP_EP lives in fused_a2a only"),
)


def megatron_version() -> str:
    """Installed megatron-core version (distribution metadata, else ``megatron.core.package_info``)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        from megatron.core import package_info  # a source checkout on PYTHONPATH
    except ImportError as exc:
        raise PatchError(f"megatron-core is not importable ({exc}); install it (pip install megatron-core)") from None
    return str(package_info.__version__)


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
            "table_entry": _state.entry.describe(), "targets": [t.path for t in _state.entry.targets]}


def _verify(entry: PatchEntry, version: str) -> dict[Target, Any]:
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
        found[target] = value
    return found


def apply(slot: Slot, version: str, allow_untested: bool = False) -> list[str]:
    """Rebind every slot of the version's table row to ``slot``; returns the patched paths."""
    global _state
    entry = entry_for(version, allow_untested)
    present = _verify(entry, version)
    if _state is None:
        _state = _State(version, entry, originals=present)
    values = slot.by_role() | {"flag": True}
    for target in entry.targets:
        setattr(importlib.import_module(target.module), target.name, values[target.role])
    _state.backend_name = slot.backend.name
    return [t.path for t in entry.targets]


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
