"""Host-side cost per dispatch/combine call: the plugin slot next to Megatron's own ``fused_a2a`` path.

One process, no GPU needed, no communication: every backend here does no work (it returns
preallocated tensors) and the group is a stand-in object of size 2, so what is timed is the
Python/autograd/dispatcher cost each call adds on the host. On a GPU that host time is hidden only
while the host runs ahead of the device; DeepEP V1's dispatch waits on the host for the receive
counts, so every microsecond after that wait is on the critical path at small token counts.

Side by side, in one run, interleaved (each repeat times every case once, round robin):

* ``megatron``: Megatron-Core's own ``fused_a2a.fused_dispatch``/``fused_combine`` (its ``FusedDispatch``/
  ``FusedCombine`` autograd Functions, ``get_buffer`` and ``torch.tensor(counts)``) over a no-work fake
  DeepEP ``Buffer``;
* ``slot+nowork``: the plugin slot ``build_slot(backend)`` over a no-work backend (the generic slot alone);
* ``slot+legacy``: the plugin slot over the real ``legacy`` adapter over the same no-work fake ``Buffer``
  (directly comparable with ``megatron``: same fake buffer underneath);
* ``megatron Function bodies``: ``FusedDispatch``/``FusedCombine``'s ``forward``/``backward`` called with a
  plain ctx (no autograd), so each side's autograd wrapper cost is a difference of two rows;
* ``legacy adapter``: the ``legacy`` adapter's methods called directly (no slot, no autograd);
* ``nowork backend``: the no-work backend's methods called directly (the floor of a Python call);
* ``slot+elastic``, ``elastic adapter``: the same for the ``elastic`` adapter over a no-work fake DeepEP V2
  ``ElasticBuffer``, and ``bare ElasticBuffer calls``: that fake's ``dispatch(..., do_expand=False)`` and ``combine``
  called as ``ep_bench``'s direct path calls them, so "elastic adapter - bare ElasticBuffer calls" is the host
  time the adapter adds to the number ``ep_bench`` divides by (issue 11's plugin/direct at small T).

Columns: median microseconds per call of dispatch forward, combine forward, dispatch forward+backward
(``torch.autograd.grad`` of recv_x and the probs), combine forward+backward, then dispatch and combine with no
input that requires grad (the evaluation path: the slot calls the backend without an autograd Function,
Megatron's path still applies its Functions). Megatron's flags are used
(``async_finish=True, allocate_on_comm_stream=True``, as ``MoEFlexTokenDispatcher`` passes them).
A second table times the pieces a call is made of. ``--device cuda`` puts the doubles' tensors on a
GPU (tensor operations on the path then pay CUDA launch costs; what is timed is still host time).

TEST DOUBLES: ``_FakeBuffer``, ``_FakeElasticBuffer`` & co. (installed as a fake ``deep_ep`` module in
``sys.modules`` for this process only, and patched into ``fused_a2a`` only while measuring) and
``_NoWorkBackend`` exist only in this script; they are never registered as plugins and never selectable.

Print-only: nothing here asserts anything about speed.

Usage: .venv/bin/python benchmarks/host_overhead.py [--quick] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# Benchmark sizes: tiny tensors so that no arithmetic shows (the cost measured is per call, not per
# byte); the per-expert count list has Megatron's length at E=256 over 2 ranks.
TOKENS, RECV, HIDDEN, TOPK, NUM_EXPERTS, LOCAL_EXPERTS = 8, 16, 32, 8, 256, 128


# -- test doubles: a no-work DeepEP V1 API ------------------------------------------------------------
class _Pool:
    """Preallocated results every double returns (no allocation, no arithmetic per call)."""

    def __init__(self, device: str = "cpu") -> None:
        def on(t):
            return t.to(device)

        self.x = on(torch.zeros(TOKENS, HIDDEN, dtype=torch.bfloat16))
        self.idx = on(torch.randint(0, NUM_EXPERTS, (TOKENS, TOPK)))
        self.probs = on(torch.rand(TOKENS, TOPK))
        self.recv_x = on(torch.zeros(RECV, HIDDEN, dtype=torch.bfloat16))
        self.recv_idx = on(torch.randint(-1, LOCAL_EXPERTS, (RECV, TOPK)))
        self.recv_probs = on(torch.rand(RECV, TOPK))
        self.counts = [RECV * TOPK // LOCAL_EXPERTS] * LOCAL_EXPERTS  # a Python list, as DeepEP V1 returns
        self.counts_tensor = torch.tensor(self.counts, dtype=torch.int64)  # on the CPU, as the contract says
        self.combined = on(torch.zeros(TOKENS, HIDDEN, dtype=torch.bfloat16))
        self.combined_probs = on(torch.rand(TOKENS, TOPK))
        self.cached = on(torch.zeros(RECV, HIDDEN, dtype=torch.bfloat16))
        self.layout = (on(torch.zeros(2, dtype=torch.int32)), None, on(torch.zeros(LOCAL_EXPERTS, dtype=torch.int32)),
                       on(torch.zeros(TOKENS, 2, dtype=torch.bool)), None)
        self.raw_handle = tuple(on(torch.zeros(1)) for _ in range(6))


POOL: _Pool


class _EventHandle:
    """Double of ``deep_ep.EventHandle`` (records nothing)."""


class _EventOverlap:
    """Double of ``deep_ep.EventOverlap``."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event = event

    def current_stream_wait(self) -> None:
        pass


_AFTER = _EventOverlap()


class _Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 1 << 20

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


_CONFIG = _Config()


class _FakeBuffer:
    """Double of DeepEP V1 ``deep_ep.Buffer``: same call signatures, returns preallocated tensors."""

    num_sms = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *args, **kwargs) -> None:
        self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes

    @staticmethod
    def set_num_sms(num_sms: int) -> None:
        _FakeBuffer.num_sms = num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> _Config:
        return _CONFIG

    @staticmethod
    def get_combine_config(num_ranks: int) -> _Config:
        return _CONFIG

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        return POOL.layout[:4] + (_AFTER,)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        if handle is not None:  # cached dispatch (combine's backward)
            return POOL.cached, None, None, None, None, _AFTER
        return POOL.recv_x, POOL.recv_idx, POOL.recv_probs, POOL.counts, POOL.raw_handle, _AFTER

    def combine(self, x, handle, topk_weights=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        return POOL.combined, (POOL.combined_probs if topk_weights is not None else None), _AFTER


class _FakeEPHandle:
    """Double of DeepEP V2's ``EPHandle`` (the fields the adapter reads)."""

    def __init__(self) -> None:
        self.num_recv_tokens_per_expert_list = POOL.counts
        self.num_experts, self.num_sms = NUM_EXPERTS, 0


class _FakeElasticBuffer:
    """Double of DeepEP V2 ``deep_ep.ElasticBuffer`` (dd758ca ``deep_ep/buffers/elastic.py``): the signatures the
    adapter checks and calls (``do_handle_copy=True`` is V2's default), returns preallocated tensors."""

    def __init__(self, group, num_bytes=None, num_max_tokens_per_rank=0, hidden=0, num_topk=0,
                 use_fp8_dispatch=False, deterministic=False, allow_hybrid_mode=True, num_allocated_qps=0) -> None:
        self.group, self.handle = group, _FakeEPHandle()

    def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, num_sms=0, previous_event=None,
                 async_with_compute_stream=False, allocate_on_comm_stream=False, handle=None, do_handle_copy=True,
                 do_expand=False):
        if handle is not None:  # cached dispatch (combine's backward)
            return POOL.cached, None, None, handle, _AFTER
        return POOL.recv_x, POOL.recv_idx, POOL.recv_probs, self.handle, _AFTER

    def combine(self, x, handle, topk_weights=None, num_sms=0, previous_event=None, async_with_compute_stream=False,
                allocate_on_comm_stream=False):
        return POOL.combined, (POOL.combined_probs if topk_weights is not None else None), _AFTER


def _fake_deep_ep_modules() -> dict[str, types.ModuleType]:
    deep_ep = types.ModuleType("deep_ep")
    deep_ep.__doc__ = ("BENCHMARK DOUBLE of DeepEP's V1 and V2 Python API (benchmarks/host_overhead.py); does no "
                       "work.")
    deep_ep.__version__ = "0+host-overhead-double"
    deep_ep.IS_BENCHMARK_DOUBLE = True
    deep_ep.Buffer, deep_ep.EventOverlap, deep_ep.EventHandle = _FakeBuffer, _EventOverlap, _EventHandle
    deep_ep.ElasticBuffer = _FakeElasticBuffer
    utils = types.ModuleType("deep_ep.utils")
    utils.EventOverlap, utils.EventHandle = _EventOverlap, _EventHandle
    deep_ep.utils = utils
    return {"deep_ep": deep_ep, "deep_ep.utils": utils}


class _NoWorkBackend:
    """BENCHMARK DOUBLE of an EPBackend: returns preallocated tensors, never registered as a plugin."""

    name = "nowork"

    def __init__(self) -> None:
        from megatron_ep_plugins.spec import DispatchResult

        self._result = DispatchResult(POOL.recv_x, POOL.recv_idx, POOL.recv_probs, POOL.counts_tensor, object())

    def set_num_sms(self, num_sms: int) -> None:
        pass

    def agreement_key(self):
        return {"algorithm": "nowork"}

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False):
        return self._result

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        return POOL.cached

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        return POOL.combined, (POOL.combined_probs if topk_weights is not None else None)


# -- set-up ---------------------------------------------------------------------------------------------
@contextmanager
def fake_deep_ep():
    """Install the fake ``deep_ep`` for this process; patch ``fused_a2a``'s DeepEP names while inside."""
    saved = {name: sys.modules.get(name) for name in ("deep_ep", "deep_ep.utils")}
    sys.modules.update(_fake_deep_ep_modules())
    try:
        import importlib
        import warnings

        with warnings.catch_warnings():  # Megatron warns about optional packages (TE, Apex) at import
            warnings.simplefilter("ignore")
            import megatron.core.transformer.moe.fused_a2a as fused_a2a

        if fused_a2a.fused_dispatch is None:  # imported before without deep_ep: define its functions now
            fused_a2a = importlib.reload(fused_a2a)
        with mock.patch.multiple(fused_a2a, Buffer=_FakeBuffer, EventOverlap=_EventOverlap,
                                 EventHandle=_EventHandle, HAVE_DEEP_EP=True, _buffer=None):
            yield fused_a2a
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _FakeGroup:
    """Stand-in for the expert-parallel process group: ``size()`` and ``rank()`` only, no communication.

    Size 2, as on the 2 x H200 machine of the issue (DeepEP V1 has kernel configurations for 2 ranks,
    none for 1); no process group is initialised, so nothing here can communicate.
    """

    def __init__(self, size: int = 2) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def make_slot(backend) -> Any:
    """``build_slot`` as ``install()`` binds it, with a once-per-group check that does no collective.

    (The real check is an ``all_gather`` on the group's first dispatch; it runs in the warm-up, never in
    the timed loop, and a stand-in group cannot communicate.)
    """
    from megatron_ep_plugins.autograd import build_slot

    checked: list[Any] = []
    return build_slot(backend, checked.append)


FLAGS = dict(async_finish=True, allocate_on_comm_stream=True)


def path_cases(dispatch, combine, group) -> dict[str, Callable[[], Any]]:
    """The four measured calls through Megatron-signature ``dispatch``/``combine`` functions."""
    x = POOL.x.clone().requires_grad_()
    probs = POOL.probs.clone().requires_grad_()
    idx = POOL.idx
    handle = dispatch(x.detach(), idx, probs.detach(), NUM_EXPERTS, group, **FLAGS)[4]
    recv = POOL.recv_x.clone().requires_grad_()
    grad_recv, grad_probs, grad_combined = torch.ones_like(POOL.recv_x), torch.ones_like(POOL.recv_probs), \
        torch.ones_like(POOL.combined)
    grad = torch.autograd.grad

    def dispatch_fwd():
        return dispatch(x, idx, probs, NUM_EXPERTS, group, **FLAGS)

    def combine_fwd():
        return combine(recv, group, handle, **FLAGS)

    def dispatch_fwd_bwd():
        out = dispatch(x, idx, probs, NUM_EXPERTS, group, **FLAGS)
        return grad((out[0], out[2]), (x, probs), (grad_recv, grad_probs))

    def combine_fwd_bwd():
        out = combine(recv, group, handle, **FLAGS)
        return grad(out[0], recv, grad_combined)

    x_eval, probs_eval, recv_eval = x.detach(), probs.detach(), recv.detach()

    def dispatch_eval():  # evaluation path: no input requires grad (the slot then calls the backend directly)
        return dispatch(x_eval, idx, probs_eval, NUM_EXPERTS, group, **FLAGS)

    def combine_eval():
        return combine(recv_eval, group, handle, **FLAGS)

    return {"dispatch": dispatch_fwd, "combine": combine_fwd, "dispatch+bwd": dispatch_fwd_bwd,
            "combine+bwd": combine_fwd_bwd, "dispatch, no grad": dispatch_eval, "combine, no grad": combine_eval}


def backend_cases(backend, group) -> dict[str, Callable[[], Any]]:
    """The backend's own methods, called as the slot calls them (no autograd)."""
    x, idx, probs = POOL.x, POOL.idx, POOL.probs
    handle = backend.dispatch(x, idx, probs, NUM_EXPERTS, group, **FLAGS).handle
    recv = POOL.recv_x

    def dispatch_fwd():
        return backend.dispatch(x, idx, probs, NUM_EXPERTS, group, **FLAGS)

    def combine_fwd():
        return backend.combine(recv, handle, group, **FLAGS)

    def dispatch_fwd_bwd():
        backend.dispatch(x, idx, probs, NUM_EXPERTS, group, **FLAGS)
        return backend.combine(recv, handle, group, topk_weights=POOL.recv_probs, **FLAGS)

    def combine_fwd_bwd():
        backend.combine(recv, handle, group, **FLAGS)
        return backend.dispatch_cached(x, handle, group, **FLAGS)

    # no autograd either way: the no-grad columns time the same calls
    return {"dispatch": dispatch_fwd, "combine": combine_fwd, "dispatch+bwd": dispatch_fwd_bwd,
            "combine+bwd": combine_fwd_bwd, "dispatch, no grad": dispatch_fwd, "combine, no grad": combine_fwd}


def elastic_backend(group):
    """The real ``elastic`` adapter over the fake ``ElasticBuffer``, warmed up: its once-per-call-key work (the
    cross-rank agreement collective and the size rules, which a stand-in group cannot run) is skipped once, so
    the timed calls take the steady-state path a job takes from its second dispatch on."""
    from megatron_ep_plugins.backends import deepep_elastic

    backend = deepep_elastic.DeepEPElasticBackend()
    backend._groups[group] = deepep_elastic._GroupState(world=group.size())
    with mock.patch.multiple(deepep_elastic, agree_on_inputs=lambda _name, _group, num_tokens, *a: num_tokens,
                             check_v2_rules=lambda *a, **k: None, check_v2_hybrid_rules=lambda *a, **k: None):
        handle = backend.dispatch(POOL.x, POOL.idx, POOL.probs, NUM_EXPERTS, group, **FLAGS).handle
        backend.combine(POOL.recv_x, handle, group, **FLAGS)
        backend.combine(POOL.recv_x, handle, group, topk_weights=POOL.recv_probs, **FLAGS)
        backend.dispatch_cached(POOL.x, handle, group, **FLAGS)
    return backend


def bare_elastic_cases(backend, group) -> dict[str, Callable[[], Any]]:
    """The adapter's own fake ``ElasticBuffer`` called as ``ep_bench``'s direct path calls it (``measure.py``
    ``timing_direct_elastic``): no adapter, no slot."""
    buf = backend._groups[group].buffer
    x, idx, probs, recv = POOL.x, POOL.idx, POOL.probs, POOL.recv_x
    raw = buf.dispatch(x, topk_idx=idx, topk_weights=probs, num_experts=NUM_EXPERTS, num_sms=0, do_expand=False)[3]

    def dispatch_fwd():
        return buf.dispatch(x, topk_idx=idx, topk_weights=probs, num_experts=NUM_EXPERTS, num_sms=0,
                            do_expand=False)[3]

    def combine_fwd():
        return buf.combine(recv, raw, num_sms=0)

    return {"dispatch": dispatch_fwd, "combine": combine_fwd, "dispatch, no grad": dispatch_fwd,
            "combine, no grad": combine_fwd}


def megatron_direct_cases(fused_a2a, group) -> dict[str, Callable[[], Any]]:
    """Megatron's ``FusedDispatch``/``FusedCombine`` bodies called directly (a plain ctx, no autograd)."""
    fd, fc = fused_a2a.FusedDispatch, fused_a2a.FusedCombine
    x, idx, probs = POOL.x, POOL.idx, POOL.probs
    ctx = types.SimpleNamespace()
    handle = fd.forward(ctx, x, idx, probs, NUM_EXPERTS, group, True, True)[4]
    recv, grad_recv, grad_probs = POOL.recv_x, POOL.recv_x, POOL.recv_probs

    def dispatch_fwd():
        return fd.forward(types.SimpleNamespace(), x, idx, probs, NUM_EXPERTS, group, True, True)

    def combine_fwd():
        return fc.forward(types.SimpleNamespace(), recv, group, handle, True, True)

    def dispatch_fwd_bwd():
        c = types.SimpleNamespace()
        fd.forward(c, x, idx, probs, NUM_EXPERTS, group, True, True)
        return fd.backward(c, grad_recv, None, grad_probs, None, None)

    def combine_fwd_bwd():
        c = types.SimpleNamespace()
        fc.forward(c, recv, group, handle, True, True)
        return fc.backward(c, POOL.combined)

    return {"dispatch": dispatch_fwd, "combine": combine_fwd, "dispatch+bwd": dispatch_fwd_bwd,
            "combine+bwd": combine_fwd_bwd, "dispatch, no grad": dispatch_fwd, "combine, no grad": combine_fwd}


def measure(cases: dict[str, Callable[[], Any]], number: int, repeats: int, warmup: int) -> dict[str, dict]:
    """Median (and min) ns per call of every case; cases interleaved round robin within each repeat."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in cases.items():
                loop = range(number)
                t0 = clock()
                for _ in loop:
                    fn()
                samples[name].append((clock() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_ns": statistics.median(v), "min_ns": min(v)} for name, v in samples.items()}


# -- pieces ---------------------------------------------------------------------------------------------
def piece_cases(group, legacy) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """Single pieces a call is made of, each timed alone (notes say where each one lives)."""
    from megatron_ep_plugins.backends import _deepep_common as common
    from megatron_ep_plugins.backends import deepep_elastic, deepep_legacy
    from megatron_ep_plugins.spec import DispatchResult

    x, idx, probs = POOL.x, POOL.idx, POOL.probs
    recv_idx, recv_probs = POOL.recv_idx, POOL.recv_probs
    seen = {group}
    leaf = torch.zeros(2, requires_grad=True)

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c, d, e, f, g):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None, None, None, None, None

    class Five(torch.autograd.Function):  # 5 outputs, 4 ctx attributes: the shape of FusedDispatch
        @staticmethod
        def forward(ctx, a, b, c, d, e, f, g):
            ctx.group, ctx.handle, ctx.async_finish, ctx.allocate_on_comm_stream = e, d, f, g
            return POOL.recv_x, POOL.recv_idx, POOL.recv_probs, POOL.counts_tensor, d

        @staticmethod
        def backward(ctx, *grads):
            return (None,) * 7

    class FiveMarked(Five):
        @staticmethod
        def forward(ctx, a, b, c, d, e, f, g):
            ctx.group, ctx.handle, ctx.async_finish, ctx.allocate_on_comm_stream = e, d, f, g
            ctx.mark_non_differentiable(POOL.recv_idx, POOL.counts_tensor)
            return POOL.recv_x, POOL.recv_idx, POOL.recv_probs, POOL.counts_tensor, d

    def legacy_handle():  # the adapter's handle record (its fields may change; then it is not timed)
        return deepep_legacy.LegacyHandle(None, recv_idx, TOKENS, RECV, NUM_EXPERTS)

    try:
        handle = legacy_handle()
    except Exception:  # noqa: BLE001
        handle = None

    def plain(a):
        return a.contiguous()

    def guarded(a):
        try:
            return a.contiguous()
        except Exception:
            raise

    def import_in_function():
        import torch  # noqa: F401
        import torch.distributed as dist  # noqa: F401

    cases = {
        "function call `f(x)` returning `x.contiguous()`": lambda: plain(x),
        "same call inside try/except (no exception)": lambda: guarded(x),
        "`group not in seen` (set membership)": lambda: group not in seen,
        "`import torch` + `import torch.distributed` inside a function": import_in_function,
        "`dist.get_world_size(group)`": lambda: dist.get_world_size(group),
        "`group.size()`": group.size,
        "`x.contiguous()` (already contiguous)": x.contiguous,
        "`probs.float()` (already fp32)": probs.float,
        "`torch.tensor(list of 128 ints)`": lambda: torch.tensor(POOL.counts),
        "`torch.tensor(list of 128 ints, dtype=int64)`": lambda: torch.tensor(POOL.counts, dtype=torch.int64),
        "`torch.frombuffer(array('q', list of 128 ints), dtype=int64)`":
            lambda: torch.frombuffer(array.array("q", POOL.counts), dtype=torch.int64),
        "`counts_tensor(list of 128 ints)` (struct pack + frombuffer)": lambda: common.counts_tensor(POOL.counts),
        "`torch.where(recv_idx >= 0, w.float(), 0.0)` (prob mask)":
            lambda: torch.where(recv_idx >= 0, recv_probs.float(), 0.0),
        "autograd.Function.apply, 7 args, 1 output, no ctx use": lambda: Empty.apply(leaf, 1, 2, 3, 4, 5, 6),
        "apply, 5 outputs + 4 ctx attributes (FusedDispatch's shape)": lambda: Five.apply(leaf, 1, 2, 3, 4, 5, 6),
        "same + `ctx.mark_non_differentiable` of 2 outputs": lambda: FiveMarked.apply(leaf, 1, 2, 3, 4, 5, 6),
        "EventOverlap(EventHandle()) (no-work doubles)": lambda: _EventOverlap(_EventHandle()),
        "legacy: `check_dispatch_args`": lambda: common.check_dispatch_args("legacy", x, idx, probs, NUM_EXPERTS, 1),
        "legacy: `check_handle`": lambda: common.check_handle(handle, deepep_legacy.LegacyHandle, "legacy"),
        "legacy: `check_combine_args` (no weights)":
            lambda: common.check_combine_args("legacy", POOL.recv_x, RECV, recv_idx, None),
        "legacy: `check_combine_args` with weights (= prob mask)":
            lambda: common.check_combine_args("legacy", POOL.recv_x, RECV, recv_idx, recv_probs),
        "legacy: `LegacyHandle(...)`": legacy_handle,
        "`dispatch_key(...)` + dict lookup (shapes without the token count)":
            lambda: {}.get(common.dispatch_key(x, idx, probs, NUM_EXPERTS, group)),
        "`call_key(...)` + dict lookup (full shapes)":
            lambda: {}.get(common.call_key(x, idx, probs, NUM_EXPERTS, group)),
        "`combine_key(x)` + set membership": lambda: (0, common.combine_key(x), HIDDEN) in seen,
        "elastic: `ElasticHandle(...)`":
            lambda: deepep_elastic.ElasticHandle(None, None, recv_idx, TOKENS, RECV, HIDDEN),
        "`DispatchResult(...)` (the 5-tuple every adapter returns)":
            lambda: DispatchResult(x, recv_idx, recv_probs, None, None),
    }
    notes = {
        "same call inside try/except (no exception)": "autograd.py: fault propagation around every slot call",
        "`group not in seen` (set membership)": "autograd.py: once per dispatch (first use of a group)",
        "`import torch` + `import torch.distributed` inside a function": "adapters at 459f634: per call",
        "`dist.get_world_size(group)`": "adapters at 459f634: per dispatch",
        "`group.size()`": "Megatron's get_buffer: 3 per call",
        "`torch.tensor(list of 128 ints)`": "Megatron FusedDispatch.forward: per dispatch",
        "`torch.tensor(list of 128 ints, dtype=int64)`": "the DeepEP adapters before _deepep_common.counts_tensor",
        "`torch.frombuffer(array('q', list of 128 ints), dtype=int64)`": "the same tensor: counts_tensor before de260e1",
        "`counts_tensor(list of 128 ints)` (struct pack + frombuffer)": "the DeepEP adapters: per dispatch",
        "`torch.where(recv_idx >= 0, w.float(), 0.0)` (prob mask)":
            "legacy adapter: dispatch backward (on a GPU: CUDA launches)",
        "apply, 5 outputs + 4 ctx attributes (FusedDispatch's shape)": "Megatron and the slot: per call",
        "same + `ctx.mark_non_differentiable` of 2 outputs": "autograd.py before this change: per dispatch",
        "`x.contiguous()` (already contiguous)": "both paths",
        "`probs.float()` (already fp32)": "both paths: dispatch backward",
        "EventOverlap(EventHandle()) (no-work doubles)": "both paths with async_finish (real: a CUDA event)",
        "legacy: `check_dispatch_args`": "adapter at 459f634: per dispatch; since 944ebe1 once per call key",
        "`dispatch_key(...)` + dict lookup (shapes without the token count)":
            "hybridep: per dispatch; legacy / elastic before call_key",
        "`call_key(...)` + dict lookup (full shapes)": "legacy / elastic: per dispatch (validated-key cache)",
        "`combine_key(x)` + set membership": "legacy / elastic: per combine and cached dispatch",
        "elastic: `ElasticHandle(...)`": "elastic adapter: per dispatch",
        "`DispatchResult(...)` (the 5-tuple every adapter returns)": "every adapter: per dispatch",
    }
    return cases, notes


# -- report ---------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist_name in ("megatron-core", "megatron-ep-plugins", "pluggy"):
        try:
            out[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            out[dist_name] = "not installed"
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu}


COLUMNS = ("dispatch", "combine", "dispatch+bwd", "combine+bwd", "dispatch, no grad", "combine, no grad")
MEGATRON, MEGATRON_BODY = "megatron fused_a2a (fake Buffer)", "megatron Function bodies alone (no autograd)"
SLOT_NOWORK, SLOT_LEGACY = "slot+nowork (generic slot alone)", "slot+legacy (fake Buffer)"
LEGACY, NOWORK = "legacy adapter alone (no slot, no autograd)", "nowork backend alone"
SLOT_ELASTIC, ELASTIC = "slot+elastic (fake ElasticBuffer)", "elastic adapter alone (no slot, no autograd)"
BARE_ELASTIC = "bare ElasticBuffer calls (ep_bench's direct path)"
#: label -> (minuend, subtrahend) rows of the difference table
DIFFERENCES = {
    "plugin total: slot+legacy - megatron": (SLOT_LEGACY, MEGATRON),
    "wrapper cost, Megatron: autograd Functions - their bodies": (MEGATRON, MEGATRON_BODY),
    "wrapper cost, plugin: slot+nowork - nowork backend": (SLOT_NOWORK, NOWORK),
    "wrapper cost, plugin: slot+legacy - legacy adapter": (SLOT_LEGACY, LEGACY),
    "adapter vs Megatron body: legacy adapter - Megatron bodies": (LEGACY, MEGATRON_BODY),
    "elastic adapter - bare ElasticBuffer calls (what ep_bench's plugin/direct sees)": (ELASTIC, BARE_ELASTIC),
    "slot+elastic - bare ElasticBuffer calls": (SLOT_ELASTIC, BARE_ELASTIC),
}


def fmt_us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def render(paths: dict[str, dict], pieces: dict[str, dict], notes: dict[str, str], meta: dict) -> str:
    lines = [f"# Host cost per call ({meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPUs, Python "
             f"{meta['versions']['python']}, torch {meta['versions']['torch']}, megatron-core "
             f"{meta['versions']['megatron-core']}, commit {meta['versions']['git_commit']})",
             "",
             f"Median microseconds per call over {meta['repeats']} x {meta['number']} calls (host time; doubles' "
             f"tensors on {meta['device']}; no-work doubles, "
             "async_finish=allocate_on_comm_stream=True as Megatron passes them).",
             "",
             "| path | dispatch | combine | dispatch fwd+bwd | combine fwd+bwd | dispatch, no grad | combine, no grad |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in paths.items():
        lines.append(f"| {name} | " + " | ".join(fmt_us(res.get(c, {}).get("median_ns")) for c in COLUMNS) + " |")
    lines += ["", "| difference (us per call) | dispatch | combine | dispatch fwd+bwd | combine fwd+bwd | dispatch, no "
              "grad | combine, no grad |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, (a, b) in DIFFERENCES.items():
        if a in paths and b in paths:
            diffs = [paths[a][c]["median_ns"] - paths[b][c]["median_ns"] if c in paths[a] and c in paths[b] else None
                     for c in COLUMNS]
            lines.append(f"| {label} | " + " | ".join("-" if d is None else f"{d / 1000:+.2f}" for d in diffs) + " |")
    lines += ["", "| piece | us per call | where |", "| --- | ---: | --- |"]
    for name, res in pieces.items():
        lines.append(f"| {name} | {fmt_us(res['median_ns'])} | {notes.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (CI): about 5 s instead of 15 s")
    ap.add_argument("--number", type=int, help="calls per timed batch")
    ap.add_argument("--repeats", type=int, help="timed batches per case (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cpu", help="where the doubles' tensors live: cpu (default) or cuda (then "
                    "tensor operations on the path, e.g. the probability mask, pay CUDA launch costs; host time "
                    "is still what is timed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for host_overhead.json and host_overhead.md")
    args = ap.parse_args(argv)
    number = args.number or (200 if args.quick else 1000)
    repeats = args.repeats or (9 if args.quick else 21)
    warmup = 100 if args.quick else 300
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MCORE_EP_LOG", "warning")

    global POOL
    POOL = _Pool(args.device)
    started = time.perf_counter()
    with fake_deep_ep() as fused_a2a:
        from megatron_ep_plugins.backends.deepep_legacy import DeepEPLegacyBackend

        group = _FakeGroup(2)
        nowork, legacy, elastic = _NoWorkBackend(), DeepEPLegacyBackend(), elastic_backend(group)
        legacy.set_num_sms(20)
        slot_nowork, slot_legacy, slot_elastic = make_slot(nowork), make_slot(legacy), make_slot(elastic)
        sets = {
            MEGATRON: path_cases(fused_a2a.fused_dispatch, fused_a2a.fused_combine, group),
            SLOT_NOWORK: path_cases(slot_nowork.fused_dispatch, slot_nowork.fused_combine,
                                                           group),
            SLOT_LEGACY: path_cases(slot_legacy.fused_dispatch, slot_legacy.fused_combine, group),
            MEGATRON_BODY: megatron_direct_cases(fused_a2a, group),
            LEGACY: backend_cases(legacy, group),
            NOWORK: backend_cases(nowork, group),
            SLOT_ELASTIC: path_cases(slot_elastic.fused_dispatch, slot_elastic.fused_combine, group),
            ELASTIC: backend_cases(elastic, group),
            BARE_ELASTIC: bare_elastic_cases(elastic, group),
        }
        flat = {(p, c): fn for p, cases in sets.items() for c, fn in cases.items()}
        timed = measure({f"{p}|{c}": fn for (p, c), fn in flat.items()}, number, repeats, warmup)
        paths = {p: {c: timed[f"{p}|{c}"] for c in cases} for p, cases in sets.items()}
        cases, notes = piece_cases(group, legacy)
        for name, fn in list(cases.items()):  # adapter internals change; time only what still runs
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                del cases[name]
                notes[name] = f"not timed: {type(exc).__name__}: {exc}"[:120]
        pieces = measure(cases, number, repeats, warmup)
        pieces.update({name: {"median_ns": None, "min_ns": None} for name in notes if name not in pieces
                       and name.startswith(("legacy", "elastic"))})
    elapsed = time.perf_counter() - started

    meta = {"machine": machine(), "versions": versions(), "number": number, "repeats": repeats, "warmup": warmup,
            "sizes": {"tokens": TOKENS, "recv_rows": RECV, "hidden": HIDDEN, "topk": TOPK,
                      "num_experts": NUM_EXPERTS, "local_experts_in_counts": LOCAL_EXPERTS},
            "flags": FLAGS, "device": args.device, "elapsed_s": round(elapsed, 2)}
    table = render(paths, pieces, notes, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.json").write_text(json.dumps({**meta, "paths": paths, "pieces": pieces}, indent=2) + "\n")
    (out / "host_overhead.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
