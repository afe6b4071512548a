"""The facade: ``install()``, ``uninstall()``, ``explain()``, ``installed()``.

``install()`` = read settings -> discover plugins -> select and create a backend -> bind it into
Megatron-signature functions (with the once-per-group rank agreement check) -> patch Megatron ->
notify plugins. Users keep ``moe_flex_dispatcher_backend="deepep"`` in their Megatron config; the
implementation underneath is swapped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from . import __version__, patching, teardown
from .autograd import build_slot
from .config import Settings, load_settings, normalize_backend_request
from .consistency import check_agreement
from .errors import EPPluginError
from .manager import Registry, discover
from .selection import probe_all, select, select_and_create
from .spec import Choice, EPBackend

__all__ = ["Installation", "explain", "install", "installed", "list_backends", "uninstall"]

log = logging.getLogger("megatron_ep_plugins")
_lock = threading.RLock()
_installation: Optional["Installation"] = None


@dataclass(frozen=True)
class Installation:
    """What ``install()`` did: the choice (with its explanation), the live backend, the patched slots."""

    choice: Choice
    backend: EPBackend
    megatron_version: str
    patched: tuple[str, ...]
    settings: Settings

    @property
    def name(self) -> str:
        return self.choice.spec.name

    def as_dict(self) -> dict[str, Any]:
        return self.choice.as_dict() | {"megatron_core": self.megatron_version, "patched": list(self.patched)}


def _configure_logging(settings: Settings) -> None:
    log.setLevel(settings.log_level.upper())
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[megatron_ep_plugins] %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def installed() -> Optional[Installation]:
    """The active installation, or ``None``."""
    return _installation


def install(backend: Optional[str] = None, *, environ: Optional[Mapping[str, str]] = None) -> Optional[Installation]:
    """Select a backend and patch Megatron's flex dispatcher slot with it.

    :param backend: a backend name/alias or ``"auto"``; overrides ``MCORE_EP_BACKEND``. When omitted
        and ``MCORE_EP_BACKEND=off``, nothing is installed and ``None`` is returned.
    :param environ: the environment to read every ``MCORE_EP_*`` variable from, the core's and the
        backends' alike (probes and factories are asked about it); default ``os.environ``.
    :raises UnknownBackendError, BackendUnavailableError, NoBackendAvailableError, BackendInitError,
        DuplicateBackendError, PatchError, ConfigError: with a message naming the cause and the fix.
    :raises EPPluginError: an ``ep_backend_installed`` hook raised; Megatron's original objects are
        restored and nothing is installed.

    Idempotent: installing the backend that is already installed, with every ``MCORE_EP_*`` value
    unchanged, returns the existing installation; anything else builds a new one that replaces it
    (the original Megatron objects stay recorded for ``uninstall()``).
    """
    global _installation
    settings = load_settings(environ)
    _configure_logging(settings)
    if backend is None and settings.backend == "off":
        log.info("MCORE_EP_BACKEND=off: Megatron's own dispatcher is left in place")
        return None
    with _lock:
        want = normalize_backend_request(backend if backend is not None else settings.backend)
        current = _installation
        if current is not None and settings == current.settings \
                and want in (current.choice.requested, *current.choice.spec.names):
            return current
        version = patching.megatron_version()
        patching.entry_for(version, settings.allow_untested_megatron)  # refuse early, before creating buffers
        registry = discover(settings)
        choice, live = select_and_create(registry, settings, backend)

        def check_group(group: Any) -> None:
            # always publish; wait for (and compare with) the other ranks only when asked to
            check_agreement(group, choice.spec.name, live.agreement_key(), __version__,
                            wait=settings.check_ranks, timeout=settings.check_timeout)

        slot = build_slot(live, check_group)
        patched = patching.apply(slot, version, settings.allow_untested_megatron)
        _installation = None
        _notify_installed(registry, choice, live)
        _installation = Installation(choice, live, version, tuple(patched), settings)
        release = getattr(live, "release", None)
        if release is not None:  # free its buffers before the process group goes (teardown.py says why)
            teardown.hook(release)
        else:
            teardown.unhook()
        log.info("%s", choice.summary())
        return _installation


def _notify_installed(registry: Registry, choice: Choice, live: EPBackend) -> None:
    """Call each ``ep_backend_installed`` implementation; if one raises, restore Megatron and say which."""
    pm = registry.pluggy_manager
    if pm is None:
        return
    args = {"choice": choice, "backend": live}
    for impl in reversed(pm.hook.ep_backend_installed.get_hookimpls()):
        try:
            impl.function(*(args[name] for name in impl.argnames))
        except Exception as exc:
            patching.revert()
            raise EPPluginError(
                f"plugin {impl.plugin_name!r}: its ep_backend_installed hook raised {type(exc).__name__}: {exc}. "
                f"Megatron's original dispatcher was restored and no backend is installed; fix or block the "
                f"plugin (MCORE_EP_PLUGINS_DISABLE=plugin:{impl.plugin_name})") from exc


def uninstall() -> list[str]:
    """Restore Megatron's original objects; returns the restored slot paths (``[]`` if none)."""
    global _installation
    with _lock:
        restored = patching.revert()
        teardown.unhook()
        _installation = None
        return restored


def explain(backend: Optional[str] = None, *, environ: Optional[Mapping[str, str]] = None) -> Choice:
    """What ``install(backend)`` would choose now, and why (no backend is created, nothing patched)."""
    settings = load_settings(environ)
    return select(discover(settings), settings, backend)


def list_backends(*, environ: Optional[Mapping[str, str]] = None) -> tuple[Registry, tuple]:
    """Discovery plus every backend's probe verdict (what ``megatron-ep list`` shows).

    Does not raise for conflicts or malformed backend variables (``list`` is how users see them):
    see ``registry.conflicts`` and :func:`megatron_ep_plugins.selection.validate_environment`.
    """
    settings = load_settings(environ)
    registry = discover(settings)
    return registry, probe_all(registry, settings)
