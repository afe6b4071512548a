"""Typed records exchanged between plugins and the core.

Everything a backend author needs besides :mod:`megatron_ep_plugins.hookspecs` lives here:

* :class:`BackendSpec` -- what a plugin registers (name, priority, capabilities, a cheap
  availability probe and a lazy factory);
* :class:`Availability` -- the probe's verdict, always with a human reason;
* :class:`Capabilities` -- what a backend declares it can do;
* :class:`EPBackend` -- the protocol the factory's product implements: the primitive
  dispatch/combine operations of the contract in ``shared/design/backend-contract.md``;
* :class:`DispatchResult` -- what :meth:`EPBackend.dispatch` returns.

This module imports nothing heavy: ``torch`` is only named in annotations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional, Protocol, Union

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    import torch.distributed

    Tensor = torch.Tensor
    #: bf16 ``[T, H]`` or, for FP8 dispatch, ``(e4m3 [T, H], fp32 scales [T, ceil(H/128)])``.
    TokenTensor = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "Availability",
    "BackendSpec",
    "Candidate",
    "Capabilities",
    "DispatchResult",
    "EPBackend",
    "NAME_PATTERN",
    "RESERVED_NAMES",
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
    """

    devices: tuple[str, ...] = ("cuda",)
    fp8_dispatch: bool = False
    uneven_tokens: bool = True
    async_overlap: bool = False
    deterministic_order: bool = True
    internode: bool = False
    autograd_probs: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "fp8_dispatch": self.fp8_dispatch,
            "uneven_tokens": self.uneven_tokens,
            "async_overlap": self.async_overlap,
            "deterministic_order": self.deterministic_order,
            "internode": self.internode,
            "autograd_probs": self.autograd_probs,
        }


@dataclass(frozen=True)
class BackendSpec:
    """One dispatch/combine implementation, as registered by a plugin.

    * ``name``: unique, see :data:`NAME_PATTERN`; what ``MCORE_EP_BACKEND`` names.
    * ``factory``: zero-argument callable returning an :class:`EPBackend`. Called once, at
      install time, never at discovery; this is where the backend library is imported.
    * ``probe``: zero-argument callable returning :class:`Availability`. Must be cheap (no GPU
      memory, no collectives, no JIT) and must not raise; a probe that raises is reported as
      unavailable with the exception as reason.
    * ``priority``: higher wins under ``MCORE_EP_BACKEND=auto``. Built-ins use 0 (``torch``) to
      300 (``elastic``); a third party that wants to beat them in ``auto`` says so explicitly.
    * ``aliases``: other names that select this backend (same rules as ``name``).
    * ``description``: one line for ``megatron-ep list``.
    * ``provider``: filled in by the plugin manager with the registering plugin's name; a
      plugin leaves it empty.
    * ``agreement_keys`` is not here on purpose: a live backend reports the parameters ranks must
      agree on through :meth:`EPBackend.agreement_key`, because they are known only at run time.
    """

    name: str
    factory: Callable[[], "EPBackend"]
    probe: Callable[[], Availability]
    priority: int = 0
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    description: str = ""
    provider: str = ""

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


class DispatchResult(NamedTuple):
    """What :meth:`EPBackend.dispatch` returns (Megatron's ``fused_dispatch`` 5-tuple).

    * ``recv_x``: ``[N, H]`` received rows (or the FP8 pair), one per (source token, this rank).
    * ``recv_topk_idx``: ``[N, K]`` int64 local expert ids, ``-1`` where the expert is elsewhere.
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
