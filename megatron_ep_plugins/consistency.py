"""Ranks agree or fail: once per process group, before its first dispatch, through the group's store.

Every rank publishes one record -- backend name, package version, and the backend's
:meth:`~megatron_ep_plugins.spec.EPBackend.agreement_key` under its own key, so a backend can never
overwrite the core's fields -- in the default process group's store, then (unless
``MCORE_EP_CHECK_RANKS=0``) waits for the others, with a timeout. Per rank that is O(1) store
requests, whatever the world size:

1. ``add(n/<digest>, 1)`` counts the ranks holding this exact record; the first of them also
   ``set(rec/<digest>, record)`` (one copy per distinct record);
2. ``append(who, "<rank>:<digest>,")`` and ``add(arrived, 1)``; the last rank to arrive sets ``done``;
3. ``wait(done, timeout)``, then ``add(n/<digest>, 0)``: equal to the group size means every rank
   holds this record. Otherwise every rank reads ``who`` and the distinct records (failure path
   only) and raises :class:`RankMismatchError` naming the ranks and their values.

A rank with ``MCORE_EP_CHECK_RANKS=0`` still publishes (steps 1-2) but does not wait: ranks that do
check still see its record, so ranks disagreeing on ``MCORE_EP_CHECK_RANKS`` fail cleanly on any
real difference instead of hanging in a collective. Ranks that never arrive make the others raise
:class:`RankTimeoutError` after ``MCORE_EP_CHECK_RANKS_TIMEOUT`` seconds, naming the silent ranks.
Without a store (no default process group) the check falls back to one ``all_gather``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any, Mapping, Optional

from .errors import RankMismatchError, RankTimeoutError

__all__ = ["KEY_ROOT", "RECORD_BYTES", "check_agreement", "encode_record", "record_text"]

RECORD_BYTES = 512
#: Store key prefix; a group's keys are ``{KEY_ROOT}/{hash of its sorted global ranks}/{round}/...``.
KEY_ROOT = "megatron_ep_plugins/agree"
_rounds: dict[str, int] = {}  # group hash -> checks this process has started on it

_FIX = ("Set the same MCORE_EP_BACKEND (and backend MCORE_EP_* variables) and install the same "
        "megatron_ep_plugins and DeepEP versions on every rank.")


def record_text(backend_name: str, key: Mapping[str, Any], version: str) -> str:
    """The record as JSON: the core's fields and the backend's key side by side, never merged."""
    return json.dumps({"backend": backend_name, "version": version, "key": dict(key)}, sort_keys=True, default=str)


def encode_record(backend_name: str, key: Mapping[str, Any], version: str) -> bytes:
    """The record as fixed-size bytes (for the all_gather fallback); long records keep a prefix plus a digest."""
    raw = record_text(backend_name, key, version).encode()
    if len(raw) > RECORD_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        raw = raw[: RECORD_BYTES - 20] + b"...#" + digest.encode()
    return raw.ljust(RECORD_BYTES, b"\0")


def _mismatch(world: int, by_value: Mapping[str, list[int]]) -> RankMismatchError:
    lines = "\n".join(f"  global ranks {sorted(ranks)}: {value}" for value, ranks in by_value.items())
    return RankMismatchError(
        f"ranks of one expert-parallel group ({world} ranks) selected different backends or parameters:\n"
        f"{lines}\n{_FIX}")


def _store() -> Optional[Any]:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default group, or a build without it
        return None


def check_agreement(group: Any, backend_name: str, key: Mapping[str, Any], version: str, *,
                    wait: bool = True, timeout: float = 300.0) -> None:
    """Publish this rank's record for ``group``; with ``wait``, raise on every rank unless all agree.

    :raises RankMismatchError: ranks hold different records (the message groups ranks by value).
    :raises RankTimeoutError: some ranks did not publish within ``timeout`` seconds (named).
    """
    import torch.distributed as dist

    text = record_text(backend_name, key, version)
    store = _store()
    if store is None:
        if wait:
            _gather_check(group, backend_name, key, version)
        return
    ranks = sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    world, me = len(ranks), dist.get_rank()
    group_hash = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:16]
    number = _rounds[group_hash] = _rounds.get(group_hash, 0) + 1
    base = f"{KEY_ROOT}/{group_hash}/{number}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]

    if store.add(f"{base}/n/{digest}", 1) == 1:
        store.set(f"{base}/rec/{digest}", text)
    store.append(f"{base}/who", f"{me}:{digest},")
    if store.add(f"{base}/arrived", 1) == world:
        store.set(f"{base}/done", "1")
    if not wait:
        return
    try:
        store.wait([f"{base}/done"], timedelta(seconds=timeout))
    except Exception:  # noqa: BLE001 - DistStoreError "Wait timeout" (or the store's own deadline)
        arrived = _who(store, base)
        silent = [r for r in ranks if r not in arrived]
        raise RankTimeoutError(
            f"global ranks {silent} of this expert-parallel group ({world} ranks: {ranks}) did not reach the "
            f"backend agreement check within {timeout:g} s (MCORE_EP_CHECK_RANKS_TIMEOUT); ranks "
            f"{sorted(arrived)} did. A silent rank failed or stopped before its first dispatch, uses another "
            f"dispatcher, or is still starting; its own log says which. This rank chose: {text}") from None
    if int(store.add(f"{base}/n/{digest}", 0)) == world:
        return
    who = _who(store, base)
    by_value: dict[str, list[int]] = {}
    for rank, d in sorted(who.items()):
        try:
            value = store.get(f"{base}/rec/{d}").decode(errors="replace")
        except Exception:  # noqa: BLE001
            value = f"(record {d} unreadable)"
        by_value.setdefault(value, []).append(rank)
    raise _mismatch(world, by_value)


def _who(store: Any, base: str) -> dict[int, str]:
    try:
        raw = store.get(f"{base}/who").decode()
    except Exception:  # noqa: BLE001 - nobody arrived
        return {}
    out = {}
    for item in raw.split(","):
        rank, _, digest = item.partition(":")
        if rank.strip().isdigit():
            out[int(rank)] = digest
    return out


def _gather_check(group: Any, backend_name: str, key: Mapping[str, Any], version: str) -> None:
    """One ``all_gather`` of fixed-size records (every rank of ``group`` must call it)."""
    import torch
    import torch.distributed as dist

    record = encode_record(backend_name, key, version)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.frombuffer(bytearray(record), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    values = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
    if len(set(values)) == 1:
        return
    by_value: dict[str, list[int]] = {}
    for group_rank, value in enumerate(values):
        by_value.setdefault(value, []).append(dist.get_global_rank(group, group_rank))
    raise _mismatch(world, by_value)
