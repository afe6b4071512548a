"""Every ``MCORE_EP_*`` environment variable, parsed and validated in one place.

:data:`ENV_VARS` is the single table of variables (the README's table and ``megatron-ep``
print it). :func:`load_settings` reads the core's variables into a frozen :class:`Settings`;
backends read their own through :func:`read_int` / :func:`read_bool` / :func:`read_str`, which
only accept names listed in :data:`ENV_VARS`. Nothing here is read on the dispatch/combine hot
path: settings are parsed once, at selection or backend construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError

__all__ = ["ENV_VARS", "EnvVar", "Settings", "load_settings", "read_bool", "read_int", "read_str"]


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str
    scope: str = "core"


ENV_VARS: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("MCORE_EP_BACKEND", "", "Backend to use: a name or alias, `auto` (highest-priority available), "
               "or `off`. Unset: nothing is installed automatically; `install()` then behaves as `auto`."),
        EnvVar("MCORE_EP_FALLBACK", "", "Backend to use instead when the named one is unavailable or fails to "
               "initialise (e.g. `torch`). Unset: such a failure is an error."),
        EnvVar("MCORE_EP_PLUGINS_AUTOLOAD", "1", "`0`: load only the built-in plugins, no third-party entry points."),
        EnvVar("MCORE_EP_PLUGINS_DISABLE", "", "Comma-separated plugin or backend names to block."),
        EnvVar("MCORE_EP_CHECK_RANKS", "1", "`0`: skip the one-time check that all ranks of a group chose the "
               "same backend and parameters."),
        EnvVar("MCORE_EP_ALLOW_UNTESTED_MEGATRON", "0", "`1`: patch a megatron-core version the patch table does "
               "not list, with the newest table entry (targets and signatures are still verified)."),
        EnvVar("MCORE_EP_LOG", "info", "Log level of the `megatron_ep_plugins` logger (debug, info, warning)."),
        EnvVar("MCORE_EP_FAULT_PROPAGATION", "1", "`1`: when one rank raises inside dispatch/combine (or their "
               "backward passes), the other ranks of that expert-parallel group print one line naming that rank "
               "and its error and exit with code 1 within a few seconds, instead of waiting in the collective "
               "until a timeout. `0`: off."),
        # DeepEP legacy (V1) Buffer
        EnvVar("MCORE_EP_LEGACY_NUM_SMS", "", "SMs for DeepEP V1 kernels; default Megatron's "
               "`moe_flex_dispatcher_num_sms` (20).", "legacy"),
        # DeepEP V2 ElasticBuffer
        EnvVar("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", "", "Pin `num_max_tokens_per_rank` (must be equal on all "
               "ranks). Unset: the first dispatch's token count rounded up to a power of two (min 256), "
               "agreed across ranks; a larger batch later rebuilds the buffer at the next power of two.",
               "elastic"),
        EnvVar("MCORE_EP_ELASTIC_HIDDEN", "", "Hidden size used to size the buffer; unset: taken from the first "
               "dispatch's `x`.", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_NUM_TOPK", "", "Top-k used to size the buffer; unset: from the first dispatch.",
               "elastic"),
        EnvVar("MCORE_EP_ELASTIC_NUM_QPS", "0", "`num_allocated_qps` (0 = automatic; AWS EFA needs a small budget, "
               "e.g. 4).", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_NUM_SMS", "", "SMs per dispatch (combine reuses the dispatch handle's); unset: "
               "Megatron's `moe_flex_dispatcher_num_sms`.", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_DETERMINISTIC", "0", "`1`: deterministic receive order (slower).", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_HYBRID_MODE", "auto", "`allow_hybrid_mode`: `auto` (off when GPU-initiated "
               "networking is disabled via `EP_DISABLE_GIN=1`), `1` or `0`.", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH", "0", "`1`: agree on token count/shape/ids across ranks at every "
               "dispatch (one small all_reduce + host sync) so the buffer can grow and bad ids fail on all ranks; "
               "`0`: only at a group's first dispatch.", "elastic"),
        EnvVar("MCORE_EP_ELASTIC_FP8", "0", "`1`: build the buffer for FP8 dispatch input.", "elastic"),
        # HybridEP
        EnvVar("MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK", "", "HybridEP `max_num_of_tokens_per_rank`; unset: the "
               "largest token count seen on any rank, rounded up to a multiple of 64.", "hybridep"),
        # NCCL EP (nccl-extensions, nccl.ep)
        EnvVar("MCORE_EP_NCCLEP_ALGORITHM", "auto", "`ht` (high throughput, training), `ll` (low latency, "
               "forward-only) or `auto`: LL when no input requires grad, the agreed token count is at most "
               "`MCORE_EP_NCCLEP_LL_MAX_TOKENS`, hidden % 512 == 0, top-k <= 31 and NCCL reports GIN; else HT.",
               "ncclep"),
        EnvVar("MCORE_EP_NCCLEP_LL_MAX_TOKENS", "128", "Largest agreed tokens per rank for which `auto` picks LL "
               "(0: never).", "ncclep"),
        EnvVar("MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK", "", "Pin `max_dispatch_tokens_per_rank` (a multiple of 4, at "
               "most 8192). Unset: the agreed largest token count rounded up to a power of two (min 128); a larger "
               "batch later grows the group on every rank together.", "ncclep"),
        EnvVar("MCORE_EP_NCCLEP_NUM_SMS", "", "`max_num_sms` of the nccl.ep group (0 = library default); unset: "
               "Megatron's `moe_flex_dispatcher_num_sms`.", "ncclep"),
        EnvVar("MCORE_EP_NCCLEP_TIMEOUT_MS", "", "GPU-side wait timeout of nccl.ep's LL kernels (`timeout_ns`); "
               "unset: the library default (~100 s). A peer silent for longer traps the kernel (an error on the "
               "other ranks, not a hang), or is masked with `MCORE_EP_NCCLEP_ACTIVE_MASK=1`. nccl.ep's own "
               "`NCCL_EP_TIMEOUT_MS` overrides it.", "ncclep"),
        EnvVar("MCORE_EP_NCCLEP_ACTIVE_MASK", "0", "`1`: LL groups mask a timed-out peer instead of trapping "
               "(`enable_mask`); the adapter then checks nccl.ep's async-error flag after each LL operation and "
               "raises `NcclEpRankFailure` naming the masked ranks. Not available with `ALGORITHM=ht`.", "ncclep"),
    )
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str, environ: Optional[Mapping[str, str]]) -> str:
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a registered megatron_ep_plugins variable; add it to config.ENV_VARS")
    env = os.environ if environ is None else environ
    return env.get(name, ENV_VARS[name].default).strip()


def read_str(name: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The variable's value with surrounding space removed (its default when unset)."""
    return _raw(name, environ)


def read_bool(name: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    value = _raw(name, environ).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def read_int(
    name: str, environ: Optional[Mapping[str, str]] = None, *, minimum: int = 0
) -> Optional[int]:
    """The variable as an int >= ``minimum``, or ``None`` when it is unset/empty."""
    value = _raw(name, environ)
    if value == "":
        return None
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer (expected e.g. {name}=8192)") from None
    if number < minimum:
        raise ConfigError(f"{name}={number} is out of range: it must be >= {minimum}")
    return number


def _names(name: str, environ: Optional[Mapping[str, str]]) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in _raw(name, environ).split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """The core's settings. ``backend`` is ``"auto"``, ``"off"`` or a lower-cased name."""

    backend: str = "auto"
    backend_is_set: bool = False
    fallback: Optional[str] = None
    autoload_plugins: bool = True
    disabled: tuple[str, ...] = ()
    check_ranks: bool = True
    allow_untested_megatron: bool = False
    log_level: str = "info"

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "backend_is_set": self.backend_is_set,
            "fallback": self.fallback,
            "autoload_plugins": self.autoload_plugins,
            "disabled": list(self.disabled),
            "check_ranks": self.check_ranks,
            "allow_untested_megatron": self.allow_untested_megatron,
            "log_level": self.log_level,
        }


_OFF_WORDS = {"off", "none", "0", "false", "disabled"}
_AUTO_WORDS = {"auto", "default", ""}
_LOG_LEVELS = {"debug", "info", "warning", "error"}


def normalize_backend_request(value: str) -> str:
    """``"  Elastic "`` -> ``"elastic"``; the off/auto synonyms -> ``"off"``/``"auto"``."""
    word = value.strip().lower()
    if word in _OFF_WORDS:
        return "off"
    if word in _AUTO_WORDS:
        return "auto"
    return word


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
        raise ConfigError(f"MCORE_EP_LOG={log_level!r} is not a log level: use one of {sorted(_LOG_LEVELS)}")
    return Settings(
        backend=normalize_backend_request(backend_raw or ""),
        backend_is_set=backend_raw is not None and backend_raw.strip() != "",
        fallback=fallback,
        autoload_plugins=read_bool("MCORE_EP_PLUGINS_AUTOLOAD", env),
        disabled=_names("MCORE_EP_PLUGINS_DISABLE", env),
        check_ranks=read_bool("MCORE_EP_CHECK_RANKS", env),
        allow_untested_megatron=read_bool("MCORE_EP_ALLOW_UNTESTED_MEGATRON", env),
        log_level=log_level,
    )
