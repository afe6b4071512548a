"""``megatron-ep bench``: expert-parallel backends side by side (what ``benchmarks/ep_bench.py`` runs).

* :mod:`.cli` -- options, launch (torchrun's ranks, or ``--nproc`` spawned local ranks), exit status;
* :mod:`.measure` -- timing through the slot, the DeepEP buffer directly and Megatron's own path, bandwidth,
  ratios, one rank's run;
* :mod:`.report` -- markdown table, ``NAME.json`` / ``NAME.md``, PNG plots (matplotlib: the ``[bench]`` extra);
* :mod:`.progress` -- the progress display (tqdm when installed, else lines);
* the conformance check against the reference backend is :mod:`megatron_ep_plugins.testing.reference`.

Run ``megatron-ep bench --help``, ``python -m megatron_ep_plugins.bench`` or
``torchrun --nproc-per-node 2 benchmarks/ep_bench.py ...``.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None, default_out: Optional[str] = None) -> int:
    """See :func:`megatron_ep_plugins.bench.cli.main`."""
    from .cli import main as cli_main

    return cli_main(argv, prog=prog, default_out=default_out)
