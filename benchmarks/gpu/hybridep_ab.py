"""``hybridep`` with one host sync per dispatch against two, and against the bare ``HybridEPBuffer``, in one process.

``ep_bench.py`` runs each setting in its own processes, and on the 2 x H200 host the same host-bound code measured
568-942 us per dispatch from one process to the next. This script puts the three side by side in one process pair,
round robin (``AB_ROUNDS`` rounds of ``AB_ITERS`` dispatch+combine pairs each, after warm-up), so process-to-process
noise cancels out of the ratios:

* ``scan``: the adapter with ``MCORE_EP_HYBRIDEP_SCAN_COUNTS=1`` (HybridEP's preprocessing with its per-expert counts:
  one host sync, HybridEP's own);
* ``copy``: ``MCORE_EP_HYBRIDEP_SCAN_COUNTS=0`` (``HybridEPBuffer.dispatch`` as it is, then a copy of the counts to
  the host: two host syncs);
* ``bare``: ``HybridEPBuffer`` called directly with a precomputed routing map, as ``ep_bench.py``'s "direct".

T=4096 H=7168 K=8 E=256 bf16 unless ``AB_T``/``AB_H`` say otherwise. Rank 0 prints a markdown table and writes
``AB_OUT`` (default ``$OUT/hybridep_ab.json``). Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/hybridep_ab.py``.
"""
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from megatron_ep_plugins.backends.hybridep import HybridEPBackend  # noqa: E402
from megatron_ep_plugins.bench.measure import hybridep_direct_pair, time_pair  # noqa: E402

T, H = int(os.environ.get("AB_T", 4096)), int(os.environ.get("AB_H", 7168))
K, E = 8, 256
ROUNDS, ITERS = int(os.environ.get("AB_ROUNDS", 5)), int(os.environ.get("AB_ITERS", 20))
OUT = os.environ.get("AB_OUT") or os.path.join(os.environ.get("OUT", "/tmp"), "hybridep_ab.json")

DEVICE = os.environ.get("AB_DEVICE", "cuda")  # "cpu": a gloo smoke run over the CPU emulator (tests/emulators)

dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if DEVICE == "cuda":
    torch.cuda.set_device(rank)
group = dist.group.WORLD
gen = torch.Generator().manual_seed(1234 + rank)
x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(DEVICE)
idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(DEVICE)
w = torch.rand(T, K, generator=gen).to(DEVICE)


def adapter_case(scan: bool):
    backend = HybridEPBackend()
    backend._scan_counts = scan

    def d():
        return backend.dispatch(x, idx, w, E, group)

    def c(res):
        backend.combine(res.recv_x, res.handle, group)

    return d, c


def bare_case():
    return hybridep_direct_pair(HybridEPBackend()._HybridEPBuffer, x, idx, w, E, group, rank)


with torch.no_grad():
    cases = {"scan": adapter_case(True), "copy": adapter_case(False), "bare": bare_case()}
    for d, c in cases.values():  # JIT kernels, buffers, agreement, graphs
        for _ in range(5):
            c(d())
    rounds = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for name, (d, c) in cases.items():
            disp, comb = time_pair(d, c, ITERS, 2, DEVICE, group)
            rounds[name].append((statistics.median(disp) * 1e6, statistics.median(comb) * 1e6))

if rank == 0:
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rounds.items()}
    bare = sum(med["bare"])
    print(f"# hybridep: one host sync (scan) vs two (copy) vs bare HybridEPBuffer, one process, T={T} H={H} K={K} "
          f"E={E} bf16, {ROUNDS} rounds x {ITERS} pairs, median of round medians, slowest rank\n")
    print("| case | dispatch us | combine us | d+c us | bare/case | per round d+c us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, (dd, cc) in med.items():
        per = ", ".join(f"{a + b:.0f}" for a, b in rounds[k])
        print(f"| {k} | {dd:.1f} | {cc:.1f} | {dd + cc:.1f} | {bare / (dd + cc):.3f} | {per} |")
    import deep_ep

    record = {"T": T, "H": H, "K": K, "E": E, "rounds": ROUNDS, "iters": ITERS, "per_round_us": rounds,
              "median_us": med, "bare_over_case": {k: bare / sum(v) for k, v in med.items()},
              "machine": {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "python": platform.python_version(),
                          "torch": torch.__version__, "deep_ep": getattr(deep_ep, "__file__", "?")},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {OUT}")
# free the backends and buffers while the process group exists (as ep_bench does), then leave together
del cases
gc.collect()
dist.barrier()
dist.destroy_process_group()
