"""A set of long-lived rank processes with one process group, to run many small cases quickly.

``gloo`` ranks on CPU are forked (they inherit the parent's imports and any programmatic plugin registration);
``nccl`` ranks are spawned, rank ``r`` on GPU ``r``. :meth:`RankPool.run` sends one call to every rank and
collects the results. A rank that raises, dies, or is still busy ``grace`` seconds after another rank reported a
failure, or any rank busy past ``timeout``, ends the pool (it is restarted on the next call) and the outcome
says which rank did what -- a backend that raises on one rank only shows up as the others hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

__all__ = ["Outcome", "RankPool"]

#: Set in every rank: a rank's error must not make the others exit (the kit wants every rank's verdict).
RANK_ENV = {"MCORE_EP_FAULT_PROPAGATION": "0"}


@dataclass
class Outcome:
    """``status``: ok (``value`` is the function's result), raised (``error``), died, stuck."""

    rank: int
    status: str
    value: Any = None
    error: str = ""

    def describe(self) -> str:
        if self.status == "ok":
            return f"rank {self.rank}: returned"
        if self.status == "raised":
            return f"rank {self.rank}: raised\n{self.error}"
        if self.status == "died":
            return f"rank {self.rank}: process died ({self.error})"
        return f"rank {self.rank}: {self.error}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, env: dict, tasks, results) -> None:
    os.environ.update(env)
    import torch.distributed as dist

    try:
        if backend == "nccl":
            import torch

            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    except BaseException:  # noqa: BLE001
        results.put((-1, rank, "raised", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        seq, fn, args = task
        try:
            results.put((seq, rank, "ok", fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((seq, rank, "raised", traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class RankPool:
    """``world`` rank processes on ``device`` (``"cpu"``: gloo, forked; ``"cuda"``: NCCL, spawned)."""

    def __init__(self, world: int, device: str = "cpu", timeout: float = 120.0, grace: float = 3.0,
                 env: Optional[dict] = None) -> None:
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.world, self.device, self.timeout, self.grace = world, device, timeout, grace
        self.env = dict(RANK_ENV) | dict(env or {})
        self._procs: list = []
        self._tasks: list = []
        self._results = None
        self._seq = 0
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("spawn" if self.device == "cuda" else "fork")
        backend = "nccl" if self.device == "cuda" else "gloo"
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world, port, backend, self.env, self._tasks[r],
                                                         self._results), daemon=True)
                       for r in range(self.world)]
        with warnings.catch_warnings():  # the parent's only threads are queue feeders of other pools, idle here
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
            for p in self._procs:
                p.start()

    def close(self) -> None:
        """End the rank processes (politely, then by force)."""
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._procs, self._tasks, self._results = [], [], None

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one call on every rank ----------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, failed: Optional[Callable[[Any], bool]] = None,
            timeout: Optional[float] = None) -> list[Outcome]:
        """Call ``fn(*args)`` on every rank; ``failed(value)`` marks a returned value as a failure (which starts
        the grace period for the other ranks, as a raise does)."""
        if not self._procs:
            self._start()
        self._seq += 1
        seq = self._seq
        for q in self._tasks:
            q.put((seq, fn, args))
        done: dict[int, Outcome] = {}
        failed_at: Optional[float] = None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(done) < self.world:
            now = time.monotonic()
            if now >= deadline or (failed_at is not None and now >= failed_at + self.grace):
                break
            try:
                got_seq, rank, status, value = self._results.get(timeout=0.05)
            except queue_module.Empty:
                for r, p in enumerate(self._procs):
                    if r not in done and not p.is_alive():
                        done[r] = Outcome(r, "died", error=f"exit code {p.exitcode}")
                        failed_at = failed_at if failed_at is not None else time.monotonic()
                continue
            if got_seq == -1:  # start-up failure
                done[rank] = Outcome(rank, "raised", error=value)
                failed_at = failed_at if failed_at is not None else time.monotonic()
            elif got_seq == seq:
                done[rank] = Outcome(rank, status, value=value if status == "ok" else None,
                                     error=value if status != "ok" else "")
                if status != "ok" or (failed is not None and failed(value)):
                    failed_at = failed_at if failed_at is not None else time.monotonic()
        if len(done) < self.world:
            why = (f"still running {self.grace:g} s after another rank failed (a backend must raise on every rank "
                   "alike, or the others wait in the collective forever)" if failed_at is not None else
                   f"no result within {self.timeout if timeout is None else timeout:g} s (hung)")
            for r in range(self.world):
                done.setdefault(r, Outcome(r, "stuck", error=why))
            self._kill()
            self.restarts += 1
        elif any(o.status in ("raised", "died") for o in done.values()):
            self._kill()  # a rank left mid-collective: start clean next time
            self.restarts += 1
        return [done[r] for r in range(self.world)]
