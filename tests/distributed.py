"""Run a function on N local ranks (gloo, CPU) and collect results; a test helper, not product code.

Ranks are forked processes: no re-import cost, and a hung rank is killed after ``timeout`` seconds
so a broken collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, queue, args, env, backend):
    os.environ.update(env or {})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        if backend == "nccl":
            import torch

            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        queue.put((rank, True, pickle.dumps(result)))  # plain pickle: no shared-memory handles
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              env: dict[str, str] | None = None, backend: str = "gloo") -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank.

    ``backend="gloo"``: forked CPU ranks. ``backend="nccl"``: spawned ranks, rank r on GPU r (spawn,
    because CUDA cannot be used in a forked child).

    Any rank raising fails with every rank's traceback; a rank silent for ``timeout`` seconds fails
    with "hung". ``fn`` and its results must be picklable.
    """
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args, env, backend),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = queue.get(timeout=timeout)
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                errors.update({r: f"hung: no result within {timeout}s" for r in missing})
                break
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)))
    return [results[r] for r in range(world_size)]
