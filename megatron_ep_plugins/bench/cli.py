"""Side-by-side benchmark of expert-parallel backends through the plugin, with conformance checks.

For every backend named in ``--backends`` (same inputs on every backend, same seed per rank):

* conformance vs the ``torch`` reference backend: dispatched rows bit-identical after sorting each
  source-rank block by source token id (the id is encoded in the first 5 columns of ``x``),
  ``tokens_per_expert`` equal, each row's (local id, weight) pairs equal in any order
  (``testing.reference.canonical_topk``), combine ``||a-b||/||b|| < 1e-2``, and ``x.grad`` / ``probs.grad`` through the core's
  autograd slot (``megatron_ep_plugins.autograd.build_slot``) within the same bound;
* timing of dispatch and combine through the slot functions Megatron calls (``fused_dispatch`` /
  ``fused_combine``): CUDA events on GPU, ``perf_counter`` + barrier on CPU; per iteration the
  slowest rank counts; median and mean over ``--iters`` after ``--warmup``;
* on GPU, the library under each backend called bare on the plugin's own buffer or group, in the same run
  (``legacy``: layout + dispatch + combine as Megatron's ``fused_a2a.py``; ``elastic``:
  ``dispatch(do_expand=False)`` + ``combine`` as DeepEP's tests; ``hybridep``: the buffer with a routing
  map; ``ncclep``: ``create_handle`` + ``dispatch`` + ``combine``; ``torch``: the raw ``all_to_all_single``
  pair, also on CPU), and the ratio direct/plugin time (>= 0.97: plugin overhead <= 3%); for ``legacy``
  also Megatron's own ``fused_a2a`` path.

Unavailable backends are reported as skipped with their probe's reason, never replaced.

Launch::

    megatron-ep bench --device cpu --backends torch,allgather                # spawns 2 gloo ranks
    torchrun --nproc-per-node 2 -m megatron_ep_plugins.bench --backends torch,legacy,elastic --plot
    torchrun --nproc-per-node 2 benchmarks/ep_bench.py --backends torch,legacy,elastic --out benchmarks/results

Rank 0 shows progress (``--progress``; a tqdm bar with the ``[bench]`` extra on a terminal), prints a markdown
table and writes ``OUT/NAME.json`` and ``OUT/NAME.md`` (``--name``, default ``ep_bench``); ``--plot`` also
``OUT/NAME.png`` (matplotlib, the ``[bench]`` extra): time per backend, GB/s and plugin/direct, or for a token
sweep (``--tokens 128,256,...``) the same against tokens per rank.
Exit status: 0 when every backend that ran passed conformance, 1 when one failed or errored,
2 for bad arguments (an unknown backend name lists the valid ones).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from typing import Optional, Sequence

from ..testing.reference import ID_COLS

__all__ = ["main", "parse_args"]

#: ``--out`` of ``megatron-ep bench`` (``benchmarks/ep_bench.py`` passes ``benchmarks/results``).
DEFAULT_OUT = "ep_bench_results"


def add_size_options(ap, gpu_defaults: dict, cpu_defaults: dict) -> None:
    """``--device`` and the sizes (``--tokens``, ``--hidden``, ``--topk``, ``--experts``, ``--iters``, ``--warmup``),
    defaulting per device; :func:`apply_device_defaults` fills them after parsing."""
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available (NCCL), else cpu (gloo)")
    ap.add_argument("--tokens", default=None,
                    help=f"tokens per rank, or a comma-separated list for a token sweep in one run (e.g. "
                         f"128,256,512); default {gpu_defaults['tokens']} on cuda, {cpu_defaults['tokens']} on cpu")
    for name in ("hidden", "topk", "experts", "iters", "warmup"):
        ap.add_argument(f"--{name}", type=int, default=None,
                        help=f"default {gpu_defaults[name]} on cuda, {cpu_defaults[name]} on cpu")


def apply_device_defaults(args, gpu_defaults: dict, cpu_defaults: dict) -> None:
    """Resolve ``args.device == "auto"`` (cuda when available) and fill every option still ``None`` from the
    device's defaults (``benchmarks/profile_torch_backend.py`` uses it too)."""
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in (gpu_defaults if args.device == "cuda" else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


GPU_DEFAULTS = dict(tokens=4096, hidden=7168, topk=8, experts=256, iters=50, warmup=10)
CPU_DEFAULTS = dict(tokens=256, hidden=256, topk=4, experts=8, iters=10, warmup=2)


def parse_args(argv=None, prog: Optional[str] = None, default_out: Optional[str] = None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch,legacy,elastic",
                    help="comma-separated backend names or aliases (default: torch,legacy,elastic)")
    add_size_options(ap, GPU_DEFAULTS, CPU_DEFAULTS)
    ap.add_argument("--fp8", action="store_true",
                    help="FP8 dispatch input (e4m3 + fp32 scales per 128 columns) for backends that support it")
    ap.add_argument("--name", default="ep_bench",
                    help="basename of the output files (OUT/NAME.json, .md, .png); default ep_bench")
    ap.add_argument("--megatron", choices=("auto", "on", "off"), default="auto",
                    help="also time Megatron-Core's own fused_a2a path (FusedDispatch/FusedCombine over its own "
                         "DeepEP V1 Buffer) for legacy (auto: on cuda only)")
    ap.add_argument("--num-sms", type=int, default=20,
                    help="SMs for DeepEP kernels, as Megatron's moe_flex_dispatcher_num_sms (default 20)")
    ap.add_argument("--direct", choices=("auto", "on", "off"), default="auto",
                    help="also time deep_ep called directly for legacy/elastic (auto: on cuda only)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every path of a backend (plugin, direct, Megatron's) in this many alternating rounds of "
                         "iters/rounds pairs, so a host-bound machine's drift hits them alike (default 1)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun (default 2)")
    ap.add_argument("--seed", type=int, default=1234)
    default_out = default_out or DEFAULT_OUT
    ap.add_argument("--out", default=default_out,
                    help=f"directory for NAME.json / NAME.md / NAME.png (default {default_out})")
    ap.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                    help="progress on rank 0: bar (tqdm, the optional extra [bench]), lines, or off; auto: a bar "
                         "when tqdm is importable and stderr is a terminal, else lines")
    ap.add_argument("--plot", action="store_true", help="also write ep_bench.png if matplotlib is importable")
    args = ap.parse_args(argv)
    apply_device_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    if args.hidden < ID_COLS:
        ap.error(f"--hidden must be >= {ID_COLS} (the source token id is encoded in the first columns)")
    try:
        args.token_list = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tokens must be an int or a comma-separated list of ints, got {args.tokens!r}")
    if not args.token_list or any(t < 0 or t >= 16 ** 4 for t in args.token_list):
        ap.error("--tokens must be in [0, 65536)")
    args.tokens = args.token_list[0]
    if not 1 <= args.topk <= args.experts:
        ap.error("--topk must be in [1, --experts]")
    if not 1 <= args.rounds <= args.iters:
        ap.error(f"--rounds must be in [1, --iters={args.iters}] (each round times iters/rounds pairs), got {args.rounds}")
    if args.fp8 and args.hidden % 128:
        ap.error("--fp8 needs --hidden divisible by 128 (one scale per 128 columns)")
    args.backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
    if not args.backends:
        ap.error("--backends is empty")
    return args


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(run_rank, rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # what torchrun does for several ranks on one host: one intra-op thread each. With torch's default (one per
        # core) the ranks' OpenMP workers spin against each other and every large CPU op waits milliseconds for a
        # core (benchmarks/README.md, "Why a bf16 combine was slow on CPU"); OMP_NUM_THREADS set by the user wins
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    try:
        code = run_rank(rank, world, args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            sys.stderr.write(f"rank {rank}: {exc.code}\n")
    except BaseException:  # noqa: BLE001 - reported by the parent's exit status
        sys.stderr.write(f"rank {rank} failed:\n{traceback.format_exc()}")
        code = 1
    queue.put((rank, code))


def launch(run_rank, args) -> int:
    """``run_rank(rank, world, args)`` on torchrun's ranks, or on ``args.nproc`` local ranks spawned here
    (fork for CPU/gloo, spawn for CUDA); returns the worst exit status. Shared by the benchmark scripts."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn" if args.device == "cuda" else "fork")
    world, port = args.nproc, _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(run_rank, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = {}
    for _ in range(world):
        try:
            r, c = queue.get(timeout=2)
        except queue_module.Empty:
            break
        codes[r] = c
    for r, p in enumerate(procs):
        codes.setdefault(r, p.exitcode if p.exitcode else 1)
    return max(codes.values()) if codes else 1


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, default_out: Optional[str] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run on every rank (torchrun's, or ``--nproc`` spawned ones);
    returns the exit status (0 all ran backends passed conformance, 1 one failed or raised, 2 bad arguments)."""
    from .measure import resolve_backends, run_rank

    args = parse_args(argv, prog, default_out)
    resolve_backends(args.backends)  # unknown names fail here, before any rank starts
    return launch(run_rank, args)
