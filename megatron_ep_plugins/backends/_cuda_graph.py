"""Capture a fixed sequence of small kernels as one CUDA graph (shared by the ``torch`` and ``hybridep`` backends).

On the 2 x H200 host every kernel launched from Python costs 10-20 us of host time (``torch.profiler``:
``cudaLaunchKernel`` plus the aten op around it), and a backend whose next step is a host sync (waiting for a
count) exposes all of it. A graph replay launches the same work with one call. Both users build their inputs'
routing tensors (routing codes, maps, probabilities) with shapes fixed by (T, K, E), no host sync and no
data-dependent sizes, which is what capture needs.

Usage::

    static_idx = torch.zeros_like(topk_idx)          # the graph's input buffers: copy each call's inputs in
    captured = capture(lambda: build(static_idx), topk_idx.device, "backend 'x': routing for T=4096")
    if captured is not None:
        graph, outputs = captured                    # outputs live in the graph's memory, rewritten per replay
        static_idx.copy_(topk_idx); graph.replay()   # then read (or clone) outputs
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger("megatron_ep_plugins")

__all__ = ["capture"]


def capture(run: Callable[[], Any], device, what: str) -> Optional[tuple[Any, Any]]:
    """``(graph, outputs)`` for ``run()`` captured on ``device``, or ``None`` when capture fails (logged once
    here as a warning naming ``what``: a missed optimisation, never an error; the caller runs eagerly).

    ``run`` is first called once on a side stream, outside capture (lazy initialisation, library handles and
    workspaces must not happen inside it), then captured with ``capture_error_mode="thread_local"``: the
    process group's watchdog thread queries CUDA events while this thread captures. Entering capture
    synchronises the device and runs ``gc.collect()``: call this once per shape, not per call.
    """
    import torch

    try:
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = run()
        return graph, outputs
    except Exception as exc:  # noqa: BLE001 - the caller falls back to eager launches
        log.warning("%s: CUDA graph capture failed (%s: %s); this shape runs eagerly", what, type(exc).__name__, exc)
        return None
