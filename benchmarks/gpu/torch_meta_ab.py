"""The ``torch`` backend with its rows' metadata in the header exchange, against its own collective, one process.

Per token count T (``AB_TOKENS``, default 256,1024,4096,8192,16384; H=7168 K=8 E=256 bf16, ep_bench's inputs), in
``AB_ROUNDS`` rounds, each timing every path once (``AB_ITERS`` pairs after 3 warm-up pairs, CUDA events, slowest
rank per pair, as ``ep_bench``):

* ``header``: ``TorchA2ABackend`` as shipped (metadata in the header: two collectives per dispatch);
* ``separate``: the same class with ``meta_in_header = False`` (header, rows, metadata: three);
* ``raw``: ``all_to_all_single`` of the same deduplicated rows both ways, split sizes known (ep_bench's floor).

Both backend paths' outputs are compared bit for bit once per T (recv_x, ids, weights, counts, combine). Each
rank's host speed (us per ``sum(range(200))``, ``ep_bench``'s measure) is sampled before and after each T: the
numbers are host-bound at small T, and a rank on a slow vCPU of the 2 x H200 VM makes them slower.

Writes ``AB_OUT`` (default ``$OUT/torch_meta_ab.json``) and a markdown table next to it; rank 0 prints the table.
Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/torch_meta_ab.py`` (``AB_DEVICE=cpu``: gloo, a smoke run).
"""
import json
import os
import statistics
import sys
import types

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend  # noqa: E402
from megatron_ep_plugins.bench.measure import (dedup_rows, gather_host_speed, host_python_us, machine,  # noqa: E402
                                               time_pair, versions)
from megatron_ep_plugins.testing.reference import make_inputs  # noqa: E402

DEVICE = os.environ.get("AB_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
TOKENS = [int(t) for t in os.environ.get("AB_TOKENS", "256,1024,4096,8192,16384").split(",")]
H, K, E = int(os.environ.get("AB_H", 7168)), int(os.environ.get("AB_K", 8)), int(os.environ.get("AB_E", 256))
ROUNDS, ITERS = int(os.environ.get("AB_ROUNDS", 4)), int(os.environ.get("AB_ITERS", 20))
OUT = os.environ.get("AB_OUT") or os.path.join(os.environ.get("OUT", "/tmp"), "torch_meta_ab.json")

dist.init_process_group("nccl" if CUDA else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if CUDA:
    torch.cuda.set_device(rank)
dev = torch.device("cuda", rank) if CUDA else torch.device("cpu")
group = dist.group.WORLD


def backend_pair(backend, x, idx, probs):
    state = {}

    def d():
        res = backend.dispatch(x, idx, probs, E, group)
        state["y"] = res.recv_x
        return res.handle

    def c(handle):
        return backend.combine(state["y"], handle, group)

    return d, c


def raw_pair(x, idx):
    send, send_counts, recv_counts = dedup_rows(x, idx, E, group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv, back = send.new_empty(sum(recv_splits), send.shape[1]), torch.empty_like(send)

    def d():
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)

    def c(_):
        dist.all_to_all_single(back, recv, send_splits, recv_splits, group=group)

    return d, c


def same_outputs(a, b, x, idx, probs):
    ra, rb = a.dispatch(x, idx, probs, E, group), b.dispatch(x, idx, probs, E, group)
    ok = all(torch.equal(u, v) for u, v in zip(ra[:4], rb[:4]))
    return ok and torch.equal(a.combine(ra.recv_x, ra.handle, group)[0], b.combine(rb.recv_x, rb.handle, group)[0])


rows = []
for T in TOKENS:
    args = types.SimpleNamespace(seed=0, tokens=T, hidden=H, topk=K, experts=E, fp8=False)
    x, idx, probs, _ = make_inputs(args, rank, world, dev)
    header, separate = TorchA2ABackend(), TorchA2ABackend()
    separate.meta_in_header = False
    paths = {"header": backend_pair(header, x, idx, probs), "separate": backend_pair(separate, x, idx, probs),
             "raw": raw_pair(x, idx)}
    speed_before = gather_host_speed(host_python_us(), world, group)
    times = {k: ([], []) for k in paths}
    with torch.no_grad():
        identical = same_outputs(header, separate, x, idx, probs)
        for _ in range(ROUNDS):
            for k, (d, c) in paths.items():
                td, tc = time_pair(d, c, ITERS, 3, DEVICE, group)
                times[k][0].extend(td)
                times[k][1].extend(tc)
    speed_after = gather_host_speed(host_python_us(), world, group)
    med = {k: (statistics.median(td) * 1e6, statistics.median(tc) * 1e6) for k, (td, tc) in times.items()}
    raw = sum(med["raw"])
    row = {"tokens_per_rank": T, "identical_outputs": identical, "host_python_us_per_rank": [speed_before, speed_after],
           "meta_capacity": header._meta_cap.get(group, 0),
           **{f"{k}_us": {"dispatch": v[0], "combine": v[1]} for k, v in med.items()},
           "raw_over_header": raw / sum(med["header"]), "raw_over_separate": raw / sum(med["separate"]),
           "separate_over_header": sum(med["separate"]) / sum(med["header"])}
    rows.append(row)
    if rank == 0:
        print(f"T={T}: header {med['header'][0]:.0f}/{med['header'][1]:.0f} us, separate {med['separate'][0]:.0f}/"
              f"{med['separate'][1]:.0f} us, raw pair {raw:.0f} us; raw/header {row['raw_over_header']:.3f}, "
              f"raw/separate {row['raw_over_separate']:.3f}; identical {identical}; host us {speed_before} "
              f"{speed_after}", flush=True)

if rank == 0:
    report = {"machine": machine(DEVICE, world), "versions": versions(DEVICE),
              "config": {"H": H, "K": K, "E": E, "dtype": "bfloat16", "rounds": ROUNDS, "iters_per_round": ITERS},
              "rows": rows}
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)
    lines = ["# `torch` backend: metadata in the header exchange vs its own collective", "",
             f"{world} x {report['machine'].get('gpu', 'CPU (gloo)')}; torch {report['versions']['torch']}, NCCL "
             f"{report['versions']['nccl']}; H={H} K={K} E={E} bf16, {ROUNDS} rounds x {ITERS} pairs, paths "
             "alternating, median, slowest rank", "",
             "| T | header d / c us | separate d / c us | raw pair us | raw / header | raw / separate | "
             "separate / header | bits equal | host us by rank (before, after) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['tokens_per_rank']} | {r['header_us']['dispatch']:.0f} / {r['header_us']['combine']:.0f} | "
                     f"{r['separate_us']['dispatch']:.0f} / {r['separate_us']['combine']:.0f} | "
                     f"{sum(r['raw_us'].values()):.0f} | {r['raw_over_header']:.3f} | {r['raw_over_separate']:.3f} | "
                     f"{r['separate_over_header']:.3f} | {r['identical_outputs']} | {r['host_python_us_per_rank']} |")
    with open(os.path.splitext(OUT)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
dist.barrier()
dist.destroy_process_group()
