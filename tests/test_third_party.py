"""A separately installed plugin package (examples/plugins/ep_allgather) is discovered, listed, selected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from test_torch_backend import SCENARIOS, make_inputs

HINT = "the example plugin is not installed: pip install -e examples/plugins/ep_allgather (scripts/setup.sh does)"


def test_listed_with_its_distribution():
    exe = Path(sys.executable).with_name("megatron-ep")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    data = json.loads(subprocess.run([str(exe), "list", "--json"], capture_output=True, text=True, env=env,
                                     timeout=120, check=True).stdout)
    plugin = next((p for p in data["plugins"] if p["name"] == "allgather"), None)
    assert plugin is not None, HINT
    assert plugin["status"] == "loaded" and plugin["builtin"] is False
    assert plugin["distribution"].startswith("ep-allgather-plugin") and plugin["backends"] == ["allgather"]
    row = next(b for b in data["backends"] if b["name"] == "allgather")
    assert row["available"] and row["priority"] == -10


def test_not_loaded_when_autoload_is_off(monkeypatch):
    from megatron_ep_plugins.api import explain
    from megatron_ep_plugins.errors import BackendUnavailableError

    monkeypatch.setenv("MCORE_EP_PLUGINS_AUTOLOAD", "0")
    monkeypatch.setenv("MCORE_EP_BACKEND", "allgather")
    with pytest.raises(BackendUnavailableError, match="not loaded: skipped by MCORE_EP_PLUGINS_AUTOLOAD=0"):
        explain()


def _rank_selected_by_env(rank, world, names):
    import torch.distributed as dist

    import megatron_ep_plugins as mep
    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    os.environ["MCORE_EP_BACKEND"] = "AllGather"
    inst = mep.install()
    assert inst.name == "allgather" and inst.choice.spec.provider == "allgather"
    ref = TorchA2ABackend()
    out = {}
    for name in names:
        x, idx, w, num_experts = make_inputs(name, rank, world)
        x = x.float().requires_grad_()
        w = w.requires_grad_()
        recv_x, recv_idx, recv_w, tpe, handle = td.fused_dispatch(x, idx, w, num_experts, dist.group.WORLD)
        y, _ = td.fused_combine(recv_x * 2, dist.group.WORLD, handle)
        (y.sum() + (recv_w * (recv_idx >= 0)).sum()).backward()
        r = ref.dispatch(x.detach(), idx, w.detach(), num_experts, dist.group.WORLD)
        y_ref, _ = ref.combine(r.recv_x * 2, r.handle, dist.group.WORLD)
        out[name] = dict(same_rows=torch.equal(recv_x.detach(), r.recv_x), same_idx=torch.equal(recv_idx, r.recv_topk_idx),
                         same_tpe=torch.equal(tpe, r.tokens_per_expert), y=y.detach(), y_ref=y_ref,
                         x_grad=x.grad, w_grad=w.grad, idx=idx)
    return out


def test_selected_by_env_and_matches_the_reference():
    results = run_ranks(_rank_selected_by_env, 2, list(SCENARIOS))
    for rank_out in results:
        for name, r in rank_out.items():
            assert r["same_rows"] and r["same_idx"] and r["same_tpe"], name
            torch.testing.assert_close(r["y"], r["y_ref"], rtol=1e-5, atol=1e-5)
            # d(sum y)/dx = 2 x (number of ranks the token went to); d/dw = 1 where the entry is routed
            sent_to = torch.zeros(r["idx"].shape[0])
            local = SCENARIOS[name][3]
            for t in range(r["idx"].shape[0]):
                sent_to[t] = len({int(e) // local for e in r["idx"][t] if e >= 0})
            torch.testing.assert_close(r["x_grad"], (2 * sent_to)[:, None].expand_as(r["x_grad"]))
            torch.testing.assert_close(r["w_grad"], (r["idx"] >= 0).float())
