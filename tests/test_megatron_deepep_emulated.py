"""The DeepEP adapters inside a real megatron-core MoELayer (2 gloo ranks), on the CPU DeepEP emulator.

Each adapter is installed in turn under the same layer, weights and inputs; forward output, input
gradient, router gradient and expert gradients must match the `torch` reference backend (which
test_megatron_e2e.py proves equal to a non-parallel computation). The emulator is a test double
(tests/emulators/deep_ep) that enforces DeepEP's documented asserts, so argument mapping, handle
caching, async flags and both backward paths go through Megatron's own calls on every commit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from distributed import run_ranks
from test_megatron_e2e import EXPERTS, _moe_config, _setup_megatron

EMULATORS = str(Path(__file__).resolve().parent / "emulators")
BACKENDS = ("legacy", "elastic", "hybridep")
#: Valid for every real DeepEP kernel (V2 combine: hidden % 256 == 0; V1/HybridEP bf16: hidden % 16 == 0); the
#: emulator enforces the same rules, so a smaller hidden size fails here exactly as it would on the GPU.
HIDDEN, FFN = 256, 64


def _enable_emulator(api: str) -> None:
    """In a forked rank: make the emulator importable as ``deep_ep`` (no monkeypatch fixture here)."""
    os.environ["DEEP_EP_EMULATOR_API"] = api
    sys.path.insert(0, EMULATORS)
    for name in [m for m in sys.modules if m == "deep_ep" or m.startswith("deep_ep.")]:
        del sys.modules[name]
    import deep_ep

    assert deep_ep.IS_EMULATOR


@contextlib.contextmanager
def _gpu_probes_pass():
    """Only while probing/creating: a CPU machine must look like an SM90 GPU with NCCL 2.30.
    (Kept narrow: Megatron's torch.compile'd fusions break if torch.cuda claims a GPU for longer.)"""
    import torch

    saved = torch.cuda.is_available, torch.cuda.get_device_capability, torch.cuda.nccl.version
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.nccl.version = lambda: (2, 30, 7)
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability, torch.cuda.nccl.version = saved


def _rank(rank, world, backends):
    import torch

    import megatron_ep_plugins as mep
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron.core.transformer.moe.moe_layer import MoELayer

    _enable_emulator("v2")  # the V2 package also carries the legacy Buffer and HybridEPBuffer
    mep.install("torch")
    overrides = _setup_megatron()
    config = _moe_config(**overrides, params_dtype=torch.bfloat16, bf16=True, hidden_size=HIDDEN,
                         ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN)
    mlp_spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False).submodules.mlp
    submodules = getattr(mlp_spec, "submodules", None) or mlp_spec.keywords["submodules"]
    layer = MoELayer(config, submodules)
    gen = torch.Generator().manual_seed(300 + rank)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    seq, batch = 6 + rank, 2  # uneven token counts per rank
    x0 = torch.randn(seq, batch, HIDDEN, generator=gen).to(torch.bfloat16)
    g = torch.randn(seq, batch, HIDDEN, generator=gen).to(torch.bfloat16)

    def run(name):
        with _gpu_probes_pass():
            inst = mep.install(name)
        assert td.fused_dispatch.__megatron_ep_backend__ == inst.name == name
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out, _ = layer(x)
        (out.float() * g.float()).sum().backward()
        grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
        return out.float().detach(), x.grad.float(), grads

    ref_out, ref_dx, ref_grads = run("torch")
    result = {}
    for name in backends:
        out, dx, grads = run(name)
        rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
        result[name] = {"out": rel(out, ref_out), "dx": rel(dx, ref_dx),
                        "grads": {n: rel(grads[n], ref_grads[n]) for n in ref_grads},
                        "scale": ref_out.abs().max().item()}
    ps.destroy_model_parallel()
    return result


def test_deepep_adapters_inside_megatron_moe_layer_match_the_reference():
    results = run_ranks(_rank, 2, BACKENDS, timeout=170)
    for rank, per_backend in enumerate(results):
        for name in BACKENDS:
            r = per_backend[name]
            assert r["scale"] > 1e-2
            # bf16 model: same routing and rows; only the fp32 sum order of combine may differ
            assert r["out"] < 1e-2 and r["dx"] < 1e-2, (rank, name, r)
            assert r["grads"] and max(r["grads"].values()) < 2e-2, (rank, name, r["grads"])


def _bench_paths_rank(rank, world):
    """ep_bench's timed paths for `legacy`, both modes: the slot and Megatron's own FusedDispatch/FusedCombine."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    _enable_emulator("v2")
    from megatron_ep_plugins.autograd import build_slot
    from megatron_ep_plugins.backends.deepep_legacy import DeepEPLegacyBackend
    from megatron_ep_plugins.bench import measure

    with _gpu_probes_pass():
        backend = DeepEPLegacyBackend()
    slot = build_slot(backend)
    slot.set_deepep_num_sms(20)
    args = SimpleNamespace(num_sms=20, iters=2, warmup=1, device="cpu")
    gen = torch.Generator().manual_seed(11 + rank)
    T, E, K = 8 + rank, 8, 2
    x = torch.randn(T, HIDDEN, generator=gen).to(torch.bfloat16)
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    probs = torch.rand(T, K, generator=gen)
    group = dist.group.WORLD
    out = {}
    for autograd in (False, True):
        td, tc, recv_x = measure.timing_plugin(slot, x, idx, probs, E, group, rank, args, autograd=autograd)
        md, mc, have = measure.timing_megatron_legacy(backend, x, idx, probs, E, group, rank, args, autograd=autograd)
        out[autograd] = {"plugin": [len(td), len(tc), min(td + tc) > 0], "rows": recv_x.shape[0],
                         "megatron": [len(md), len(mc), min(md + mc) > 0], "leaf_untouched": not x.requires_grad}
    # FP8 input (the (e4m3, scales) pair), as `ep_bench --fp8` times it: through the adapter, no autograd
    scales = torch.ones(T, HIDDEN // 128)
    fp8 = (x.float().to(torch.float8_e4m3fn), scales)
    td, tc, recv_x = measure.timing_plugin(measure.AdapterSlot(backend), fp8, idx, probs, E, group, rank, args)
    out["fp8"] = {"plugin": [len(td), len(tc)], "pair": isinstance(recv_x, tuple) and len(recv_x) == 2}
    return out


def test_bench_times_the_plugin_and_megatrons_path_with_and_without_autograd():
    for per_rank in run_ranks(_bench_paths_rank, 2, timeout=120):
        for autograd in (False, True):
            r = per_rank[autograd]
            assert r["plugin"] == [2, 2, True] and r["megatron"] == [2, 2, True], (autograd, r)
            assert r["rows"] > 0 and r["leaf_untouched"]
        assert per_rank["fp8"] == {"plugin": [2, 2], "pair": True}


def _rank_job_end(rank, world, keep_hook):
    """A job's last moments with ``elastic`` installed: one dispatch + combine, then ``destroy_process_group()`` while
    the installation still holds the backend (as it does until the process exits), then the installation goes.
    ``keep_hook=False``: without the teardown hook install() puts in place. An abort (the emulator's, as on the GPU)
    ends the rank before it returns."""
    import gc

    import torch
    import torch.distributed as dist

    import megatron_ep_plugins as mep
    from megatron_ep_plugins import teardown

    _enable_emulator("v2")
    with _gpu_probes_pass():
        backend = mep.install("elastic").backend
        hooked = teardown.hooked() is not None
        if not keep_hook:
            teardown.unhook()
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(4 + rank, HIDDEN, generator=gen).to(torch.bfloat16)
        idx = torch.rand(4 + rank, EXPERTS, generator=gen).topk(2, dim=1).indices
        res = backend.dispatch(x, idx, torch.rand(4 + rank, 2, generator=gen), EXPERTS, dist.group.WORLD)
        backend.combine(res.recv_x, res.handle, dist.group.WORLD)
        del res, backend
    dist.destroy_process_group()
    mep.uninstall()  # drops the installation, and with it the backend and (unless released) its buffer
    gc.collect()
    return hooked, teardown.hooked() is None


def test_job_ending_with_destroy_process_group_exits_cleanly_with_elastic_installed():
    """On 2 x H200 a job that used ``elastic`` and called ``destroy_process_group()`` died with SIGABRT at exit: the
    ``ElasticBuffer`` destructor's GPU barrier ran after the group was gone (``benchmarks/gpu/exit_check.py``,
    ``logs/steps_lease18.txt``). ``install()`` now hooks ``destroy_process_group`` to release the backend's buffers
    first; without the hook the emulator aborts the rank as the GPU did."""
    for hooked, unhooked_after_uninstall in run_ranks(_rank_job_end, 2, True, timeout=240):
        assert hooked and unhooked_after_uninstall
    outcomes = run_ranks(_rank_job_end, 2, False, timeout=240, expect_failure=True)
    assert all(o.exitcode == -6 for o in outcomes), [o.describe() for o in outcomes]
    assert all("cudaErrorIllegalAddress" in (o.stderr or "") for o in outcomes), [o.describe() for o in outcomes]
