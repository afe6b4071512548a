"""Policy: settings + registry + probes -> one backend, and the explanation of that choice.

Rules (the README states the same):

1. A backend the user *named* (``MCORE_EP_BACKEND=<name>`` or ``install(backend=...)``) is used or
   the call fails with the reason. It is replaced only by the backend named in
   ``MCORE_EP_FALLBACK``, and that replacement is logged and recorded in the explanation.
2. ``auto``: the site policy hook ``ep_select_backend`` may name a backend (it is then treated
   like a named one, without fallback); otherwise the highest-priority available backend wins,
   ties broken by registration order. If it fails to initialise, the next one is tried and the
   failure is recorded.
3. An unknown name is answered with every known backend, its availability and reason.
4. Before any of this: a name claimed twice (see ``manager.py``) is a
   :class:`~megatron_ep_plugins.errors.DuplicateBackendError`, and a malformed ``MCORE_EP_*`` value
   (or a ``MCORE_EP_FALLBACK`` naming no backend) a :class:`~megatron_ep_plugins.errors.ConfigError`,
   whatever the mode; a factory raising ``ConfigError`` stops the selection too. Only a missing
   library or device makes a backend "unavailable".

Probes and factories run with the environment being asked about (``settings.environ``): passed as
``env=`` when they take that parameter, and seen by ``config.read_*`` otherwise.

The records (:class:`~megatron_ep_plugins.spec.Choice`, :class:`~megatron_ep_plugins.spec.Verdict`)
live in ``spec.py`` with the others; they are re-exported here.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional

from .config import Settings, normalize_backend_request, using_environ
from .errors import (
    BackendInitError,
    BackendUnavailableError,
    ConfigError,
    EPPluginError,
    NoBackendAvailableError,
    UnknownBackendError,
)
from .manager import Registry
from .spec import Availability, BackendEnv, BackendSpec, Candidate, Choice, EPBackend, Verdict

__all__ = ["Choice", "Verdict", "backend_env", "probe_all", "select", "select_and_create", "validate_environment"]

log = logging.getLogger("megatron_ep_plugins")


def _environ(settings: Optional[Settings]) -> Optional[Mapping[str, str]]:
    return None if settings is None else settings.environ


def backend_env(spec: BackendSpec, environ: Mapping[str, str]) -> BackendEnv:
    """``spec``'s declared variables parsed from ``environ`` (:class:`ConfigError` on a bad value)."""
    return BackendEnv({v.name: v.value(environ) for v in spec.settings}, environ)


def _wants_env(fn: Callable[..., Any]) -> bool:
    try:
        return "env" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables: called without arguments
        return False


def _call(fn: Callable[..., Any], spec: BackendSpec, environ: Mapping[str, str]) -> Any:
    """Call a probe or factory with the environment it is asked about (``env=`` if it takes one)."""
    with using_environ(environ) as env:
        if _wants_env(fn):
            return fn(env=backend_env(spec, env))
        return fn()


def validate_environment(registry: Registry, settings: Settings) -> list[str]:
    """Every declared variable parses and every backend's ``validate`` passes, else one :class:`ConfigError`.

    A malformed value is an error whatever the mode (it never just makes a backend "unavailable",
    which under ``auto`` would move the job to another backend). ``MCORE_EP_FALLBACK`` must name a
    registered backend. Returns notes: ``MCORE_EP_*`` variables that nobody declared, with the
    closest declared names.
    """
    env = os.environ if settings.environ is None else settings.environ
    problems: list[str] = []
    bad: set[str] = set()
    for var in registry.variables:
        try:
            var.value(env)
        except ConfigError as exc:
            bad.add(var.name)
            problems.append(f"{exc} (read by {var.scope})")
    for spec in registry.backends:
        if spec.validate is None or bad.intersection(v.name for v in spec.settings):
            continue
        try:
            benv = backend_env(spec, env)
            with using_environ(env):
                spec.validate(benv)
        except ConfigError as exc:
            problems.append(f"{exc} (read by {spec.name})")
        except Exception as exc:  # a validate that crashes is the plugin's fault: say so, do not guess
            problems.append(f"backend {spec.name!r} (plugin {spec.provider!r}): its settings check raised "
                            f"{type(exc).__name__}: {exc}")
    if settings.fallback is not None and registry.lookup(settings.fallback) is None \
            and registry.lookup_disabled(settings.fallback) is None:
        names = sorted(n for s in registry.backends for n in s.names)
        problems.append(f"MCORE_EP_FALLBACK={settings.fallback!r} names no registered backend; valid names: {names}")
    if problems:
        raise ConfigError("invalid megatron_ep_plugins settings (nothing was selected or installed):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    declared = {v.name for v in registry.variables}
    notes = []
    for name in sorted(k for k in env if k.startswith("MCORE_EP_") and k not in declared):
        close = difflib.get_close_matches(name, sorted(declared), n=3, cutoff=0.8)
        hint = f"did you mean {close}?" if close else "no loaded plugin declares it"
        notes.append(f"{name} is set but no loaded plugin or the core declares it ({hint}); "
                     "`megatron-ep env` lists the declared variables")
    return notes


def _safe_probe(spec: BackendSpec, environ: Optional[Mapping[str, str]] = None) -> Availability:
    try:
        verdict = _call(spec.probe, spec, os.environ if environ is None else environ)
    except Exception as exc:  # a probe must not raise; treat it as "unavailable, here is why"
        return Availability.no(f"availability probe raised {type(exc).__name__}: {exc}")
    if not isinstance(verdict, Availability):
        return Availability.no(f"availability probe returned {verdict!r} instead of an Availability")
    return verdict


def probe_all(registry: Registry, settings: Optional[Settings] = None) -> tuple[Candidate, ...]:
    """Probe every usable backend (in ``settings.environ``, default ``os.environ``).

    Order: priority descending, then registration order.
    """
    environ = _environ(settings)
    order = sorted(range(len(registry.backends)), key=lambda i: (-registry.backends[i].priority, i))
    return tuple(Candidate(registry.backends[i], _safe_probe(registry.backends[i], environ)) for i in order)


def _table(candidates: tuple[Candidate, ...], registry: Registry) -> str:
    rows = [
        f"  - {c.spec.name} (aliases {list(c.spec.aliases)}, provider {c.spec.provider!r}): "
        f"{'available' if c.availability else 'unavailable'} - {c.availability.reason}"
        for c in candidates
    ]
    rows += [f"  - {s.name}: disabled by MCORE_EP_PLUGINS_DISABLE" for s in registry.disabled_backends]
    rows += [f"  - plugin {p.name!r} failed to load: {p.error}" for p in registry.failed_plugins()]
    rows += [f"  - plugin {p.name!r}: {p.status} ({p.error})" for p in registry.plugins if p.status in ("blocked", "skipped")]
    return "\n".join(rows) if rows else "  (no backend registered: is megatron_ep_plugins installed?)"


def _resolve(name: str, candidates: tuple[Candidate, ...], registry: Registry, source: str) -> Candidate:
    for c in candidates:
        if name in c.spec.names:
            return c
    blocked = registry.lookup_disabled(name)
    if blocked is not None:
        raise BackendUnavailableError(
            f"{source} names backend {name!r}, but it is blocked by MCORE_EP_PLUGINS_DISABLE; "
            f"remove it from that list or choose another backend. Known backends:\n{_table(candidates, registry)}"
        )
    for plugin in registry.plugins:
        if plugin.name == name and plugin.status in ("blocked", "skipped"):
            raise BackendUnavailableError(
                f"{source} names {name!r}, and the plugin of that name is not loaded: {plugin.status} by "
                f"{plugin.error}. Unblock it or choose another backend. Known backends:\n{_table(candidates, registry)}"
            )
    raise UnknownBackendError(
        f"{source} names unknown backend {name!r}. Valid names: "
        f"{sorted(n for c in candidates for n in c.spec.names)} or 'auto'. Known backends:\n"
        f"{_table(candidates, registry)}"
    )


def _verdicts(candidates, chosen: Optional[str], why: dict[str, tuple[str, str]], registry) -> tuple[Verdict, ...]:
    out = []
    for c in candidates:
        outcome, text = why.get(c.spec.name, ("skipped" if c.availability else "rejected", c.availability.reason))
        if c.spec.name == chosen:
            outcome = "chosen"
        out.append(Verdict(c.spec.name, c.spec.provider, c.spec.priority, c.availability.available,
                           c.availability.reason, outcome, text))
    out += [Verdict(s.name, s.provider, s.priority, False, "blocked", "disabled", "MCORE_EP_PLUGINS_DISABLE")
            for s in registry.disabled_backends]
    return tuple(out)


def select(
    registry: Registry,
    settings: Settings,
    requested: Optional[str] = None,
    *,
    failed: Optional[dict[str, str]] = None,
) -> Choice:
    """Choose a backend without creating it. ``requested`` overrides ``settings.backend``.

    ``failed`` maps backend names whose factory already raised to the error (used by
    :func:`select_and_create` to move on under ``auto``).
    """
    failed = failed or {}
    registry.raise_for_conflicts()
    env_notes = validate_environment(registry, settings)
    candidates = probe_all(registry, settings)
    source = "install(backend=...)" if requested is not None else "MCORE_EP_BACKEND"
    want = normalize_backend_request(requested if requested is not None else settings.backend)
    if want == "off":
        raise EPPluginError(f"{source} is 'off': no backend is to be installed")
    why: dict[str, tuple[str, str]] = {n: ("failed", f"factory raised: {e}") for n, e in failed.items()}
    notes = list(registry.notes) + [f"plugin {p.name!r} failed to load: {p.error}" for p in registry.failed_plugins()]
    notes += env_notes

    if want != "auto":
        cand = _resolve(want, candidates, registry, f"{source}={want!r}")
        problem = failed.get(cand.spec.name) or (None if cand.availability else cand.availability.reason)
        if problem is None:
            why[cand.spec.name] = ("chosen", f"named by {source}")
            return Choice(cand.spec, "explicit", want, _verdicts(candidates, cand.spec.name, why, registry), tuple(notes))
        if settings.fallback is None:
            kind = "failed to initialise" if cand.spec.name in failed else "is unavailable"
            raise BackendUnavailableError(
                f"backend {cand.spec.name!r} named by {source} {kind}: {problem}\n"
                f"No fallback is configured, so nothing else is used. Fix the cause above, choose another "
                f"backend, or allow a replacement explicitly with MCORE_EP_FALLBACK=torch.\n"
                f"Known backends:\n{_table(candidates, registry)}"
            )
        fb = _resolve(settings.fallback, candidates, registry, f"MCORE_EP_FALLBACK={settings.fallback!r}")
        fb_problem = failed.get(fb.spec.name) or (None if fb.availability else fb.availability.reason)
        if fb_problem is not None:
            raise BackendUnavailableError(
                f"backend {cand.spec.name!r} named by {source} is unusable ({problem}) and the fallback "
                f"{fb.spec.name!r} from MCORE_EP_FALLBACK is unusable too ({fb_problem}).\n"
                f"Known backends:\n{_table(candidates, registry)}"
            )
        why[cand.spec.name] = ("failed" if cand.spec.name in failed else "rejected", problem)
        why[fb.spec.name] = ("chosen", f"MCORE_EP_FALLBACK because {cand.spec.name!r} is unusable")
        notes.append(f"requested backend {cand.spec.name!r} is unusable ({problem}); "
                     f"using fallback {fb.spec.name!r} as MCORE_EP_FALLBACK allows")
        log.warning("megatron_ep_plugins: %s", notes[-1])
        return Choice(fb.spec, "fallback", want, _verdicts(candidates, fb.spec.name, why, registry), tuple(notes))

    pm = registry.pluggy_manager
    policy = None
    if pm is not None:
        live = tuple(c for c in candidates if c.spec.name not in failed)
        try:
            policy = pm.hook.ep_select_backend(candidates=live, settings=settings)
        except Exception as exc:
            raise EPPluginError(f"the site policy hook ep_select_backend raised {type(exc).__name__}: {exc}") from exc
    if policy is not None:
        word = normalize_backend_request(str(policy))
        cand = _resolve(word, candidates, registry, f"the ep_select_backend policy hook ({policy!r})")
        problem = failed.get(cand.spec.name) or (None if cand.availability else cand.availability.reason)
        if problem is not None:
            raise BackendUnavailableError(
                f"the ep_select_backend policy hook chose backend {cand.spec.name!r}, which is unusable: {problem}"
            )
        why[cand.spec.name] = ("chosen", "chosen by the ep_select_backend policy hook")
        return Choice(cand.spec, "policy", "auto", _verdicts(candidates, cand.spec.name, why, registry), tuple(notes))

    chosen = None
    for c in candidates:
        if c.spec.name in failed:
            continue
        if not c.availability:
            why[c.spec.name] = ("rejected", c.availability.reason)
        elif chosen is None:
            chosen = c
            why[c.spec.name] = ("chosen", f"highest-priority available backend ({c.spec.priority})")
        else:
            why[c.spec.name] = ("skipped", f"available, lower priority than {chosen.spec.name!r}")
    if chosen is None:
        raise NoBackendAvailableError(
            f"MCORE_EP_BACKEND=auto found no usable backend. Known backends:\n{_table(candidates, registry)}"
        )
    return Choice(chosen.spec, "auto", "auto", _verdicts(candidates, chosen.spec.name, why, registry), tuple(notes))


def select_and_create(
    registry: Registry, settings: Settings, requested: Optional[str] = None
) -> tuple[Choice, EPBackend]:
    """:func:`select`, then call the chosen factory; on failure apply the rules above."""
    failed: dict[str, str] = {}
    while True:
        choice = select(registry, settings, requested, failed=failed)
        try:
            backend = _call(choice.spec.factory, choice.spec, os.environ if settings.environ is None else settings.environ)
        except ConfigError:
            raise  # a malformed value is the user's to fix, never a reason to move on to another backend
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            failed[choice.spec.name] = error
            log.warning("megatron_ep_plugins: backend %r failed to initialise: %s", choice.spec.name, error)
            if choice.mode in ("fallback", "policy"):
                raise BackendInitError(
                    f"backend {choice.spec.name!r} ({choice.mode}) failed to initialise: {error}"
                ) from exc
            continue  # explicit -> select() raises or applies the fallback; auto -> next candidate
        if getattr(backend, "name", None) != choice.spec.name:
            try:
                backend.name = choice.spec.name  # type: ignore[misc]
            except AttributeError:
                pass
        if failed:
            choice = replace(choice, notes=choice.notes + tuple(f"{n!r} failed to initialise: {e}" for n, e in failed.items()))
        return choice, backend

