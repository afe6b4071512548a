"""End to end with real megatron-core 0.19.2 on 2 gloo CPU ranks (expert parallel size 2).

(a) Megatron's ``MoELayer`` (flex dispatcher, ``moe_flex_dispatcher_backend="deepep"``) served by the
    ``torch`` backend: output, input gradient, router and expert weight gradients equal a
    hand-written non-parallel computation from the same weights.
(b) Megatron's ``MoEFlexTokenDispatcher`` round trip through the installed slot with identity experts
    weighted by probs = 1/K: returns the input; gradients of input and probs are the analytic ones;
    ``tokens_per_expert`` counts every rank's assignments; uneven token counts per rank.
(c) The main job ``examples/train_moe.py`` runs and its loss falls.
(d) Zero-code activation: ``MCORE_EP_BACKEND=torch`` alone patches Megatron at import and a flex
    dispatcher round trip runs, without any ``install()`` call.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_moe.py"
HIDDEN, FFN, EXPERTS, TOPK = 16, 24, 4, 2


def _train_module():
    """examples/train_moe.py as a module: its ``megatron_device_setup`` holds the CPU workarounds."""
    spec = importlib.util.spec_from_file_location("train_moe_example", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flex_deepep_config() -> dict:
    """How a TransformerConfig selects the flex dispatcher's DeepEP slot: ``moe_flex_dispatcher_backend``
    from megatron-core 0.16, ``moe_enable_deepep`` in 0.15."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    if "moe_flex_dispatcher_backend" in fields:
        return {"moe_flex_dispatcher_backend": "deepep"}
    return {"moe_enable_deepep": True}


def _moe_config(**overrides):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
              moe_ffn_hidden_size=FFN, num_moe_experts=EXPERTS, moe_router_topk=TOPK,
              expert_model_parallel_size=2, moe_token_dispatcher_type="flex",
              **flex_deepep_config(), moe_router_dtype="fp32", moe_grouped_gemm=False,
              moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, hidden_dropout=0.0,
              attention_dropout=0.0, params_dtype=torch.float32, add_bias_linear=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _setup_megatron(seed=7):
    import torch
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(expert_model_parallel_size=2)
    return _train_module().megatron_device_setup(torch.device("cpu"), seed)


# ---------------------------------------------------------------------------------------------- (a)
def _rank_moe_layer_vs_reference(rank, world):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import megatron_ep_plugins as mep
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron.core.transformer.moe.moe_layer import MoELayer

    inst = mep.install("torch")
    overrides = _setup_megatron()
    config = _moe_config(**overrides)
    mlp_spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False).submodules.mlp
    # 0.19.2's local spec holds the MoE layer as functools.partial(MoELayer, submodules=...).
    submodules = getattr(mlp_spec, "submodules", None) or mlp_spec.keywords["submodules"]
    layer = MoELayer(config, submodules)
    assert type(layer.token_dispatcher).__name__ == "MoEFlexTokenDispatcher"
    assert td.fused_dispatch.__megatron_ep_backend__ == "torch"
    local = EXPERTS // world
    assert len(layer.experts.local_experts) == local

    # Distinct expert weights per rank, so a token served by the wrong expert would show.
    gen = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for e in layer.experts.local_experts:
            e.linear_fc1.weight.copy_(torch.randn(e.linear_fc1.weight.shape, generator=gen) * 0.3)
            e.linear_fc2.weight.copy_(torch.randn(e.linear_fc2.weight.shape, generator=gen) * 0.3)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen))

    seq, batch = 5 + 2 * rank, 3  # uneven token counts per rank
    x = torch.randn(seq, batch, HIDDEN, generator=gen, requires_grad=True)
    g = torch.randn(seq, batch, HIDDEN, generator=gen)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    (out * g).sum().backward()

    # --- reference: no expert parallelism, all experts on this rank, written by hand --------------
    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    fc1 = gather(torch.stack([e.linear_fc1.weight.detach() for e in layer.experts.local_experts]))
    fc2 = gather(torch.stack([e.linear_fc2.weight.detach() for e in layer.experts.local_experts]))
    fc1.requires_grad_(True)
    fc2.requires_grad_(True)
    wr = layer.router.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    tokens = xr.reshape(-1, HIDDEN)
    logits = tokens.float() @ wr.t()
    top_val, top_idx = logits.topk(TOPK, dim=-1)
    probs = torch.softmax(top_val, dim=-1)  # Megatron's default: softmax over the top-k logits
    ref = torch.zeros_like(tokens)
    for k in range(TOPK):
        for e in range(EXPERTS):
            sel = top_idx[:, k] == e
            if sel.any():
                h = F.gelu(tokens[sel] @ fc1[e].t()) @ fc2[e].t()
                ref = ref.index_add(0, sel.nonzero().squeeze(1), probs[sel, k, None] * h)
    ref = ref.view_as(xr)
    (ref * g).sum().backward()
    # Expert weights are shared by all ranks' tokens: sum the reference grads over ranks.
    dist.all_reduce(fc1.grad)
    dist.all_reduce(fc2.grad)
    mine = slice(rank * local, (rank + 1) * local)
    ep_fc1_grad = torch.stack([e.linear_fc1.weight.grad for e in layer.experts.local_experts])
    ep_fc2_grad = torch.stack([e.linear_fc2.weight.grad for e in layer.experts.local_experts])
    counts = torch.bincount(top_idx.flatten(), minlength=EXPERTS)
    dist.all_reduce(counts)
    result = {
        "backend": inst.name,
        "out_err": (out - ref).abs().max().item(),
        "out_scale": ref.abs().max().item(),
        "dx_err": (x.grad - xr.grad).abs().max().item(),
        "dx_scale": xr.grad.abs().max().item(),
        "router_grad_err": (layer.router.weight.grad - wr.grad).abs().max().item(),
        "fc1_grad_err": (ep_fc1_grad - fc1.grad[mine]).abs().max().item(),
        "fc2_grad_err": (ep_fc2_grad - fc2.grad[mine]).abs().max().item(),
        "fc_grad_scale": min(fc1.grad[mine].abs().max().item(), fc2.grad[mine].abs().max().item()),
        "experts_used": int((counts > 0).sum()),
        "remote_tokens": int(counts[[e for e in range(EXPERTS) if not (mine.start <= e < mine.stop)]].sum()),
    }
    ps.destroy_model_parallel()
    return result


def test_moe_layer_matches_non_parallel_reference():
    results = run_ranks(_rank_moe_layer_vs_reference, 2, timeout=150)
    for rank, r in enumerate(results):
        assert r["backend"] == "torch"
        assert r["out_scale"] > 1e-2 and r["dx_scale"] > 1e-2 and r["fc_grad_scale"] > 1e-3, r
        # fp32 on both sides; only summation order differs (errors seen: ~1e-6 at values ~5-9).
        assert r["out_err"] < 1e-5 * max(1.0, r["out_scale"]), (rank, r)
        assert r["dx_err"] < 1e-5 * max(1.0, r["dx_scale"]), (rank, r)
        assert r["router_grad_err"] < 1e-4, (rank, r)
        assert max(r["fc1_grad_err"], r["fc2_grad_err"]) < 1e-5 * max(1.0, r["fc_grad_scale"]), (rank, r)
        assert r["experts_used"] == EXPERTS and r["remote_tokens"] > 0, r  # real cross-rank traffic


# ---------------------------------------------------------------------------------------------- (b)
def _flex_round_trip(rank, world):
    """Megatron's dispatcher stages with identity experts scaled by the dispatched probs (1/K)."""
    import torch
    import torch.distributed as dist

    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    overrides = _setup_megatron()
    config = _moe_config(**overrides)
    local = EXPERTS // world
    disp = td.MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                     pg_collection=get_default_pg_collection())

    gen = torch.Generator().manual_seed(11 + rank)
    seq, batch = 4 + 3 * rank, 2  # uneven: 8 and 14 tokens
    x = torch.randn(seq, batch, HIDDEN, generator=gen, requires_grad=True)
    g = torch.randn(seq, batch, HIDDEN, generator=gen)
    tokens = seq * batch
    chosen = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOPK] for _ in range(tokens)])
    routing_map = torch.zeros(tokens, EXPERTS, dtype=torch.bool).scatter_(1, chosen, True)
    probs = (routing_map.float() / TOPK).requires_grad_(True)

    h, p = disp.dispatch_preprocess(x, routing_map, probs)
    h, p = disp.token_dispatch(h, p)
    h, tokens_per_expert, p = disp.dispatch_postprocess(h, p)
    h = h * p.unsqueeze(-1).to(h.dtype)  # identity experts, weighted like Megatron's experts do
    h = disp.combine_preprocess(h)
    h = disp.token_combine(h)
    out = disp.combine_postprocess(h)
    (out * g).sum().backward()

    counts = routing_map.sum(0)  # assignments per expert, summed over every rank's tokens
    dist.all_reduce(counts)
    expected_counts = counts[rank * local:(rank + 1) * local]
    expected_probs_grad = torch.where(routing_map, (x.detach() * g).sum(-1).reshape(-1, 1), 0.0)
    return {
        "out_err": (out - x).abs().max().item(),
        "dx_err": (x.grad - g).abs().max().item(),
        "dprobs_err": (probs.grad - expected_probs_grad).abs().max().item(),
        "tokens_per_expert": [int(v) for v in tokens_per_expert],
        "expected_counts": expected_counts.tolist(),
        "slot": td.fused_dispatch.__megatron_ep_backend__,
    }


def _rank_dispatcher_round_trip(rank, world):
    import megatron_ep_plugins as mep
    from megatron.core import parallel_state as ps

    mep.install("torch")
    try:
        return _flex_round_trip(rank, world)
    finally:
        ps.destroy_model_parallel()


def _check_round_trip(results):
    for rank, r in enumerate(results):
        assert r["slot"] == "torch", r
        assert r["out_err"] < 1e-5, (rank, r)
        assert r["dx_err"] < 1e-5, (rank, r)
        assert r["dprobs_err"] < 1e-4, (rank, r)
        assert r["tokens_per_expert"] == r["expected_counts"], (rank, r)
        assert sum(r["tokens_per_expert"]) > 0


def test_flex_dispatcher_round_trip_through_installed_slot():
    _check_round_trip(run_ranks(_rank_dispatcher_round_trip, 2, timeout=120))


# ---------------------------------------------------------------------------------------------- (c)
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_train_moe_example_runs_and_loss_falls(tmp_path):
    out_json = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, str(TRAIN), "--steps", "12", "--json-out", str(out_json)],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "selected backend: torch" in proc.stdout, log[-4000:]
    assert "megatron_ep_plugins: backend 'torch'" in proc.stdout  # the explanation is printed
    assert "token_dispatcher.fused_dispatch served by: torch" in proc.stdout
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+loss\s+([0-9.]+)", proc.stdout, re.M)]
    assert len(losses) == 12, proc.stdout
    assert losses[-1] < 0.9 * losses[0], losses
    import json

    record = json.loads(out_json.read_text())
    assert record["backend"] == "torch" and record["steps"] == 12 and record["world_size"] == 2
    assert record["losses"] == pytest.approx(losses, abs=1e-4)
    assert record["versions"]["megatron-core"] == "0.19.2" and record["device"] == "cpu"


# ---------------------------------------------------------------------------------------------- (d)
ZERO_CODE = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}]
    import megatron.core.transformer.moe.token_dispatcher as td  # the .pth hook installs here
    import megatron_ep_plugins.api as api
    from distributed import run_ranks
    from test_megatron_e2e import _flex_round_trip, _check_round_trip

    inst = api.installed()
    assert inst is not None, "MCORE_EP_BACKEND=torch did not install anything at import"
    print("installed:", inst.name, inst.choice.mode)
    print("slot:", td.fused_dispatch.__megatron_ep_backend__, td.fused_combine.__megatron_ep_backend__)

    def rank_fn(rank, world):
        from megatron.core import parallel_state as ps
        try:
            return _flex_round_trip(rank, world)
        finally:
            ps.destroy_model_parallel()

    _check_round_trip(run_ranks(rank_fn, 2, timeout=120))
    print("round trip ok")
""")


def test_zero_code_activation_by_env():
    script = ZERO_CODE.format(tests=str(Path(__file__).parent))
    assert "install(" not in script.replace("installed(", "")  # no explicit install anywhere
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=_clean_env(MCORE_EP_BACKEND="torch"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "installed: torch explicit" in proc.stdout, log[-4000:]
    assert "slot: torch torch" in proc.stdout
    assert "round trip ok" in proc.stdout
