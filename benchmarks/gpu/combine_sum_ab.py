"""The ``torch`` backend's combine sum on one GPU: eager gather + add, the Triton kernel, ``torch.compile``, one process.

For each token count T (``SUM_TOKENS``, default 256,1024,4096,8192,16384; H=7168 bf16 unless ``SUM_H``/``SUM_DTYPE``
say otherwise) it builds the block combine receives with two ranks (row 0 spare, then T rows from each rank,
a few tokens missing from one of them as with top-8 of 256 experts) and times, round robin over ``SUM_ROUNDS``
rounds of ``SUM_ITERS`` calls:

* ``eager``: ``index_select`` of both rows side by side + ``torch.add`` of the halves (what combine did);
* ``triton``: :func:`megatron_ep_plugins.backends._pair_sum.pair_sum` (one read of each row, one write);
* ``compiled``: ``torch.compile(dynamic=True)`` of the same expression (Inductor's fused kernel).

Per call: GPU time (CUDA events around the loop) and host time (wall clock of launching the loop, no sync
inside). Every variant's output is compared bit for bit with eager's. Writes ``SUM_OUT`` (default
``$OUT/combine_sum_ab.json``) and prints a markdown table. ``SUM_VARIANTS`` picks variants (default all three on
CUDA, ``eager,compiled`` on CPU); ``SUM_DEVICE=cpu SUM_VARIANTS=eager,triton TRITON_INTERPRET=1 SUM_DTYPE=float16``
is the CPU smoke run CI does (Triton's interpreter; it truncates fp32 -> bf16, so bf16 bits differ there).
"""
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from megatron_ep_plugins.backends._pair_sum import pair_sum  # noqa: E402

DEVICE = os.environ.get("SUM_DEVICE", "cuda")
H = int(os.environ.get("SUM_H", 7168))
DTYPE = getattr(torch, os.environ.get("SUM_DTYPE", "bfloat16"))
TOKENS = [int(t) for t in os.environ.get("SUM_TOKENS", "256,1024,4096,8192,16384").split(",")]
ROUNDS, ITERS = int(os.environ.get("SUM_ROUNDS", 5)), int(os.environ.get("SUM_ITERS", 20))
OUT = os.environ.get("SUM_OUT") or os.path.join(os.environ.get("OUT", "/tmp"), "combine_sum_ab.json")


def eager(back, bags):
    both = back.index_select(0, bags.view(-1)).view(bags.shape[0], 2, back.shape[1])
    return torch.add(both[:, 0], both[:, 1])


def _expr(back, bags):
    return (back[bags[:, 0]].float() + back[bags[:, 1]].float()).to(back.dtype)


compiled = torch.compile(_expr, dynamic=True)  # compiles at its first call only


def inputs(num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    missing = torch.rand(num_tokens, 2, generator=gen) < 0.004  # ~0.4 % of (token, rank) pairs get no row
    missing[missing.all(1), 0] = False
    counts = (~missing).sum(0)
    back = torch.randn(1 + int(counts.sum()), H, generator=gen).to(DTYPE)
    back[0] = 0
    pos = (~missing).t().reshape(-1).cumsum(0).view(2, num_tokens).t()  # 1 + send position, destination-major
    bags = torch.where(missing, 0, pos).contiguous()
    return back.to(DEVICE), bags.to(DEVICE)


def timed(fn, back, bags):
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(ITERS):
        fn(back, bags)
    host = (time.perf_counter() - t0) / ITERS * 1e6
    if DEVICE == "cuda":
        end.record()
        end.synchronize()
        gpu = start.elapsed_time(end) / ITERS * 1e3
    else:
        gpu = host
    return gpu, host


def main():
    known = {"eager": eager, "compiled": compiled, "triton": pair_sum}
    default = "eager,compiled,triton" if DEVICE == "cuda" else "eager,compiled"
    variants = {name: known[name] for name in os.environ.get("SUM_VARIANTS", default).split(",")}
    rows = []
    for num_tokens in TOKENS:
        back, bags = inputs(num_tokens)
        ref = eager(back, bags)
        same = {}
        for name, fn in variants.items():
            out = fn(back, bags)  # warm-up (compiles)
            same[name] = out is not None and torch.equal(out.view(torch.int16 if DTYPE != torch.float32 else torch.int32),
                                                         ref.view(torch.int16 if DTYPE != torch.float32 else torch.int32))
        samples = {name: ([], []) for name in variants}
        for _ in range(ROUNDS):
            for name, fn in variants.items():
                gpu, host = timed(fn, back, bags)
                samples[name][0].append(gpu)
                samples[name][1].append(host)
        row = {"tokens": num_tokens, "rows": back.shape[0]}
        for name in variants:
            row[name] = {"gpu_us": statistics.median(samples[name][0]), "host_us": statistics.median(samples[name][1]),
                         "bit_identical_to_eager": same[name]}
        for name in variants:
            row[f"eager_over_{name}"] = row["eager"]["gpu_us"] / row[name]["gpu_us"]
        rows.append(row)
    report = {"what": "combine's per-token sum of two rows", "hidden": H, "dtype": str(DTYPE), "rounds": ROUNDS,
              "iters": ITERS, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor(),
              "torch": torch.__version__, "python": platform.python_version(), "results": rows}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    print(f"| T | " + " | ".join(f"{n} GPU / host us" for n in variants) + " | eager / triton | bit-identical |")
    print("| --- " * (len(variants) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[n]['gpu_us']:.1f} / {r[n]['host_us']:.1f}" for n in variants)
        ratio = f"{r['eager_over_triton']:.2f}" if "triton" in variants else "-"
        print(f"| {r['tokens']} | {cells} | {ratio} | {all(r[n]['bit_identical_to_eager'] for n in variants)} |")
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
