"""Host time of one ``all_to_all_single`` call on NCCL, by how it is called (the ``torch`` backend makes three per dispatch).

On the 2 x H200 host a T=4096 dispatch of the ``torch`` backend is host-bound, and ``cProfile`` put ~70 us of host time
in each c10d ``all_to_all_single`` (``results/2xH200/diag/trace_slot/trace_torch_T4096.log``). This script separates
the Python wrapper from the C++ collective: for each variant, ``A2A_CALLS`` back-to-back calls on tiny tensors (the
GPU is never the bottleneck), host wall time per call, ``A2A_ROUNDS`` rounds round robin, median per variant:

* ``wrapper``: ``dist.all_to_all_single(out, inp, out_splits, in_splits, group=g)`` (what the backend calls);
* ``wrapper_even``: the same without split sizes (the header exchange);
* ``pg_direct``: ``g.alltoall_base(out, inp, out_splits, in_splits, opts).wait()`` (the C++ collective the wrapper ends in);
* ``pg_direct_async``: the same without ``wait()`` (the stream wait the wrapper adds for a synchronous call).

Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/a2a_host_cost.py``; rank 0 prints a table and writes ``A2A_OUT``
(default ``$OUT/a2a_host_cost.json``).
"""
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

CALLS, ROUNDS = int(os.environ.get("A2A_CALLS", 200)), int(os.environ.get("A2A_ROUNDS", 5))
OUT = os.environ.get("A2A_OUT") or os.path.join(os.environ.get("OUT", "/tmp"), "a2a_host_cost.json")
DEVICE = os.environ.get("A2A_DEVICE", "cuda")


def main():
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world)))
    inp = torch.zeros(4 * world, 8, device=DEVICE)
    out = torch.empty_like(inp)
    splits = [4] * world
    opts = dist.AllToAllOptions()
    variants = {
        "wrapper": lambda: dist.all_to_all_single(out, inp, splits, splits, group=group),
        "wrapper_even": lambda: dist.all_to_all_single(out, inp, group=group),
        "pg_direct": lambda: group.alltoall_base(out, inp, splits, splits, opts).wait(),
        "pg_direct_async": lambda: group.alltoall_base(out, inp, splits, splits, opts),
    }
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    samples = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        for _ in range(20):
            fn()
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            sync()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            samples[name].append((time.perf_counter() - t0) / CALLS * 1e6)
            sync()
    medians = {name: statistics.median(v) for name, v in samples.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, medians, group=group)
    if rank == 0:
        slowest = {name: max(m[name] for m in gathered) for name in variants}
        report = {"what": "host us per all_to_all_single call (slowest rank, median of rounds)", "calls": CALLS,
                  "rounds": ROUNDS, "world": world, "torch": torch.__version__, "python": platform.python_version(),
                  "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor(),
                  "host_us_per_call": slowest, "per_rank": gathered, "per_round": samples}
        print("| variant | host us per call |\n| --- | --- |")
        for name, v in slowest.items():
            print(f"| {name} | {v:.1f} |")
        os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
