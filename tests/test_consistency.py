"""Rank agreement through the process group's store (consistency.py), on 2 gloo ranks.

Issue 8.5: a backend's agreement key could overwrite the core's fields, and ranks disagreeing on
``MCORE_EP_CHECK_RANKS`` (or a rank that never dispatches) hung until the process-group timeout.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from distributed import run_ranks
from megatron_ep_plugins.consistency import record_text
from megatron_ep_plugins.errors import RankMismatchError, RankTimeoutError


def test_a_backend_key_cannot_overwrite_the_core_fields():
    forged = json.loads(record_text("torch", {"version": "0.1.0", "backend": "torch"}, "0.2.0"))
    assert forged["version"] == "0.2.0" and forged["key"] == {"version": "0.1.0", "backend": "torch"}
    assert record_text("torch", {"version": "0.1.0"}, "0.2.0") != record_text("torch", {}, "0.1.0")


def _versions_differ(rank, world):
    import torch.distributed as dist

    from megatron_ep_plugins.consistency import check_agreement

    try:  # rank 1 runs another package version; its backend key claims rank 0's
        check_agreement(dist.group.WORLD, "torch", {"version": "0.1.0"}, "0.1.0" if rank == 0 else "0.2.0", timeout=30)
    except RankMismatchError as exc:
        return str(exc)
    return "no error"


def test_ranks_with_different_package_versions_fail_even_if_the_key_says_otherwise():
    for msg in run_ranks(_versions_differ, 2, timeout=60):
        assert "selected different backends or parameters" in msg
        assert '"version": "0.1.0"' in msg and '"version": "0.2.0"' in msg


def _install_and_dispatch(rank, world, backends, check, stay):
    """Install ``backends[rank]`` with ``MCORE_EP_CHECK_RANKS=check[rank]``; dispatch once (or not at all)."""
    import torch
    import torch.distributed as dist

    import megatron_ep_plugins as mep
    from megatron.core.transformer.moe import token_dispatcher as td
    from test_install import register_clone

    os.environ["MCORE_EP_CHECK_RANKS"] = check[rank]
    os.environ["MCORE_EP_CHECK_RANKS_TIMEOUT"] = "3"
    if backends[rank] is None:  # a rank that never reaches its first dispatch
        time.sleep(stay)
        return "silent"
    register_clone("clone")
    mep.install(backends[rank])
    x, idx, w = torch.ones(2, 4), torch.tensor([[0], [1]]), torch.ones(2, 1)
    start = time.monotonic()
    try:
        td.fused_dispatch(x, idx, w, 2, dist.group.WORLD)
    except RankMismatchError as exc:
        elapsed = time.monotonic() - start
        time.sleep(stay)  # stay alive, as a rank of an NCCL job does while its communicator lives
        return type(exc).__name__, str(exc), elapsed
    return "ok"


def test_ranks_disagreeing_only_on_check_ranks_both_run():
    assert run_ranks(_install_and_dispatch, 2, ["torch", "torch"], ["1", "0"], 0, timeout=60) == ["ok", "ok"]


def test_a_rank_with_the_check_off_still_makes_the_checking_ranks_fail_cleanly():
    start = time.monotonic()
    out = run_ranks(_install_and_dispatch, 2, ["torch", "clone"], ["1", "0"], 4.5, timeout=45, outcomes=True)
    checker, unchecked = out
    assert checker.ok, checker.describe()
    kind, msg, elapsed = checker.value
    assert kind == "RankMismatchError" and elapsed < 10
    assert "global ranks [0]" in msg and '"backend": "torch"' in msg
    assert "global ranks [1]" in msg and '"backend": "clone"' in msg
    # the rank that skipped the check waits in the collective only until fault propagation stops it
    assert unchecked.status == "exited" and unchecked.exitcode == 1, unchecked.describe()
    assert "rank 0 failed in dispatch: RankMismatchError" in unchecked.stderr
    assert time.monotonic() - start < 40


def test_a_rank_that_never_dispatches_is_named_after_the_timeout():
    out = run_ranks(_install_and_dispatch, 2, ["torch", None], ["1", "1"], 6, timeout=45, outcomes=True)
    assert out[1].ok and out[1].value == "silent"
    kind, msg, elapsed = out[0].value
    assert kind == RankTimeoutError.__name__ and 2.5 < elapsed < 10
    assert "global ranks [1] of this expert-parallel group (2 ranks: [0, 1]) did not reach" in msg
    assert "MCORE_EP_CHECK_RANKS_TIMEOUT" in msg and "ranks [0] did" in msg


@pytest.mark.parametrize("value", ["0", "90000"])
def test_timeout_is_bounded(value):
    from megatron_ep_plugins.config import load_settings
    from megatron_ep_plugins.errors import ConfigError

    with pytest.raises(ConfigError, match="MCORE_EP_CHECK_RANKS_TIMEOUT"):
        load_settings({"MCORE_EP_CHECK_RANKS_TIMEOUT": value})
