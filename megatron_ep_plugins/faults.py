"""An error one rank hits inside the slot reaches every rank of the group, instead of a hang.

Dispatch and combine are collective: when one rank raises before (or instead of) entering the
communication kernel, the other ranks wait in it until a timeout, often tens of minutes, and their
logs say nothing about why. This module turns that into a readable stop within a few seconds, with
no cost on the hot path:

* **Publish** (failure path only). When a slot function -- dispatch, combine, their backward passes
  (combine, cached dispatch) -- raises any ``Exception`` on a rank (a
  :mod:`megatron_ep_plugins.errors` error, a CUDA out-of-memory, a backend assertion: each one leaves
  the peers waiting), that rank appends a short record ``{rank, op, error}`` to the default process
  group's store under a key namespaced by the group (a hash of its sorted global ranks), then
  re-raises the original exception unchanged. The slot's ``try``/``except`` costs nothing while no
  exception is raised (zero-cost exception handling, Python 3.11+; ``benchmarks/host_overhead.py``
  times it).
* **Watch**. Each process runs one daemon thread per process group, started at the group's first
  dispatch (before the rank-agreement check, so no peer's record can predate it). It polls the next
  record key once per :data:`POLL_S` seconds with ``store.check`` (one small request; no store
  traffic at start-up, no per-call work; beyond :data:`MAX_CHECKS_PER_S` x :data:`POLL_S` ranks the
  interval grows with the world size, so the store serves at most that many checks per second). Records are numbered per rank: a peer's n-th failure in
  the group is matched with this rank's own n-th failure, because an error a backend detects
  collectively is raised by every rank at the same call. When a peer's record appears and this rank
  has failed as often (before, or within :data:`GRACE_S` seconds after), the watcher does nothing:
  the rank reports its own error. Otherwise it prints one line, e.g.
  ``megatron_ep_plugins: rank 1 failed in dispatch: InvalidInputError: ...; rank 0 stops too
  instead of waiting in the collective``, and ends the process with ``os._exit(1)``, as PyTorch's
  NCCL async error handling ends a process whose collective can no longer complete.

Why polling, not a thread blocked in ``store.wait``: a ``TCPStore`` client serialises its requests,
so a blocked ``wait`` stalls every other store request of the process (communicator creation,
barriers) until it times out; each timeout prints C++ warnings; and a ``wait`` that returns while
the interpreter finalizes aborts the process (``terminate called without an active exception``,
exit code 134). A ``check`` holds the client for one round trip and prints nothing.

``MCORE_EP_FAULT_PROPAGATION`` (default ``1``) turns all of it off when ``0``; it is read once, when
the slot is built. Without an initialised default process group (no store) nothing is watched or
published. Nothing outlives its purpose: the thread is a daemon, stops when the slots that started it
are gone (``uninstall()``), when the default process group is destroyed or replaced, at interpreter
exit (joined, so it never runs during finalization), and a forked child starts with no watchers.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import threading
import time
import weakref
from typing import Any, Mapping, Optional

from .config import _FALSE, _TRUE
from .errors import ConfigError

__all__ = ["ENV", "GRACE_S", "POLL_S", "FaultReporter", "active_watchers", "enabled", "group_namespace",
           "stop_all"]

#: The switch; ``1`` (default) on, ``0`` off. Read once per :func:`build_slot`, never per call.
ENV = "MCORE_EP_FAULT_PROPAGATION"
#: Seconds between two checks of the store for a peer's record (detection latency).
POLL_S = 1.0
#: Upper bound on the store checks per second all ranks together make for fault watching: in jobs of
#: more than ``POLL_S * MAX_CHECKS_PER_S`` ranks each rank polls less often (world size / this seconds).
MAX_CHECKS_PER_S = 5000
#: Seconds a rank waits after a peer's record before stopping, to let its own (same) error surface first.
GRACE_S = 2.0
#: Store key prefix; a group's keys are ``{KEY_ROOT}/{namespace}/count`` and ``.../{n}`` (n = 1, 2, ...).
KEY_ROOT = "megatron_ep_plugins/faults"
#: Longest error message a record carries (characters).
MESSAGE_CHARS = 800


def enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``MCORE_EP_FAULT_PROPAGATION`` asks for fault propagation (default: yes)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip().lower()
    if value == "" or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{ENV}={value!r} is not a boolean: use 1 (stop every rank of the group when one rank "
                      f"fails inside dispatch/combine) or 0 (do not)")


def group_namespace(group: Any) -> Optional[str]:
    """``{KEY_ROOT}/{hash of the group's sorted global ranks}``, or ``None`` when there is no store."""
    dist = _dist()
    if dist is None:
        return None
    try:
        ranks = sorted(dist.get_process_group_ranks(group))
    except Exception:  # noqa: BLE001 - not a process group of this world
        return None
    digest = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:16]
    return f"{KEY_ROOT}/{digest}"


def _dist():
    """``torch.distributed`` when a default process group (hence a store) exists, else ``None``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _one_line(text: str) -> str:
    line = " / ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


# -- process-wide state (reset in a forked child) ---------------------------------------------------------
_lock = threading.Lock()
_watchers: dict[str, "_Watcher"] = {}
_own_faults: dict[str, int] = {}  # namespace -> how many faults this process has published in that group
_atexit_registered = False


class FaultReporter:
    """One slot's handle on fault propagation (the slot holds it; watchers hold it weakly).

    ``watch(group)`` at a group's first dispatch, ``report(exc, op, group)`` when a slot function
    raises. When every reporter that asked to watch a group is gone (the slot was uninstalled and
    dropped), that group's watcher stops.
    """

    __slots__ = ("__weakref__",)

    def watch(self, group: Any) -> None:
        dist = _dist()
        if dist is None:
            return
        namespace = group_namespace(group)
        if namespace is None:
            return
        try:
            store = _default_store()
        except Exception:  # noqa: BLE001 - no store: nothing to watch
            return
        with _lock:
            watcher = _watchers.get(namespace)
            if watcher is None or not watcher.is_alive():
                watcher = _Watcher(namespace, dist.get_rank(), store, dist.get_world_size())
                watcher.reporters.add(self)
                _watchers[namespace] = watcher
                _ensure_atexit()
                watcher.start()
            else:
                watcher.reporters.add(self)

    def report(self, exc: BaseException, op: str, group: Any) -> None:
        """Publish ``exc`` (raised by this rank in ``op`` on ``group``); never raises itself."""
        try:
            if getattr(exc, "_megatron_ep_fault_published", False):
                return
            try:
                exc._megatron_ep_fault_published = True  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - an exception type with __slots__
                pass
            dist = _dist()
            namespace = group_namespace(group) if dist is not None else None
            if namespace is None:
                return
            seq = _own_faults[namespace] = _own_faults.get(namespace, 0) + 1
            record = json.dumps({"rank": dist.get_rank(), "seq": seq, "op": op,
                                 "error": _one_line(f"{type(exc).__name__}: {exc}")})
            store = _default_store()
            number = store.add(f"{namespace}/count", 1)
            store.set(f"{namespace}/{number}", record)
        except Exception:  # noqa: BLE001 - the original error matters, not a failed report
            pass


class _Watcher(threading.Thread):
    def __init__(self, namespace: str, rank: int, store: Any, world_size: int = 1) -> None:
        super().__init__(name=f"megatron-ep-faults[{namespace.rsplit('/', 1)[-1]}]", daemon=True)
        self.namespace, self.rank = namespace, rank
        self.store_ref = weakref.ref(store)
        self.reporters: "weakref.WeakSet[FaultReporter]" = weakref.WeakSet()
        self.stopping = threading.Event()
        self.next = 1
        self.world_size = world_size

    def poll_interval(self) -> float:
        return max(POLL_S, self.world_size / MAX_CHECKS_PER_S)

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.poll_interval()):
                store = self._store()
                if store is None or self._unwanted():
                    return
                key = f"{self.namespace}/{self.next}"
                try:
                    if not store.check([key]):
                        continue
                    raw = store.get(key)
                except Exception:  # noqa: BLE001 - store gone (peer host exited): stop quietly
                    return
                self.next += 1
                self._on_record(raw)
        finally:
            self._unregister()

    def _unwanted(self) -> bool:
        """No live slot watches this group any more (uninstalled): leave the registry, atomically."""
        with _lock:
            if self.reporters:
                return False
            self._unregister_locked()
            return True

    def _unregister(self) -> None:
        with _lock:
            self._unregister_locked()

    def _unregister_locked(self) -> None:
        if _watchers.get(self.namespace) is self:
            del _watchers[self.namespace]

    def _store(self) -> Any:
        """The store this watcher started on, while it is still the default process group's."""
        store = self.store_ref()
        if store is None or _dist() is None:
            return None
        try:
            return store if _default_store() is store else None
        except Exception:  # noqa: BLE001
            return None

    def _on_record(self, raw: bytes) -> None:
        try:
            record = json.loads(raw)
            peer, seq, op, error = int(record["rank"]), int(record["seq"]), str(record["op"]), str(record["error"])
        except Exception:  # noqa: BLE001 - not ours to interpret
            return
        if peer == self.rank:
            return
        # The peer's seq-th failure in this group. An error a backend detects collectively is raised by every
        # rank at the same call, so this rank's own seq-th failure is the same event: whether it came first or
        # comes within the grace period, this rank reports it itself and is not stopped.
        if _own_faults.get(self.namespace, 0) >= seq:
            return
        if self.stopping.wait(GRACE_S) or _own_faults.get(self.namespace, 0) >= seq:
            return
        if not self.reporters or self._store() is None:
            return  # uninstalled or torn down meanwhile
        line = (f"megatron_ep_plugins: rank {peer} failed in {op}: {error}; rank {self.rank} stops too instead of "
                f"waiting in the collective ({ENV}=0 turns this off)")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        try:
            os.write(2, (line + "\n").encode(errors="replace"))
        finally:
            os._exit(1)


def active_watchers() -> dict[str, int]:
    """Namespaces watched by this process and how many live slots asked for each (for tests, ``explain``)."""
    with _lock:
        return {ns: len(w.reporters) for ns, w in _watchers.items() if w.is_alive()}


def stop_all(timeout: float = 2.0) -> None:
    """Stop every watcher of this process and wait for them (run at interpreter exit)."""
    with _lock:
        watchers = list(_watchers.values())
    for watcher in watchers:
        watcher.stopping.set()
    deadline = time.monotonic() + timeout
    for watcher in watchers:
        if watcher.is_alive() and watcher is not threading.current_thread():
            watcher.join(max(0.0, deadline - time.monotonic()))


def _ensure_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(stop_all)
        _atexit_registered = True


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _watchers.clear()  # their threads do not exist in the child
    _own_faults.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
