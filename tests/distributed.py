"""Run a function on N local ranks and collect results; a test helper, not product code.

``gloo`` ranks are forked processes (no re-import cost); ``nccl`` ranks are spawned, rank r on GPU r
(CUDA cannot be used in a forked child).

A rank that raises, dies or hangs fails the test within seconds, showing that rank's output:

* each rank's stdout and stderr (file descriptors 1 and 2, so C/C++ output too) go to files that are
  shown in the failure message; ``faulthandler`` prints the Python stacks of a rank that crashes,
  and of a rank that is still running when it is killed (``SIGUSR1`` first);
* a rank whose process ends without a result (``os._exit``, a signal, a segfault) is noticed at once
  (process liveness is polled while waiting), with its exit code;
* once one rank has failed, the others get ``grace`` seconds to finish and are then killed (they are
  typically waiting in a collective with the failed rank), instead of the whole ``timeout``.

``run_ranks(..., expect_failure=True)`` (or ``outcomes=True``) returns one :class:`RankOutcome` per
rank -- status, result or traceback, exit code, captured output -- for tests that expect a rank to
fail or die.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

#: Characters of each captured stream shown per rank in a failure message (the end is kept).
OUTPUT_TAIL = 6000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    """What happened on one rank.

    ``status``: ``"ok"`` (``fn`` returned ``value``), ``"raised"`` (``error`` is the traceback),
    ``"exited"`` (the process ended without a result; ``exitcode`` says how: negative = killed by that
    signal), ``"killed"`` (still running ``grace`` seconds after another rank failed), ``"hung"``
    (still running at ``timeout``).
    """

    rank: int
    status: str
    value: Any = None
    error: str = ""
    exitcode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self, tail: int = OUTPUT_TAIL) -> str:
        what = {"ok": "returned", "raised": "raised", "exited": f"process exited with code {self.exitcode} "
                "without a result", "killed": "killed: still running after another rank failed",
                "hung": "hung: no result before the timeout, killed"}[self.status]
        parts = [f"--- rank {self.rank}: {what} ---"]
        if self.error:
            parts.append(self.error.rstrip())
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text.strip():
                shown = text if len(text) <= tail else "[...]\n" + text[-tail:]
                parts.append(f"[rank {self.rank} {name}]\n{shown.rstrip()}")
        return "\n".join(parts)


def _redirect_output(out_path: str, err_path: str) -> None:
    """Send this process's fds 1/2 (and sys.stdout/err, logging, faulthandler) to the given files."""
    old = (sys.stdout, sys.stderr)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    loggers = [logging.getLogger()] + [obj for obj in logging.Logger.manager.loggerDict.values()
                                       if isinstance(obj, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in old:
                handler.setStream(sys.stderr if handler.stream is old[1] else sys.stdout)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def _worker(fn, rank, world_size, port, queue, args, env, backend, out_path, err_path):
    _redirect_output(out_path, err_path)
    os.environ.update(env or {})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    if backend != "nccl":
        # a forked rank inherits the parent's OpenMP state but not its worker threads: once the parent has run a
        # parallel CPU op (any test that computes in-process first), the child's first parallel region waits for
        # threads that do not exist and hangs. One intra-op thread per rank never opens a region (and is what 2
        # ranks on CI's 2 cores should use anyway).
        torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        queue.put((rank, True, pickle.dumps(result)))  # plain pickle: no shared-memory handles
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              env: dict[str, str] | None = None, backend: str = "gloo", grace: float = 5.0,
              expect_failure: bool = False, outcomes: bool = False) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank.

    ``backend="gloo"``: forked CPU ranks. ``backend="nccl"``: spawned ranks, rank r on GPU r.
    ``timeout``: seconds for the whole run. ``grace``: seconds the other ranks get once one rank has
    failed (raised, died), before they are killed. ``fn`` and its results must be picklable.

    Default: any rank failing raises ``AssertionError`` with every rank's status, traceback and
    captured output. ``outcomes=True``: return a :class:`RankOutcome` per rank instead of raising.
    ``expect_failure=True``: the same, and raise ``AssertionError`` if every rank succeeded.
    """
    for attempt in range(3):
        results = _launch(fn, world_size, args, timeout, env, backend, grace)
        # free_port() only finds a port that was free a moment ago: another process may bind it before rank 0's
        # store does (seen once on the GPU machine). Nothing ran yet then (rank 0 failed in init): launch again.
        if not any("EADDRINUSE" in (o.error or "") for o in results):
            break
    if expect_failure:
        if all(o.ok for o in results):
            raise AssertionError("expected a rank to fail, but every rank returned:\n"
                                 + "\n".join(o.describe() for o in results))
        return results
    if outcomes:
        return results
    if not all(o.ok for o in results):
        raise AssertionError("\n".join(o.describe() for o in results if not o.ok or o.stdout or o.stderr))
    return [o.value for o in results]


def _launch(fn, world_size, args, timeout, env, backend, grace) -> list[RankOutcome]:
    """One launch of ``world_size`` ranks on a fresh rendezvous port: every rank's outcome."""
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    queue = ctx.Queue()
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="run_ranks-")
    paths = [(os.path.join(tmp, f"rank{r}.out"), os.path.join(tmp, f"rank{r}.err")) for r in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args, env, backend, *paths[r]),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, RankOutcome] = {}
    failed_at: Optional[float] = None
    deadline = time.monotonic() + timeout

    def take(item) -> None:
        nonlocal failed_at
        rank, ok, value = item
        if ok:
            done[rank] = RankOutcome(rank, "ok", value=pickle.loads(value))
        else:
            done[rank] = RankOutcome(rank, "raised", error=value)
            failed_at = failed_at if failed_at is not None else time.monotonic()

    try:
        while len(done) < world_size:
            now = time.monotonic()
            if now >= deadline or (failed_at is not None and now >= failed_at + grace):
                break
            try:
                take(queue.get(timeout=0.05))
                continue
            except queue_module.Empty:
                pass
            for r, p in enumerate(procs):
                if r in done or p.exitcode is None:
                    continue
                try:  # a result put just before the process ended may still be in the pipe
                    while True:
                        take(queue.get(timeout=0.2))
                except queue_module.Empty:
                    pass
                if r not in done:
                    done[r] = RankOutcome(r, "exited", exitcode=p.exitcode)
                    failed_at = failed_at if failed_at is not None else time.monotonic()
        status = "killed" if failed_at is not None else "hung"
        stragglers = [r for r in range(world_size) if r not in done]
        for r in stragglers:
            if procs[r].is_alive() and hasattr(signal, "SIGUSR1"):
                os.kill(procs[r].pid, signal.SIGUSR1)  # faulthandler: where is it stuck?
        if stragglers:
            time.sleep(0.5)
        for r in stragglers:
            procs[r].kill()
            done[r] = RankOutcome(r, status, error=f"no result within {timeout}s" if status == "hung" else "")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for r, outcome in done.items():
            outcome.exitcode = procs[r].exitcode if outcome.exitcode is None else outcome.exitcode
            outcome.stdout, outcome.stderr = _read(paths[r][0]), _read(paths[r][1])
        shutil.rmtree(tmp, ignore_errors=True)
    return [done[r] for r in range(world_size)]


def package_log_messages() -> list:
    """A list that collects every message the package's logger (``megatron_ep_plugins``) emits from now on in
    this process; for checks that run inside a rank."""
    import logging

    messages: list = []

    class _Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_ep_plugins").addHandler(_Keep())
    return messages
