"""The conformance kit (megatron_ep_plugins.testing) itself: it passes correct backends and fails broken ones.

The deliberately broken backends below are test doubles of this file only: registered from Python for one test
(``register_plugin``), never through entry points. Each breaks one rule of the contract; the kit must name it.
The built-in DeepEP/NCCL EP adapters run the kit on their CPU emulators (``tests/emulators``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
from megatron_ep_plugins.errors import InvalidInputError
from megatron_ep_plugins.manager import register_plugin
from megatron_ep_plugins.spec import Availability, BackendSpec, Capabilities
from megatron_ep_plugins.testing import KitConfig, check_backend
from megatron_ep_plugins.testing.cases import Shape

ROOT = Path(__file__).resolve().parent.parent


# -- deliberately broken backends (test doubles) ------------------------------------------------------------
class BrokenOffByOneCounts(TorchA2ABackend):
    """tokens_per_expert off by one for local expert 0."""

    def dispatch(self, *args, **kwargs):
        res = super().dispatch(*args, **kwargs)
        counts = res.tokens_per_expert.clone()
        counts[0] += 1
        return res._replace(tokens_per_expert=counts)


class BrokenCombineScaled(TorchA2ABackend):
    """combine returns 1.01 x the right sum."""

    def combine(self, x, handle, group, **kwargs):
        out, weights = super().combine(x, handle, group, **kwargs)
        return (out.float() * 1.01).to(out.dtype), weights


class BrokenDroppedRow(TorchA2ABackend):
    """dispatch loses its last received row (combine pads it back, so only the dispatch checks can see it)."""

    def dispatch(self, *args, **kwargs):
        res = super().dispatch(*args, **kwargs)
        if res.recv_x.shape[0] == 0:
            return res
        return res._replace(recv_x=res.recv_x[:-1], recv_topk_idx=res.recv_topk_idx[:-1],
                            recv_topk_weights=res.recv_topk_weights[:-1])

    def combine(self, x, handle, group, **kwargs):
        if x.shape[0] == handle.num_recv - 1:
            x = __import__("torch").cat([x, x.new_zeros(1, x.shape[1])])
        tw = kwargs.get("topk_weights")
        if tw is not None and tw.shape[0] == handle.num_recv - 1:
            kwargs["topk_weights"] = __import__("torch").cat([tw, tw.new_zeros(1, tw.shape[1])])
        return super().combine(x, handle, group, **kwargs)

    def dispatch_cached(self, x, handle, group, **kwargs):
        out = super().dispatch_cached(x, handle, group, **kwargs)
        return out[:-1] if out.shape[0] else out


class BrokenRaisesOnOneRank(TorchA2ABackend):
    """Bad ids are caught on the rank that holds them only, which raises alone: its peers wait forever."""

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, **kwargs):
        bad = (topk_idx >= num_experts) | (topk_idx < -1)
        if bool(bad.any()):
            raise InvalidInputError("bad expert id (raised on this rank only)")
        return super().dispatch(x, topk_idx, topk_weights, num_experts, group, **kwargs)


BROKEN = {"broken-counts": BrokenOffByOneCounts, "broken-combine": BrokenCombineScaled,
          "broken-dropped-row": BrokenDroppedRow, "broken-one-rank-raises": BrokenRaisesOnOneRank}


class _BrokenPlugin:
    @hookimpl
    def ep_register_backends(self):
        return [BackendSpec(name=name, factory=cls, probe=lambda: Availability.yes("test double"), priority=-100,
                            capabilities=Capabilities(devices=("cpu",)), description=cls.__doc__)
                for name, cls in BROKEN.items()]


@pytest.fixture
def broken_backends():
    register_plugin(_BrokenPlugin(), "broken_test_doubles")  # removed again by conftest's clean_ep_state


QUICK = KitConfig(cases=15, grace=2.0, seed=1)


@pytest.mark.parametrize("name, expected", [
    ("broken-counts", "tokens_per_expert: got"),
    ("broken-combine", "combine: not the fp32 sum"),
    ("broken-dropped-row", "dispatch rows: received"),
])
def test_kit_fails_a_broken_backend_and_says_why(broken_backends, name, expected):
    report = check_backend(name, worlds=(2,), config=QUICK)
    assert not report.passed
    failed = dict(report.failures())
    assert all(expected in text for text in failed.values()), report.text()
    # the fixed scenarios catch it, and so do the random cases (hypothesis shrinks the failure to a small case)
    assert "2 ranks: uneven_tokens_masks" in failed and "2 ranks: 15 random cases" in failed, report.text()
    assert "Falsifying example" in failed["2 ranks: 15 random cases"] or "random" in failed["2 ranks: 15 random cases"]


def test_kit_reports_a_backend_that_raises_on_one_rank_only(broken_backends):
    t0 = time.perf_counter()
    report = check_backend("broken-one-rank-raises", worlds=(2,), config=QUICK)
    failed = dict(report.failures())
    assert set(failed) == {"2 ranks: bad_id_too_large", "2 ranks: bad_id_below_minus_one"}, report.text()
    assert all("must raise on every rank alike" in text for text in failed.values()), report.text()
    assert time.perf_counter() - t0 < 60  # the stuck peer is given up on after the grace period, not a timeout


def test_kit_passes_the_reference_in_process():
    report = check_backend("torch", worlds=(3,), config=KitConfig(cases=10, shape=Shape(hidden=(1, 8, 33),
                                                                                        dtypes=("float32",))))
    assert report.passed, report.text()


def test_kit_usage_errors_are_one_clear_line():
    from megatron_ep_plugins.testing.kit import KitUsageError

    with pytest.raises(KitUsageError, match="not a registered backend; registered: .*'torch'"):
        check_backend("no-such-ep", worlds=(2,))
    with pytest.raises(KitUsageError, match="unavailable here: .*deep_ep"):
        check_backend("legacy", worlds=(2,))


def _pytest_kit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The documented command, as a user runs it (the kit's pytest11 entry point loads its options)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "megatron_ep_plugins.testing", "-q",
                           "-p", "no:cacheprovider", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT / "examples")


def test_documented_command_full_run_on_the_reference():
    """The full kit (200 random cases on 2 and on 4 ranks) on the torch backend, through pytest."""
    proc = _pytest_kit("--ep-backend", "torch", "--ep-seed", "1", "-s")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "200 random cases on 2 ranks passed" in proc.stdout and "200 random cases on 4 ranks passed" in proc.stdout


def test_documented_command_without_backend_is_a_usage_error():
    proc = _pytest_kit(timeout=120)
    assert proc.returncode != 0
    assert "--ep-backend NAME" in proc.stdout + proc.stderr


# -- the built-in adapters on their CPU emulators --------------------------------------------------------------
from test_deepep_backends import deepep_emulator  # noqa: E402,F401 - fixture
from test_ncclep import ncclep_emulator  # noqa: E402,F401 - fixture

EMULATED = KitConfig(cases=25, force_device=True, grace=1.5, seed=1)  # CI: the same cases every run


@pytest.mark.parametrize("name, api, worlds", [
    ("legacy", "v1", (2, 4)),
    ("elastic", "v2", (2, 4)),
    ("elastic", "v25", (2,)),  # DeepEP V2.5's EPBuffer
    ("hybridep", "v1", (2, 4)),
])
def test_kit_passes_deepep_adapters_on_the_emulator(deepep_emulator, name, api, worlds):
    deepep_emulator(api)
    report = check_backend(name, worlds=worlds, config=EMULATED)
    if name != "legacy":
        assert report.passed, report.text()
        return
    # legacy's documented limit (deepep_legacy.py: "the expert ids are not range-checked (that would cost a host
    # sync; DeepEP does not either)"): DeepEP V1's device assert fires on the rank holding the bad id only and its
    # peers wait. The kit reports exactly that, and everything else passes.
    failed = dict(report.failures())
    assert set(failed) == {f"{w} ranks: {c}" for w in worlds for c in ("bad_id_too_large", "bad_id_below_minus_one")}, \
        report.text()
    for text in failed.values():
        assert "device-side assert" in text and "must raise on every rank alike" in text, text


def test_kit_passes_ncclep_on_the_emulator(ncclep_emulator):
    ncclep_emulator()
    report = check_backend("ncclep", worlds=(2, 4), config=EMULATED)
    assert report.passed, report.text()
