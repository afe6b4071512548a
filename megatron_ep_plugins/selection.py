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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Optional

from .config import Settings, normalize_backend_request
from .errors import (
    BackendInitError,
    BackendUnavailableError,
    EPPluginError,
    NoBackendAvailableError,
    UnknownBackendError,
)
from .manager import Registry
from .spec import Availability, BackendSpec, Candidate, EPBackend

__all__ = ["Choice", "Verdict", "probe_all", "select", "select_and_create"]

log = logging.getLogger("megatron_ep_plugins")


@dataclass(frozen=True)
class Verdict:
    """One backend's part in a selection. ``outcome``: chosen | rejected | skipped | disabled | failed."""

    name: str
    provider: str
    priority: int
    available: bool
    reason: str
    outcome: str
    why: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Choice:
    """The selected backend and the full explanation of the decision.

    ``mode``: ``explicit`` (user named it), ``policy`` (site hook named it), ``auto`` (priority),
    ``fallback`` (``MCORE_EP_FALLBACK`` replaced a failed named backend).
    """

    spec: BackendSpec
    mode: str
    requested: str
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def summary(self) -> str:
        lines = [f"megatron_ep_plugins: backend {self.spec.name!r} (provider {self.spec.provider!r}, "
                 f"mode {self.mode}, requested {self.requested!r})"]
        for v in self.verdicts:
            mark = {"chosen": "*", "failed": "!", "disabled": "x"}.get(v.outcome, "-")
            lines.append(f"  {mark} {v.name:<10} prio {v.priority:>4}  {v.outcome:<8} {v.why}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.spec.name,
            "provider": self.spec.provider,
            "mode": self.mode,
            "requested": self.requested,
            "capabilities": self.spec.capabilities.as_dict(),
            "candidates": [v.as_dict() for v in self.verdicts],
            "notes": list(self.notes),
        }


def _safe_probe(spec: BackendSpec) -> Availability:
    try:
        verdict = spec.probe()
    except Exception as exc:  # a probe must not raise; treat it as "unavailable, here is why"
        return Availability.no(f"availability probe raised {type(exc).__name__}: {exc}")
    if not isinstance(verdict, Availability):
        return Availability.no(f"availability probe returned {verdict!r} instead of an Availability")
    return verdict


def probe_all(registry: Registry) -> tuple[Candidate, ...]:
    """Probe every usable backend; order: priority descending, then registration order."""
    order = sorted(range(len(registry.backends)), key=lambda i: (-registry.backends[i].priority, i))
    return tuple(Candidate(registry.backends[i], _safe_probe(registry.backends[i])) for i in order)


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
    candidates = probe_all(registry)
    source = "install(backend=...)" if requested is not None else "MCORE_EP_BACKEND"
    want = normalize_backend_request(requested if requested is not None else settings.backend)
    if want == "off":
        raise EPPluginError(f"{source} is 'off': no backend is to be installed")
    why: dict[str, tuple[str, str]] = {n: ("failed", f"factory raised: {e}") for n, e in failed.items()}
    notes = list(registry.notes) + [f"plugin {p.name!r} failed to load: {p.error}" for p in registry.failed_plugins()]

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
            backend = choice.spec.factory()
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

