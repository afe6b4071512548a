"""Side-by-side benchmark of expert-parallel backends through the plugin, with conformance checks.

For every backend named in ``--backends`` (same inputs on every backend, same seed per rank):

* conformance vs the ``torch`` reference backend: dispatched rows bit-identical after sorting each
  source-rank block by source token id (the id is encoded in the first 5 columns of ``x``),
  ``tokens_per_expert`` equal, ``recv_topk_idx`` equal and ``recv_topk_weights`` equal where
  ``idx >= 0``, combine ``||a-b||/||b|| < 1e-2``, and ``x.grad`` / ``probs.grad`` through the core's
  autograd slot (``megatron_ep_plugins.autograd.build_slot``) within the same bound;
* timing of dispatch and combine through the slot functions Megatron calls (``fused_dispatch`` /
  ``fused_combine``): CUDA events on GPU, ``perf_counter`` + barrier on CPU; per iteration the
  slowest rank counts; median and mean over ``--iters`` after ``--warmup``;
* for ``legacy`` / ``elastic`` on GPU, the same DeepEP buffer called directly (V1: layout + dispatch
  + combine as Megatron's ``fused_a2a.py``; V2: ``dispatch(do_expand=False)`` + ``combine`` as
  DeepEP's tests) in the same run, and the ratio direct/plugin time (>= 0.97: plugin overhead <= 3%).

Unavailable backends are reported as skipped with their probe's reason, never replaced.

Launch::

    torchrun --nproc-per-node 2 benchmarks/ep_bench.py --backends torch,legacy,elastic --out benchmarks/results
    python benchmarks/ep_bench.py --device cpu --backends torch,allgather      # spawns 2 gloo ranks

Rank 0 prints a markdown table and writes ``OUT/ep_bench.json`` and ``OUT/ep_bench.md`` (``--plot``: also
``OUT/ep_bench.png``).
Exit status: 0 when every backend that ran passed conformance, 1 when one failed or errored,
2 for bad arguments (an unknown backend name lists the valid ones).
"""

# This script is the command ``megatron-ep bench`` with benchmarks/results as the default --out: the code lives in
# the package (megatron_ep_plugins.bench: cli, measure, report, progress; the conformance check in
# megatron_ep_plugins.testing.reference).
import sys
from pathlib import Path

try:
    from megatron_ep_plugins.bench import main
except ImportError:  # run from a checkout that is not installed (torchrun from the repository root)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from megatron_ep_plugins.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="ep_bench.py", default_out=str(Path(__file__).resolve().parent / "results")))
