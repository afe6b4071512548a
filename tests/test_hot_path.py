"""The slot's hot path does only the work it must (functional checks; no timing here).

``benchmarks/host_overhead.py`` measures the host cost; these tests pin the behaviour that keeps it
low and unchanged: no environment reads, imports or plugin lookups per call, one backend call per
call, the once-per-group work only once per group, outputs and gradients as before.
"""

from __future__ import annotations

import builtins
import collections.abc
import os
import sys

import pytest
import torch

from megatron_ep_plugins import faults
from megatron_ep_plugins.autograd import SLOT_MARK, build_slot
from megatron_ep_plugins.errors import InvalidInputError
from megatron_ep_plugins.spec import DispatchResult

T, N, H, K, E = 3, 5, 4, 2, 4


class _RecordingBackend:
    """TEST DOUBLE: returns fixed tensors and records every call (method, arguments)."""

    name = "recording-double"

    def __init__(self, fail_in: str = "") -> None:
        gen = torch.Generator().manual_seed(7)
        self.recv_x = torch.randn(N, H, generator=gen)
        self.recv_idx = torch.tensor([[0, -1], [1, 0], [-1, 1], [0, 1], [1, -1]])
        self.recv_w = torch.rand(N, K, generator=gen)
        self.counts = torch.tensor([4, 3], dtype=torch.int64)
        self.combined = torch.randn(T, H, generator=gen)
        self.combined_w = torch.rand(T, K, generator=gen)
        self.cached = torch.randn(N, H, generator=gen)
        self.handle = object()
        self.calls: list[tuple] = []
        self.fail_in = fail_in

    def _record(self, *call):
        self.calls.append(call)
        if self.fail_in == call[0]:
            raise InvalidInputError(f"{call[0]} refused (test double)")

    def set_num_sms(self, num_sms):
        self._record("set_num_sms", num_sms)

    def agreement_key(self):
        return {}

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False):
        self._record("dispatch", x, topk_idx, topk_weights, num_experts, group, async_finish, allocate_on_comm_stream)
        return DispatchResult(self.recv_x.clone(), self.recv_idx, self.recv_w.clone(), self.counts, self.handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        self._record("dispatch_cached", x, handle, group, async_finish, allocate_on_comm_stream)
        return self.cached.clone()

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        self._record("combine", x, handle, group, topk_weights, async_finish, allocate_on_comm_stream)
        return self.combined.clone(), (None if topk_weights is None else self.combined_w.clone())


class _Group:
    """A stand-in process group (hashable, like ProcessGroup); no default process group exists here."""


def _inputs(requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=gen, requires_grad=requires_grad)
    probs = torch.rand(T, K, generator=gen, requires_grad=requires_grad)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    return x, idx, probs


def _round_trip(slot, group, flags=(False, False)):
    x, idx, probs = _inputs()
    recv_x, recv_idx, recv_w, counts, handle = slot.fused_dispatch(x, idx, probs, E, group, *flags)
    out, none = slot.fused_combine(recv_x * 2, group, handle, *flags)
    (out.sum() + recv_w.sum()).backward()
    return x, probs, recv_x, recv_idx, recv_w, counts, handle, out, none


def test_one_backend_call_per_slot_call_with_arguments_passed_through():
    backend, group = _RecordingBackend(), _Group()
    slot = build_slot(backend)
    x, probs, recv_x, recv_idx, recv_w, counts, handle, out, none = _round_trip(slot, group, (True, True))
    # forward: dispatch, combine; backward (reverse order): cached dispatch, then combine of the gradients
    assert [c[0] for c in backend.calls] == ["dispatch", "combine", "dispatch_cached", "combine"]
    dispatch, combine, back_cached, back_combine = backend.calls
    assert dispatch[1] is x and dispatch[4:] == (E, group, True, True)  # contiguous x is passed as is
    assert combine[2:] == (handle, group, None, True, True)  # forward combine: no weights
    assert back_combine[2:4] == (handle, group) and back_combine[5:] == (True, True)
    assert back_combine[4].dtype == torch.float32 and torch.equal(back_combine[4], torch.ones(N, K))
    assert back_cached[2:] == (handle, group, True, True)
    assert torch.equal(back_cached[1], torch.full((T, H), 1.0))  # d(out.sum())/d(out), through combine
    slot.set_deepep_num_sms(24)
    assert backend.calls[-1] == ("set_num_sms", 24)
    for fn in slot.by_role().values():
        assert getattr(fn, SLOT_MARK) == backend.name


def test_outputs_and_gradients_follow_megatrons_functions():
    backend = _RecordingBackend()
    x, probs, recv_x, recv_idx, recv_w, counts, handle, out, none = _round_trip(build_slot(backend), _Group())
    assert torch.equal(recv_x.detach(), backend.recv_x) and torch.equal(recv_w.detach(), backend.recv_w)
    assert recv_idx is backend.recv_idx and counts is backend.counts and handle is backend.handle and none is None
    assert torch.equal(out.detach(), backend.combined)
    # integer outputs are non-differentiable (by dtype, as in Megatron); float outputs carry gradients
    assert not recv_idx.requires_grad and not counts.requires_grad
    assert recv_x.requires_grad and recv_w.requires_grad and out.requires_grad
    # dispatch backward = combine(grad, topk_weights=grad of the probs): x.grad and probs.grad come from it
    assert torch.equal(x.grad, backend.combined) and torch.equal(probs.grad, backend.combined_w)


def test_dispatch_backward_with_unused_probs_gets_zero_weights_like_megatron():
    # autograd materializes the unused output's gradient as zeros (Megatron's FusedDispatch gets the same)
    backend, group = _RecordingBackend(), _Group()
    slot = build_slot(backend)
    x, idx, probs = _inputs()
    recv_x, *_ = slot.fused_dispatch(x, idx, probs.detach(), E, group)
    recv_x.sum().backward()
    assert backend.calls[-1][0] == "combine"
    weights = backend.calls[-1][4]
    assert weights.dtype == torch.float32 and torch.equal(weights, torch.zeros(N, K))
    assert torch.equal(x.grad, backend.combined)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inputs_without_grad"])
def test_without_a_gradient_to_track_the_slot_calls_the_backend_without_a_function(mode):
    # what apply would return, minus the autograd node: the backend's own objects, passed through
    backend, group = _RecordingBackend(), _Group()
    slot = build_slot(backend)
    x, idx, probs = _inputs(requires_grad=mode != "inputs_without_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    seen_out = []
    real_dispatch, real_combine = backend.dispatch, backend.combine
    backend.dispatch = lambda *a, **k: seen_out.append(real_dispatch(*a, **k)) or seen_out[-1]
    backend.combine = lambda *a, **k: seen_out.append(real_combine(*a, **k)) or seen_out[-1]
    with ctx():
        out = slot.fused_dispatch(x, idx, probs, E, group, True, True)
        y = out[0] * 2
        combined = slot.fused_combine(y, group, out[4], True, True)
    assert type(out) is tuple and len(out) == 5 and all(a is b for a, b in zip(out, seen_out[0]))
    assert type(combined) is tuple and combined[0] is seen_out[1][0] and combined[1] is None
    assert all(t.grad_fn is None for t in (out[0], out[2], combined[0]))
    assert [c[0] for c in backend.calls] == ["dispatch", "combine"]
    assert backend.calls[0][1] is x and backend.calls[0][4:] == (E, group, True, True)
    assert backend.calls[1][2:] == (out[4], group, None, True, True)


def test_a_gradient_on_either_input_keeps_the_function():
    backend, group = _RecordingBackend(), _Group()
    slot = build_slot(backend)
    x, idx, probs = _inputs(requires_grad=False)
    probs.requires_grad_(True)  # only the router's probabilities carry a gradient
    recv_x, _, recv_w, _, handle = slot.fused_dispatch(x, idx, probs, E, group)
    assert recv_w.grad_fn is not None and recv_x.grad_fn is not None  # one node for all float outputs
    recv_w.sum().backward()
    assert [c[0] for c in backend.calls] == ["dispatch", "combine"]  # dispatch backward ran
    assert torch.equal(probs.grad, backend.combined_w)
    # combine of a tensor that needs no gradient: no node; of one that does: the Function
    assert slot.fused_combine(recv_x.detach(), group, handle)[0].grad_fn is None
    assert slot.fused_combine(recv_x, group, handle)[0].grad_fn is not None


def test_failures_without_a_gradient_reach_the_caller_and_the_fault_reporter(monkeypatch):
    reported = []
    monkeypatch.setattr("megatron_ep_plugins.autograd.FaultReporter.report",
                        lambda self, exc, op, group: reported.append((type(exc), op)))
    for op in ("dispatch", "combine"):
        slot, group = build_slot(_RecordingBackend(fail_in=op)), _Group()
        with torch.no_grad(), pytest.raises(InvalidInputError, match=f"^{op} refused"):
            _round_trip_no_grad(slot, group)
    assert reported == [(InvalidInputError, "dispatch"), (InvalidInputError, "combine")]


def _round_trip_no_grad(slot, group):
    x, idx, probs = _inputs(requires_grad=False)
    recv_x, _, _, _, handle = slot.fused_dispatch(x, idx, probs, E, group)
    return slot.fused_combine(recv_x, group, handle)


def test_once_per_group_work_runs_once_per_group():
    checked: list = []
    slot = build_slot(_RecordingBackend(), checked.append)
    a, b = _Group(), _Group()
    for group in (a, a, b, a, b, b):
        _round_trip(slot, group)
    assert checked == [a, b]


def test_a_failing_agreement_check_is_retried_at_the_next_dispatch():
    calls = []

    def check(group):
        calls.append(group)
        if len(calls) == 1:
            raise InvalidInputError("ranks disagree (test double)")

    slot, group = build_slot(_RecordingBackend(), check), _Group()
    x, idx, probs = _inputs()
    with pytest.raises(InvalidInputError):
        slot.fused_dispatch(x, idx, probs, E, group)
    slot.fused_dispatch(x, idx, probs, E, group)
    slot.fused_dispatch(x, idx, probs, E, group)
    assert calls == [group, group]


class _WatchedEnviron(collections.abc.MutableMapping):
    """os.environ stand-in that counts every read."""

    def __init__(self, real):
        self.real, self.reads = real, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.real[key]

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]

    def __iter__(self):
        self.reads += 1
        return iter(self.real)

    def __len__(self):
        return len(self.real)

    def get(self, key, default=None):
        self.reads += 1
        return self.real.get(key, default)


def test_calls_read_no_environment_import_nothing_and_look_up_no_plugin(monkeypatch):
    backend, group = _RecordingBackend(), _Group()
    slot = build_slot(backend)
    _round_trip(slot, group)  # first use of the group done before watching

    def forbidden(*args, **kwargs):
        raise AssertionError("plugin machinery used on the hot path")

    import megatron_ep_plugins.config as config
    import megatron_ep_plugins.manager as manager
    import megatron_ep_plugins.selection as selection

    for module, name in ((manager, "discover"), (selection, "select"), (selection, "select_and_create"),
                         (config, "load_settings"), (config, "read_bool"), (config, "read_int"),
                         (config, "read_str"), (faults, "enabled")):
        monkeypatch.setattr(module, name, forbidden)
    environ = _WatchedEnviron(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    imports = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron_ep_plugins"):  # torch's autograd imports lazily itself
            imports.append(f"{caller}: {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting_import)
    before = len(backend.calls)
    for flags in ((False, False), (True, True)):
        for _ in range(3):
            _round_trip(slot, group, flags)
    assert len(backend.calls) - before == 6 * 4  # still one backend call per slot call
    assert environ.reads == 0, "the slot read the environment on the hot path"
    assert imports == [], f"the slot imported {imports} on the hot path"


def test_errors_reach_the_caller_unchanged_in_every_op():
    group = _Group()
    for op in ("dispatch", "combine", "dispatch_cached"):
        backend = _RecordingBackend(fail_in=op)
        slot = build_slot(backend)
        with pytest.raises(InvalidInputError, match=f"^{op} refused") as info:
            _round_trip(slot, group)
        assert type(info.value) is InvalidInputError
    assert faults.active_watchers() == {}  # no process group here: nothing watched


def test_slot_builds_read_the_fault_switch_once(monkeypatch):
    calls = []
    real = faults.enabled
    monkeypatch.setattr("megatron_ep_plugins.autograd._fault_propagation_enabled",
                        lambda: calls.append(1) or real())
    slot = build_slot(_RecordingBackend())
    for _ in range(3):
        _round_trip(slot, _Group())
    assert calls == [1]
