"""GPU checks: one rank per visible GPU, NCCL. Skipped on machines without CUDA (CI is CPU-only).

Run on a GPU machine with ``python -m pytest tests/test_gpu.py -v``. Covers the reference backend
over NCCL against the single-process oracle, its autograd round trip, the installed Megatron slot
with the rank-agreement check over NCCL, and - when real DeepEP is importable and there are at
least 2 GPUs - the DeepEP adapters (legacy, elastic, hybridep) against the reference on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from test_deepep_backends import SCENARIOS as DEEPEP_SCENARIOS
from test_deepep_backends import _compare, check_deepep_facts, deepep_facts
from test_torch_backend import (SCENARIOS, _rank_dispatch_combine, _rank_round_trip, check_against_oracle,
                                check_round_trip)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs (CI is CPU-only)")

GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def world() -> int:
    return torch.cuda.device_count()


def _require(backend_name: str, why: str) -> None:
    """Skip unless there are 2 GPUs (``why``: what needs them) and the backend's probe passes here."""
    from megatron_ep_plugins.api import list_backends

    if world() < 2:
        pytest.skip(f"{why} needs an expert-parallel group of at least 2 GPUs")
    verdict = {c.spec.name: c.availability for c in list_backends()[1]}[backend_name]
    if not verdict:
        pytest.skip(f"{backend_name} unavailable: {verdict.reason}")


def test_torch_backend_over_nccl_matches_oracle():
    n = world()
    results = run_ranks(_rank_dispatch_combine, n, list(SCENARIOS), "cuda", backend="nccl", env=GPU_ENV)
    check_against_oracle(results, n)


def test_torch_backend_round_trip_over_nccl():
    check_round_trip(run_ranks(_rank_round_trip, world(), "cuda", backend="nccl", env=GPU_ENV))


def _one_shape_routings(rank, num_experts, count=5, tokens=96, hidden=256, topk=4):
    """``count`` dispatch inputs ``(x, topk_idx, weights)`` on this rank's GPU, all of one shape, each with a new
    routing (distinct ids, 20 % masked): what a graph captured for the shape must replay correctly."""
    for i in range(count):
        gen = torch.Generator().manual_seed(100 * i + rank)
        x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).cuda()
        idx = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices
        idx[torch.rand(tokens, topk, generator=gen) < 0.2] = -1
        yield x, idx.cuda(), torch.rand(tokens, topk, generator=gen).cuda()


def _graph_vs_eager(graphed, eager, rank, world) -> list:
    """Dispatch the one-shape routings through both backends, then use every handle only after all dispatches
    (a handle must not share memory with a graph, which the next dispatch of that shape overwrites): combine with
    weights and the cached dispatch. One bool per compared result."""
    import torch.distributed as dist

    from test_torch_backend import _expert

    g, num_experts = dist.group.WORLD, 4 * world
    kept = [(x, graphed.dispatch(x, idx, w, num_experts, g), eager.dispatch(x, idx, w, num_experts, g))
            for x, idx, w in _one_shape_routings(rank, num_experts)]
    same = []
    for x, rg, re in kept:
        same.append(all(torch.equal(a, b) for a, b in zip(rg[:4], re[:4])))
        y = _expert(re.recv_x)
        grads = torch.rand_like(re.recv_topk_weights)
        for a, b in zip(graphed.combine(y, rg.handle, g, topk_weights=grads),
                        eager.combine(y, re.handle, g, topk_weights=grads)):
            same.append(torch.equal(a, b))
        same.append(torch.equal(graphed.dispatch_cached(x, rg.handle, g), eager.dispatch_cached(x, re.handle, g)))
    return same


def _rank_routing_graph_replays(rank, world):
    """Backend ``torch`` with its routing replayed as a CUDA graph against the same backend launching it op by
    op (``_graph_vs_eager``)."""
    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    graphed, eager = TorchA2ABackend(), TorchA2ABackend()
    graphed.cuda_graphs, eager.cuda_graphs = True, False
    same = _graph_vs_eager(graphed, eager, rank, world)
    return sum(v is not None for v in graphed._graphs.values()), len(eager._graphs), same


def test_torch_backend_routing_graph_matches_eager():
    for captured, eager_graphs, same in run_ranks(_rank_routing_graph_replays, world(), backend="nccl", env=GPU_ENV):
        assert captured == 1 and eager_graphs == 0
        assert all(same), same


def _rank_installed_slot(rank, world):
    import torch.distributed as dist

    import megatron_ep_plugins as mep
    from megatron.core.transformer.moe import token_dispatcher as td

    inst = mep.install("torch")
    x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 2 * world, (8, 2), device="cuda")
    out = td.fused_dispatch(x, idx, torch.rand(8, 2, device="cuda"), 2 * world, dist.group.WORLD,
                            async_finish=True, allocate_on_comm_stream=True)
    combined, _ = td.fused_combine(out[0], dist.group.WORLD, out[4], async_finish=True, allocate_on_comm_stream=True)
    torch.cuda.synchronize()
    sent_to = torch.zeros(8, device="cuda")
    for t in range(8):
        sent_to[t] = len({int(e) // 2 for e in idx[t]})
    return inst.name, bool(torch.allclose(combined.float(), x.float() * sent_to[:, None], rtol=1e-2, atol=1e-2))


def test_installed_megatron_slot_over_nccl_with_rank_agreement():
    for name, ok in run_ranks(_rank_installed_slot, world(), backend="nccl", env=GPU_ENV):
        assert name == "torch" and ok


@pytest.mark.parametrize("backend_name", ["legacy", "elastic", "hybridep"])
def test_real_deepep_matches_reference(backend_name):
    """DeepEP adapters against the reference on SCENARIOS (valid for every real backend: hidden 256, an even number
    of experts per rank). ``deep_ep`` is one module per process: DeepEP main (legacy, elastic) and the hybrid-ep
    branch (legacy, hybridep) are separate installs, so each backend runs where its probe passes and skips with
    the probe's reason elsewhere (run this module once per DeepEP tree)."""
    _require(backend_name, "DeepEP")
    n = world()
    env = GPU_ENV | ({"EP_DISABLE_GIN": "1", "MCORE_EP_ELASTIC_HYBRID_MODE": "0"} if backend_name == "elastic" else {})
    counts = run_ranks(_compare, n, backend_name, list(DEEPEP_SCENARIOS), [(False, False), (True, True)], "cuda",
                       backend="nccl", env=env, timeout=600)
    assert counts == [len(DEEPEP_SCENARIOS) * 2] * n


def _rank_hybridep_graph_replays(rank, world):
    """``hybridep`` with its routing map and probs replayed as a CUDA graph against the same adapter launching them
    op by op (``_graph_vs_eager``; the graph's outputs are rewritten by each replay: HybridEP must have consumed
    them by then)."""
    from test_deepep_backends import make_backend

    graphed, eager = make_backend("hybridep"), make_backend("hybridep")
    eager._cuda_graphs = False
    same = _graph_vs_eager(graphed, eager, rank, world)
    return sum(v is not None for v in graphed._graphs.values()), len(eager._graphs), same


def test_hybridep_routing_graph_matches_eager():
    _require("hybridep", "HybridEP")
    for captured, eager_graphs, same in run_ranks(_rank_hybridep_graph_replays, world(), backend="nccl", env=GPU_ENV,
                                                  timeout=300):
        assert captured == 1 and eager_graphs == 0
        assert all(same), same


def _rank_hybridep_no_torch_sync(rank, world):
    """``hybridep`` once its shape is agreed and its graph captured, under sync debug mode "error": any sync through
    torch (``.cpu()``, ``.item()`` of a device tensor, ``Stream.synchronize`` as HybridEP's Python wrapper does it)
    raises. HybridEP's own ``cudaStreamSynchronize`` in its preprocessing (C++) is the dispatch's one host sync and
    is not seen by the mode. Returns the calls that ran clean."""
    import torch.distributed as dist

    from test_deepep_backends import make_backend

    backend, group, num_experts = make_backend("hybridep"), dist.group.WORLD, 4 * world
    x, idx, w = next(_one_shape_routings(rank, num_experts, count=1))
    for _ in range(3):  # agreement, buffer, JIT kernels, then the routing-map graph (captured at the 2nd)
        backend.dispatch(x, idx, w, num_experts, group)
    torch.cuda.synchronize()
    clean = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = backend.dispatch(x, idx, w, num_experts, group)
        clean.append("dispatch")
        backend.dispatch_cached(x, res.handle, group)
        clean.append("cached dispatch")
        backend.combine(res.recv_x, res.handle, group, topk_weights=res.recv_topk_weights)
        clean.append("combine")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return clean, res.tokens_per_expert.device.type, res.tokens_per_expert.tolist() == torch.bincount(
        res.recv_topk_idx[res.recv_topk_idx >= 0], minlength=num_experts // world).tolist()


def test_hybridep_adds_no_host_sync_to_hybrideps_own():
    _require("hybridep", "HybridEP")
    for clean, device, counts_ok in run_ranks(_rank_hybridep_no_torch_sync, world(), backend="nccl", env=GPU_ENV,
                                              timeout=300):
        assert clean == ["dispatch", "cached dispatch", "combine"]
        assert device == "cpu" and counts_ok


@pytest.mark.parametrize("cls_name", ["Buffer", "ElasticBuffer", "HybridEPBuffer"])
def test_real_deepep_objects_fail_like_the_emulator(cls_name):
    """The facts tests/test_deepep_backends.py checks on the CPU emulator, checked on the real library: only
    attributes the real objects have, and the same failures in the same words (``deepep_facts``)."""
    n = world()
    if n != 2:
        pytest.skip("the facts are for a group of 2 GPUs")
    try:
        import deep_ep
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"deep_ep not importable: {exc}")
    if not hasattr(deep_ep, cls_name):
        pytest.skip(f"this deep_ep has no {cls_name} (one DeepEP tree per process)")
    env = GPU_ENV | {"EP_DISABLE_GIN": "1"}
    # the hybrid-ep branch's V1 Buffer is an older fork (extra PCIe methods): exact attribute lists are main's
    exact = not (cls_name == "Buffer" and not hasattr(deep_ep, "ElasticBuffer"))
    for facts in run_ranks(deepep_facts, n, cls_name, "cuda", backend="nccl", env=env, timeout=300):
        check_deepep_facts(cls_name, facts, exact_attributes=exact)


def test_real_ncclep_matches_reference():
    """NCCL EP (nccl.ep, high-throughput algorithm) against the reference on test_ncclep's scenarios, and the
    autograd round trip through the core slot; skips with the probe's reason where nccl.ep cannot run."""
    from test_ncclep import SCENARIOS as NCCLEP_SCENARIOS
    from test_ncclep import _compare_ncclep
    from test_ncclep import _round_trip as _ncclep_round_trip

    _require("ncclep", "nccl.ep")
    n = world()
    assert run_ranks(_compare_ncclep, n, list(NCCLEP_SCENARIOS), "cuda", "ht", backend="nccl", env=GPU_ENV,
                     timeout=600) == [len(NCCLEP_SCENARIOS)] * n
    assert run_ranks(_ncclep_round_trip, n, "cuda", backend="nccl", env=GPU_ENV, timeout=600) == [True] * n


def test_one_pass_pair_sum_is_bit_identical_to_gather_and_add_on_the_gpu():
    """Combine's Triton two-row sum against the eager gather + ``torch.add`` it replaces, bf16/fp16/fp32, on the GPU
    (where fp32 -> bf16 rounds to nearest even; Triton's CPU interpreter truncates, so CI checks fp16/fp32 only)."""
    from megatron_ep_plugins.backends._pair_sum import pair_sum

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens, hidden in ((4096, 7168), (37, 1500), (1, 7), (0, 256)):
            gen = torch.Generator().manual_seed(tokens + hidden)
            back = (torch.randn(1 + 2 * tokens, hidden, generator=gen) * 50).to(dtype).cuda()
            back[0] = 0
            bags = torch.randint(0, 1 + 2 * tokens, (tokens, 2), generator=gen).cuda()
            out = pair_sum(back, bags)
            both = back.index_select(0, bags.view(-1)).view(tokens, 2, hidden)
            assert out is not None and torch.equal(out, torch.add(both[:, 0], both[:, 1])), (dtype, tokens, hidden)
