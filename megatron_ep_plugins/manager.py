"""Discovery: load plugins from the ``megatron_ep_plugins`` entry-point group, collect their backends.

Each entry point is loaded and each ``ep_register_backends`` implementation is called on its own:
a plugin that fails to import, fails pluggy's validation, implements an unknown hook, or whose hook
raises or returns something other than ``BackendSpec`` records is kept as a failed
:class:`PluginRecord` (with its error) and does not stop the others.

Every :func:`discover` call builds a fresh pluggy manager, so a changed environment
(``MCORE_EP_PLUGINS_DISABLE`` ...) always takes effect; imported modules stay cached by Python.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import pluggy

from . import hookspecs
from .config import Settings
from .errors import DuplicateBackendError
from .spec import BackendSpec

__all__ = ["ENTRY_POINT_GROUP", "PluginRecord", "Registry", "discover", "register_plugin", "unregister_plugin"]

log = logging.getLogger("megatron_ep_plugins")

ENTRY_POINT_GROUP = "megatron_ep_plugins"
OWN_DISTRIBUTION = "megatron-ep-plugins"
_HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("ep_"))

# Plugins registered from Python (``register_plugin``) rather than through entry points.
_programmatic: dict[str, Any] = {}


@dataclass(frozen=True)
class PluginRecord:
    """One plugin as discovery saw it. ``status``: loaded | failed | blocked | skipped."""

    name: str
    source: str
    distribution: str
    builtin: bool
    status: str
    error: str = ""
    backends: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"backends": list(self.backends)}


@dataclass(frozen=True)
class Registry:
    """The outcome of one discovery: usable backends, blocked backends, and every plugin's record."""

    backends: tuple[BackendSpec, ...]
    plugins: tuple[PluginRecord, ...]
    disabled_backends: tuple[BackendSpec, ...] = ()
    notes: tuple[str, ...] = ()
    pluggy_manager: Optional[pluggy.PluginManager] = field(default=None, compare=False, repr=False)

    def lookup(self, name: str) -> Optional[BackendSpec]:
        """The usable backend called ``name`` (or with that alias), else ``None``."""
        for spec in self.backends:
            if name in spec.names:
                return spec
        return None

    def lookup_disabled(self, name: str) -> Optional[BackendSpec]:
        for spec in self.disabled_backends:
            if name in spec.names:
                return spec
        return None

    def failed_plugins(self) -> tuple[PluginRecord, ...]:
        return tuple(p for p in self.plugins if p.status == "failed")


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object from Python, as if it came from an entry point called ``name``.

    For site code and tests; takes effect at the next discovery (``install()``, ``explain()``).
    """
    if name in _programmatic and _programmatic[name] is not plugin:
        raise ValueError(f"a plugin named {name!r} is already registered ({_programmatic[name]!r})")
    _programmatic[name] = plugin


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`; unknown names raise ``KeyError`` listing the registered ones."""
    if name not in _programmatic:
        raise KeyError(f"no plugin {name!r} was registered from Python; registered: {sorted(_programmatic)}")
    del _programmatic[name]


def _dist_label(ep: importlib.metadata.EntryPoint) -> tuple[str, bool]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", False
    name = dist.metadata["Name"] or "?"
    normalized = name.lower().replace("_", "-")
    return f"{name} {dist.version}", normalized == OWN_DISTRIBUTION


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        seen.setdefault(ep.name, ep)  # the first on sys.path wins, like importlib's own lookup
    return sorted(seen.values(), key=lambda ep: ep.name)


def _unknown_hooks(plugin: Any) -> list[str]:
    marker = hookspecs.PROJECT_NAME + "_impl"
    return sorted(
        attr for attr in dir(plugin)
        if getattr(getattr(plugin, attr, None), marker, None) is not None and attr not in _HOOK_NAMES
    )


def _error_text(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def discover(settings: Settings) -> Registry:
    """Load plugins and collect their backends according to ``settings``.

    Raises :class:`DuplicateBackendError` when two plugins claim one name (naming both); every
    other plugin problem is recorded in the returned :class:`Registry`.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    disabled = set(settings.disabled)
    used_disable_words: set[str] = set()
    records: dict[str, PluginRecord] = {}

    def try_register(name: str, source: str, dist: str, builtin: bool, load: Any) -> None:
        if name in disabled:
            used_disable_words.add(name)
            records[name] = PluginRecord(name, source, dist, builtin, "blocked", "MCORE_EP_PLUGINS_DISABLE")
            return
        try:
            plugin = load()
            unknown = _unknown_hooks(plugin)
            if unknown:
                raise TypeError(f"implements unknown hook(s) {unknown}; valid hooks: {sorted(_HOOK_NAMES)}")
            pm.register(plugin, name=name)
        except Exception as exc:  # a broken plugin must not stop the others
            records[name] = PluginRecord(name, source, dist, builtin, "failed", _error_text(exc))
            log.warning("megatron_ep_plugins: plugin %r (%s) failed to load: %s", name, source, _error_text(exc))
            return
        records[name] = PluginRecord(name, source, dist, builtin, "loaded")

    for ep in _entry_points():
        dist, builtin = _dist_label(ep)
        if not builtin and not settings.autoload_plugins:
            records[ep.name] = PluginRecord(ep.name, ep.value, dist, False, "skipped", "MCORE_EP_PLUGINS_AUTOLOAD=0")
            continue
        try_register(ep.name, ep.value, dist, builtin, ep.load)
    for name, plugin in _programmatic.items():
        if name in records:
            raise DuplicateBackendError(
                f"plugin name {name!r} is used by entry point {records[name].source!r} and by "
                f"register_plugin({plugin!r}); choose another name"
            )
        try_register(name, repr(plugin), "(registered from Python)", False, lambda p=plugin: p)

    owner: dict[str, tuple[str, str]] = {}  # name/alias -> (backend name, plugin)
    usable: list[BackendSpec] = []
    blocked: list[BackendSpec] = []
    for impl in reversed(pm.hook.ep_register_backends.get_hookimpls()):  # pluggy's call order
        plugin_name = impl.plugin_name
        try:
            result = impl.function()
            specs = list(result or ())
            for item in specs:
                if not isinstance(item, BackendSpec):
                    raise TypeError(f"ep_register_backends returned {type(item).__name__} {item!r}; expected BackendSpec")
        except Exception as exc:
            records[plugin_name] = dataclasses.replace(records[plugin_name], status="failed", error=_error_text(exc))
            log.warning("megatron_ep_plugins: plugin %r: ep_register_backends failed: %s", plugin_name, _error_text(exc))
            continue
        names: list[str] = []
        for spec in specs:
            spec = dataclasses.replace(spec, provider=plugin_name)
            for word in spec.names:
                if word in owner:
                    other_backend, other_plugin = owner[word]
                    raise DuplicateBackendError(
                        f"backend name {word!r} is registered twice: by plugin {other_plugin!r} "
                        f"(backend {other_backend!r}) and by plugin {plugin_name!r} (backend {spec.name!r}); "
                        f"uninstall one, or block one with MCORE_EP_PLUGINS_DISABLE={plugin_name} "
                        f"or MCORE_EP_PLUGINS_DISABLE={other_plugin}"
                    )
                owner[word] = (spec.name, plugin_name)
            names.append(spec.name)
            hit = disabled.intersection(spec.names)
            if hit:
                used_disable_words.update(hit)
                blocked.append(spec)
            else:
                usable.append(spec)
        records[plugin_name] = dataclasses.replace(records[plugin_name], backends=tuple(names))

    notes = []
    unknown_words = sorted(disabled - used_disable_words)
    if unknown_words:
        valid = sorted(set(records) | set(owner))
        notes.append(f"MCORE_EP_PLUGINS_DISABLE names {unknown_words}, which match no plugin or backend; known: {valid}")
        log.warning("megatron_ep_plugins: %s", notes[-1])
    if not any(r.builtin for r in records.values()):
        notes.append(
            "no built-in plugin was found in the entry-point group 'megatron_ep_plugins': "
            "is megatron_ep_plugins installed (pip install -e .)?"
        )
    return Registry(
        backends=tuple(usable),
        plugins=tuple(records[k] for k in sorted(records)),
        disabled_backends=tuple(blocked),
        notes=tuple(notes),
        pluggy_manager=pm,
    )

