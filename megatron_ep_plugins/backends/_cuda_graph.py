"""Capture a fixed sequence of small kernels as one CUDA graph (shared by the ``torch`` and ``hybridep`` backends).

On the 2 x H200 host every kernel launched from Python costs 10-20 us of host time (``torch.profiler``:
``cudaLaunchKernel`` plus the aten op around it), and a backend whose next step is a host sync (waiting for a
count) exposes all of it. A graph replay launches the same work with one call. Both users build their inputs'
routing tensors (routing codes, maps, probabilities) with shapes fixed by (T, K, E), no host sync and no
data-dependent sizes, which is what capture needs.

Usage (what both backends do)::

    graphs = ShapeGraphs()                           # per backend instance
    replay = graphs.lookup(key, lambda: capture_replay(build, (topk_idx, weights), "backend 'x': ..."))
    out = build(topk_idx, weights) if replay is None else replay(topk_idx, weights)

A replay's outputs live in the graph's memory and are rewritten by the next replay: a caller that keeps them
past that copies them out (``torch``'s routing does, its handles outlive the next dispatch).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger("megatron_ep_plugins")

__all__ = ["Replay", "ShapeGraphs", "capture", "capture_replay"]


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


class Replay:
    """A captured graph and its input buffers: a call copies its arguments into the buffers, replays, and
    returns the captured outputs (the graph's own memory, rewritten by the next call)."""

    def __init__(self, graph, inputs, outputs) -> None:
        self.graph, self.inputs, self.outputs = graph, list(inputs), outputs

    def __call__(self, *args):
        for static, arg in zip(self.inputs, args):
            static.copy_(arg)
        self.graph.replay()
        return self.outputs


def capture_replay(build: Callable[..., Any], example_inputs, what: str) -> Optional[Replay]:
    """``build(*inputs)`` captured over zero-filled input buffers shaped like ``example_inputs`` (zeros must be a
    valid input: for routing ids that is expert 0 everywhere), as a :class:`Replay`; ``None`` when capture
    failed (:func:`capture` logged why)."""
    import torch

    static = [torch.zeros_like(t) for t in example_inputs]
    captured = capture(lambda: build(*static), example_inputs[0].device, what)
    return None if captured is None else Replay(captured[0], static, captured[1])


class ShapeGraphs:
    """The graphs of one backend, one per input shape: none at a shape's first sight (a shape seen once is not
    worth a capture, which synchronises the device), captured at its second, at most ``limit`` kept (later
    shapes run eagerly); a failed capture is remembered as ``None``, so that shape stays eager without
    trying again."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._graphs: dict = {}  # shape key -> Replay-like object, or None where capture failed
        self._seen: set = set()  # shapes met once

    def lookup(self, key, make: Callable[[], Any]):
        """The graph for ``key`` (``make()`` builds it at the key's second sight), or ``None``: run eagerly."""
        graph = self._graphs.get(key, _MISSING)
        if graph is _MISSING:
            if key not in self._seen:
                if len(self._seen) >= 4 * self.limit:  # shapes keep changing: forget the ones met once
                    self._seen.clear()
                self._seen.add(key)
                return None
            if len(self._graphs) >= self.limit:
                return None
            graph = self._graphs[key] = make()
        return graph

    def values(self):
        return self._graphs.values()

    def __len__(self) -> int:
        return len(self._graphs)


_MISSING = object()
