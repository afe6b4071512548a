"""The emulator's wire: an all-gather mailbox over the default torch store (test double only).

Each operation of a communicator gets the next sequence number (every rank must issue the same operations in
the same order, as with the real library). A rank posts one message ``(kind, payload)`` under
``<prefix>/op/<seq>/<rank>`` and reads every peer's. Two waiting disciplines:

* ``timeout_s=None`` -- the real code path has no timeout (NCCL bootstrap, HT kernels, handle creation):
  wait at most the emulator's hang watchdog ``NCCL_EP_EMULATOR_HANG_S`` (default 60 s), then raise
  :class:`EmulatedHang`, which says the real library would hang there.
* ``timeout_s=t`` -- an LL kernel's receive loop (``ll_ep.cuh``: ``clock64() - startTime <= timeoutCycles``,
  one budget from the kernel's start for every source rank): a peer not posted within ``t`` seconds is
  reported as timed out; the caller decides between trap and mask. Masked peers are not waited for
  (``isRankMasked`` skips them in the kernel).
"""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from typing import Any, Optional

import torch

DEVICE_FAULT: list[str] = []  # a sticky "CUDA error" of this process (a trapped kernel), see raise_if_faulted


class EmulatedHang(RuntimeError):
    """The real library would wait forever here (no GPU-side or host-side timeout on this path)."""


def raise_if_faulted() -> None:
    """A trapped kernel leaves the CUDA context unusable: every later call fails (sticky error)."""
    if DEVICE_FAULT:
        raise RuntimeError(DEVICE_FAULT[0])


def device_fault(text: str) -> RuntimeError:
    """Record and return the sticky error of a device-side trap (EP_DEVICE_ASSERT / timeout trap())."""
    message = f"CUDA error: unspecified launch failure (emulated device trap: {text})"
    if not DEVICE_FAULT:
        DEVICE_FAULT.append(message)
    return RuntimeError(DEVICE_FAULT[0])


def hang_seconds() -> float:
    return float(os.environ.get("NCCL_EP_EMULATOR_HANG_S", "60"))


def default_store():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("nccl emulator: Communicator.init needs torch.distributed to be initialized (the emulator "
                           "rendezvouses through the default store; real NCCL uses its own bootstrap sockets)")
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=False)


class Mailbox:
    def __init__(self, store, prefix: str, rank: int, nranks: int) -> None:
        self.store, self.prefix, self.rank, self.nranks = store, prefix, rank, nranks
        self.seq = 0

    def _wait(self, key: str, seconds: float) -> bool:
        if seconds <= 0:
            return self.store.check([key])
        try:
            self.store.wait([key], timedelta(seconds=seconds))
            return True
        except Exception:  # noqa: BLE001 - DistStoreError / RuntimeError on timeout
            return self.store.check([key])

    def exchange(self, kind: str, payload: Any, *, timeout_s: Optional[float] = None,
                 active: Optional[list[bool]] = None, what: str = "") -> tuple[list[Any], list[int]]:
        """Post ``payload``; return (payload per rank -- None where not received, ranks that timed out)."""
        self.seq += 1
        base = f"{self.prefix}/op/{self.seq}"
        self.store.set(f"{base}/{self.rank}", _dumps((kind, payload)))
        start = time.monotonic()
        out: list[Any] = [None] * self.nranks
        out[self.rank] = payload
        timed_out: list[int] = []
        for peer in range(self.nranks):
            if peer == self.rank or (active is not None and not active[peer]):
                continue
            key = f"{base}/{peer}"
            if timeout_s is None:
                if not self._wait(key, hang_seconds()):
                    raise EmulatedHang(
                        f"nccl emulator: rank {self.rank} waited {hang_seconds():.0f} s for rank {peer} in {what or kind} "
                        f"(operation #{self.seq}); the real library has no timeout on this path and would hang here")
            elif not self._wait(key, timeout_s - (time.monotonic() - start)):
                timed_out.append(peer)
                continue
            peer_kind, peer_payload = _loads(self.store.get(key))
            if peer_kind != kind:
                raise RuntimeError(
                    f"nccl emulator: operation #{self.seq} is {kind!r} on rank {self.rank} but {peer_kind!r} on rank "
                    f"{peer}: ranks must issue the same nccl.ep operations in the same order (the real library would "
                    "hang or exchange garbage)")
            out[peer] = peer_payload
            if self.store.add(f"{key}/reads", 1) == self.nranks - 1:
                self.store.delete_key(key)
                self.store.delete_key(f"{key}/reads")
        return out, timed_out
