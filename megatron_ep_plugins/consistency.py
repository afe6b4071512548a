"""Ranks agree or fail: one small collective per process group, before its first dispatch.

Every rank contributes a fixed-size byte record (backend name, the backend's
:meth:`~megatron_ep_plugins.spec.EPBackend.agreement_key`, package version) through a single
``all_gather``. A difference raises :class:`RankMismatchError` on every rank, naming the ranks and
their values, instead of hanging later in a collective whose shapes disagree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from .errors import RankMismatchError

__all__ = ["RECORD_BYTES", "check_agreement", "encode_record"]

RECORD_BYTES = 512


def encode_record(backend_name: str, key: Mapping[str, Any], version: str) -> bytes:
    """The record as fixed-size bytes; long records keep a readable prefix plus a digest."""
    text = json.dumps({"backend": backend_name, "version": version, **dict(key)}, sort_keys=True, default=str)
    raw = text.encode()
    if len(raw) > RECORD_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        raw = raw[: RECORD_BYTES - 20] + b"...#" + digest.encode()
    return raw.ljust(RECORD_BYTES, b"\0")


def check_agreement(group: Any, backend_name: str, key: Mapping[str, Any], version: str) -> None:
    """Collective over ``group``: raise on every rank if any rank's record differs."""
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
    lines = "\n".join(f"  global ranks {ranks}: {value}" for value, ranks in by_value.items())
    raise RankMismatchError(
        f"ranks of one expert-parallel group ({world} ranks) selected different backends or parameters:\n{lines}\n"
        "Set the same MCORE_EP_BACKEND (and backend MCORE_EP_* variables) and install the same "
        "megatron_ep_plugins and DeepEP versions on every rank."
    )
