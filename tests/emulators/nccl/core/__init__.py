"""Emulated ``nccl.core`` (nccl4py 0.6.0): unique ids, ``Communicator.init`` and the properties nccl.ep reads.

Mirrors ``nccl/core/utils.py`` (``UniqueId``, ``get_unique_id``, ``get_version``) and
``nccl/core/communicator.py`` (``Communicator.init``, ``nranks``, ``rank``, ``n_lsa_teams``, ``gin_type``,
``device_api_support``, ``destroy``). Test double only: see ``tests/emulators/nccl/__init__.py``.

Emulator knobs (environment, read at ``Communicator.init``): ``NCCL_EMULATOR_GIN`` (``proxy`` default, or
``none``: what ``gin_type`` reports) and ``NCCL_EMULATOR_LSA_TEAMS`` (default 1: one NVLink domain).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Optional

from ._transport import Mailbox, default_store, hang_seconds
from .typing import NcclDataType, NcclGinType, NcclInvalid

IS_EMULATOR = True
__version__ = "0.6.0+emulator"
LIBNCCL_VERSION = os.environ.get("NCCL_EMULATOR_LIBNCCL_VERSION", "2.30.7")
UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
_MAGIC = b"EMUNCCL1"

__all__ = ["Communicator", "NcclDataType", "NcclGinType", "NcclInvalid", "UniqueId", "get_unique_id", "get_version"]


class UniqueId:
    """128 opaque bytes; transmit with :attr:`as_bytes` / :meth:`from_bytes` (nccl/core/utils.py UniqueId)."""

    def __init__(self, _internal: Optional[bytes] = None) -> None:
        self._internal = bytes(UNIQUE_ID_BYTES) if _internal is None else bytes(_internal)

    def __bytes__(self) -> bytes:
        return self._internal

    @staticmethod
    def from_bytes(b) -> "UniqueId":
        raw = bytes(b)
        if len(raw) != UNIQUE_ID_BYTES:
            raise NcclInvalid(f"UniqueId needs {UNIQUE_ID_BYTES} bytes, got {len(raw)}")
        return UniqueId(raw)

    @property
    def ptr(self) -> int:
        return id(self._internal)

    @property
    def as_bytes(self) -> bytes:
        return bytes(self)


def get_unique_id(empty: bool = False) -> UniqueId:
    """A new id on the calling rank (``empty=True``: zeros, to be filled by :meth:`UniqueId.from_bytes`)."""
    if empty:
        return UniqueId()
    return UniqueId((_MAGIC + secrets.token_bytes(16)).ljust(UNIQUE_ID_BYTES, b"\0"))


@dataclass(frozen=True)
class LibraryInfo:
    version: str
    cuda_variant: Optional[str]
    path: Optional[str]


@dataclass(frozen=True)
class VersionInfo:
    nccl4py: str
    nccl_bindings: str
    libnccl: Optional[LibraryInfo]


def get_version() -> VersionInfo:
    return VersionInfo(__version__, LIBNCCL_VERSION, LibraryInfo(LIBNCCL_VERSION, None, None))


class Communicator:
    """An initialised communicator of ``nranks`` ranks (nccl/core/communicator.py Communicator)."""

    def __init__(self, ptr: Optional[int] = None) -> None:
        if ptr:
            raise NcclInvalid("nccl emulator: wrapping a raw ncclComm_t pointer is not emulated")
        self._mailbox: Optional[Mailbox] = None
        self._nranks: Optional[int] = None
        self._rank: Optional[int] = None
        self._gin = NcclGinType.NONE
        self._lsa_teams = 1

    def _check_valid(self, operation: str) -> None:
        if self._mailbox is None:
            raise NcclInvalid(f"Cannot {operation}: Communicator not initialized")

    @classmethod
    def init(cls, nranks: int, rank: int, unique_id, config=None) -> "Communicator":
        """Collective (all ranks, same ``nranks`` and ``unique_id``): ``ncclCommInitRank``."""
        comm = cls()
        comm.initialize(nranks, rank, unique_id, config)
        return comm

    def initialize(self, nranks: int, rank: int, unique_id, config=None) -> None:
        if config is not None:
            raise NcclInvalid("nccl emulator: NCCLConfig is not emulated; pass config=None")
        if not isinstance(unique_id, UniqueId):
            raise NcclInvalid(f"unique_id has an invalid type: {type(unique_id).__name__}")
        if not isinstance(nranks, int) or not isinstance(rank, int) or nranks < 1 or not 0 <= rank < nranks:
            raise RuntimeError(f"ncclCommInitRank: invalid argument (nranks={nranks!r}, rank={rank!r}): "
                               "ncclInvalidArgument")
        raw = unique_id.as_bytes
        if not raw.startswith(_MAGIC):
            raise RuntimeError("ncclCommInitRank: the unique id was never filled in (all zeros on this rank): "
                               "broadcast the id from the rank that called get_unique_id() first")
        prefix = "nccl_emulator/" + raw[len(_MAGIC):len(_MAGIC) + 16].hex()
        store = default_store()
        if store.add(f"{prefix}/init/{rank}", 1) != 1:
            raise RuntimeError(f"ncclCommInitRank: rank {rank} joined unique id {prefix} twice")
        store.set(f"{prefix}/init/{rank}/nranks", str(nranks))
        from datetime import timedelta

        keys = [f"{prefix}/init/{r}/nranks" for r in range(nranks)]
        try:
            store.wait(keys, timedelta(seconds=hang_seconds()))
        except Exception as exc:  # noqa: BLE001
            from ._transport import EmulatedHang

            raise EmulatedHang(f"nccl emulator: ncclCommInitRank waited {hang_seconds():.0f} s for all {nranks} ranks "
                               "of the unique id; the real NCCL bootstrap would hang here") from exc
        seen = {int(store.get(k)) for k in keys}
        if seen != {nranks}:
            raise RuntimeError(f"ncclCommInitRank: ranks passed different nranks {sorted(seen)} for one unique id")
        self._mailbox = Mailbox(store, prefix, rank, nranks)
        self._nranks, self._rank = nranks, rank
        gin = os.environ.get("NCCL_EMULATOR_GIN", "proxy").strip().lower()
        self._gin = NcclGinType.NONE if gin in ("none", "0", "") else NcclGinType.PROXY
        self._lsa_teams = int(os.environ.get("NCCL_EMULATOR_LSA_TEAMS", "1"))
        if self._lsa_teams < 1 or nranks % self._lsa_teams:
            raise RuntimeError(f"nccl emulator: NCCL_EMULATOR_LSA_TEAMS={self._lsa_teams} does not divide {nranks}")

    # -- properties (nccl/core/communicator.py) -----------------------------------------------------------------
    @property
    def ptr(self) -> int:
        self._check_valid("read ptr")
        return id(self)

    @property
    def is_valid(self) -> bool:
        return self._mailbox is not None

    @property
    def nranks(self) -> int:
        self._check_valid("get nranks")
        return self._nranks

    @property
    def rank(self) -> int:
        self._check_valid("get rank")
        return self._rank

    @property
    def n_lsa_teams(self) -> int:
        self._check_valid("get n_lsa_teams")
        return self._lsa_teams

    @property
    def gin_type(self) -> NcclGinType:
        self._check_valid("get gin_type")
        return self._gin

    @property
    def device_api_support(self) -> bool:
        self._check_valid("get device_api_support")
        return True

    def destroy(self) -> None:
        self._mailbox = None

    def abort(self) -> None:
        self._mailbox = None
