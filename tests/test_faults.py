"""An error on one rank reaches the other ranks of the group (faults.py), on 2 gloo ranks.

The test backend below is a double defined here (never registered): its dispatch is a real gloo
collective, so a rank that raises before entering it leaves its peer blocked in it, the hang the
fault watcher exists to end. The failing rank stays alive after raising, as a rank of an NCCL job
does while its communicator lives (a gloo peer that exits would instead unblock the collective with
a connection error, which hides the hang).
"""

from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch

from distributed import run_ranks
from megatron_ep_plugins import faults
from megatron_ep_plugins.errors import ConfigError, InvalidInputError
from megatron_ep_plugins.spec import DispatchResult

STOP_LINE = "megatron_ep_plugins: rank {peer} failed in {op}: {error}; rank {me} stops too instead of waiting in " \
            "the collective"


class _CollectiveBackend:
    """TEST DOUBLE: dispatch/combine/cached dispatch are one gloo all_reduce each (identity data movement).

    ``fail`` = ``{(rank, op, call number): message}``: that rank raises ``InvalidInputError(message)``
    at that call, before the collective.
    """

    name = "collective-double"

    def __init__(self, fail=None) -> None:
        import torch.distributed as dist

        self.rank, self.fail, self.calls = dist.get_rank(), dict(fail or {}), {}

    def _collective(self, op, group):
        import torch.distributed as dist

        n = self.calls[op] = self.calls.get(op, 0) + 1
        message = self.fail.get((self.rank, op, n))
        if message is not None:
            raise InvalidInputError(message)
        dist.all_reduce(torch.ones(1), group=group)

    def set_num_sms(self, num_sms):
        pass

    def agreement_key(self):
        return {"algorithm": "all_reduce"}

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False):
        self._collective("dispatch", group)
        return DispatchResult(x.clone(), topk_idx.clone(), topk_weights.clone(),
                              torch.zeros(num_experts, dtype=torch.int64), len(x))

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        self._collective("dispatch_cached", group)
        return x.clone()

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        self._collective("combine", group)
        return x.clone(), (None if topk_weights is None else topk_weights.clone())


def _slot(backend):
    """``build_slot`` with the agreement check, as ``install()`` binds it."""
    from megatron_ep_plugins import __version__
    from megatron_ep_plugins.autograd import build_slot
    from megatron_ep_plugins.consistency import check_agreement

    return build_slot(backend, lambda g: check_agreement(g, backend.name, backend.agreement_key(), __version__))


def _step(slot, group, backward=True):
    x = torch.randn(4, 8, requires_grad=backward)
    probs = torch.rand(4, 2, requires_grad=backward)
    recv_x, _, recv_probs, _, handle = slot.fused_dispatch(x, torch.zeros(4, 2, dtype=torch.int64), probs, 2, group)
    out, _ = slot.fused_combine(recv_x * recv_probs.sum(1, keepdim=True), group, handle)
    if backward:
        out.sum().backward()
    return out


def _fast_watch(poll=0.2, grace=0.5):
    faults.POLL_S, faults.GRACE_S = poll, grace


def _rank_one_fails(rank, world, fail, fast, linger):
    """Steps until something raises; the failing rank prints its error and stays alive (see module doc)."""
    import torch.distributed as dist

    if fast:
        _fast_watch()
    slot = _slot(_CollectiveBackend(fail))
    try:
        for step in range(6):
            print(f"rank {rank} step {step}", flush=True)
            _step(slot, dist.group.WORLD)
    except InvalidInputError:
        traceback.print_exc()
        time.sleep(linger)
        raise
    return "finished"


def _stop_lines(text):
    return [line for line in text.splitlines() if line.startswith("megatron_ep_plugins: rank ")]


def test_one_rank_raising_in_dispatch_stops_its_waiting_peer_within_seconds():
    message = "token count 4096 is above the agreed buffer size 2048 (test double, rank 1, 3rd dispatch)"
    start = time.monotonic()
    out = run_ranks(_rank_one_fails, 2, {(1, "dispatch", 3): message}, False, 60.0,
                    expect_failure=True, grace=2.0, timeout=90)
    elapsed = time.monotonic() - start
    rank0, rank1 = out
    details = "\n".join(o.describe() for o in out)
    # rank 0 entered the 3rd dispatch (a collective rank 1 never joins) and was stopped by its watcher
    assert rank0.status == "exited" and rank0.exitcode == 1, details
    assert "rank 0 step 2" in rank0.stdout, details
    want = STOP_LINE.format(peer=1, op="dispatch", error=f"InvalidInputError: {message}", me=0)
    assert _stop_lines(rank0.stderr) == [want + f" ({faults.ENV}=0 turns this off)"], details
    # rank 1 raised the original error itself and printed no stop line
    assert f"megatron_ep_plugins.errors.InvalidInputError: {message}" in rank1.stderr, details
    assert not _stop_lines(rank1.stderr), details
    # default POLL_S (1 s) + GRACE_S (2 s) + start-up; far from the collective's 60 s timeout
    assert elapsed < 30, f"took {elapsed:.1f}s\n{details}"


def test_one_rank_raising_in_combine_backward_stops_its_peer():
    message = "bad gradient rows (test double, rank 1, 2nd cached dispatch)"
    out = run_ranks(_rank_one_fails, 2, {(1, "dispatch_cached", 2): message}, True, 30.0,
                    expect_failure=True, grace=2.0, timeout=90)
    details = "\n".join(o.describe() for o in out)
    assert out[0].status == "exited" and out[0].exitcode == 1, details
    want = STOP_LINE.format(peer=1, op="combine backward (cached dispatch of the gradients)",
                            error=f"InvalidInputError: {message}", me=0)
    assert _stop_lines(out[0].stderr) == [want + f" ({faults.ENV}=0 turns this off)"], details
    assert f"InvalidInputError: {message}" in out[1].stderr and not _stop_lines(out[1].stderr), details


def _rank_all_fail_then_continue(rank, world):
    """An error every rank raises (what backends detect collectively) stops no one; work goes on after it."""
    import torch.distributed as dist

    _fast_watch()
    message = "expert ids out of range on some rank (test double)"
    slot = _slot(_CollectiveBackend({(0, "dispatch", 2): message, (1, "dispatch", 2): message}))
    _step(slot, dist.group.WORLD)
    with pytest.raises(InvalidInputError):
        _step(slot, dist.group.WORLD)
    time.sleep(faults.POLL_S + faults.GRACE_S + 1.0)  # both records seen, grace over
    _step(slot, dist.group.WORLD)  # both ranks still here and in step
    return sorted(faults.active_watchers().values())


def test_an_error_every_rank_raises_stops_no_one():
    out = run_ranks(_rank_all_fail_then_continue, 2, outcomes=True, timeout=90)
    details = "\n".join(o.describe() for o in out)
    assert all(o.ok for o in out), details
    assert [o.value for o in out] == [[1], [1]], details
    assert not any(_stop_lines(o.stderr) for o in out), details


def _rank_first_fails_long_before_the_other(rank, world):
    """The same collective error, raised by rank 1 seconds after rank 0 (a slow rank): no one is stopped.

    Rank 0 sees rank 1's record long after its own failure (more than its poll + grace period); it
    must match it with its own failure, not take it for a new one. Rank 1 gets a long grace period,
    so it is not stopped while it is late.
    """
    import torch.distributed as dist

    _fast_watch(poll=0.2, grace=0.5 if rank == 0 else 5.0)
    message = "expert ids out of range on some rank (test double)"
    slot = _slot(_CollectiveBackend({(0, "dispatch", 2): message, (1, "dispatch", 2): message}))
    _step(slot, dist.group.WORLD)
    if rank == 1:
        time.sleep(1.5)
    with pytest.raises(InvalidInputError):
        _step(slot, dist.group.WORLD)
    time.sleep(1.5)  # rank 0's watcher has seen rank 1's record and its grace period is over
    _step(slot, dist.group.WORLD)
    return "survived"


def test_the_same_error_seconds_apart_on_each_rank_stops_no_one():
    out = run_ranks(_rank_first_fails_long_before_the_other, 2, outcomes=True, timeout=90)
    details = "\n".join(o.describe() for o in out)
    assert [o.value for o in out] == ["survived"] * 2, details
    assert not any(_stop_lines(o.stderr) for o in out), details


def _rank_quiet(rank, world):
    import torch.distributed as dist

    from megatron_ep_plugins.autograd import build_slot
    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    _fast_watch()
    slot = build_slot(TorchA2ABackend())
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(5, 4, generator=gen, requires_grad=True)
        probs = torch.rand(5, 2, generator=gen, requires_grad=True)
        idx = torch.rand(5, 4, generator=gen).topk(2, dim=1).indices
        recv_x, _, recv_probs, _, handle = slot.fused_dispatch(x, idx, probs, 4, dist.group.WORLD)
        out, _ = slot.fused_combine(recv_x * recv_probs.sum(1, keepdim=True), dist.group.WORLD, handle)
        out.sum().backward()
    time.sleep(3 * faults.POLL_S)  # the watcher polls a few times
    threads = [t.name for t in threading.enumerate() if t.name.startswith("megatron-ep-faults")]
    return faults.active_watchers(), threads


def test_nothing_is_printed_when_nothing_fails():
    out = run_ranks(_rank_quiet, 2, outcomes=True, timeout=90)
    details = "\n".join(o.describe() for o in out)
    assert all(o.ok for o in out), details
    for o in out:
        watchers, threads = o.value
        assert list(watchers.values()) == [1] and len(threads) == 1, details  # one watcher for the group
        assert o.stdout == "" and o.stderr == "", details


def _rank_disabled(rank, world):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from megatron_ep_plugins.autograd import build_slot

    message = "both ranks fail (test double)"
    slot = build_slot(_CollectiveBackend({(0, "dispatch", 2): message, (1, "dispatch", 2): message}))
    _step(slot, dist.group.WORLD)
    with pytest.raises(InvalidInputError):
        _step(slot, dist.group.WORLD)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("megatron-ep-faults")]
    published = distributed_c10d._get_default_store().check([f"{faults.group_namespace(dist.group.WORLD)}/count"])
    return faults.active_watchers(), threads, published


def test_disabled_means_no_watcher_and_nothing_published():
    for value in ("0", "off"):
        out = run_ranks(_rank_disabled, 2, env={faults.ENV: value}, outcomes=True, timeout=90)
        details = "\n".join(o.describe() for o in out)
        assert all(o.ok for o in out), details
        assert [o.value for o in out] == [({}, [], False)] * 2, details


def _rank_published_record(rank, world):
    import json

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    message = "line one\nline two"
    slot = _slot(_CollectiveBackend({(0, "dispatch", 1): message, (1, "dispatch", 1): message}))
    with pytest.raises(InvalidInputError) as info:
        _step(slot, dist.group.WORLD)
    assert str(info.value) == message  # the original exception, unchanged
    dist.barrier()
    namespace = faults.group_namespace(dist.group.WORLD)
    store = distributed_c10d._get_default_store()
    return namespace, sorted(json.loads(store.get(f"{namespace}/{n}"))["rank"] for n in (1, 2)), \
        json.loads(store.get(f"{namespace}/1"))


def test_failure_record_is_one_short_line_per_rank_under_the_group_namespace():
    out = run_ranks(_rank_published_record, 2, timeout=90)
    (ns0, ranks0, record), (ns1, ranks1, _) = out
    assert ns0 == ns1 and ns0.startswith(faults.KEY_ROOT + "/")
    assert ranks0 == ranks1 == [0, 1]
    assert record["op"] == "dispatch" and record["error"] == "InvalidInputError: line one / line two"


def _rank_uninstall(rank, world):
    import gc

    import torch.distributed as dist
    from megatron.core.transformer.moe import fused_a2a

    import megatron_ep_plugins as mep

    _fast_watch()
    mep.install("torch")
    x = torch.randn(3, 4)
    out = fused_a2a.fused_dispatch(x, torch.tensor([[0], [1], [0]]), torch.ones(3, 1), 2, dist.group.WORLD)
    fused_a2a.fused_combine(out[0], dist.group.WORLD, out[4])
    before = faults.active_watchers()
    del out
    mep.uninstall()
    gc.collect()
    time.sleep(3 * faults.POLL_S)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("megatron-ep-faults")]
    return list(before.values()), faults.active_watchers(), threads


def test_watcher_stops_after_uninstall():
    assert run_ranks(_rank_uninstall, 1, timeout=120) == [([1], {}, [])]


def test_variable_is_read_once_when_the_slot_is_built(monkeypatch):
    from megatron_ep_plugins.autograd import build_slot

    assert faults.enabled({}) and faults.enabled({faults.ENV: " "}) and faults.enabled({faults.ENV: "yes"})
    assert not faults.enabled({faults.ENV: "0"}) and not faults.enabled({faults.ENV: "false"})
    monkeypatch.setenv(faults.ENV, "maybe")
    with pytest.raises(ConfigError, match=f"{faults.ENV}='maybe' is not a boolean"):
        build_slot(_NoOpBackend())


class _NoOpBackend:
    name = "noop-double"

    def set_num_sms(self, num_sms):
        pass

    def agreement_key(self):
        return {}


def test_without_a_process_group_nothing_is_watched_or_published():
    reporter = faults.FaultReporter()
    reporter.watch(object())  # no default process group: no store, nothing to do
    error = InvalidInputError("x")
    reporter.report(error, "dispatch", object())  # must not raise
    assert faults.active_watchers() == {}


# -- run_ranks itself: a rank that raises, dies or hangs fails the test within seconds, with its output ----
def _rank_dies_hard(rank, world, how):
    import os
    import signal

    import torch.distributed as dist

    print(f"rank {rank} about to {how if rank == 1 else 'wait'}", flush=True)
    if rank == 1:
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.barrier()  # rank 0 waits for a peer that is gone (gloo notices, or the grace period ends it)
    return "unreachable"


@pytest.mark.parametrize("how, code", [("exit", 3), ("segfault", -11)])
def test_run_ranks_reports_a_dead_rank_at_once_with_its_exit_code_and_output(how, code):
    start = time.monotonic()
    out = run_ranks(_rank_dies_hard, 2, how, expect_failure=True, grace=1.0, timeout=120)
    elapsed = time.monotonic() - start
    details = "\n".join(o.describe() for o in out)
    assert out[1].status == "exited" and out[1].exitcode == code, details
    assert f"rank 1 about to {how}" in out[1].stdout, details
    if how == "segfault":
        assert "Fatal Python error: Segmentation fault" in out[1].stderr, details  # faulthandler's stack
    assert out[0].status in ("raised", "killed") and "rank 0 about to wait" in out[0].stdout, details
    assert elapsed < 30, f"{elapsed:.1f}s: not noticed at once (timeout was 120 s)\n{details}"


def _rank_raises_or_hangs(rank, world):
    print(f"rank {rank} output", flush=True)
    if rank == 0:
        raise ValueError("rank 0 gives up")
    time.sleep(600)


def test_run_ranks_stops_waiting_for_the_others_after_a_grace_period_and_shows_everything():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_rank_raises_or_hangs, 2, grace=1.0, timeout=120)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "--- rank 0: raised ---" in text and "ValueError: rank 0 gives up" in text and "rank 0 output" in text
    assert "--- rank 1: killed: still running after another rank failed ---" in text and "rank 1 output" in text
    assert "in _rank_raises_or_hangs" in text  # faulthandler: where the killed rank was stuck
    assert elapsed < 30, f"{elapsed:.1f}s"


def _rank_hangs(rank, world):
    time.sleep(600)


def test_run_ranks_kills_hung_ranks_at_the_timeout():
    out = run_ranks(_rank_hangs, 2, outcomes=True, timeout=3)
    assert [o.status for o in out] == ["hung", "hung"] and all("_rank_hangs" in o.stderr for o in out)


def _rank_world_size(rank, world):
    import torch.distributed as dist

    return dist.get_world_size()


def test_run_ranks_launches_again_when_its_rendezvous_port_was_taken(monkeypatch):
    import socket

    import distributed

    squatter = socket.socket()  # another process took the port between free_port() and rank 0's bind
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    ports = [squatter.getsockname()[1]]
    real, launches = distributed.free_port, []
    monkeypatch.setattr(distributed, "free_port", lambda: ports.pop() if ports else real())
    real_launch = distributed._launch
    monkeypatch.setattr(distributed, "_launch", lambda *a: launches.append(real_launch(*a)) or launches[-1])
    try:
        assert run_ranks(_rank_world_size, 2, timeout=60) == [2, 2]
    finally:
        squatter.close()
    assert len(launches) == 2 and "EADDRINUSE" in launches[0][0].error  # the taken port failed, then a new one
