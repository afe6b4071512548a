"""The timing both GPU diagnostics use (``host_gap.py``, ``trace_slot.py``): cold calls, interleaved."""
import statistics
import time

import torch
import torch.distributed as dist


def interleaved(cases, iters, device):
    """Median wall microseconds per call of each case (``{name: fn}``), slowest rank. Round robin: each iteration
    times every case once, so warm-up and clock drift hit them alike; the device is synchronised and the ranks
    barrier before each call, so host time is not hidden behind queued GPU work (a cold call, as in a step)."""
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for fn in cases.values():
        for _ in range(3):
            fn()
    per = {k: [] for k in cases}
    for _ in range(iters):
        for k, fn in cases.items():
            sync()
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            per[k].append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(v) * 1e6 for v in per.values()], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(per, t.tolist()))
