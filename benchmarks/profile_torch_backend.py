"""Where the time of the ``torch`` backend goes: each piece of a dispatch and a combine, timed.

For every implementation named by ``--impl`` (default: the installed
``megatron_ep_plugins/backends/torch_a2a.py``; any other copy of that module by path, e.g. the old one
from git, in the same run and on the same inputs):

* **end to end**, no instrumentation: dispatch, combine (and, with ``--backward``, combine with
  weights and a cached dispatch, the two backward calls); CUDA events on GPU, ``perf_counter`` after a
  barrier on CPU; the slowest rank per iteration, median over ``--iters``;
* **pieces**: the same calls under a recording ``TorchDispatchMode`` that sees every aten op the module
  runs, with ``all_to_all_single`` (and ``torch.cuda.Event.synchronize``) wrapped. Each op is put into a
  piece by what it is (see ``Pieces``), so a module needs no hooks: the old implementation is profiled
  exactly as it is. GPU: CUDA events at each change of piece, the device synchronised there (so pieces
  never overlap; only in this mode); CPU: ``perf_counter`` around each op. An untimed barrier before
  each collective lines the ranks up, so a collective's time is the exchange itself. Per piece the
  slowest rank per iteration, median over iterations. ``unattributed`` = end to end minus the pieces: Python between
  ops, kernel-launch gaps and, on GPU, the pipeline drains a host sync causes (pieces are serialised
  here, so overlap the real run gets shows up as a negative number);
* **floors** (once per size, no module involved): the raw ``all_to_all_single`` pair of the same
  deduplicated rows both ways with split sizes known, and the same plus the count exchange and its
  host sync; ``raw / pair`` = raw pair time / (dispatch + combine) time.

Launch::

    python benchmarks/profile_torch_backend.py --impl old=/tmp/old_torch_a2a.py \
        --impl new=megatron_ep_plugins/backends/torch_a2a.py
        # CPU: spawns --nproc (2) gloo ranks; defaults T=256 H=256 K=4 E=8 bf16
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --nproc-per-node 2 benchmarks/profile_torch_backend.py --impl old=/tmp/old_torch_a2a.py --impl new
        # GPU, NCCL; defaults T=4096 H=7168 K=8 E=256 bf16 (--tokens 256,1024,4096 for a sweep)

(``git show 459f634:megatron_ep_plugins/backends/torch_a2a.py > /tmp/old_torch_a2a.py`` gives the
implementation before issue 7.) Rank 0 prints a markdown table and writes ``--out`` (JSON: machine,
versions, sizes, settings, every median, the ops seen in each piece) and the table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path and importlib.util.find_spec("megatron_ep_plugins") is None:
    sys.path.insert(0, str(REPO))

GPU_DEFAULTS = dict(tokens="4096", hidden=7168, topk=8, experts=256, iters=50, warmup=10)
CPU_DEFAULTS = dict(tokens="256", hidden=256, topk=4, experts=8, iters=30, warmup=5)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
INSTALLED = "megatron_ep_plugins.backends.torch_a2a"

DISPATCH_PIECES = ("routing + header build", "header exchange", "host sync", "index building + metadata pack",
                   "row gather (packing)", "row collective", "metadata collective", "unpack + handle")
COMBINE_PIECES = ("row collective", "sum + cast", "weights collective", "other")


# ---------------------------------------------------------------------------------------------------
# arguments and implementations
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    from megatron_ep_plugins.bench.cli import add_size_options, apply_device_defaults

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", action="append", default=None, metavar="[LABEL=]PATH",
                    help="a copy of torch_a2a.py to profile (repeatable; LABEL defaults to the file name; "
                         "PATH 'installed' = the package's module); default: installed")
    add_size_options(ap, GPU_DEFAULTS, CPU_DEFAULTS)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--backward", action="store_true",
                    help="also time combine with weights and the cached dispatch (the backward calls)")
    ap.add_argument("--no-pieces", dest="pieces", action="store_false",
                    help="end to end and floors only (no per-piece profile)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every rank; default: torch's own, except that self-spawned "
                         "ranks get 1 when OMP_NUM_THREADS is unset, as torchrun does for several ranks per host")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun (default 2)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_torch_backend.json"),
                    help="JSON file to write (a directory: DIR/profile_torch_backend.json); the markdown table "
                         "goes next to it with the suffix .md")
    args = ap.parse_args(argv)
    apply_device_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    args.token_list = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    args.impls = parse_impls(args.impl or ["installed"])
    out = Path(args.out)
    args.out = str(out / "profile_torch_backend.json" if out.is_dir() or not out.suffix else out)
    return args


def parse_impls(specs):
    impls, labels = [], set()
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if path in ("installed", ""):
            path = "installed"
        elif not Path(path).is_file():
            raise SystemExit(f"--impl {spec!r}: no such file {path!r}")
        label = label or ("installed" if path == "installed" else Path(path).stem)
        if label in labels:
            raise SystemExit(f"--impl: label {label!r} given twice; name them LABEL=PATH")
        labels.add(label)
        impls.append((label, path))
    return impls


def load_impl(label, path):
    """The module at ``path`` as a sibling of the installed one (its relative imports resolve)."""
    if path == "installed":
        return importlib.import_module(INSTALLED)
    name = "megatron_ep_plugins.backends._profiled_" + re.sub(r"\W", "_", label)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def impl_info(label, path):
    real = Path(importlib.util.find_spec(INSTALLED).origin if path == "installed" else path).resolve()
    return {"label": label, "path": str(real), "sha256": hashlib.sha256(real.read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------------------------------
# clocks: GPU events at each change of piece (device synchronised there), CPU perf_counter per op
# ---------------------------------------------------------------------------------------------------
class CudaClock:
    per_op = False

    def __init__(self):
        import torch

        self.torch = torch
        self.times = defaultdict(float)
        self.current, self.start = None, None

    def switch(self, piece):
        if piece == self.current:
            return
        torch = self.torch
        if self.current is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()  # NCCL's stream too: nothing of this piece is left running
            self.times[self.current] += self.start.elapsed_time(end) * 1e3
        else:
            torch.cuda.synchronize()
        self.current = piece
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record()

    def run(self, piece, fn):
        self.switch(piece)
        return fn()

    def close(self):
        self.switch(None)


class CpuClock:
    per_op = True

    def __init__(self):
        self.times = defaultdict(float)

    def run(self, piece, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.times[piece] += (time.perf_counter() - t0) * 1e6

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------------
# pieces: which piece an op belongs to, judged by what it is and where it runs
# ---------------------------------------------------------------------------------------------------
SYNC_OPS = ("aten.nonzero.", "aten._local_scalar_dense", "aten.item", "aten.bincount", "aten.unique",
            "aten._unique", "aten.masked_select")


class Pieces:
    """Classification of one call's ops.

    Dispatch: collectives in order (the first is the header exchange; one moving ``[*, H]`` rows of x's
    dtype is the row collective; any other the metadata collective); ops that sync the host on CUDA
    (``nonzero``, ``bincount``, ``.item()``, a device-to-host copy, ``Event.synchronize``) are the host
    sync; ``index``/``index_select`` of ``x`` is the row gather; any other op is routing + header before
    the header exchange, index building + metadata pack before the first payload collective, and unpack +
    handle after it. Combine: the collective of ``[*, H]`` rows, the weights collective, any op after the
    row collective with a ``[*, H]`` input or output (sum, casts, fp32 copies) is sum + cast, the rest other.
    """

    def __init__(self, call, x, hidden, on_cuda):
        self.call, self.x, self.hidden, self.on_cuda = call, x, hidden, on_cuda
        self.collectives = 0
        self.payload_started = False

    def collective(self, output, input_):
        import torch

        rows = isinstance(input_, torch.Tensor) and input_.dim() == 2 and input_.shape[1] == self.hidden
        self.collectives += 1
        if self.call == "dispatch":
            if self.collectives == 1:
                return "header exchange"
            self.payload_started = True
            return "row collective" if rows and input_.dtype == self.x.dtype else "metadata collective"
        self.payload_started = self.payload_started or rows
        return "row collective" if rows else "weights collective"

    def op(self, func, args, kwargs, out):
        import torch

        name = str(func)
        tensors = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in _leaves(out) if isinstance(o, torch.Tensor)]
        if self.call == "dispatch":
            if self.on_cuda and (name.startswith(SYNC_OPS) or _device_to_host(name, args, kwargs)):
                return "host sync"
            if name.startswith(("aten.index.", "aten.index_select.")) and args and args[0] is self.x:
                return "row gather (packing)"
            if self.collectives == 0:
                return "routing + header build"
            return "unpack + handle" if self.payload_started else "index building + metadata pack"
        wide = any(t.dim() == 2 and t.shape[-1] == self.hidden and t.numel() > 0 for t in tensors + outs)
        # a factory op (zeros, empty) is known by its size argument before it runs
        wide = wide or any(isinstance(a, (list, tuple)) and len(a) == 2 and a[-1] == self.hidden
                           and all(isinstance(v, int) for v in a) for a in args)
        return "sum + cast" if self.payload_started and wide else "other"


def _leaves(tree):
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(tree)


def _device_to_host(name, args, kwargs):
    """A copy from a CUDA tensor into host memory: ``copy_(host, cuda)`` or ``_to_copy(cuda, device=cpu)``."""
    import torch

    if name.startswith("aten.copy_"):
        return len(args) > 1 and args[0].device.type == "cpu" and args[1].is_cuda
    if name.startswith("aten._to_copy"):
        device = kwargs.get("device")
        return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
    return False


class Recorder:
    """Times the pieces of one call (see module docstring); a no-op outside ``with``."""

    def __init__(self, pieces, clock):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if recorder.inside:
                    return func(*args, **kwargs)
                if clock.per_op:  # CPU: time the op itself, classify after (the output tells)
                    t0 = time.perf_counter()
                    out = func(*args, **kwargs)
                    spent = (time.perf_counter() - t0) * 1e6
                    piece = pieces.op(func, args, kwargs, out)
                    clock.times[piece] += spent
                    recorder.op_us[piece][str(func)] += spent
                else:  # GPU: classify before, so the piece's events bracket the op
                    piece = pieces.op(func, args, kwargs, None)
                    out = clock.run(piece, lambda: func(*args, **kwargs))
                recorder.ops[piece][str(func)] += 1
                return out

        self.mode = Mode()
        self.pieces, self.clock = pieces, clock
        self.inside = False
        self.ops = defaultdict(Counter)
        self.op_us = defaultdict(Counter)  # CPU only: microseconds per op name within each piece

    def __enter__(self):
        import torch
        import torch.distributed as dist

        self._a2a = dist.all_to_all_single
        self._sync = torch.cuda.Event.synchronize
        recorder = self

        def all_to_all_single(output, input, *args, **kwargs):
            piece = recorder.pieces.collective(output, input)
            recorder.ops[piece]["all_to_all_single"] += 1
            recorder.inside = True
            try:
                # untimed: line the ranks up, so the collective's time is the exchange, not the wait for a
                # peer still busy with (or slowed by timing) the pieces before it
                recorder.clock.run("(untimed)", lambda: dist.barrier(group=kwargs.get("group")))
                return recorder.clock.run(piece, lambda: recorder._a2a(output, input, *args, **kwargs))
            finally:
                recorder.inside = False

        def synchronize(event):
            recorder.ops["host sync"]["Event.synchronize"] += 1
            return recorder.clock.run("host sync", lambda: recorder._sync(event))

        dist.all_to_all_single = all_to_all_single
        torch.cuda.Event.synchronize = synchronize
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch
        import torch.distributed as dist

        try:
            self.mode.__exit__(*exc)
            self.clock.close()
        finally:
            dist.all_to_all_single = self._a2a
            torch.cuda.Event.synchronize = self._sync
        return False


# ---------------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------------
def make_inputs(rank, tokens, args, device):
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(tokens, args.hidden, generator=gen).to(getattr(torch, DTYPES[args.dtype]))
    idx = torch.rand(tokens, args.experts, generator=gen).topk(args.topk, dim=1).indices
    idx[::7, 0] = -1  # dropped by capacity now and then, as in ep_bench.py
    w = torch.rand(tokens, args.topk, generator=gen)
    return x.to(device), idx.to(device), w.to(device)


def barrier_time(fn, device, group):
    """Seconds of ``fn()`` on this rank: CUDA events on GPU, perf_counter after a barrier on CPU."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        return out, (start, end)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def slowest_median(per_iter, group):
    """[iters][columns] seconds (or event pairs) -> per column: median over iterations of the slowest rank (us)."""
    import torch
    import torch.distributed as dist

    if per_iter and isinstance(per_iter[0][0], tuple):
        torch.cuda.synchronize()
        per_iter = [[s.elapsed_time(e) / 1e3 for s, e in row] for row in per_iter]
    t = torch.tensor(per_iter, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [statistics.median(col) * 1e6 for col in t.cpu().t().tolist()]


def end_to_end(backends, x, idx, w, args, group, device):
    """Uninstrumented medians per implementation: dispatch, combine (and the backward calls with --backward).
    Implementations take turns within each iteration, so a change of machine load hits them alike."""
    import torch
    import torch.distributed as dist

    E = args.experts

    def step(backend, timed):
        res, t_d = timed(lambda: backend.dispatch(x, idx, w, E, group))
        y = res.recv_x
        _, t_c = timed(lambda: backend.combine(y, res.handle, group))
        row = [t_d, t_c]
        if args.backward:
            _, t_cw = timed(lambda: backend.combine(y, res.handle, group, topk_weights=res.recv_topk_weights))
            _, t_dc = timed(lambda: backend.dispatch_cached(x, res.handle, group))
            row += [t_cw, t_dc]
        return row

    rows = {label: [] for label in backends}
    with torch.no_grad():
        for it in range(args.warmup + args.iters):
            if it == args.warmup and device.startswith("cuda"):
                # GPU: then back to back, as a training step runs them (the host may run ahead of the device
                # until a dispatch's host sync), CUDA events around each call (as benchmarks/ep_bench.py)
                torch.cuda.synchronize()
                dist.barrier(group=group)
            for label, backend in backends.items():
                if it < args.warmup:
                    step(backend, lambda fn: (fn(), 0.0))
                else:
                    rows[label].append(step(backend, lambda fn: barrier_time(fn, device, group)))
    names = ["dispatch", "combine"] + (["combine with weights", "cached dispatch"] if args.backward else [])
    return {label: dict(zip(names, slowest_median(r, group))) for label, r in rows.items()}


def pieces_profile(backends, x, idx, w, args, group, device):
    """Per implementation, call and piece: medians over iterations (slowest rank), and the ops seen in each
    piece (with this rank's median time per op on CPU). Implementations take turns within each iteration."""
    import torch
    import torch.distributed as dist

    on_cuda = device.startswith("cuda")
    E, H = args.experts, args.hidden
    make_clock = CudaClock if on_cuda else CpuClock
    calls = {"dispatch": DISPATCH_PIECES, "combine": COMBINE_PIECES}
    samples = {label: {call: [] for call in calls} for label in backends}
    ops = {label: {} for label in backends}
    op_us = {label: {call: defaultdict(list) for call in calls} for label in backends}  # (piece, op) -> [us]

    def profiled(label, call, pieces, fn):
        dist.barrier(group=group)
        clock = make_clock()
        with Recorder(pieces, clock) as rec:
            out = fn()
        ops[label][call] = rec.ops
        return out, clock.times, rec.op_us

    with torch.no_grad():
        for it in range(args.warmup + args.iters):
            for label, backend in backends.items():
                res, d_times, d_op_us = profiled(label, "dispatch", Pieces("dispatch", x, H, on_cuda),
                                                 lambda: backend.dispatch(x, idx, w, E, group))
                _, c_times, c_op_us = profiled(label, "combine", Pieces("combine", res.recv_x, H, on_cuda),
                                               lambda: backend.combine(res.recv_x, res.handle, group))
                if it < args.warmup:
                    continue
                for call, times, by_piece in (("dispatch", d_times, d_op_us), ("combine", c_times, c_op_us)):
                    samples[label][call].append([times.get(p, 0.0) / 1e6 for p in calls[call]])
                    for piece, counter in by_piece.items():
                        for op, us in counter.items():
                            op_us[label][call][(piece, op)].append(us)
    out, seen = {}, {}
    for label in backends:
        out[label] = {}
        for call, names in calls.items():
            medians = slowest_median(samples[label][call], group)
            out[label][call] = {name: round(m, 1) for name, m in zip(names, medians)}
        seen[label] = {call: {piece: {op: {"calls": n} for op, n in counter.items()}
                              for piece, counter in by_piece.items()}
                       for call, by_piece in ops[label].items()}
        for call, by_key in op_us[label].items():  # this rank's median per op (CPU; on GPU only pieces are timed)
            for (piece, op), values in by_key.items():
                seen[label][call][piece][op]["median_us"] = round(statistics.median(values), 1)
    return out, seen


def floors(x, idx, args, group, device):
    """The raw all_to_all_single pair of the same rows (split sizes known), and the same plus the count
    exchange and its host sync (as benchmarks/ep_bench.py times them)."""
    import torch
    import torch.distributed as dist

    from megatron_ep_plugins.bench.measure import dedup_rows

    send, send_counts, recv_counts = dedup_rows(x, idx, args.experts, group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv = send.new_empty(sum(recv_splits), send.shape[1])
    back = torch.empty_like(send)
    got = torch.empty_like(send_counts)

    def raw():
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        dist.all_to_all_single(back, recv, send_splits, recv_splits, group=group)

    def with_counts():
        dist.all_to_all_single(got, send_counts, group=group)
        splits = got.tolist()  # the host sync
        r = send.new_empty(sum(splits), send.shape[1])
        dist.all_to_all_single(r, send, splits, send_splits, group=group)
        dist.all_to_all_single(torch.empty_like(send), r, send_splits, splits, group=group)

    out = {}
    with torch.no_grad():
        for name, fn in (("raw a2a pair (split sizes known)", raw),
                         ("raw pair + count exchange + host sync", with_counts)):
            for _ in range(args.warmup):
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows = [[barrier_time(fn, device, group)[1]] for _ in range(args.iters)]
            out[name] = round(slowest_median(rows, group)[0], 1)
    return out


def versions(device):
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        info["megatron_ep_plugins"] = md.version("megatron-ep-plugins")
    except md.PackageNotFoundError:
        info["megatron_ep_plugins"] = None
    if device.startswith("cuda"):
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info["nccl"] = f"unknown ({exc})"
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    return info


def machine(device, world):
    import torch

    m = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
         "cpus": os.cpu_count(), "device": "cuda" if device.startswith("cuda") else "cpu", "world_size": world,
         "torch_threads": torch.get_num_threads(),
         "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if device.startswith("cuda"):
        m["gpu"] = torch.cuda.get_device_name()
        m["gpu_count"] = torch.cuda.device_count()
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        if var in os.environ:
            m.setdefault("env", {})[var] = os.environ[var]
    return m


def run_rank(rank, world, args):
    import torch
    import torch.distributed as dist

    from megatron_ep_plugins.bench.measure import init_rank

    if args.threads:
        torch.set_num_threads(args.threads)
    device, group = init_rank(rank, world, args)
    backends = {label: load_impl(label, path).TorchA2ABackend() for label, path in args.impls}
    sizes = []
    for tokens in args.token_list:
        x, idx, w = make_inputs(rank, tokens, args, device)
        entry = {"tokens": tokens, "floors": floors(x, idx, args, group, device), "impls": {}}
        e2e = end_to_end(backends, x, idx, w, args, group, device)
        pieces, seen = pieces_profile(backends, x, idx, w, args, group, device) if args.pieces else ({}, {})
        for label in backends:
            entry["impls"][label] = {"end_to_end_us": {k: round(v, 1) for k, v in e2e[label].items()},
                                     "pieces_us": pieces.get(label, {}), "ops": seen.get(label, {})}
        sizes.append(entry)
    if rank == 0:
        report = {"machine": machine(device, world), "versions": versions(device),
                  "sizes": {"hidden": args.hidden, "topk": args.topk, "experts": args.experts, "dtype": args.dtype,
                            "tokens": args.token_list},
                  "settings": {"iters": args.iters, "warmup": args.warmup, "seed": args.seed, "backward": args.backward,
                               "threads": args.threads, "pieces": args.pieces},
                  "impls": [impl_info(label, path) for label, path in args.impls],
                  "results": sizes}
        text = markdown(report)
        print(text)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")
        print(f"profile_torch_backend: wrote {out} and {out.with_suffix('.md')}")
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 0


def markdown(report):
    m, s = report["machine"], report["sizes"]
    where = f"{m['world_size']} x {m.get('gpu', 'CPU (gloo)')}"
    lines = [f"# torch backend: where the time goes ({where}, H={s['hidden']} K={s['topk']} E={s['experts']} "
             f"{s['dtype']})", "",
             f"{m['platform']}; torch {report['versions']['torch']}; {m['torch_threads']} torch threads per rank; "
             f"median of {report['settings']['iters']} after {report['settings']['warmup']} warm-up, slowest rank "
             f"per iteration; pieces measured with the device synchronised between them (GPU) / per op (CPU).", ""]
    labels = [i["label"] for i in report["impls"]]
    for entry in report["results"]:
        lines += [f"## T={entry['tokens']}", "", "| piece (us) | " + " | ".join(labels) + " |",
                  "| --- |" + " --- |" * len(labels)]

        def row(name, values):
            lines.append(f"| {name} | " + " | ".join(values) + " |")

        impls = entry["impls"]
        for call, names in (("dispatch", DISPATCH_PIECES), ("combine", COMBINE_PIECES)):
            e2e = [impls[lb]["end_to_end_us"][call] for lb in labels]
            if report["settings"]["pieces"]:
                for name in names:
                    values = [impls[lb]["pieces_us"][call][name] for lb in labels]
                    if any(v for v in values):
                        row(f"{call}: {name}", [f"{v:.1f}" for v in values])
                total = [sum(impls[lb]["pieces_us"][call].values()) for lb in labels]
                row(f"{call}: sum of pieces", [f"{v:.1f}" for v in total])
            row(f"**{call}: end to end**", [f"**{v:.1f}**" for v in e2e])
            if report["settings"]["pieces"]:
                row(f"{call}: unattributed (end to end - pieces)", [f"{a - b:.1f}" for a, b in zip(e2e, total)])
        for call in ("combine with weights", "cached dispatch"):
            if call in impls[labels[0]]["end_to_end_us"]:
                row(f"{call}: end to end", [f"{impls[lb]['end_to_end_us'][call]:.1f}" for lb in labels])
        pair = [impls[lb]["end_to_end_us"]["dispatch"] + impls[lb]["end_to_end_us"]["combine"] for lb in labels]
        row("**dispatch + combine**", [f"**{v:.1f}**" for v in pair])
        for name, value in entry["floors"].items():
            row(name, [f"{value:.1f}"] * len(labels))
        raw = entry["floors"]["raw a2a pair (split sizes known)"]
        row("raw pair / (dispatch + combine)", [f"{raw / v:.2f}" for v in pair])
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    from megatron_ep_plugins.bench.cli import launch

    args = parse_args(argv)
    if args.threads is None and "OMP_NUM_THREADS" not in os.environ and args.nproc > 1:
        args.threads = 1  # torchrun's default: ranks sharing a host's cores would otherwise oversubscribe them
    return launch(run_rank, args)


if __name__ == "__main__":
    sys.exit(main())
