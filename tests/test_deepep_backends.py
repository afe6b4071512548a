"""The DeepEP adapters (legacy, elastic, hybridep) against the reference ``torch`` backend, on CPU gloo ranks.

DeepEP itself needs a GPU, so these tests run the adapters against ``tests/emulators/deep_ep``: a CPU test
double of DeepEP's Python API (never installed, importable only through the ``deepep_emulator`` fixture).
The emulator computes with an all-gather algorithm unlike the reference's all-to-all and enforces DeepEP's
documented asserts, so "adapter == reference" and "no emulator assert fired" are independent checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks

EMULATORS = Path(__file__).resolve().parent / "emulators"


def _drop_deep_ep_modules() -> None:
    for name in list(sys.modules):
        if name == "deep_ep" or name.startswith("deep_ep."):
            del sys.modules[name]


@pytest.fixture
def deepep_emulator(monkeypatch):
    """``enable(api)``: make the CPU DeepEP emulator importable as ``deep_ep`` and the GPU probes pass."""

    def enable(api: str = "v2", capability=(9, 0), nccl=(2, 30, 4)):
        monkeypatch.setenv("DEEP_EP_EMULATOR_API", api)
        monkeypatch.syspath_prepend(str(EMULATORS))
        _drop_deep_ep_modules()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda.nccl, "version", lambda: nccl)
        import deep_ep

        assert deep_ep.IS_EMULATOR and deep_ep.API == api
        deep_ep.reset_emulator_state()
        return deep_ep

    yield enable
    _drop_deep_ep_modules()


# -- inputs ---------------------------------------------------------------------------------------------
SCENARIOS = {
    # name: (tokens on rank r, hidden, topk, experts per rank)
    "uneven_masked": (lambda r: 11 + 5 * r, 16, 2, 2),
    "zero_tokens_on_rank1": (lambda r: 0 if r == 1 else 9, 16, 2, 2),
    "k1": (lambda r: 10, 8, 1, 2),
    "k4": (lambda r: 6 + r, 8, 4, 3),
}


def make_inputs(name: str, rank: int, world: int):
    count, hidden, topk, per_rank = SCENARIOS[name]
    num_experts = per_rank * world
    gen = torch.Generator().manual_seed(1000 * world + 10 * rank + sorted(SCENARIOS).index(name))
    tokens = count(rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(tokens, num_experts, generator=gen).topk(min(topk, num_experts), dim=1).indices
    if name == "uneven_masked":
        idx[::3, 0] = -1  # dropped by capacity
        if tokens > 4:
            idx[4, :] = -1  # routed nowhere
    w = torch.rand(tokens, idx.shape[1], generator=gen)
    return x, idx, w, num_experts


def make_backend(name: str):
    if name == "legacy":
        from megatron_ep_plugins.backends.deepep_legacy import DeepEPLegacyBackend

        return DeepEPLegacyBackend()
    if name == "elastic":
        from megatron_ep_plugins.backends.deepep_elastic import DeepEPElasticBackend

        return DeepEPElasticBackend()
    from megatron_ep_plugins.backends.hybridep import HybridEPBackend

    return HybridEPBackend()


def _order(recv_x, recv_idx):
    """Permutation sorting received rows by content (rows are random, so content names the source token)."""
    keys = [tuple(r) + tuple(i) for r, i in zip(recv_x.view(torch.int16).tolist(), recv_idx.tolist())]
    return sorted(range(len(keys)), key=keys.__getitem__)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-6))


def _compare(rank, world, backend_name, scenarios, flags, device="cpu"):
    """Backend vs the torch reference on the same inputs (CPU emulator, or real DeepEP on ``device``)."""
    import deep_ep
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    group = dist.group.WORLD
    backend, ref = make_backend(backend_name), TorchA2ABackend()
    backend.set_num_sms(24)
    checked = 0
    for name in scenarios:
        for async_finish, on_comm in flags:
            x, idx, w, num_experts = make_inputs(name, rank, world)
            x, idx, w = x.to(device), idx.to(device), w.to(device)
            kw = dict(async_finish=async_finish, allocate_on_comm_stream=on_comm)
            got = backend.dispatch(x, idx, w, num_experts, group, **kw)
            exp = ref.dispatch(x, idx, w, num_experts, group)
            assert got.recv_x.shape == exp.recv_x.shape, (name, got.recv_x.shape, exp.recv_x.shape)
            assert got.tokens_per_expert.device.type == "cpu" and got.tokens_per_expert.dtype == torch.int64
            assert torch.equal(got.tokens_per_expert, exp.tokens_per_expert), name
            pg, pe = _order(got.recv_x, got.recv_topk_idx), _order(exp.recv_x, exp.recv_topk_idx)
            assert torch.equal(got.recv_x[pg], exp.recv_x[pe]), name  # bit-identical rows
            gi, ei = got.recv_topk_idx[pg], exp.recv_topk_idx[pe]
            assert torch.equal(gi, ei), name
            owned = ei >= 0
            assert torch.equal(got.recv_topk_weights[pg][owned], exp.recv_topk_weights[pe][owned]), name

            # combine: an "expert" that scales each row by (1 + number of local slots)
            def expert(res):
                return (res.recv_x.float() * (1 + (res.recv_topk_idx >= 0).sum(1, keepdim=True))).to(torch.bfloat16)

            # dispatch's backward: probs' grad, with garbage in slots owned elsewhere (must be ignored)
            def probs_grad(res):
                g = res.recv_x.float()[:, : res.recv_topk_idx.shape[1]] + torch.arange(res.recv_topk_idx.shape[1],
                                                                                        device=res.recv_x.device)
                return torch.where(res.recv_topk_idx >= 0, g, 123.0)

            out, cw = backend.combine(expert(got), got.handle, group, topk_weights=probs_grad(got), **kw)
            ref_out, ref_cw = ref.combine(expert(exp), exp.handle, group, topk_weights=probs_grad(exp))
            assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
            if ref_out.numel():
                assert _rel(out, ref_out) < 1e-2, (name, _rel(out, ref_out))
                assert torch.allclose(cw, ref_cw, rtol=1e-5, atol=1e-5), (name, cw, ref_cw)
            masked_nowhere = (idx < 0).all(1)
            assert not out[masked_nowhere].float().any(), "a token sent nowhere must come back as zeros"
            out2, none_w = backend.combine(expert(got), got.handle, group, **kw)
            assert none_w is None and torch.equal(out2, out)

            # combine's backward: dispatch along the cached handle
            g = (x.float() * 3 + 1).to(torch.bfloat16)
            cg = backend.dispatch_cached(g, got.handle, group, **kw)
            ce = ref.dispatch_cached(g, exp.handle, group)
            assert torch.equal(cg[pg], ce[pe]), name
            checked += 1
    if getattr(deep_ep, "IS_EMULATOR", False):
        assert deep_ep.pending_async_events() == 0, "an async event was never waited on"
    return checked


@pytest.mark.parametrize("backend_name, world, scenarios, flags", [
    ("legacy", 2, list(SCENARIOS), [(False, False), (True, True)]),
    ("legacy", 4, ["uneven_masked", "k4"], [(True, False)]),
    ("elastic", 2, list(SCENARIOS), [(False, False), (True, True)]),
    ("elastic", 4, ["uneven_masked", "zero_tokens_on_rank1"], [(False, True)]),
    ("hybridep", 2, list(SCENARIOS), [(False, False)]),
])
def test_matches_reference(deepep_emulator, backend_name, world, scenarios, flags):
    deepep_emulator("v2" if backend_name == "elastic" else "v1")
    counts = run_ranks(_compare, world, backend_name, scenarios, flags)
    assert counts == [len(scenarios) * len(flags)] * world


# -- backend specifics ----------------------------------------------------------------------------------
def _legacy_buffer_reuse(rank, world):
    import deep_ep
    import torch.distributed as dist

    backend = make_backend("legacy")
    group = dist.group.WORLD
    for hidden in (16, 16, 8, 64):
        x = torch.randn(5, hidden).to(torch.bfloat16)
        idx = torch.tensor([[0, 3]] * 5)
        res = backend.dispatch(x, idx, torch.ones(5, 2), 4, group)
        backend.combine(res.recv_x, res.handle, group)
    with pytest.raises(Exception, match="even"):
        backend.set_num_sms(7)
    return deep_ep.Buffer.num_constructed, deep_ep.Buffer.num_sms


def test_legacy_reuses_buffer_and_rebuilds_when_larger(deepep_emulator):
    deepep_emulator("v1")
    results = run_ranks(_legacy_buffer_reuse, 2)
    assert results == [(2, 20)] * 2  # built for hidden 16, reused for 16 and 8, rebuilt for 64


def _elastic_buckets(rank, world):
    import deep_ep
    import torch.distributed as dist

    os.environ["MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH"] = "1"
    backend = make_backend("elastic")
    group = dist.group.WORLD
    sizes = []
    for tokens in (10 + rank, 300 if rank == 1 else 3, 20, 0):  # rank 1's larger batch grows both ranks
        x = torch.randn(tokens, 8).to(torch.bfloat16)
        idx = torch.randint(0, 4, (tokens, 2))
        res = backend.dispatch(x, idx, torch.rand(tokens, 2), 4, group)
        backend.combine(res.recv_x, res.handle, group)
        sizes.append(backend._shape[1])
    return sizes, deep_ep.ElasticBuffer.num_constructed


def test_elastic_buckets_max_tokens_and_grows_together(deepep_emulator):
    deepep_emulator("v2")
    assert run_ranks(_elastic_buckets, 2) == [([256, 512, 512, 512], 2)] * 2


def _elastic_steady_state(rank, world):
    import deep_ep
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError

    backend = make_backend("elastic")
    group = dist.group.WORLD
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    for tokens in (10 + rank, 200, 5):  # within the agreed bucket: no collective of the adapter's own
        x = torch.randn(tokens, 8).to(torch.bfloat16)
        res = backend.dispatch(x, torch.randint(0, 4, (tokens, 2)), torch.rand(tokens, 2), 4, group)
        backend.combine(res.recv_x, res.handle, group)
    try:
        backend.dispatch(torch.randn(300, 8).to(torch.bfloat16), torch.randint(0, 4, (300, 2)),
                         torch.rand(300, 2), 4, group)
    except InvalidInputError as exc:
        return len(calls), str(exc), deep_ep.ElasticBuffer.num_constructed
    return len(calls), "no error", deep_ep.ElasticBuffer.num_constructed


def test_elastic_steady_state_adds_no_collective_and_overflow_says_what_to_pin(deepep_emulator):
    deepep_emulator("v2")
    for calls, msg, built in run_ranks(_elastic_steady_state, 2):
        assert calls == 1 and built == 1  # only the first dispatch agreed across ranks
        assert "300 tokens exceed the num_max_tokens_per_rank=256" in msg
        assert "MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK" in msg and "MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH=1" in msg


def _elastic_pinned(rank, world, values, tokens):
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError, RankMismatchError

    os.environ["MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK"] = str(values[rank])
    backend = make_backend("elastic")
    assert backend.agreement_key()["max_tokens_per_rank"] == values[rank]
    t = tokens[rank]
    try:
        backend.dispatch(torch.randn(t, 8).to(torch.bfloat16), torch.randint(0, 4, (t, 2)), torch.rand(t, 2), 4,
                         dist.group.WORLD)
    except (RankMismatchError, InvalidInputError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def test_elastic_pinned_max_tokens_mismatch_and_overflow(deepep_emulator):
    deepep_emulator("v2")
    results = run_ranks(_elastic_pinned, 2, [512, 1024], [4, 4])
    assert all(kind == "RankMismatchError" and "rank 0: 512" in msg and "rank 1: 1024" in msg for kind, msg in results)
    # only rank 1 overflows, yet both ranks raise the same error (no hang)
    results = run_ranks(_elastic_pinned, 2, [64, 64], [4, 65])
    assert all(kind == "InvalidInputError" and "65 tokens" in msg for kind, msg in results)
    assert run_ranks(_elastic_pinned, 2, [64, 64], [4, 64]) == [("ok", "")] * 2


def _fp8_passthrough(rank, world, backend_name):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    group = dist.group.WORLD
    tokens, hidden = 6 + rank, 256
    ids = torch.arange(tokens, dtype=torch.float32) + 100 * rank
    data = (torch.arange(tokens).float()[:, None] % 7 + 1).expand(tokens, hidden).to(torch.float8_e4m3fn)
    scales = ids[:, None].repeat(1, 2)
    idx = torch.randint(0, 4, (tokens, 2), generator=torch.Generator().manual_seed(rank))
    w = torch.rand(tokens, 2)
    res = make_backend(backend_name).dispatch((data.contiguous(), scales), idx, w, 4, group)
    recv_data, recv_scales = res.recv_x
    assert recv_data.dtype == torch.float8_e4m3fn
    ref = TorchA2ABackend().dispatch(ids[:, None].repeat(1, 4), idx, w, 4, group)
    assert sorted(recv_scales[:, 0].tolist()) == sorted(ref.recv_x[:, 0].tolist())
    expected = ((recv_scales[:, 0] % 100) % 7 + 1)[:, None].expand_as(recv_data)
    assert torch.equal(recv_data.float(), expected.to(torch.float8_e4m3fn).float())
    return recv_data.shape[0]


@pytest.mark.parametrize("backend_name", ["legacy", "elastic"])
def test_fp8_input_passes_through(deepep_emulator, backend_name, monkeypatch):
    deepep_emulator("v2")
    monkeypatch.setenv("MCORE_EP_ELASTIC_FP8", "1")
    assert sum(run_ranks(_fp8_passthrough, 2, backend_name)) > 0


# -- the emulator's asserts are live ----------------------------------------------------------------------
def _misuse(rank, world):
    import deep_ep
    import torch.distributed as dist

    group = dist.group.WORLD
    seen = []

    def expect(exc, fn, *args, **kwargs):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
        seen.append(str(info.value)[:200])

    expect(AssertionError, deep_ep.Buffer.set_num_sms, 7)
    buf = deep_ep.Buffer(group, 1 << 30, 0)
    idx = torch.tensor([[0, 3], [1, -1]])
    expect(AssertionError, buf.get_dispatch_layout, idx, 4, allocate_on_comm_stream=True)
    layout = buf.get_dispatch_layout(idx, 4)
    x = torch.randn(2, 8).to(torch.bfloat16)
    expect(AssertionError, buf.dispatch, x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
           num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=torch.ones(2, 2, dtype=torch.bfloat16))

    with pytest.raises(RuntimeError, match="differs across ranks"):
        deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256 * (rank + 1), hidden=8, num_topk=2)
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=4, hidden=8, num_topk=2)
    w = torch.ones(2, 2)
    expect(AssertionError, eb.dispatch, x, idx, w, num_experts=4, previous_event=eb.capture())
    big = torch.randn(5 if rank else 2, 8).to(torch.bfloat16)  # only rank 1 overflows; both raise
    expect(AssertionError, eb.dispatch, big, torch.zeros(big.shape[0], 2, dtype=torch.long),
           torch.ones(big.shape[0], 2), num_experts=4)
    recv_x, _, _, handle, _ = eb.dispatch(x, idx, w, num_experts=4, num_sms=20)
    expect(RuntimeError, eb.combine, recv_x, handle, num_sms=10)
    expect(RuntimeError, eb.dispatch, x, idx, w, num_experts=4)  # sticky: the buffer is dead

    hb = deep_ep.HybridEPBuffer(group, hidden_dim=8, max_num_of_tokens_per_rank=64, num_local_experts=2)
    expect(RuntimeError, hb.dispatch, x, topk_idx=idx, topk_weights=w, num_of_experts=4)  # -1 index
    uneven = torch.randn(2 + rank, 8).to(torch.bfloat16)
    expect(RuntimeError, hb.dispatch, uneven, routing_map=torch.ones(2 + rank, 4, dtype=torch.bool))
    return seen


def test_emulator_asserts_are_live(deepep_emulator):
    deepep_emulator("v2")
    results = run_ranks(_misuse, 2)
    for seen in results:
        assert len(seen) == 9
        assert any("even" in s for s in seen) and any("719" in s for s in seen)
        assert any("allocate_on_comm_stream" in s for s in seen) and any("float32" in s for s in seen)
        assert any("same token count" in s for s in seen) and any("-1" in s for s in seen)


# -- probes, registration, settings -----------------------------------------------------------------------
def _probes():
    from megatron_ep_plugins.backends import deepep_elastic, deepep_legacy, hybridep

    return {"legacy": deepep_legacy._probe(), "elastic": deepep_elastic._probe(), "hybridep": hybridep._probe()}


def test_probes_without_deep_ep_or_gpu(monkeypatch):
    _drop_deep_ep_modules()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, verdict in _probes().items():
        assert not verdict.available, name
        assert "deep_ep not importable" in verdict.reason and "No module named 'deep_ep'" in verdict.reason, name
        assert "no CUDA device" in verdict.reason, name


def test_probes_with_v1_emulator(deepep_emulator):
    deepep_emulator("v1")
    verdicts = _probes()
    assert verdicts["legacy"].available and verdicts["hybridep"].available
    assert not verdicts["elastic"].available
    assert "no ElasticBuffer" in verdicts["elastic"].reason and "V1-only" in verdicts["elastic"].reason


def test_probes_with_v2_emulator(deepep_emulator, monkeypatch):
    deep_ep = deepep_emulator("v2")
    monkeypatch.delenv("EP_DISABLE_GIN", raising=False)
    verdicts = _probes()
    assert verdicts["elastic"].available and "EP_DISABLE_GIN=1" in verdicts["elastic"].reason
    assert verdicts["elastic"].details["nccl"] == "2.30.4"
    # V2 moved EventOverlap out of deep_ep.utils: the legacy adapter still finds it
    with pytest.raises(ImportError):
        from deep_ep.utils import EventOverlap  # noqa: F401
    assert verdicts["legacy"].available
    from megatron_ep_plugins.backends._deepep_common import import_event_classes

    assert import_event_classes()[0] is deep_ep.EventOverlap


@pytest.mark.parametrize("capability, nccl, expected", [
    ((8, 0), (2, 30, 4), "compute capability 8.0 < 9.0"),
    ((9, 0), (2, 28, 3), "NCCL 2.28.3 < 2.30.4"),
])
def test_elastic_probe_rejects_old_gpu_or_nccl(deepep_emulator, capability, nccl, expected):
    deepep_emulator("v2", capability=capability, nccl=nccl)
    verdict = _probes()["elastic"]
    assert not verdict.available and expected in verdict.reason


def test_registration():
    from megatron_ep_plugins.backends import deepep_elastic, deepep_legacy, hybridep

    specs = {s.name: s for m in (deepep_legacy, deepep_elastic, hybridep) for s in m.ep_register_backends()}
    assert {n: s.priority for n, s in specs.items()} == {"legacy": 200, "elastic": 300, "hybridep": 100}
    assert {"deepep", "deepep-v1", "v1"} <= set(specs["legacy"].aliases)
    assert {"deepep-v2", "v2", "deepepv2"} <= set(specs["elastic"].aliases)
    assert specs["hybridep"].capabilities.uneven_tokens


@pytest.mark.parametrize("var, value, match", [
    ("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", "abc", "not an integer"),
    ("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", "0", "out of range"),
    ("MCORE_EP_ELASTIC_HYBRID_MODE", "maybe", "use auto, 1 or 0"),
    ("MCORE_EP_ELASTIC_DETERMINISTIC", "perhaps", "not a boolean"),
    ("MCORE_EP_LEGACY_NUM_SMS", "7", "even"),
    ("MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK", "-1", "out of range"),
])
def test_env_validation(deepep_emulator, monkeypatch, var, value, match):
    from megatron_ep_plugins.errors import ConfigError

    deepep_emulator("v2")
    monkeypatch.setenv(var, value)
    backend = {"LEGACY": "legacy", "ELASTIC": "elastic", "HYBRIDEP": "hybridep"}[var.split("_")[2]]
    with pytest.raises(ConfigError, match=match):
        make_backend(backend)
    if backend == "elastic":
        verdict = _probes()["elastic"]
        assert not verdict.available and var in verdict.reason


def test_elastic_settings_hybrid_mode(deepep_emulator, monkeypatch):
    deepep_emulator("v2")
    from megatron_ep_plugins.backends.deepep_elastic import bucket, read_settings

    assert read_settings({"EP_DISABLE_GIN": "1"}).hybrid_mode is False
    assert read_settings({}).hybrid_mode is True
    assert read_settings({"EP_DISABLE_GIN": "1", "MCORE_EP_ELASTIC_HYBRID_MODE": "1"}).hybrid_mode is True
    assert [bucket(t) for t in (0, 1, 256, 257, 1000)] == [256, 256, 256, 512, 1024]
    monkeypatch.setenv("MCORE_EP_ELASTIC_NUM_QPS", "4")
    monkeypatch.setenv("EP_DISABLE_GIN", "1")
    key = make_backend("elastic").agreement_key()
    assert key["num_allocated_qps"] == 4 and key["allow_hybrid_mode"] is False and key["max_tokens_per_rank"] is None
