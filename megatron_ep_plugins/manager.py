"""Discovery: load plugins from the ``megatron_ep_plugins`` entry-point group, collect their backends.

Each entry point is loaded and each ``ep_register_backends`` / ``ep_register_settings``
implementation is called on its own: a plugin that fails to import, fails pluggy's validation,
implements an unknown hook, or whose hook raises or returns the wrong records is kept as a failed
:class:`PluginRecord` (with its error) and does not stop the others.

Names are claimed once. Two distributions declaring one entry-point name, two plugins registering
one backend name or alias, two providers declaring one variable: each is a *conflict*, recorded
with both claimants and a fix that blocks exactly one of them (``MCORE_EP_PLUGINS_DISABLE=plugin:X``
or ``dist:Y``). Neither side of an entry-point conflict is loaded (picking one would be a silent
substitution); ``megatron-ep list`` shows the conflict, and ``install()``/``explain()`` raise
:class:`DuplicateBackendError` with it until it is resolved.

Every :func:`discover` call builds a fresh pluggy manager, so a changed environment
(``MCORE_EP_PLUGINS_DISABLE`` ...) always takes effect; imported modules stay cached by Python.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .config import CORE_VARS, Settings, declare
from .errors import DuplicateBackendError
from .spec import BackendSpec, EnvVar

__all__ = ["ENTRY_POINT_GROUP", "PluginRecord", "Registry", "canonical_dist", "discover", "register_plugin",
           "unregister_plugin"]

log = logging.getLogger("megatron_ep_plugins")

ENTRY_POINT_GROUP = "megatron_ep_plugins"
OWN_DISTRIBUTION = "megatron-ep-plugins"
_HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("ep_"))

# Plugins registered from Python (``register_plugin``) rather than through entry points.
_programmatic: dict[str, Any] = {}


@dataclass(frozen=True)
class PluginRecord:
    """One plugin as discovery saw it. ``status``: loaded | failed | blocked | skipped | conflict."""

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
    """The outcome of one discovery: usable and blocked backends, every plugin's record, every variable.

    ``variables``: the core's variables, then each backend's and plugin's declared ones (with
    ``scope`` and ``provider`` filled in). ``conflicts``: one message per name claimed twice.
    """

    backends: tuple[BackendSpec, ...]
    plugins: tuple[PluginRecord, ...]
    disabled_backends: tuple[BackendSpec, ...] = ()
    notes: tuple[str, ...] = ()
    pluggy_manager: Optional[pluggy.PluginManager] = field(default=None, compare=False, repr=False)
    conflicts: tuple[str, ...] = ()
    variables: tuple[EnvVar, ...] = CORE_VARS

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

    def variable(self, name: str) -> Optional[EnvVar]:
        """The declaration of ``name``, else ``None``."""
        for var in self.variables:
            if var.name == name:
                return var
        return None

    def raise_for_conflicts(self) -> None:
        """Raise :class:`DuplicateBackendError` listing every conflict (if any)."""
        if self.conflicts:
            raise DuplicateBackendError("\n".join(self.conflicts))


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


def canonical_dist(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Evil_EP`` -> ``evil-ep``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class _Offer:
    """One plugin on offer before loading: an entry point or a ``register_plugin`` object."""

    name: str
    source: str
    distribution: str  # label, e.g. "evil-ep 1.0"
    dist: str  # canonical distribution name, "" for register_plugin
    builtin: bool
    load: Callable[[], Any] = field(compare=False)

    def who(self) -> str:
        return f"{self.distribution} ({self.source})"


def _offers() -> list[_Offer]:
    offers = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        raw = (dist.metadata["Name"] or "?") if dist is not None else "?"
        label = f"{raw} {dist.version}" if dist is not None else "?"
        offers.append(_Offer(ep.name, ep.value, label, canonical_dist(raw), canonical_dist(raw) == OWN_DISTRIBUTION,
                             ep.load))
    for name, plugin in _programmatic.items():
        offers.append(_Offer(name, repr(plugin), "(registered from Python)", "", False, lambda p=plugin: p))
    return offers


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


class _Words:
    """``MCORE_EP_PLUGINS_DISABLE`` as matchers; remembers which words matched something."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = tuple(w.lower() for w in words)
        self.used: set[str] = set()

    def _hit(self, candidates: set[str]) -> Optional[str]:
        hit = next((w for w in self.words if w in candidates), None)
        if hit is not None:
            self.used.add(hit)
        return hit

    def plugin(self, offer: _Offer) -> Optional[str]:
        name = offer.name.lower()
        keys = {name, f"plugin:{name}"}
        if offer.dist:
            keys.add(f"dist:{offer.dist}")
        hit = self._hit(keys)
        if hit is None and offer.dist:  # dist:Evil_EP matches evil-ep
            hit = next((w for w in self.words if w.startswith("dist:") and canonical_dist(w[5:]) == offer.dist), None)
            if hit is not None:
                self.used.add(hit)
        return hit

    def backend(self, spec: BackendSpec) -> Optional[str]:
        return self._hit(set(spec.names) | {f"backend:{n}" for n in spec.names})

    def unused(self) -> list[str]:
        return sorted(set(self.words) - self.used)


def _entry_conflict(name: str, offers: list[_Offer]) -> str:
    who = " and by ".join(o.who() for o in offers)
    third = [o for o in offers if not o.builtin]
    blocks = [f"MCORE_EP_PLUGINS_DISABLE=dist:{o.dist}" for o in third if o.dist]
    fixes = []
    if [o for o in third if o.dist]:
        fixes.append("uninstall one (" + " or ".join(f"pip uninstall {o.dist}" for o in third if o.dist) + ")")
    if blocks:
        fixes.append("block one with " + " or ".join(blocks))
    if any(not o.dist for o in offers):
        fixes.append(f"register the Python plugin under another name (unregister_plugin({name!r}))")
    return (f"plugin name {name!r} (entry-point group {ENTRY_POINT_GROUP!r}) is declared by {who}; neither is "
            f"loaded, since choosing one would silently replace the other. Plugin names must be unique: "
            + ", or ".join(fixes) + ".")


def _backend_conflict(word: str, first: tuple[str, str], second: tuple[str, str]) -> str:
    (b1, p1), (b2, p2) = first, second
    return (f"backend name {word!r} is registered twice: by plugin {p1!r} (backend {b1!r}) and by plugin {p2!r} "
            f"(backend {b2!r}); uninstall one, or block exactly one plugin with "
            f"MCORE_EP_PLUGINS_DISABLE=plugin:{p2} or MCORE_EP_PLUGINS_DISABLE=plugin:{p1}")


def _variable_conflict(var: EnvVar, other: EnvVar) -> str:
    fix = ("rename the plugin's variable" if other.provider == "megatron_ep_plugins"
           else f"block exactly one plugin with MCORE_EP_PLUGINS_DISABLE=plugin:{var.provider} or "
                f"MCORE_EP_PLUGINS_DISABLE=plugin:{other.provider}")
    return (f"variable {var.name} is declared twice: by {other.provider!r} (scope {other.scope!r}) and by plugin "
            f"{var.provider!r} (scope {var.scope!r}); each variable has one owner: {fix}")


def discover(settings: Settings) -> Registry:
    """Load plugins and collect their backends and variables according to ``settings``.

    Never raises for a plugin's fault: failures and conflicts are recorded in the returned
    :class:`Registry` (``Registry.raise_for_conflicts()`` turns conflicts into the error).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    words = _Words(settings.disabled)
    records: list[PluginRecord] = []
    by_name: dict[str, int] = {}  # loaded plugin name -> index in records
    conflicts: list[str] = []

    # 1. what is on offer, minus what the settings skip or block; then one plugin per name
    groups: dict[str, list[_Offer]] = {}
    for offer in _offers():
        if not offer.builtin and offer.dist and not settings.autoload_plugins:
            records.append(PluginRecord(offer.name, offer.source, offer.distribution, False, "skipped",
                                        "MCORE_EP_PLUGINS_AUTOLOAD=0"))
            continue
        hit = words.plugin(offer)
        if hit is not None:
            records.append(PluginRecord(offer.name, offer.source, offer.distribution, offer.builtin, "blocked",
                                        f"MCORE_EP_PLUGINS_DISABLE ({hit})"))
            continue
        same = groups.setdefault(offer.name.lower(), [])
        if not any((o.dist, o.source) == (offer.dist, offer.source) and o.dist for o in same):
            same.append(offer)
    for key in sorted(groups):
        offers = groups[key]
        if len(offers) > 1:
            message = _entry_conflict(offers[0].name, offers)
            conflicts.append(message)
            records.extend(PluginRecord(o.name, o.source, o.distribution, o.builtin, "conflict", message)
                           for o in offers)
            log.warning("megatron_ep_plugins: %s", message)
            continue
        offer = offers[0]
        try:
            plugin = offer.load()
            unknown = _unknown_hooks(plugin)
            if unknown:
                raise TypeError(f"implements unknown hook(s) {unknown}; valid hooks: {sorted(_HOOK_NAMES)}")
            pm.register(plugin, name=offer.name)
        except Exception as exc:  # a broken plugin must not stop the others
            records.append(PluginRecord(offer.name, offer.source, offer.distribution, offer.builtin, "failed",
                                        _error_text(exc)))
            log.warning("megatron_ep_plugins: plugin %r (%s) failed to load: %s", offer.name, offer.source,
                        _error_text(exc))
            continue
        by_name[offer.name] = len(records)
        records.append(PluginRecord(offer.name, offer.source, offer.distribution, offer.builtin, "loaded"))

    def fail(plugin_name: str, hook: str, exc: BaseException) -> None:
        i = by_name[plugin_name]
        records[i] = dataclasses.replace(records[i], status="failed", error=_error_text(exc), backends=())
        log.warning("megatron_ep_plugins: plugin %r: %s failed: %s", plugin_name, hook, _error_text(exc))

    # 2. backends, in pluggy's call order (tryfirst first; the tie-break between equal priorities)
    owner: dict[str, tuple[str, str]] = {}  # name/alias -> (backend name, plugin)
    usable: list[BackendSpec] = []
    blocked: list[BackendSpec] = []
    accepted: list[tuple[str, BackendSpec]] = []
    for impl in reversed(pm.hook.ep_register_backends.get_hookimpls()):
        plugin_name = impl.plugin_name
        try:
            specs = list(impl.function() or ())
            for item in specs:
                if not isinstance(item, BackendSpec):
                    raise TypeError(f"ep_register_backends returned {type(item).__name__} {item!r}; expected BackendSpec")
            for item in specs:
                for var in item.settings:
                    var.value({})  # the default must parse
        except Exception as exc:
            fail(plugin_name, "ep_register_backends", exc)
            continue
        names: list[str] = []
        for spec in specs:
            spec = dataclasses.replace(spec, provider=plugin_name)
            clash = next((w for w in spec.names if w in owner), None)
            if clash is not None:
                message = _backend_conflict(clash, owner[clash], (spec.name, plugin_name))
                conflicts.append(message)
                for name in {owner[clash][1], plugin_name}:
                    i = by_name[name]
                    records[i] = dataclasses.replace(records[i], status="conflict", error=message)
                log.warning("megatron_ep_plugins: %s", message)
                continue
            for word in spec.names:
                owner[word] = (spec.name, plugin_name)
            names.append(spec.name)
            accepted.append((plugin_name, spec))
            (blocked if words.backend(spec) is not None else usable).append(spec)
        i = by_name[plugin_name]
        records[i] = dataclasses.replace(records[i], backends=tuple(names))

    # 3. variables: the core's, each backend's, each plugin's own
    variables: dict[str, EnvVar] = {v.name: v for v in CORE_VARS}
    offered: list[EnvVar] = [dataclasses.replace(v, scope=spec.name, provider=plugin_name)
                             for plugin_name, spec in accepted for v in spec.settings]
    for impl in reversed(pm.hook.ep_register_settings.get_hookimpls()):
        try:
            found = list(impl.function() or ())
            for item in found:
                if not isinstance(item, EnvVar):
                    raise TypeError(f"ep_register_settings returned {type(item).__name__} {item!r}; expected EnvVar")
                item.value({})
        except Exception as exc:
            fail(impl.plugin_name, "ep_register_settings", exc)
            continue
        offered += [dataclasses.replace(v, scope=impl.plugin_name, provider=impl.plugin_name) for v in found]
    for var in offered:
        other = variables.get(var.name)
        if other is None:
            variables[var.name] = var
        elif other.provider != var.provider:
            conflicts.append(_variable_conflict(var, other))
            log.warning("megatron_ep_plugins: %s", conflicts[-1])
    declare(*variables.values())

    notes = []
    unknown_words = words.unused()
    if unknown_words:
        valid = sorted({r.name.lower() for r in records} | set(owner))
        notes.append(f"MCORE_EP_PLUGINS_DISABLE names {unknown_words}, which match no plugin or backend; known: {valid}")
        log.warning("megatron_ep_plugins: %s", notes[-1])
    if not any(r.builtin for r in records):
        notes.append(
            "no built-in plugin was found in the entry-point group 'megatron_ep_plugins': "
            "is megatron_ep_plugins installed (pip install -e .)?"
        )
    return Registry(
        backends=tuple(usable),
        plugins=tuple(sorted(records, key=lambda r: (r.name.lower(), r.distribution))),
        disabled_backends=tuple(blocked),
        notes=tuple(notes),
        pluggy_manager=pm,
        conflicts=tuple(dict.fromkeys(conflicts)),
        variables=tuple(variables.values()),
    )
