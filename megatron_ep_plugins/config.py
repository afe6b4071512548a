"""The core's ``MCORE_EP_*`` variables, and how anyone reads a declared variable.

Every variable is declared once, by whoever reads it, as an :class:`~megatron_ep_plugins.spec.EnvVar`
(name, default, meaning, parser with bounds): the core's own are :data:`CORE_VARS` here; each backend
declares its own in its :class:`~megatron_ep_plugins.spec.BackendSpec` (``settings=``), so a backend
never edits this file. The plugin manager collects them all into the registry, which is what
``megatron-ep env``, the README table and validation read.

:func:`load_settings` parses the core's variables into a frozen :class:`Settings`. Backends read
their own through :func:`read_int` / :func:`read_bool` / :func:`read_str`, which accept only
declared names (:func:`declare`) and, when no mapping is passed, read the environment the core is
asking about (:func:`using_environ`; ``os.environ`` otherwise). Nothing here is read on the
dispatch/combine hot path: settings are parsed once, at selection or backend construction.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from .errors import ConfigError
from .spec import Boolean, EnvVar, Integer, OneOf, Text, Words

__all__ = ["CORE_VARS", "ENV_VARS", "EnvVar", "Settings", "current_environ", "declare", "declared",
           "load_settings", "read_bool", "read_int", "read_str", "using_environ"]

_LOG_LEVELS = ("debug", "info", "warning", "error")

#: The core's own variables (backends declare theirs in their ``BackendSpec``).
CORE_VARS: tuple[EnvVar, ...] = tuple(
    EnvVar(name, default, help, parse, scope="core", provider="megatron_ep_plugins")
    for name, default, parse, help in (
        ("MCORE_EP_BACKEND", "", Text("a backend name or alias, auto, or off"),
         "Backend to use: a name or alias, `auto` (highest-priority available), or `off`. Unset: nothing is "
         "installed automatically; `install()` then behaves as `auto`."),
        ("MCORE_EP_FALLBACK", "", Text("a backend name or alias"),
         "Backend to use instead when the named one is unavailable or fails to initialise (e.g. `torch`); it must "
         "name a registered backend. Unset: such a failure is an error."),
        ("MCORE_EP_PLUGINS_AUTOLOAD", "1", Boolean(),
         "`0`: load only the built-in plugins, no third-party entry points."),
        ("MCORE_EP_PLUGINS_DISABLE", "", Words("comma-separated names: NAME, plugin:NAME, backend:NAME, dist:NAME"),
         "Plugins or backends to block (any case). `NAME` blocks a plugin or backend of that name; `plugin:NAME`, "
         "`backend:NAME` and `dist:DISTRIBUTION` (every plugin of an installed distribution) block exactly one kind."),
        ("MCORE_EP_CHECK_RANKS", "1", Boolean(),
         "`0`: this rank does not wait for the once-per-group check that all ranks chose the same backend and "
         "parameters (it still publishes its choice, so ranks that do check fail cleanly on a mismatch)."),
        ("MCORE_EP_CHECK_RANKS_TIMEOUT", "300", Integer(1, 86400),
         "Seconds a rank waits at a group's first dispatch for the other ranks' choices (through the process "
         "group's store) before failing with the list of ranks that never arrived."),
        ("MCORE_EP_ALLOW_UNTESTED_MEGATRON", "0", Boolean(),
         "`1`: patch a megatron-core version the patch table does not list, with the newest table entry "
         "(targets and signatures are still verified)."),
        ("MCORE_EP_LOG", "info", OneOf(*_LOG_LEVELS),
         "Log level of the `megatron_ep_plugins` logger (debug, info, warning, error)."),
        ("MCORE_EP_FAULT_PROPAGATION", "1", Boolean(),
         "`1`: when one rank raises inside dispatch/combine (or their backward passes), the other ranks of that "
         "expert-parallel group print one line naming that rank and its error and exit with code 1 within a few "
         "seconds, instead of waiting in the collective until a timeout. `0`: off."),
    )
)

#: The core's variables by name (kept under this name for readers of earlier versions).
ENV_VARS: dict[str, EnvVar] = {v.name: v for v in CORE_VARS}

# Every declared variable by name: the core's, plus those declared by backend modules (``declare``)
# and by plugins seen at discovery. Only used to answer read_* (name check and default).
_declared: dict[str, EnvVar] = dict(ENV_VARS)

# The environment the core is asking about (install/explain/list_backends(environ=...)); unset: os.environ.
_environ: contextvars.ContextVar[Optional[Mapping[str, str]]] = contextvars.ContextVar(
    "megatron_ep_plugins_environ", default=None)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def declare(*variables: EnvVar) -> tuple[EnvVar, ...]:
    """Make ``variables`` readable through :func:`read_int` & co.; returns them (for ``settings=``).

    A backend module writes ``SETTINGS = declare(EnvVar(...), ...)`` and passes
    ``BackendSpec(..., settings=SETTINGS)``. The first declaration of a name is kept here; two
    plugins declaring one name is reported by discovery, naming both.
    """
    for var in variables:
        if not isinstance(var, EnvVar):
            raise TypeError(f"declare() takes EnvVar records, got {var!r}")
        _declared.setdefault(var.name, var)
    return tuple(variables)


def declared(name: str) -> Optional[EnvVar]:
    """The declaration of ``name`` seen so far in this process, else ``None``."""
    return _declared.get(name)


def current_environ() -> Mapping[str, str]:
    """The environment the core is asking about now (``os.environ`` outside :func:`using_environ`)."""
    env = _environ.get()
    return os.environ if env is None else env


@contextlib.contextmanager
def using_environ(environ: Optional[Mapping[str, str]]) -> Iterator[Mapping[str, str]]:
    """Within the block, :func:`current_environ` and ``read_*`` (without a mapping) see ``environ``."""
    env = os.environ if environ is None else environ
    token = _environ.set(env)
    try:
        yield env
    finally:
        _environ.reset(token)


def _raw(name: Any, environ: Optional[Mapping[str, str]]) -> str:
    var = name if isinstance(name, EnvVar) else _declared.get(name)
    if var is None:
        raise KeyError(f"{name} is not a declared megatron_ep_plugins variable: declare it in the backend's "
                       f"BackendSpec(settings=declare(EnvVar({name!r}, ...)))")
    env = current_environ() if environ is None else environ
    return str(env.get(var.name, "")).strip() or var.default


def read_str(name: Any, environ: Optional[Mapping[str, str]] = None) -> str:
    """The variable's value with surrounding space removed (its default when unset or empty)."""
    return _raw(name, environ)


def read_bool(name: Any, environ: Optional[Mapping[str, str]] = None) -> bool:
    value = _raw(name, environ).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    label = name.name if isinstance(name, EnvVar) else name
    raise ConfigError(f"{label}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def read_int(
    name: Any, environ: Optional[Mapping[str, str]] = None, *, minimum: int = 0
) -> Optional[int]:
    """The variable as an int >= ``minimum`` (and within its declared bounds), or ``None`` when unset/empty."""
    value = _raw(name, environ)
    if value == "":
        return None
    label = name.name if isinstance(name, EnvVar) else name
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{label}={value!r} is not an integer (expected e.g. {label}=8192)") from None
    if number < minimum:
        raise ConfigError(f"{label}={number} is out of range: it must be >= {minimum}")
    var = name if isinstance(name, EnvVar) else _declared[name]
    if isinstance(var.parse, Integer):
        var.parse(label, value)  # the declared bounds
    return number


#: Prefixes of ``MCORE_EP_PLUGINS_DISABLE`` words that block exactly one kind of thing.
DISABLE_KINDS = ("plugin", "backend", "dist")


@dataclass(frozen=True)
class Settings:
    """The core's settings. ``backend`` is ``"auto"``, ``"off"`` or a lower-cased name.

    ``disabled`` holds the ``MCORE_EP_PLUGINS_DISABLE`` words, lower-cased (``"name"``,
    ``"plugin:name"``, ``"backend:name"``, ``"dist:name"``). ``environ`` is the mapping the settings
    were read from (what probes and factories are asked about); ``fingerprint`` is every
    ``MCORE_EP_*`` value in it, so two settings are equal only if no such variable differs.
    """

    backend: str = "auto"
    backend_is_set: bool = False
    fallback: Optional[str] = None
    autoload_plugins: bool = True
    disabled: tuple[str, ...] = ()
    check_ranks: bool = True
    check_timeout: int = 300
    allow_untested_megatron: bool = False
    log_level: str = "info"
    fingerprint: tuple[tuple[str, str], ...] = ()
    environ: Optional[Mapping[str, str]] = field(default=None, compare=False, repr=False)  # None: os.environ

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "backend_is_set": self.backend_is_set,
            "fallback": self.fallback,
            "autoload_plugins": self.autoload_plugins,
            "disabled": list(self.disabled),
            "check_ranks": self.check_ranks,
            "check_timeout": self.check_timeout,
            "allow_untested_megatron": self.allow_untested_megatron,
            "log_level": self.log_level,
        }


_OFF_WORDS = {"off", "none", "0", "false", "disabled"}
_AUTO_WORDS = {"auto", "default", ""}


def normalize_backend_request(value: str) -> str:
    """``"  Elastic "`` -> ``"elastic"``; the off/auto synonyms -> ``"off"``/``"auto"``."""
    word = value.strip().lower()
    if word in _OFF_WORDS:
        return "off"
    if word in _AUTO_WORDS:
        return "auto"
    return word


def _disable_words(env: Mapping[str, str]) -> tuple[str, ...]:
    words = ENV_VARS["MCORE_EP_PLUGINS_DISABLE"].value(env) or ()
    for word in words:
        kind, sep, rest = word.partition(":")
        if sep and (kind not in DISABLE_KINDS or not rest):
            raise ConfigError(
                f"MCORE_EP_PLUGINS_DISABLE word {word!r} is not understood: use NAME, "
                + ", ".join(f"{k}:NAME" for k in DISABLE_KINDS) + " (e.g. MCORE_EP_PLUGINS_DISABLE=plugin:my_ep)")
    return tuple(words)


def fingerprint(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Every ``MCORE_EP_*`` variable set in ``environ`` (stripped), sorted: what an installation was made for."""
    return tuple(sorted((k, str(v).strip()) for k, v in environ.items() if k.startswith("MCORE_EP_")))


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Parse the core's variables (``os.environ`` by default); raise :class:`ConfigError` on bad values."""
    env = os.environ if environ is None else environ
    backend_raw = env.get("MCORE_EP_BACKEND")
    fallback_raw = read_str("MCORE_EP_FALLBACK", env).lower()
    if fallback_raw in _AUTO_WORDS - {""}:
        raise ConfigError(
            f"MCORE_EP_FALLBACK={fallback_raw!r} is ambiguous: name the fallback backend, e.g. MCORE_EP_FALLBACK=torch"
        )
    fallback = None if fallback_raw == "" or fallback_raw in _OFF_WORDS else fallback_raw
    log_level = read_str("MCORE_EP_LOG", env).lower()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"MCORE_EP_LOG={log_level!r} is not a log level: use one of {list(_LOG_LEVELS)}")
    values = {v.name: v.value(env) for v in CORE_VARS if v.name not in ("MCORE_EP_BACKEND", "MCORE_EP_FALLBACK",
                                                                        "MCORE_EP_LOG", "MCORE_EP_PLUGINS_DISABLE")}
    return Settings(
        backend=normalize_backend_request(backend_raw or ""),
        backend_is_set=backend_raw is not None and backend_raw.strip() != "",
        fallback=fallback,
        autoload_plugins=values["MCORE_EP_PLUGINS_AUTOLOAD"],
        disabled=_disable_words(env),
        check_ranks=values["MCORE_EP_CHECK_RANKS"],
        check_timeout=values["MCORE_EP_CHECK_RANKS_TIMEOUT"],
        allow_untested_megatron=values["MCORE_EP_ALLOW_UNTESTED_MEGATRON"],
        log_level=log_level,
        fingerprint=fingerprint(env),
        environ=env,
    )
