"""Side-by-side benchmark of expert-parallel backends through the plugin, with conformance checks.

This script is ``megatron-ep bench`` with ``benchmarks/results`` as the default ``--out``; what it measures and
checks is described in ``megatron_ep_plugins/bench/cli.py`` (``--help`` prints the options). Launch::

    torchrun --nproc-per-node 2 benchmarks/ep_bench.py --backends torch,legacy,elastic --out benchmarks/results
    python benchmarks/ep_bench.py --device cpu --backends torch,allgather      # spawns 2 gloo ranks
"""

# The code lives in the package (megatron_ep_plugins.bench: cli, measure, report, progress; the conformance check in
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
