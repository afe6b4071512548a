"""Typed records exchanged between plugins and the core (the bottom layer: imports only ``errors``).

Everything a backend author needs besides :mod:`megatron_ep_plugins.hookspecs` lives here:

* :class:`BackendSpec` -- what a plugin registers (name, priority, capabilities, a cheap
  availability probe, a lazy factory and the ``MCORE_EP_*`` variables the backend reads);
* :class:`EnvVar` with its parsers :class:`Integer`, :class:`Boolean`, :class:`OneOf`,
  :class:`Text`, :class:`Words` -- one environment variable: name, default, meaning, values;
* :class:`BackendEnv` -- the environment a probe or factory is asked about (parsed values);
* :class:`Availability` -- the probe's verdict, always with a human reason;
* :class:`Capabilities` -- what a backend declares it can do;
* :class:`EPBackend` -- the protocol the factory's product implements: the primitive
  dispatch/combine operations of the contract in ``docs/backend-contract.md``;
* :class:`DispatchResult` -- what :meth:`EPBackend.dispatch` returns;
* :class:`Candidate`, :class:`Verdict`, :class:`Choice` -- what the selection policy saw and chose.

This module imports nothing heavy: ``torch`` is only named in annotations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Protocol, Union

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    import torch.distributed

    Tensor = torch.Tensor
    #: bf16 ``[T, H]`` or, for FP8 dispatch, ``(e4m3 [T, H], fp32 scales [T, ceil(H/128)])``.
    TokenTensor = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "Availability",
    "BackendEnv",
    "BackendSpec",
    "Boolean",
    "Candidate",
    "Capabilities",
    "Choice",
    "DispatchResult",
    "EPBackend",
    "EnvVar",
    "Integer",
    "NAME_PATTERN",
    "OneOf",
    "RESERVED_NAMES",
    "Text",
    "VARIABLE_PATTERN",
    "Verdict",
    "Words",
    "validate_name",
]

#: Backend names and aliases: lower case, start with a letter, then letters, digits, ``-``, ``_``.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: Words ``MCORE_EP_BACKEND`` gives a meaning of its own; no backend may be called so.
RESERVED_NAMES = frozenset({"auto", "off", "none", "default"})


def validate_name(name: object, what: str = "backend name") -> str:
    """Return ``name`` if it is a valid backend name or alias, else raise ``ValueError``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 characters, lower-case letters, digits, '-' or '_', "
            "starting with a letter (e.g. 'elastic', 'my-ep')"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"invalid {what} {name!r}: {sorted(RESERVED_NAMES)} are reserved words")
    return name


@dataclass(frozen=True)
class Availability:
    """Verdict of a backend's availability probe.

    ``reason`` is for humans and is shown by ``megatron-ep list``/``explain`` and in errors; it
    says *why* (``"deep_ep not importable: No module named 'deep_ep'"``) and, when the backend is
    unavailable, what would fix it. ``details`` holds facts worth reporting (library versions).
    """

    available: bool
    reason: str
    details: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def yes(cls, reason: str = "available", **details: str) -> "Availability":
        return cls(True, reason, dict(details))

    @classmethod
    def no(cls, reason: str, **details: str) -> "Availability":
        return cls(False, reason, dict(details))

    def __bool__(self) -> bool:
        return self.available


#: ``MCORE_EP_`` then upper-case letters, digits and ``_`` (e.g. ``MCORE_EP_MY_EP_NUM_SMS``).
VARIABLE_PATTERN = re.compile(r"^MCORE_EP_[A-Z0-9][A-Z0-9_]{0,63}$")


def _bad(name: str, raw: str, problem: str) -> ConfigError:
    return ConfigError(f"{name}={raw!r} {problem}")


@dataclass(frozen=True)
class Integer:
    """Parser: a base-10 integer in ``[minimum, maximum]`` (and a multiple of ``multiple_of``)."""

    minimum: int = 0
    maximum: int = 2**31 - 1
    multiple_of: int = 1

    def __call__(self, name: str, raw: str) -> int:
        try:
            number = int(raw, 10)
        except ValueError:
            raise _bad(name, raw, f"is not an integer: use {self.describe()}") from None
        if not self.minimum <= number <= self.maximum:
            raise _bad(name, raw, f"is out of range: it must be at least {self.minimum} and no larger than "
                                  f"{self.maximum}")
        if number % self.multiple_of:
            what = "even" if self.multiple_of == 2 else f"a multiple of {self.multiple_of}"
            raise _bad(name, raw, f"is not {what}: use {self.describe()}")
        return number

    def describe(self) -> str:
        step = {1: "", 2: ", even"}.get(self.multiple_of, f", a multiple of {self.multiple_of}")
        return f"an integer from {self.minimum} to {self.maximum}{step}"


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Boolean:
    """Parser: ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case)."""

    def __call__(self, name: str, raw: str) -> bool:
        word = raw.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _bad(name, raw, f"is not a boolean: use {self.describe()}")

    def describe(self) -> str:
        return "1/0, true/false, yes/no or on/off"


@dataclass(frozen=True)
class OneOf:
    """Parser: one of ``words`` (compared lower-case); returns the word, or ``mapping[word]`` if given."""

    words: tuple[str, ...]
    mapping: Optional[Mapping[str, Any]] = field(default=None, compare=False)

    def __init__(self, *words: str, mapping: Optional[Mapping[str, Any]] = None) -> None:
        object.__setattr__(self, "words", tuple(w.lower() for w in words))
        object.__setattr__(self, "mapping", mapping)

    def __call__(self, name: str, raw: str) -> Any:
        word = raw.lower()
        if word not in self.words:
            raise _bad(name, raw, f"is invalid: use {self.describe()}")
        return self.mapping[word] if self.mapping is not None and word in self.mapping else word

    def describe(self) -> str:
        return "one of " + ", ".join(self.words)


@dataclass(frozen=True)
class Text:
    """Parser: any text (surrounding space removed); the consumer checks it (e.g. a backend name)."""

    what: str = "text"

    def __call__(self, name: str, raw: str) -> str:
        return raw

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Words:
    """Parser: a comma-separated list of words, lower-cased, empty items dropped."""

    what: str = "comma-separated names"

    def __call__(self, name: str, raw: str) -> tuple[str, ...]:
        return tuple(part.strip().lower() for part in raw.split(",") if part.strip())

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class EnvVar:
    """One ``MCORE_EP_*`` environment variable, declared by the core or by the backend that reads it.

    * ``name``: see :data:`VARIABLE_PATTERN`; by convention ``MCORE_EP_<BACKEND>_<WHAT>``.
    * ``default``: the text used when the variable is unset or empty (``""``: "unset" has its own
      meaning, said in ``help``); it must parse.
    * ``help``: one or two sentences for ``megatron-ep env`` and the README table: what it does, what
      unset means.
    * ``parse``: a parser (:class:`Integer`, :class:`Boolean`, :class:`OneOf`, :class:`Text`,
      :class:`Words`, or any callable ``(name, raw) -> value`` raising
      :class:`~megatron_ep_plugins.errors.ConfigError`, with a ``describe()`` method). Give numbers
      bounds: a value out of them is an error on every rank, whatever backend ends up selected.
    * ``scope``, ``provider``: filled in by the plugin manager (the backend's name and the
      plugin's); a plugin leaves them empty. The core's own variables have scope ``core``.

    Example::

        EnvVar("MCORE_EP_MY_EP_NUM_SMS", "", "SMs per dispatch; unset: Megatron's value.",
               parse=Integer(0, 1024))
    """

    name: str
    default: str = ""
    help: str = ""
    parse: Callable[[str, str], Any] = field(default_factory=Text)
    scope: str = ""
    provider: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not VARIABLE_PATTERN.match(self.name):
            raise ValueError(f"invalid variable name {self.name!r}: use MCORE_EP_ followed by upper-case letters, "
                             "digits or '_' (e.g. 'MCORE_EP_MY_EP_NUM_SMS')")
        if not callable(self.parse):
            raise TypeError(f"EnvVar {self.name}: parse must be a parser such as Integer(0, 1024), got {self.parse!r}")
        if not isinstance(self.default, str):
            raise TypeError(f"EnvVar {self.name}: default must be the text of the value, got {self.default!r}")

    def describe(self) -> str:
        """The accepted values in words (``"an integer from 0 to 1024"``)."""
        describe = getattr(self.parse, "describe", None)
        return describe() if callable(describe) else "see its description"

    def value(self, environ: Mapping[str, str]) -> Any:
        """The parsed value in ``environ`` (the default when unset or empty; ``None`` when both are empty).

        :raises ConfigError: the value (or the default) does not parse, with the accepted values.
        """
        raw = str(environ.get(self.name, "")).strip() or self.default
        if raw == "":
            return None
        return self.parse(self.name, raw)


@dataclass(frozen=True)
class BackendEnv:
    """The environment a probe or factory is asked about (``install(environ=...)``, or ``os.environ``).

    A probe or factory that declares a parameter named ``env`` receives one. ``values`` holds this
    backend's declared variables, parsed and validated (the default's value when unset, ``None``
    when unset without a default); ``environ`` is the whole mapping, for anything else (a library's
    own variables). ``env["MCORE_EP_MY_EP_NUM_SMS"]`` reads ``values``.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"{name} is not a variable this backend declared; declared: {sorted(self.values)}") \
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it supports; the core and the conformance kit read these.

    * ``devices``: tensor device types it runs on (``"cpu"``, ``"cuda"``).
    * ``fp8_dispatch``: accepts ``(e4m3 tensor, fp32 scales)`` as dispatch input.
    * ``uneven_tokens``: ranks may pass different token counts ``T`` in one dispatch.
    * ``async_overlap``: honours ``async_finish``/``allocate_on_comm_stream`` with real overlap
      (a backend without it still accepts the flags and completes synchronously).
    * ``deterministic_order``: rows inside one source rank's block arrive in ascending token order.
    * ``internode``: works across hosts (not only NVLink/shared memory peers).
    * ``autograd_probs``: the probs' gradient travels back through combine (all backends of the
      Megatron flex slot must have it; it exists so third-party forward-only backends can say so).
    * ``repeated_experts``: an expert id named twice in one token's top-k arrives as two (id, weight) pairs.
      ``False``: the transport keeps one bit per (token, expert) (HybridEP's routing map), so the repeat arrives
      as one pair carrying the summed weight. Routers never repeat an id (they take ``topk`` of scores); the
      conformance kit's routings do not either.
    """

    devices: tuple[str, ...] = ("cuda",)
    fp8_dispatch: bool = False
    uneven_tokens: bool = True
    async_overlap: bool = False
    deterministic_order: bool = True
    internode: bool = False
    autograd_probs: bool = True
    repeated_experts: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "fp8_dispatch": self.fp8_dispatch,
            "uneven_tokens": self.uneven_tokens,
            "async_overlap": self.async_overlap,
            "deterministic_order": self.deterministic_order,
            "internode": self.internode,
            "autograd_probs": self.autograd_probs,
            "repeated_experts": self.repeated_experts,
        }


@dataclass(frozen=True)
class BackendSpec:
    """One dispatch/combine implementation, as registered by a plugin.

    * ``name``: unique, see :data:`NAME_PATTERN`; what ``MCORE_EP_BACKEND`` names.
    * ``factory``: callable returning an :class:`EPBackend`. Called once, at install time, never at
      discovery; this is where the backend library is imported. If it has a parameter named ``env``
      it receives the :class:`BackendEnv` being installed for (else it reads its variables through
      ``megatron_ep_plugins.config.read_*``, which see the same environment).
    * ``probe``: callable returning :class:`Availability` (``env`` parameter as for ``factory``).
      Must be cheap (no GPU memory, no collectives, no JIT) and must not raise; a probe that raises
      is reported as unavailable with the exception as reason. A probe answers "is the library and
      hardware here"; a malformed variable is not its business (the core rejects it first).
    * ``priority``: higher wins under ``MCORE_EP_BACKEND=auto``. Built-ins use 0 (``torch``) to
      300 (``elastic``); a third party that wants to beat them in ``auto`` says so explicitly.
    * ``aliases``: other names that select this backend (same rules as ``name``).
    * ``settings``: every ``MCORE_EP_*`` variable the backend reads, as :class:`EnvVar` records.
      They appear in ``megatron-ep env`` and the README, and a malformed value is a
      :class:`~megatron_ep_plugins.errors.ConfigError` on every rank whatever the mode.
    * ``validate``: optional callable ``(env: BackendEnv) -> None`` for rules that span several
      variables; it raises :class:`~megatron_ep_plugins.errors.ConfigError`.
    * ``description``: one line for ``megatron-ep list``.
    * ``provider``: filled in by the plugin manager with the registering plugin's name; a
      plugin leaves it empty.
    * ``agreement_keys`` is not here on purpose: a live backend reports the parameters ranks must
      agree on through :meth:`EPBackend.agreement_key`, because they are known only at run time.
    """

    name: str
    factory: Callable[..., "EPBackend"]
    probe: Callable[..., Availability]
    priority: int = 0
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    description: str = ""
    provider: str = ""
    settings: tuple[EnvVar, ...] = ()
    validate: Optional[Callable[[BackendEnv], None]] = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if isinstance(self.aliases, str) or not isinstance(self.aliases, tuple):
            raise TypeError(f"BackendSpec {self.name!r}: aliases must be a tuple of names, got {self.aliases!r}")
        for alias in self.aliases:
            validate_name(alias, f"alias of backend {self.name!r}")
        if not callable(self.factory) or not callable(self.probe):
            raise TypeError(f"BackendSpec {self.name!r}: factory and probe must be callables")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"BackendSpec {self.name!r}: priority must be an int, got {self.priority!r}")
        if not isinstance(self.settings, tuple) or not all(isinstance(v, EnvVar) for v in self.settings):
            raise TypeError(f"BackendSpec {self.name!r}: settings must be a tuple of EnvVar, got {self.settings!r}")
        if self.validate is not None and not callable(self.validate):
            raise TypeError(f"BackendSpec {self.name!r}: validate must be a callable or None")

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by the aliases."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Candidate:
    """A registered backend with its probe's verdict, as the selection policy sees it."""

    spec: BackendSpec
    availability: Availability

    @property
    def name(self) -> str:
        return self.spec.name


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
    """The selected backend and the full explanation of the decision (what ``explain()`` returns).

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


class DispatchResult(NamedTuple):
    """What :meth:`EPBackend.dispatch` returns (Megatron's ``fused_dispatch`` 5-tuple).

    * ``recv_x``: ``[N, H]`` received rows (or the FP8 pair), one per (source token, this rank).
    * ``recv_topk_idx``: ``[N, K]`` int64 local expert ids, ``-1`` where the expert is elsewhere (a row's owned
      pairs may sit in any of its K positions; docs/backend-contract.md).
    * ``recv_topk_weights``: ``[N, K]`` float32, defined where ``recv_topk_idx >= 0``.
    * ``tokens_per_expert``: CPU int64 tensor ``[num_local_experts]``.
    * ``handle``: opaque; passed back to ``combine``/``dispatch_cached``.
    """

    recv_x: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    tokens_per_expert: Any
    handle: Any


class EPBackend(Protocol):
    """The primitive operations a backend implements; the core adds autograd and Megatron glue.

    All methods are called on every rank of ``group`` in the same order (they are collective).
    ``async_finish``/``allocate_on_comm_stream`` are Megatron's flags: a backend may overlap
    communication with them but must return tensors that are safe to use on the current stream.
    Inputs were not validated by the core (that would cost a sync); a backend checks what it can
    check for free and raises :class:`megatron_ep_plugins.errors.InvalidInputError` on every rank
    alike (never on one rank only, which would hang the others).

    Optional: ``release(group=None)``, called collectively before ``destroy_process_group(group)`` to free
    buffers that must not outlive the group (``docs/backend-contract.md``, ``megatron_ep_plugins.teardown``).
    """

    #: The registered backend name (the factory sets it).
    name: str

    def dispatch(
        self,
        x: "TokenTensor",
        topk_idx: "Tensor",
        topk_weights: "Tensor",
        num_experts: int,
        group: "torch.distributed.ProcessGroup",
        *,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> DispatchResult:
        """Send each token once to every rank owning one of its experts (token-major layout)."""
        ...

    def dispatch_cached(
        self,
        x: "Tensor",
        handle: Any,
        group: "torch.distributed.ProcessGroup",
        *,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> "Tensor":
        """Dispatch ``x`` ``[T, H]`` along the routing of ``handle`` (combine's backward)."""
        ...

    def combine(
        self,
        x: "Tensor",
        handle: Any,
        group: "torch.distributed.ProcessGroup",
        *,
        topk_weights: Optional["Tensor"] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple["Tensor", Optional["Tensor"]]:
        """Sum received rows back onto their source tokens (fp32 sum, cast to ``x.dtype``).

        With ``topk_weights`` ``[N, K]`` (dispatch's backward) also return ``[T, K]`` float32
        weights, each source entry taken from the rank that owns that expert; else ``None``.
        """
        ...

    def set_num_sms(self, num_sms: int) -> None:
        """Megatron's SM budget for communication kernels (``moe_flex_dispatcher_num_sms``)."""
        ...

    def agreement_key(self) -> Mapping[str, Any]:
        """Parameters every rank of a group must share (JSON-able scalars), checked once per group."""
        ...
