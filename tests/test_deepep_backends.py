"""The DeepEP adapters (legacy, elastic, hybridep) against the reference ``torch`` backend, on CPU gloo ranks.

DeepEP itself needs a GPU, so these tests run the adapters against ``tests/emulators/deep_ep``: a CPU test
double of DeepEP's Python API (never installed, importable only through the ``deepep_emulator`` fixture).
The emulator computes with an all-gather algorithm unlike the reference's all-to-all and enforces DeepEP's
documented asserts, so "adapter == reference" and "no emulator assert fired" are independent checks.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from distributed import package_log_messages, run_ranks

EMULATORS = Path(__file__).resolve().parent / "emulators"


def _drop_deep_ep_modules() -> None:
    for name in list(sys.modules):
        if name in ("deep_ep", "deep_ep_v25") or name.startswith(("deep_ep.", "deep_ep_v25.")):
            del sys.modules[name]


def _as_sgl_v25_wheel(deep_ep) -> None:
    """Make the (v25) emulator importable only as ``deep_ep_v25``, as SGLang's ``sgl-deep-ep-v25`` wheel installs
    DeepEP V2.5 (``import deep_ep`` then fails; ``_drop_deep_ep_modules`` undoes both)."""
    sys.modules["deep_ep_v25"] = deep_ep
    sys.modules["deep_ep"] = None  # import deep_ep -> ModuleNotFoundError; find_spec("deep_ep") -> None


@pytest.fixture
def deepep_emulator(monkeypatch):
    """``enable(api)``: make the CPU DeepEP emulator importable as ``deep_ep`` (``module="deep_ep_v25"``: only as
    ``deep_ep_v25``, like the sgl-deep-ep-v25 wheel) and the GPU probes pass (NCCL: what that DeepEP needs)."""

    def enable(api: str = "v2", capability=(9, 0), nccl=None, module: str = "deep_ep"):
        nccl = nccl or ((2, 32, 3) if api == "v25" else (2, 30, 4))
        monkeypatch.setenv("DEEP_EP_EMULATOR_API", api)
        monkeypatch.syspath_prepend(str(EMULATORS))
        _drop_deep_ep_modules()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda.nccl, "version", lambda: nccl)
        from megatron_ep_plugins.backends import _deepep_common

        monkeypatch.setattr(_deepep_common, "loaded_nccl_version", lambda: tuple(nccl))
        import deep_ep

        assert deep_ep.IS_EMULATOR and deep_ep.API == api
        deep_ep.reset_emulator_state()
        if module == "deep_ep_v25":
            _as_sgl_v25_wheel(deep_ep)
        return deep_ep

    yield enable
    _drop_deep_ep_modules()


# -- inputs ---------------------------------------------------------------------------------------------
# Valid for every real backend on 2 and 4 ranks (tests/test_gpu.py runs them on GPUs): hidden 256 (DeepEP V2
# combine needs hidden % 256, V1 bf16 hidden % 16, HybridEP hidden % 16) and an even number of experts per rank
# (HybridEP: (experts per rank x ranks per NVLink domain) % 4 == 0).
HIDDEN = 256
SCENARIOS = {
    # name: (tokens on rank r, hidden, topk, experts per rank)
    "uneven_masked": (lambda r: 11 + 5 * r, HIDDEN, 2, 2),
    "zero_tokens_on_rank1": (lambda r: 0 if r == 1 else 9, HIDDEN, 2, 2),
    "k1": (lambda r: 10, HIDDEN, 1, 2),
    "k4": (lambda r: 6 + r, HIDDEN, 4, 4),
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


def _deep_ep():
    """The DeepEP module in use: ``deep_ep``, else ``deep_ep_v25`` (the sgl-deep-ep-v25 wheel's name)."""
    import importlib

    try:
        return importlib.import_module("deep_ep")
    except ImportError:
        return importlib.import_module("deep_ep_v25")


def _compare(rank, world, backend_name, scenarios, flags, device="cpu", num_sms=24):
    """Backend vs the torch reference on the same inputs (CPU emulator, or real DeepEP on ``device``).

    ``num_sms``: the SM count set; DeepEP V2.5 rounds an odd one up to even, and so must the elastic adapter."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.testing.reference import canonical_topk

    deep_ep = _deep_ep()
    group = dist.group.WORLD
    backend, ref = make_backend(backend_name), TorchA2ABackend()
    backend.set_num_sms(num_sms)
    runs_sms = num_sms
    if backend_name == "elastic":
        runs_sms = num_sms + num_sms % 2 if backend.api.generation == "V2.5" else num_sms
        assert backend.agreement_key()["num_sms"] == runs_sms
    checked = 0
    for name in scenarios:
        for async_finish, on_comm in flags:
            x, idx, w, num_experts = make_inputs(name, rank, world)
            x, idx, w = x.to(device), idx.to(device), w.to(device)
            kw = dict(async_finish=async_finish, allocate_on_comm_stream=on_comm)
            got = backend.dispatch(x, idx, w, num_experts, group, **kw)
            exp = ref.dispatch(x, idx, w, num_experts, group)
            if backend_name == "elastic":
                assert got.handle.raw.num_sms == runs_sms, (got.handle.raw.num_sms, runs_sms)
            assert got.recv_x.shape == exp.recv_x.shape, (name, got.recv_x.shape, exp.recv_x.shape)
            assert got.tokens_per_expert.device.type == "cpu" and got.tokens_per_expert.dtype == torch.int64
            assert torch.equal(got.tokens_per_expert, exp.tokens_per_expert), name
            pg, pe = _order(got.recv_x, got.recv_topk_idx), _order(exp.recv_x, exp.recv_topk_idx)
            assert torch.equal(got.recv_x[pg], exp.recv_x[pe]), name  # bit-identical rows
            # the contract fixes each row's (local id, weight) pairs, not their slots (hybridep packs them first)
            gi, gw = canonical_topk(got.recv_topk_idx[pg], got.recv_topk_weights[pg])
            ei, ew = canonical_topk(exp.recv_topk_idx[pe], exp.recv_topk_weights[pe])
            assert torch.equal(gi, ei) and torch.equal(gw, ew), name

            # combine: an "expert" that scales each row by (1 + number of local slots)
            def expert(res):
                return (res.recv_x.float() * (1 + (res.recv_topk_idx >= 0).sum(1, keepdim=True))).to(torch.bfloat16)

            # dispatch's backward: probs' grad per (row, local expert) pair, wherever the backend put the pair, with
            # garbage in slots owned elsewhere (must be ignored)
            def probs_grad(res):
                ids = res.recv_topk_idx.clamp(min=0)
                g = res.recv_x.float().gather(1, ids) + ids
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


def _hybridep_routing_from_handle(rank, world):
    """More top-k slots than experts per rank (K=3, 2 per rank), and a repeated id (documented: one pair)."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.testing.reference import canonical_topk

    backend, ref, group = make_backend("hybridep"), TorchA2ABackend(), dist.group.WORLD
    x, idx, w = _tokens(9 + rank, HIDDEN, 3, 4, seed=rank)
    idx[2, 1] = -1
    got, exp = backend.dispatch(x, idx, w, 4, group), ref.dispatch(x, idx, w, 4, group)
    pg, pe = _order(got.recv_x, got.recv_topk_idx), _order(exp.recv_x, exp.recv_topk_idx)
    same = [torch.equal(a, b) for a, b in zip(canonical_topk(got.recv_topk_idx[pg], got.recv_topk_weights[pg]),
                                              canonical_topk(exp.recv_topk_idx[pe], exp.recv_topk_weights[pe]))]
    owned_first = bool(((got.recv_topk_idx[:, 1:] >= 0) <= (got.recv_topk_idx[:, :-1] >= 0)).all())
    # token 0 names expert 1 twice (weights 0.25 + 0.5) and expert 2 (0.125)
    rx = torch.full((3, HIDDEN), float(rank + 1)).to(torch.bfloat16)
    ri = torch.tensor([[1, 1, 2], [0, 3, -1], [3, 2, 0]])
    rw = torch.tensor([[0.25, 0.5, 0.125], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rep = backend.dispatch(rx, ri, rw, 4, group)
    pairs = sorted((round(float(v), 4), int(i)) for row, wrow in zip(rep.recv_topk_idx.tolist(),
                                                                     rep.recv_topk_weights.tolist())
                   for i, v in zip(row, wrow) if i >= 0)
    return same, owned_first, tuple(got.recv_topk_idx.shape), rep.tokens_per_expert.tolist(), pairs


@pytest.mark.parametrize("scan_counts", ["1", "0"])
def test_hybridep_rebuilds_the_received_routing_from_its_handle(deepep_emulator, monkeypatch, scan_counts):
    """The adapter reads the received rows' local experts from HybridEP's preprocessing (``dense_to_expert_map``
    with the scan's counts, ``local_expert_routing_map`` without; the emulator leaves garbage where the real scan
    writes nothing, as ``torch::empty`` does) and packs the owned pairs first; more slots than local experts."""
    deepep_emulator("v1")
    monkeypatch.setenv("MCORE_EP_HYBRIDEP_SCAN_COUNTS", scan_counts)
    results = run_ranks(_hybridep_routing_from_handle, 2)
    for rank, (same, owned_first, shape, counts, pairs) in enumerate(results):
        assert same == [True, True] and owned_first and shape[1] == 3
    # rank 0 owns experts 0 and 1: token 0's repeat of expert 1 is one pair with 0.25 + 0.5 (both ranks send it)
    assert results[0][3] == [4, 2]  # rows naming local expert 0 / 1: counted once per row
    assert (0.75, 1) in results[0][4] and (0.25, 1) not in results[0][4]
    assert results[1][3] == [4, 4]
    from megatron_ep_plugins.backends.hybridep import ep_register_backends

    assert ep_register_backends()[0].capabilities.repeated_experts is False


def _hybridep_host_syncs(rank, world):
    """Emulated HybridEP host syncs per adapter call, once the shape is agreed; and the counts the contract returns."""
    import deep_ep
    import torch.distributed as dist

    backend, group = make_backend("hybridep"), dist.group.WORLD
    x, idx, w = _tokens(12, HIDDEN, 2, 4, seed=rank)
    backend.dispatch(x, idx, w, 4, group)  # first sight of the shape: the agreement (one all_reduce)
    syncs = {}
    for call in ("dispatch", "cached dispatch", "combine"):
        before = deep_ep.host_syncs("HybridEPBuffer")
        if call == "dispatch":
            res = backend.dispatch(x, idx, w, 4, group)
        elif call == "cached dispatch":
            backend.dispatch_cached(x, res.handle, group)
        else:
            backend.combine(res.recv_x, res.handle, group, topk_weights=res.recv_topk_weights)
        syncs[call] = deep_ep.host_syncs("HybridEPBuffer") - before
    local = torch.bincount(res.recv_topk_idx[res.recv_topk_idx >= 0], minlength=2)
    counts = res.tokens_per_expert
    return syncs, counts.dtype, counts.device.type, torch.equal(counts, local)


def test_hybridep_syncs_the_host_once_per_dispatch_in_hybrideps_preprocessing(deepep_emulator):
    """The adapter runs HybridEP's preprocessing with the per-expert counts (one stream sync in HybridEP) and passes
    the row count to ``dispatch``, so the wrapper's own sync is skipped; a cached dispatch and combine sync nothing.
    The contract's CPU counts are the preprocessing's (int64, equal to the received routing's)."""
    deepep_emulator("v1")
    for syncs, dtype, device, same in run_ranks(_hybridep_host_syncs, 2):
        assert syncs == {"dispatch": 1, "cached dispatch": 0, "combine": 0}
        assert dtype == torch.int64 and device == "cpu" and same


def _hybridep_without_preprocessing_half(rank, world):
    """A HybridEPBuffer whose runtime does not expose ``metadata_preprocessing`` (a build other than the one the
    adapter targets): the first dispatch's buffer raises, on every rank, naming the setting that avoids it."""
    from types import SimpleNamespace

    import deep_ep
    import torch.distributed as dist

    from megatron_ep_plugins.errors import BackendUnavailableError

    class WithoutPreprocessingHalf(deep_ep.HybridEPBuffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.runtime = SimpleNamespace()

    backend = make_backend("hybridep")
    backend._HybridEPBuffer = WithoutPreprocessingHalf
    x, idx, w = _tokens(8, HIDDEN, 2, 4, seed=rank)
    with pytest.raises(BackendUnavailableError) as info:
        backend.dispatch(x, idx, w, 4, dist.group.WORLD)
    return str(info.value)


def test_hybridep_build_without_the_preprocessing_half_names_the_setting(deepep_emulator):
    deepep_emulator("v1")
    for message in run_ranks(_hybridep_without_preprocessing_half, 2):
        assert "runtime.metadata_preprocessing" in message and "MCORE_EP_HYBRIDEP_SCAN_COUNTS=0" in message


@pytest.mark.parametrize("local, topk", [(2, 3), (4, 2), (128, 8), (8, 8), (1, 1)])
def test_hybridep_owned_ids_pack_each_rows_bits_first_ascending(local, topk):
    """``_owned_ids``: every row's set bits (at most K, as a top-k router leaves them) as ascending local ids, then
    -1; more slots than local experts too. Against a plain loop, on random rows."""
    from megatron_ep_plugins.backends.hybridep import _owned_ids

    gen = torch.Generator().manual_seed(local * 100 + topk)
    rows = 300
    owned = torch.zeros(rows, local, dtype=torch.bool)
    for r in range(rows):
        k = int(torch.randint(0, min(topk, local) + 1, (1,), generator=gen))
        owned[r, torch.randperm(local, generator=gen)[:k]] = True
    got = _owned_ids(torch, owned, topk)
    expected = torch.full((rows, topk), -1, dtype=torch.int64)
    for r in range(rows):
        ids = owned[r].nonzero().flatten()
        expected[r, :ids.numel()] = ids
    assert got.dtype == torch.int64 and got.is_contiguous() and torch.equal(got, expected)


# The elastic adapter on each DeepEP API generation it drives (the emulator's v2 = ElasticBuffer 2.0-2.1, v25 =
# EPBuffer of DeepEP 2.5), as deep_ep or as the sgl-deep-ep-v25 wheel's deep_ep_v25, with even and odd SM counts.
@pytest.mark.parametrize("api, module, world, scenarios, flags, num_sms", [
    ("v2", "deep_ep", 2, ["uneven_masked", "k4"], [(True, True)], 25),  # V2 runs 25 as given
    ("v25", "deep_ep", 2, list(SCENARIOS), [(False, False), (True, True)], 24),
    ("v25", "deep_ep", 4, ["uneven_masked", "zero_tokens_on_rank1"], [(False, True)], 25),  # V2.5 runs 26
    ("v25", "deep_ep_v25", 2, ["uneven_masked", "k1"], [(True, False), (False, False)], 24),
])
def test_elastic_matches_reference_on_each_deepep_api(deepep_emulator, api, module, world, scenarios, flags, num_sms):
    from megatron_ep_plugins.backends.deepep_elastic import resolve_elastic_api

    deepep_emulator(api, module=module)
    assert resolve_elastic_api().qualname == f"{module}.{'EPBuffer' if api == 'v25' else 'ElasticBuffer'}"
    counts = run_ranks(_compare, world, "elastic", scenarios, flags, "cpu", num_sms)
    assert counts == [len(scenarios) * len(flags)] * world


# -- backend specifics ----------------------------------------------------------------------------------
def _tokens(num_tokens, hidden, topk, num_experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    return x, idx, torch.rand(num_tokens, topk, generator=gen)


def _round_trip(backend, group, num_tokens, hidden, topk=2, num_experts=4, seed=0):
    x, idx, w = _tokens(num_tokens, hidden, topk, num_experts, seed)
    res = backend.dispatch(x, idx, w, num_experts, group)
    backend.combine(res.recv_x, res.handle, group)
    return res


def _legacy_buffer_reuse(rank, world):
    import deep_ep
    import torch.distributed as dist

    backend = make_backend("legacy")
    group = dist.group.WORLD
    for hidden in (32, 32, 16, 64):
        _round_trip(backend, group, 5, hidden)
    with pytest.raises(Exception, match="even"):
        backend.set_num_sms(7)
    return deep_ep.constructed("Buffer"), deep_ep.Buffer.num_sms


def test_legacy_reuses_buffer_and_rebuilds_when_larger(deepep_emulator):
    deepep_emulator("v1")
    results = run_ranks(_legacy_buffer_reuse, 2)
    assert results == [(2, 20)] * 2  # built for hidden 32, reused for 32 and 16, rebuilt for 64


def _legacy_num_sms_growth(rank, world):
    import deep_ep
    import torch.distributed as dist

    backend = make_backend("legacy")
    group = dist.group.WORLD
    backend.set_num_sms(20)
    _round_trip(backend, group, 5, 256)
    built = [deep_ep.constructed("Buffer")]
    backend.set_num_sms(48)  # larger size hints: the old buffer is too small (the emulator host-asserts that)
    _round_trip(backend, group, 5, 256)
    built.append(deep_ep.constructed("Buffer"))
    backend.set_num_sms(20)  # smaller: the buffer still fits, no rebuild
    _round_trip(backend, group, 5, 256)
    built.append(deep_ep.constructed("Buffer"))
    deep_ep.Buffer.set_num_sms(64)  # changed behind the adapter's back (e.g. Megatron's own setter)
    _round_trip(backend, group, 5, 256)
    built.append(deep_ep.constructed("Buffer"))
    return built


def test_legacy_rechecks_buffer_size_when_num_sms_grows(deepep_emulator):
    deepep_emulator("v1")
    assert run_ranks(_legacy_num_sms_growth, 2) == [[1, 2, 2, 3]] * 2


def _two_groups_alternating(rank, world, backend_name):
    import deep_ep
    import torch.distributed as dist

    backend = make_backend(backend_name)
    name = {"legacy": "Buffer", "hybridep": "HybridEPBuffer"}.get(backend_name) or backend.api.class_name
    groups = [dist.new_group(list(range(world))), dist.new_group(list(range(world)))]
    assert groups[0] is not groups[1]
    for step in range(6):
        _round_trip(backend, groups[step % 2], 6 + rank, HIDDEN, seed=step)
    return deep_ep.constructed(name)


@pytest.mark.parametrize("backend_name, api", [("legacy", "v2"), ("elastic", "v2"), ("elastic", "v25"),
                                              ("hybridep", "v2")])
def test_two_groups_alternating_keep_one_buffer_each(deepep_emulator, backend_name, api):
    deepep_emulator(api)
    assert run_ranks(_two_groups_alternating, 2, backend_name) == [2, 2]  # one per group, never rebuilt


def _steady_state_costs(rank, world, backend_name):
    """After the first call of a shape, no argument checks, no world-size lookups and no rules run again."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends import deepep_elastic, deepep_legacy

    module = deepep_legacy if backend_name == "legacy" else deepep_elastic
    backend = make_backend(backend_name)
    group = dist.group.WORLD
    calls = []

    def wrap(fn):  # counts calls made from the plugin's code only (not the emulator's collectives)
        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("megatron_ep_plugins"):
                calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return counted

    for name in ("check_dispatch_args", "check_combine_args", "check_torch_deterministic"):
        setattr(module, name, wrap(getattr(module, name)))
    rules = "check_v1_rules" if backend_name == "legacy" else "check_v2_rules"
    setattr(module, rules, wrap(getattr(module, rules)))
    original_world, original_size = dist.get_world_size, type(group).size
    dist.get_world_size = wrap(original_world)
    type(group).size = wrap(original_size)
    try:
        for step in range(3):
            x, idx, w = _tokens(9 + rank, HIDDEN, 2, 4, seed=step)
            res = backend.dispatch(x, idx, w, 4, group)
            backend.combine(res.recv_x, res.handle, group, topk_weights=res.recv_topk_weights)
            backend.dispatch_cached(x, res.handle, group)
            if step == 0:
                first, calls[:] = list(calls), []
    finally:
        dist.get_world_size, type(group).size = original_world, original_size
    return first, calls


@pytest.mark.parametrize("backend_name, api", [("legacy", "v2"), ("elastic", "v2"), ("elastic", "v25")])
def test_steady_state_skips_checks_and_world_size_lookups(deepep_emulator, backend_name, api):
    deepep_emulator(api)
    for first, later in run_ranks(_steady_state_costs, 2, backend_name):
        assert "check_dispatch_args" in first and any(n.startswith("check_v") for n in first)
        assert later == [], later


def _stream_flags(rank, world, backend_name, overlap):
    """The flags each DeepEP call receives when Megatron passes async_finish=allocate_on_comm_stream=True."""
    import torch.distributed as dist

    backend = make_backend(backend_name)
    backend.stream_overlap = overlap
    group = dist.group.WORLD
    x, idx, w = _tokens(8, 256, 2, 4)
    flags = dict(async_finish=True, allocate_on_comm_stream=True)
    res = backend.dispatch(x, idx, w, 4, group, **flags)  # builds the buffer
    buf = next(iter(backend._buffers.values())) if backend_name == "legacy" else next(iter(backend._groups.values())).buffer
    seen = []
    cls = type(buf)
    for op in ("dispatch", "combine"):
        real = getattr(cls, op)

        def spy(self, *a, _real=real, _op=op, **k):
            seen.append((_op, bool(k.get("async_finish", k.get("async_with_compute_stream", False))),
                         bool(k.get("allocate_on_comm_stream", False)),
                         getattr(k.get("previous_event"), "event", k.get("previous_event")) is not None))
            return _real(self, *a, **k)

        setattr(cls, op, spy)
    res = backend.dispatch(x, idx, w, 4, group, **flags)
    backend.combine(res.recv_x, res.handle, group, **flags)
    backend.dispatch_cached(x, res.handle, group, **flags)
    return seen


@pytest.mark.parametrize("backend_name, api", [("legacy", "v2"), ("elastic", "v2")])
def test_megatron_async_flags_reach_deepep_only_with_stream_overlap(deepep_emulator, backend_name, api):
    """The slot returns tensors ready on the current stream, so by default the adapters run DeepEP's synchronous
    mode (same ordering, no events or comm-stream allocations: _deepep_common.STREAM_OVERLAP_NOTE)."""
    deepep_emulator(api)
    for seen in run_ranks(_stream_flags, 2, backend_name, False):
        assert len(seen) == 3 and all(flags == [False, False, False] for _, *flags in seen), seen
    for seen in run_ranks(_stream_flags, 2, backend_name, True):
        # combine and the cached dispatch reuse the handle; every call gets Megatron's flags and an event to wait on
        assert len(seen) == 3 and all(async_ and on_comm and prev for _, async_, on_comm, prev in seen), seen


def _elastic_buckets(rank, world):
    import deep_ep
    import torch.distributed as dist

    os.environ["MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH"] = "1"
    backend = make_backend("elastic")
    group = dist.group.WORLD
    sizes = []
    for tokens in (10 + rank, 300 if rank == 1 else 3, 20, 0):  # rank 1's larger batch grows both ranks
        _round_trip(backend, group, tokens, HIDDEN)
        sizes.append(backend._groups[group].max_tokens)
    return sizes, deep_ep.constructed(backend.api.class_name)


@pytest.mark.parametrize("api", ["v2", "v25"])
def test_elastic_buckets_max_tokens_and_grows_together(deepep_emulator, api):
    deepep_emulator(api)
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
        _round_trip(backend, group, tokens, HIDDEN)
    try:
        x, idx, w = _tokens(300, HIDDEN, 2, 4)
        backend.dispatch(x, idx, w, 4, group)
    except InvalidInputError as exc:
        return len(calls), str(exc), deep_ep.constructed(backend.api.class_name)
    return len(calls), "no error", deep_ep.constructed(backend.api.class_name)


@pytest.mark.parametrize("api", ["v2", "v25"])
def test_elastic_steady_state_adds_no_collective_and_overflow_says_what_to_pin(deepep_emulator, api):
    deepep_emulator(api)
    for calls, msg, built in run_ranks(_elastic_steady_state, 2):
        assert calls == 1 and built == 1  # only the first dispatch agreed across ranks
        assert "300 tokens exceed the num_max_tokens_per_rank=256" in msg and "detected on this rank only" in msg
        assert "MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK=512 on every rank" in msg
        assert "MCORE_EP_ELASTIC_CHECK_EACH_DISPATCH=1" in msg


def _call_keys_bounded(rank, world, backend_name, limit):
    """Token counts that change every call (as in decoding), different on each rank: each new count is validated on
    its rank alone (no collective after the group's first dispatch), and the validated keys stay under the limit."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends import _deepep_common

    _deepep_common.MAX_CALL_KEYS = limit  # read by remember() at each call
    backend = make_backend(backend_name)
    group = dist.group.WORLD
    calls, original = [], dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    sizes = []
    try:
        for tokens in (9 + rank, 20, 31 + 2 * rank, 42, 53 + rank, 64, 9 + rank):
            rows = _round_trip(backend, group, tokens, HIDDEN).recv_x.shape[0]
            sizes.append((len(backend._ready), rows > 0))
    finally:
        dist.all_reduce = original
    return len(calls), sizes


@pytest.mark.parametrize("backend_name", ["legacy", "elastic"])
def test_validated_call_keys_are_bounded_and_new_token_counts_need_no_collective(deepep_emulator, backend_name):
    deepep_emulator("v2")
    for collectives, sizes in run_ranks(_call_keys_bounded, 2, backend_name, 3):
        assert collectives <= 1  # elastic: the group's one agreement at its first dispatch; legacy: none
        assert all(n <= 3 for n, _ in sizes) and max(n for n, _ in sizes) == 3, sizes
        assert all(moved for _, moved in sizes)


def _hybridep_steady_state(rank, world, check_each):
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError

    os.environ["MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH"] = check_each
    backend = make_backend("hybridep")
    group = dist.group.WORLD
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    rows = []
    for tokens in (40 + rank, 60, 5 + 3 * rank, 0 if rank else 7):  # uneven and zero T within the capacity (64)
        rows.append(_round_trip(backend, group, tokens, HIDDEN).recv_x.shape[0])
    try:
        x, idx, w = _tokens(100, HIDDEN, 2, 4)
        backend.dispatch(x, idx, w, 4, group)
        msg = "no error"
    except InvalidInputError as exc:
        msg = str(exc)
    return len(calls), rows, msg


def test_hybridep_agrees_once_per_shape_and_pads_to_capacity(deepep_emulator):
    deepep_emulator("v2")
    once = run_ranks(_hybridep_steady_state, 2, "0")
    each = run_ranks(_hybridep_steady_state, 2, "1")
    assert [c for c, _, _ in once] == [1, 1]  # the shape's first dispatch only (the 100-token one raised locally)
    assert [c for c, _, _ in each] == [5, 5]  # every dispatch, including the one that grows the buffer
    assert [r for _, r, _ in once] == [r for _, r, _ in each]  # padding to capacity changes nothing received
    for _, _, msg in once:
        assert "100 tokens exceed the buffer's max_num_of_tokens_per_rank=64" in msg
        assert "MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK=128" in msg and "CHECK_EACH_DISPATCH=1" in msg
    assert all(msg == "no error" for _, _, msg in each)


def _elastic_pinned(rank, world, values, tokens):
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError, RankMismatchError

    os.environ["MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK"] = str(values[rank])
    backend = make_backend("elastic")
    assert backend.agreement_key()["max_tokens_per_rank"] == values[rank]
    result = []
    for t in tokens[rank]:
        try:
            _round_trip(backend, dist.group.WORLD, t, HIDDEN)
        except (RankMismatchError, InvalidInputError) as exc:
            return type(exc).__name__, str(exc)
    return "ok", ""


@pytest.mark.parametrize("api", ["v2", "v25"])
def test_elastic_pinned_max_tokens_mismatch_and_overflow(deepep_emulator, api):
    deepep_emulator(api)
    results = run_ranks(_elastic_pinned, 2, [512, 1024], [[4], [4]])
    assert all(kind == "RankMismatchError" and "rank 0: 512" in msg and "rank 1: 1024" in msg for kind, msg in results)
    # only rank 1 overflows at the first dispatch, yet both ranks raise the same error (no hang)
    results = run_ranks(_elastic_pinned, 2, [64, 64], [[4], [65]])
    assert all(kind == "InvalidInputError" and "65 tokens" in msg for kind, msg in results)
    assert run_ranks(_elastic_pinned, 2, [64, 64], [[4], [64]]) == [("ok", "")] * 2
    # later (steady state, no collective) only the overflowing rank can tell: it names the variable to set
    results = run_ranks(_elastic_pinned, 2, [64, 64], [[4, 8], [4, 64, 65]])
    assert results[0] == ("ok", "")
    kind, msg = results[1]
    assert kind == "InvalidInputError" and "65 tokens on this rank" in msg
    assert "set MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK to at least 65 (the same value on every rank)" in msg


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


@pytest.mark.parametrize("backend_name, api", [("legacy", "v2"), ("elastic", "v2"), ("elastic", "v25")])
def test_fp8_input_passes_through(deepep_emulator, backend_name, api, monkeypatch):
    deepep_emulator(api)
    monkeypatch.setenv("MCORE_EP_ELASTIC_FP8", "1")
    assert sum(run_ranks(_fp8_passthrough, 2, backend_name)) > 0


# -- size rules: every adapter rejects bad sizes up front, on every rank, with the fix --------------------
# (backend, world, tokens, hidden, topk, experts per rank, x dtype, expected message parts)
BAD_SIZES = {
    "legacy-hidden8": ("legacy", 2, 5, 8, 2, 2, "bf16", ["DeepEP V1 intranode dispatch needs bf16 hidden % 16 == 0",
                                                         "got hidden=8", "multiple of 16"]),
    "legacy-hidden24": ("legacy", 2, 5, 24, 2, 2, "bf16", ["bf16 hidden % 16 == 0", "got hidden=24"]),
    "legacy-fp8-hidden16": ("legacy", 2, 5, 16, 2, 2, "fp8", ["FP8 hidden % 32 == 0", "got hidden=16"]),
    "legacy-hidden8192": ("legacy", 2, 2, 8192, 2, 2, "bf16", ["bf16 hidden <= 8176", "got hidden=8192"]),
    "legacy-topk33": ("legacy", 2, 3, 256, 33, 20, "bf16", ["top-k <= 32", "got topk=33"]),
    "legacy-129-experts-per-rank": ("legacy", 2, 3, 256, 2, 129, "bf16", ["at most 128 experts per rank", "129"]),
    "legacy-3-ranks": ("legacy", 3, 3, 256, 2, 2, "bf16", ["an expert-parallel group of 2, 4 or 8 ranks",
                                                           "got 3 ranks", "no kernel configuration"]),
    "elastic-hidden64": ("elastic", 2, 5, 64, 2, 2, "bf16", [
        "backend 'elastic': DeepEP V2 combine needs hidden % 256 == 0, got hidden=64; use a hidden size that is a "
        "multiple of 256 or the 'legacy'/'torch' backend"]),
    "elastic-hidden16": ("elastic", 2, 5, 16, 2, 2, "bf16", ["hidden % 256 == 0, got hidden=16"]),
    "elastic-topk33": ("elastic", 2, 3, 256, 33, 20, "bf16", ["DeepEP V2 needs top-k <= 32", "got topk=33"]),
    # "-v25-": on the emulator's DeepEP V2.5 layout (EPBuffer); the messages name that generation
    "elastic-v25-hidden64": ("elastic", 2, 5, 64, 2, 2, "bf16", [
        "backend 'elastic': DeepEP V2.5 combine needs hidden % 256 == 0, got hidden=64; use a hidden size that is a "
        "multiple of 256 or the 'legacy'/'torch' backend"]),
    "elastic-v25-topk33": ("elastic", 2, 3, 256, 33, 20, "bf16", ["DeepEP V2.5 needs top-k <= 32", "got topk=33"]),
    "elastic-v25-valid": ("elastic", 2, 3, 256, 2, 2, "bf16", []),  # no message: the V2.5 rules let it through
    "hybridep-hidden8": ("hybridep", 2, 5, 8, 2, 2, "bf16", ["HybridEP's buffer config needs bf16 hidden_dim % 16 "
                                                             "== 0", "got hidden=8"]),
    "hybridep-3-experts-per-rank": ("hybridep", 2, 5, 256, 2, 3, "bf16", [
        "(experts per rank x ranks per NVLink domain) % 4 == 0", "got 3 x 2"]),
    "hybridep-1-expert-per-rank": ("hybridep", 2, 5, 256, 1, 1, "bf16", ["% 4 == 0", "got 1 x 2"]),
}


def _bad_sizes(rank, world, case):
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError

    backend_name, _, tokens, hidden, topk, per_rank, dtype, _ = BAD_SIZES[case]
    backend = make_backend(backend_name)
    x, idx, w = _tokens(tokens + (rank if backend_name != "legacy" else 0), hidden, topk, per_rank * world)
    if dtype == "fp8":
        x = (x.float().to(torch.float8_e4m3fn), torch.ones(x.shape[0], -(-hidden // 128)))
    try:
        backend.dispatch(x, idx, w, per_rank * world, dist.group.WORLD)
    except InvalidInputError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("case", list(BAD_SIZES))
def test_adapters_reject_bad_sizes_on_every_rank(deepep_emulator, case, monkeypatch):
    backend_name, world, *_, parts = BAD_SIZES[case]
    deepep_emulator("v25" if "-v25-" in case else "v2")
    if BAD_SIZES[case][6] == "fp8":
        monkeypatch.setenv("MCORE_EP_ELASTIC_FP8", "1")
    messages = run_ranks(_bad_sizes, world, case, timeout=60)  # a hang would fail here, not hang CI
    if not parts:
        assert messages == ["no error"] * world
        return
    for msg in messages:
        for part in parts:
            assert part in msg, (part, msg)
        assert msg.startswith(f"backend {backend_name!r}: ") and "; " in msg  # what is wrong; what would work


def _bad_combine(rank, world, backend_name):
    import torch.distributed as dist

    from megatron_ep_plugins.errors import InvalidInputError

    backend = make_backend(backend_name)
    group = dist.group.WORLD
    res = _round_trip(backend, group, 5, 512)
    errors = []
    for bad in (res.recv_x[:, :272].contiguous(), res.recv_x.float()):  # V2 JIT needs hidden % 256; bf16 only
        try:
            backend.combine(bad, res.handle, group)
            errors.append("no error")
        except InvalidInputError as exc:
            errors.append(str(exc))
    return errors


@pytest.mark.parametrize("backend_name, api", [("legacy", "v2"), ("elastic", "v2"), ("elastic", "v25")])
def test_adapters_reject_bad_combine_inputs_before_the_kernel(deepep_emulator, backend_name, api):
    deepep_emulator(api)
    library = "DeepEP V2.5" if api == "v25" else "DeepEP V2"
    for narrow, fp32 in run_ranks(_bad_combine, 2, backend_name):
        if backend_name == "elastic":
            assert f"{library} combine needs hidden % 256 == 0, got hidden=272" in narrow
        else:
            assert narrow == "no error"  # V1 combine accepts any hidden % 8 intranode
        assert "DeepEP combines bf16 rows, got torch.float32" in fp32


def test_rule_functions_cover_internode_and_hybrid_limits():
    from megatron_ep_plugins.backends.deepep_elastic import check_v2_rules
    from megatron_ep_plugins.backends.deepep_legacy import check_v1_rules
    from megatron_ep_plugins.backends.hybridep import check_hybridep_rules
    from megatron_ep_plugins.errors import InvalidInputError

    check_v1_rules(16, 7168, 2, 8, 256)  # DeepSeek-V3 sizes over 2 nodes
    check_v1_rules(8, 7168, 1, 8, 256, num_scales=56)
    check_v2_rules(2, 7168, 2, 8, 256, num_sms=24, device_sms=132)
    check_hybridep_rules(8, 7168, 256, 8)
    for call, match in [
        (lambda: check_v1_rules(16, 4160, 2, 8, 256), "internode combine needs hidden % 256 == 0"),
        (lambda: check_v1_rules(16, 8192, 2, 8, 256), "to fit its 16384-byte TMA buffer"),
        (lambda: check_v1_rules(32, 7168, 2, 8, 4096 * 4), "at most 512 experts per node"),
        (lambda: check_v1_rules(2, 7168, 2, 8, 256, op="combine"), None),
        (lambda: check_v1_rules(2, 7176, 2, 8, None, op="combine"), None),  # intranode combine: hidden % 8
        (lambda: check_v1_rules(2, 7172, 2, 8, None, op="combine"), "hidden % 8 == 0"),
        (lambda: check_v2_rules(2, 7168, 2, 8, 255), "num_experts % group size == 0"),
        (lambda: check_v2_rules(2, 7168, 2, 8, 256, num_sms=140, device_sms=132), "num_sms <= the GPU's 132 SMs"),
        (lambda: check_v2_rules(2, 7168, 2, 8, 256, num_sms=134, device_sms=133, library="DeepEP V2.5", even_sms=True),
         "DeepEP V2.5 needs num_sms <= the GPU's 133 SMs, got num_sms=134 (DeepEP V2.5 rounds an odd SM count up to "
         "even)"),
        (lambda: check_hybridep_rules(4, 256, 8, 3), "group size % ranks per NVLink domain == 0"),
        (lambda: check_hybridep_rules(4, 256, 8, 2, chunk_dispatch=3), "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API"),
        (lambda: check_hybridep_rules(4, 256, 8, 2, max_tokens=30000), "max tokens per rank <= 21844"),
        (lambda: check_hybridep_rules(2, 256, 4, 2, use_fp8=True), "FP8 hidden_dim % 512 == 0"),
        (lambda: check_hybridep_rules(2, 1024, 4, 2, use_fp8=True), None),
    ]:
        if match is None:
            call()
        else:
            with pytest.raises(InvalidInputError, match=re.escape(match)):
                call()


# -- the emulator is at least as strict as DeepEP ---------------------------------------------------------
def _misuse(rank, world):
    import deep_ep
    import torch.distributed as dist

    group = dist.group.WORLD
    seen = []

    def expect(exc, fn, *args, **kwargs):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
        seen.append(str(info.value)[:300])

    expect(AssertionError, deep_ep.Buffer.set_num_sms, 7)
    buf = deep_ep.Buffer(group, 1 << 30, 0)
    idx = torch.tensor([[0, 3], [1, -1]])
    expect(RuntimeError, buf.get_dispatch_layout, idx, 4, allocate_on_comm_stream=True)
    layout = buf.get_dispatch_layout(idx, 4)
    x = torch.randn(2, HIDDEN).to(torch.bfloat16)
    expect(RuntimeError, buf.dispatch, x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
           num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=torch.ones(2, 2, dtype=torch.bfloat16))

    with pytest.raises(RuntimeError, match="differs across ranks"):
        deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256 * (rank + 1), hidden=HIDDEN, num_topk=2)
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=4, hidden=HIDDEN, num_topk=2)
    w = torch.ones(2, 2)
    expect(RuntimeError, eb.dispatch, x, idx, w, num_experts=4, previous_event=eb.capture())
    big = torch.randn(5 if rank else 2, HIDDEN).to(torch.bfloat16)  # only rank 1 overflows; both raise
    expect(RuntimeError, eb.dispatch, big, torch.zeros(big.shape[0], 2, dtype=torch.long),
           torch.ones(big.shape[0], 2), num_experts=4)
    recv_x, _, _, handle, _ = eb.dispatch(x, idx, w, num_experts=4, num_sms=20)
    expect(RuntimeError, eb.combine, recv_x, handle, num_sms=10)
    expect(RuntimeError, eb.dispatch, x, idx, w, num_experts=4)  # sticky: the buffer is dead

    hb = deep_ep.HybridEPBuffer(group, hidden_dim=HIDDEN, max_num_of_tokens_per_rank=64, num_local_experts=2)
    expect(RuntimeError, hb.dispatch, x, topk_idx=idx, topk_weights=w, num_of_experts=4)  # -1 index
    uneven = torch.randn(2 + rank, HIDDEN).to(torch.bfloat16)
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
        assert any("num_tokens <= num_max_tokens_per_rank" in s for s in seen)


def _misuse_v25(rank, world):
    """DeepEP V2.5's own rules on the emulated EPBuffer (sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py, csrc/buffers/ep.hpp)."""
    import deep_ep
    import torch.distributed as dist

    group = dist.group.WORLD
    seen = {}

    def expect(name, exc, fn, *args, **kwargs):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
        seen[name] = str(info.value)[:300]

    x = torch.randn(2, HIDDEN).to(torch.bfloat16)
    idx, w = torch.tensor([[0, 3], [1, -1]]), torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="differs across ranks"):
        deep_ep.EPBuffer(group, num_max_tokens_per_rank=256 * (rank + 1), hidden=HIDDEN, num_topk=2)
    expect("hint_hidden0", RuntimeError, deep_ep.EPBuffer.get_buffer_size_hint, group, 256, 0)
    buf = deep_ep.EPBuffer(group, num_max_tokens_per_rank=4, hidden=HIDDEN, num_topk=2)
    expect("handle_copy", AssertionError, buf.dispatch, x, idx, w, num_experts=4, do_handle_copy=True)
    expect("removed_kwarg", TypeError, buf.dispatch, x, idx, w, num_experts=4, previous_event_before_epilogue=None)
    expect("previous_event", RuntimeError, buf.dispatch, x, idx, w, num_experts=4, previous_event=buf.capture())
    expect("defer_sync", RuntimeError, buf.dispatch, x, idx, w, num_experts=4, defer_epilogue=True)
    # an odd SM count runs rounded up to even; the handle keeps the count that ran
    recv_x, recv_idx, _, handle, _ = buf.dispatch(x, idx, w, num_experts=4, num_sms=25)
    odd_sms = handle.num_sms
    out, _, _ = buf.combine(recv_x, handle)  # num_sms=0: the handle's count
    # the handle holds the caller's topk_idx (do_handle_copy=False): an in-place change breaks the next use
    idx.add_(0)
    expect("topk_modified", AssertionError, buf.combine, recv_x, handle)
    idx = idx.clone()
    # defer_epilogue: only the event comes back; its wait runs the epilogue and returns the results
    event = buf.dispatch(x, idx, w, num_experts=4, async_with_compute_stream=True, defer_epilogue=True)
    deferred = event.current_stream_wait()
    assert isinstance(event, deep_ep.EventOverlap) and len(deferred) == 4
    assert deferred[1].shape == recv_idx.shape  # the same rows, in V2's arbitrary in-block order
    event = buf.combine(deferred[0], deferred[3], async_with_compute_stream=True, defer_epilogue=True)
    combined, _ = event.current_stream_wait()
    assert torch.equal(combined, out)
    expect("bias_shape", RuntimeError, buf.combine, recv_x, deferred[3], bias=torch.zeros(3, HIDDEN, dtype=x.dtype))
    big = torch.randn(5 if rank else 2, HIDDEN).to(torch.bfloat16)  # only rank 1 overflows; both raise
    expect("overflow", RuntimeError, buf.dispatch, big, torch.zeros(big.shape[0], 2, dtype=torch.long),
           torch.ones(big.shape[0], 2), num_experts=4)
    recv_x, _, _, handle, _ = buf.dispatch(x, idx, w, num_experts=4, num_sms=20)
    expect("sms_719", RuntimeError, buf.combine, recv_x, handle, num_sms=10)
    expect("dead", RuntimeError, buf.dispatch, x, idx, w, num_experts=4)  # sticky: the buffer is dead
    # deterministic + async: the receive order is fixed by the wait (V2.5 sorts in a hook after it)
    det = deep_ep.EPBuffer(group, num_max_tokens_per_rank=64, hidden=HIDDEN, num_topk=2, deterministic=True)
    xs = torch.randn(12, HIDDEN).to(torch.bfloat16)
    ids = torch.arange(24).reshape(12, 2) % 4
    sync_x = det.dispatch(xs, ids, torch.ones(12, 2), num_experts=4)[0]
    async_x, _, _, _, event = det.dispatch(xs, ids, torch.ones(12, 2), num_experts=4, async_with_compute_stream=True)
    hooked = event.hook_after_wait is not None
    event.current_stream_wait()
    assert torch.equal(async_x, sync_x)
    # the JIT static_assert of combine (hidden % 256), after a dispatch of hidden 64 that compiles
    wide = deep_ep.EPBuffer(group, num_max_tokens_per_rank=4, hidden=512, num_topk=2)
    narrow_x, _, _, narrow_handle, _ = wide.dispatch(torch.randn(2, 64).to(torch.bfloat16), idx, w, num_experts=4)
    expect("jit_hidden", RuntimeError, wide.combine, narrow_x, narrow_handle)
    return seen, odd_sms, hooked


def test_emulated_v25_follows_deepep_v25_rules(deepep_emulator):
    deepep_emulator("v25")
    for seen, odd_sms, hooked in run_ranks(_misuse_v25, 2):
        assert odd_sms == 26  # buffers/ep.py:643 align(num_sms, 2)
        assert hooked  # the deterministic sort waits for the event
        assert "csrc/buffers/ep.hpp:254" in seen["hint_hidden0"]
        assert seen["handle_copy"] == "`do_handle_copy` must be False; handle copying is no longer supported"
        assert "previous_event_before_epilogue" in seen["removed_kwarg"]
        assert "csrc/buffers/ep.hpp:142" in seen["previous_event"]
        assert "csrc/buffers/ep.hpp:773): async_with_compute_stream" in seen["defer_sync"]
        assert seen["topk_modified"] == "`topk_idx` must not be modified while the EP handle is in use"
        assert "csrc/buffers/ep.hpp:856" in seen["bias_shape"]
        assert "csrc/buffers/ep.hpp:344" in seen["overflow"]
        assert "719" in seen["sms_719"] and "719" in seen["dead"]
        assert "NVCC compilation failed" in seen["jit_hidden"] and '"Invalid hidden"' in seen["jit_hidden"]


def _emulator_size_rules(rank, world):
    """The emulator itself (no adapter) rejects every bad size the way the real library fails."""
    import deep_ep
    import torch.distributed as dist

    group = dist.group.WORLD
    seen = {}

    def expect(name, exc, fn, *args, **kwargs):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
        seen[name] = str(info.value)

    def v1_dispatch(buf, x, topk=2, num_experts=4):
        idx = torch.arange(topk).repeat(x.shape[0], 1) % num_experts
        layout = buf.get_dispatch_layout(idx, num_experts)
        return buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                            num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=torch.ones(idx.shape))

    bf16 = lambda t, h: torch.randn(t, h).to(torch.bfloat16)  # noqa: E731
    # V1: bf16 hidden % 16 is a device trap (the real test hung); the buffer is dead afterwards
    buf = deep_ep.Buffer(group, 1 << 30, 0)
    expect("v1_hidden8", RuntimeError, v1_dispatch, buf, bf16(3, 8))
    expect("v1_dead", RuntimeError, v1_dispatch, buf, bf16(3, 256))
    buf = deep_ep.Buffer(group, 1 << 30, 0)
    expect("v1_hidden12", RuntimeError, v1_dispatch, buf, bf16(3, 12))  # host assert: whole int4 vectors
    expect("v1_experts", RuntimeError, v1_dispatch, buf, bf16(3, 256), 2, 258)
    expect("v1_topk33", RuntimeError, v1_dispatch, deep_ep.Buffer(group, 1 << 30, 0), bf16(3, 256), 33, 66)
    expect("v1_ranks", AssertionError, deep_ep.Buffer.get_dispatch_config, 3)
    buf = deep_ep.Buffer(group, 1 << 30, 0)
    recv_x, _, _, _, handle, _ = v1_dispatch(buf, bf16(3, 256))
    expect("v1_combine_fp32", RuntimeError, buf.combine, recv_x.float(), handle)
    deep_ep.Buffer.set_num_sms(40)  # the handle was made with 10 channels
    expect("v1_sms_changed", RuntimeError, buf.combine, recv_x, handle)
    deep_ep.Buffer.set_num_sms(20)
    small = deep_ep.Buffer(group, 128, 0)
    expect("v1_too_small", RuntimeError, v1_dispatch, small, bf16(3, 256))

    # V2: combine's JIT static_assert on hidden % 256 ("Invalid hidden"), top-k <= 32 in dispatch
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256, hidden=512, num_topk=2)
    x = bf16(3, 64)
    idx = torch.tensor([[0, 1]] * 3)
    recv_x, _, _, handle, _ = eb.dispatch(x, idx, torch.ones(3, 2), num_experts=4)  # dispatch itself compiles
    expect("v2_invalid_hidden", RuntimeError, eb.combine, recv_x, handle)
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256, hidden=512, num_topk=40)
    idx = torch.arange(33).repeat(3, 1)
    expect("v2_topk33", RuntimeError, eb.dispatch, bf16(3, 256), idx, torch.ones(3, 33), num_experts=66)
    expect("v2_experts", RuntimeError, eb.dispatch, bf16(3, 256), torch.tensor([[0, 1]] * 3), torch.ones(3, 2),
           num_experts=5, num_sms=20)
    # the real dispatch's defaults: do_handle_copy=True (the handle keeps a copy of topk_idx)
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256, hidden=256, num_topk=2)
    idx = torch.tensor([[0, 3]] * 3)
    _, _, _, handle, _ = eb.dispatch(bf16(3, 256), idx, torch.ones(3, 2), num_experts=4)
    idx.add_(0)  # modified in place after dispatch: fine, the handle holds a copy
    assert handle.topk_idx is not idx
    _, _, _, handle, _ = eb.dispatch(bf16(3, 256), idx, torch.ones(3, 2), num_experts=4, do_handle_copy=False)
    idx.add_(0)
    expect("v2_no_copy_modified", AssertionError, lambda: handle.topk_idx)

    # HybridEP: "The buffer config is not valid." for bf16 hidden % 16 and (local x ranks) % 4
    expect("hybrid_hidden8", RuntimeError, deep_ep.HybridEPBuffer, group, 8, 64, 2)
    expect("hybrid_local3", RuntimeError, deep_ep.HybridEPBuffer, group, 256, 64, 3)
    expect("hybrid_fp8_hidden256", RuntimeError, deep_ep.HybridEPBuffer, group, 256, 64, 2, use_fp8=True)
    hb = deep_ep.HybridEPBuffer(group, 256, 64, 2)
    assert not any(hasattr(hb, a) for a in ("num_local_experts", "hidden_dim", "max_num_of_tokens_per_rank"))
    x = bf16(4, 256)
    routing_map = torch.zeros(4, 4, dtype=torch.bool)
    routing_map[:, rank * 2] = True
    tokens, _, _, handle = hb.dispatch(hidden=x, routing_map=routing_map, probs=torch.rand(4, 4))
    expect("hybrid_cached_no_experts", AssertionError, hb.dispatch, hidden=x, handle=handle)
    hb.dispatch(hidden=x, handle=handle, num_of_experts=4)
    expect("hybrid_template_hidden", AssertionError, hb.dispatch, hidden=bf16(4, 264), routing_map=routing_map)
    odd = torch.zeros(9, 4, dtype=torch.bool)  # T = 9: (9 % 64) x 2 ranks x 4 bytes is not a multiple of 16
    expect("hybrid_tma_rows", RuntimeError, hb.dispatch, hidden=bf16(9, 256), routing_map=odd)
    return seen


def test_emulator_is_as_strict_as_deepep(deepep_emulator):
    deepep_emulator("v2")
    for seen in run_ranks(_emulator_size_rules, 2):
        assert "device-side assert" in seen["v1_hidden8"] and "intranode.cu:304" in seen["v1_hidden8"]
        assert "device-side assert" in seen["v1_dead"]  # sticky
        assert "csrc/legacy/buffer.hpp:458" in seen["v1_hidden12"]
        assert "intranode.cu:168" in seen["v1_experts"]
        assert "num_topk <= 32" in seen["v1_topk33"]
        assert "Unsupported number of EP ranks: 3" in seen["v1_ranks"]
        assert "Unsupported type" in seen["v1_combine_fp32"]
        assert "num_channels" in seen["v1_sms_changed"]
        assert "num_nvl_bytes" in seen["v1_too_small"]
        assert "NVCC compilation failed" in seen["v2_invalid_hidden"] and '"Invalid hidden"' in seen["v2_invalid_hidden"]
        assert '"Insufficient lanes"' in seen["v2_topk33"]
        assert "num_experts % nccl_context->num_ranks == 0" in seen["v2_experts"]
        assert "must not be modified" in seen["v2_no_copy_modified"]
        for name in ("hybrid_hidden8", "hybrid_local3", "hybrid_fp8_hidden256"):
            assert seen[name] == "The buffer config is not valid.", seen[name]
        assert seen["hybrid_cached_no_experts"] == "The number of experts should be provided on index-based routing."
        assert seen["hybrid_template_hidden"] == "The config is not valid."
        assert seen["hybrid_tma_rows"].startswith("TMA 16B alignment error: tma_load_size = remainder_chunk(9) * "
                                                  "ranks_per_node(2) * 4 = 72B")  # the text seen on 2 x H200


# Every attribute the real objects have (DeepEP main dd758caf deep_ep/buffers/{legacy,elastic}.py, branch hybrid-ep
# 94a9f8f6 deep_ep/hybrid_ep_buffer.py): instance attributes set in __init__ plus methods. The emulator may have
# fewer, never others, so an adapter cannot come to rely on something the real library lacks.
REAL_ATTRIBUTES = {
    "Buffer": "rank group group_size num_nvl_bytes num_rdma_bytes low_latency_mode explicitly_destroy enable_shrink "
              "runtime nvshmem_qp_depth num_sms destroy is_sm90_compiled set_num_sms capture "
              "get_low_latency_rdma_size_hint get_comm_stream get_local_buffer_tensor _unpack_bias get_dispatch_config "
              "get_combine_config get_dispatch_layout dispatch combine internode_dispatch internode_combine "
              "clean_low_latency_buffer low_latency_dispatch low_latency_combine low_latency_update_mask_buffer "
              "low_latency_query_mask_buffer low_latency_clean_mask_buffer get_next_low_latency_combine_buffer",
    "ElasticBuffer": "group rank_idx num_ranks allow_hybrid_mode allow_multiple_reduction prefer_overlap_with_compute "
                     "deterministic nccl_comm_handle num_bytes num_max_tokens_per_rank num_allocated_qps "
                     "explicitly_destroy runtime num_scaleout_ranks num_scaleup_ranks scaleout_rank_idx "
                     "scaleup_rank_idx num_rdma_ranks num_nvlink_ranks destroy get_buffer_size_hint "
                     "get_engram_storage_size_hint get_pp_buffer_size_hint get_agrs_num_max_session_bytes "
                     "get_agrs_buffer_size_hint barrier _unpack_handle capture get_comm_stream get_physical_domain_size "
                     "get_logical_domain_size engram_write engram_fetch pp_set_config pp_send pp_recv "
                     "create_agrs_session destroy_agrs_session agrs_new_session agrs_set_config agrs_get_inplace_tensor "
                     "all_gather get_theoretical_num_sms get_theoretical_num_qps dispatch _unpack_bias combine",
    "EPHandle": "do_expand num_experts expert_alignment num_max_tokens_per_rank num_sms topk_idx "
                "psum_num_recv_tokens_per_scaleup_rank psum_num_recv_tokens_per_expert "
                "num_unaligned_recv_tokens_per_expert num_recv_tokens_per_expert_list recv_src_metadata "
                "dst_buffer_slot_idx token_metadata_at_forward channel_linked_list num_recv_tokens num_expanded_tokens "
                "cached_recv_src_metadata_before_sort deterministic_sort",
    "HybridEPBuffer": "group rank group_size num_of_hybrid_ep_ranks_per_nvlink_domain local_rank node_rank num_of_nodes "
                      "configurer runtime empty_jit_cache update_template_config dispatch combine dispatch_with_permute "
                      "combine_with_unpermute",
}
# DeepEP V2.5 (sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py EPHandle/EPBuffer, buffers/base.py BufferBase (an ABC, hence
# _abc_impl), utils/event.py EventOverlap): instance attributes set anywhere in the class plus methods/properties.
REAL_ATTRIBUTES_V25 = {
    "EPBuffer": "_abc_impl _unpack_bias _unpack_handle allow_hybrid_mode allow_multiple_reduction barrier capture "
                "combine context destroy deterministic dispatch explicitly_destroy get_buffer_size_hint "
                "get_comm_stream get_logical_domain_size get_physical_domain_size get_theoretical_num_qps "
                "get_theoretical_num_sms group lb_get_theoretical_num_sms lb_prefetch_weights lb_reduce_grads "
                "main_context nccl_comm_handle num_allocated_qps num_bytes num_lb_bytes num_max_tokens_per_rank "
                "num_nvlink_ranks num_ranks num_rdma_ranks num_scaleout_ranks num_scaleup_ranks "
                "prefer_overlap_with_compute print_memory_usage rank_idx runtime scaleout_rank_idx scaleup_rank_idx",
    "EPHandle": "_topk_idx _topk_idx_version cached_recv_src_metadata_before_sort channel_linked_list "
                "deterministic_sort do_expand dst_buffer_slot_idx expert_alignment num_expanded_tokens num_experts "
                "num_max_tokens_per_rank num_recv_tokens num_recv_tokens_per_expert_list num_sms "
                "num_unaligned_recv_tokens_per_expert psum_num_recv_tokens_per_expert "
                "psum_num_recv_tokens_per_scaleup_rank recv_src_metadata token_metadata_at_forward topk_idx",
    "EventOverlap": "event extra_tensors _release_handle_by_call hook_after_wait current_stream_wait wait "
                    "register_hook_after_wait",
}


def _emulated_v25_objects(rank, world):
    import deep_ep
    import torch.distributed as dist

    buf = deep_ep.EPBuffer(dist.group.WORLD, num_max_tokens_per_rank=256, hidden=HIDDEN, num_topk=2)
    _, _, _, handle, event = buf.dispatch(torch.randn(3, HIDDEN).to(torch.bfloat16), torch.tensor([[0, 1]] * 3),
                                          torch.ones(3, 2), num_experts=4, async_with_compute_stream=True)
    event.current_stream_wait()
    objects = {"EPBuffer": buf, "EPHandle": handle, "EventOverlap": event}
    return {name: sorted({a for a in dir(obj) if not a.startswith("__")} - set(REAL_ATTRIBUTES_V25[name].split()))
            for name, obj in objects.items()}


def test_emulated_v25_objects_have_no_attribute_the_real_ones_lack(deepep_emulator):
    deep_ep = deepep_emulator("v25")
    # the module: V2.5 has no V1 Buffer, no ElasticBuffer (no alias), no HybridEPBuffer; deep_ep.utils: EventHandle only
    assert not any(hasattr(deep_ep, n) for n in ("Buffer", "ElasticBuffer", "HybridEPBuffer", "Config"))
    import deep_ep.utils

    assert hasattr(deep_ep.utils, "EventHandle") and not hasattr(deep_ep.utils, "EventOverlap")
    for extra in run_ranks(_emulated_v25_objects, 2):
        assert extra == {name: [] for name in REAL_ATTRIBUTES_V25}, extra


def _emulated_objects(rank, world):
    import deep_ep
    import torch.distributed as dist

    group = dist.group.WORLD
    eb = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=256, hidden=HIDDEN, num_topk=2)
    _, _, _, handle, _ = eb.dispatch(torch.randn(3, HIDDEN).to(torch.bfloat16), torch.tensor([[0, 1]] * 3),
                                     torch.ones(3, 2), num_experts=4)
    objects = {"Buffer": deep_ep.Buffer(group, 1 << 20, 0), "ElasticBuffer": eb, "EPHandle": handle,
               "HybridEPBuffer": deep_ep.HybridEPBuffer(group, HIDDEN, 64, 2)}
    return {name: sorted({a for a in dir(obj) if not a.startswith("__")} - set(REAL_ATTRIBUTES[name].split()))
            for name, obj in objects.items()}


def test_emulated_objects_have_no_attribute_the_real_ones_lack(deepep_emulator):
    deepep_emulator("v2")
    for extra in run_ranks(_emulated_objects, 2):
        assert extra == {name: [] for name in REAL_ATTRIBUTES}, extra


def deepep_facts(rank, world, cls_name, device="cpu"):
    """What a DeepEP object of ``cls_name`` has and how it fails on sizes its kernels reject. Runs on the CPU
    emulator here and on the real library in tests/test_gpu.py (same function, same expectations)."""
    import torch.distributed as dist

    deep_ep = _deep_ep()
    group, facts = dist.group.WORLD, {}

    def attempt(name, fn):
        try:
            value = fn()
            facts[name] = "ok"
            return value
        except Exception as exc:  # noqa: BLE001 - the failure is the fact
            facts[name] = f"{type(exc).__name__}: {exc}"[:300]
            return None

    attrs = lambda obj: sorted(a for a in dir(obj) if not a.startswith("__"))  # noqa: E731
    cls = getattr(deep_ep, cls_name)
    x = torch.randn(4, 256, device=device).to(torch.bfloat16)
    if cls_name == "Buffer":
        facts["attrs"] = attrs(attempt("construct", lambda: cls(group, 1 << 28, 0)))
    elif cls_name in ("ElasticBuffer", "EPBuffer"):
        # Sized as the adapter sizes it (get_buffer_size_hint): on 2 x H200 (EP_DISABLE_GIN=1) the constructor's own
        # sizing path (num_bytes=None -> _C.calculate_elastic_buffer_size, elastic.py:306) segfaulted. V2.5's
        # EPBuffer (sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py:242-399) takes the same arguments.
        # get_buffer_size_hint reads the group's NCCL communicator (get_nccl_comm_handle), which torch creates at the
        # group's first collective: without one it segfaulted on 2 x H200. The adapter always agrees first.
        if device != "cpu":
            dist.all_reduce(torch.zeros(1, device=device), group=group)
        num_bytes = cls.get_buffer_size_hint(group, 256, 256, num_topk=2, allow_hybrid_mode=False)
        buf = attempt("construct", lambda: cls(group, num_bytes=num_bytes, num_max_tokens_per_rank=256, hidden=256,
                                                num_topk=2, allow_hybrid_mode=False))
        facts["attrs"] = attrs(buf)
        idx = torch.tensor([[0, 3]] * 4, device=device)
        out = attempt("dispatch_h64", lambda: buf.dispatch(x[:, :64].contiguous(), idx,
                                                           torch.ones(4, 2, device=device), num_experts=4))
        facts["handle_attrs"] = attrs(out[3])
        attempt("combine_h64", lambda: buf.combine(out[0], out[3]))  # the JIT static_assert "Invalid hidden"
    else:
        buf = attempt("construct", lambda: cls(group, 256, 64, 2))
        facts["attrs"] = attrs(buf)
        attempt("hidden8", lambda: cls(group, 8, 64, 2))
        attempt("local3", lambda: cls(group, 256, 64, 3))
        routing_map = torch.zeros(4, 4, dtype=torch.bool, device=device)
        routing_map[:, 2 * rank] = True
        out = attempt("dispatch", lambda: buf.dispatch(hidden=x, routing_map=routing_map,
                                                       probs=torch.rand(4, 4, device=device)))
        attempt("cached_without_num_of_experts", lambda: buf.dispatch(hidden=x, handle=out[3]))
        attempt("cached", lambda: buf.dispatch(hidden=x, handle=out[3], num_of_experts=4))
        attempt("odd_tokens", lambda: buf.dispatch(hidden=x[:3].contiguous(), routing_map=routing_map[:3].contiguous()))
    if device == "cuda":
        torch.cuda.synchronize()
    return facts


# What the adapters use of each class: present on every DeepEP tree's object (the hybrid-ep branch carries its
# own, older V1 Buffer with extra PCIe methods, so REAL_ATTRIBUTES, taken from main, is exact for main only).
USED_ATTRIBUTES = {
    "Buffer": "group num_nvl_bytes num_rdma_bytes num_sms set_num_sms get_dispatch_config get_combine_config "
              "get_dispatch_layout dispatch combine capture",
    "ElasticBuffer": "get_buffer_size_hint capture dispatch combine num_scaleout_ranks num_scaleup_ranks",
    "EPBuffer": "get_buffer_size_hint capture dispatch combine num_scaleout_ranks num_scaleup_ranks",
    "HybridEPBuffer": "num_of_hybrid_ep_ranks_per_nvlink_domain local_rank dispatch combine",
}


def check_deepep_facts(cls_name, facts, exact_attributes=True):
    """Expectations seen on the real library (2 x H200, DeepEP main dd758caf / hybrid-ep 94a9f8f6).

    ``exact_attributes``: the object is DeepEP main's (or the hybrid-ep branch's HybridEPBuffer), whose full
    attribute list REAL_ATTRIBUTES holds; otherwise only the attributes the adapters use are required."""
    assert facts["construct"] == "ok", facts
    assert set(USED_ATTRIBUTES[cls_name].split()) <= set(facts["attrs"]), facts["attrs"]
    real = REAL_ATTRIBUTES_V25 if cls_name == "EPBuffer" else REAL_ATTRIBUTES
    if exact_attributes:
        assert set(facts["attrs"]) <= set(real[cls_name].split()), facts["attrs"]
    if cls_name == "HybridEPBuffer":
        assert "num_local_experts" not in facts["attrs"] and "hidden_dim" not in facts["attrs"]
    if cls_name == "ElasticBuffer":
        assert facts["dispatch_h64"] == "ok", facts  # dispatch compiles for hidden 64 ...
        assert set(facts["handle_attrs"]) <= set(REAL_ATTRIBUTES["EPHandle"].split())
        assert facts["combine_h64"].startswith("RuntimeError: Assertion exception ("), facts  # ... combine does not
        assert 'csrc/jit/compiler.hpp:239): false and "NVCC compilation failed"' in facts["combine_h64"]
    if cls_name == "EPBuffer":  # V2.5: the same rules; a JIT failure's text comes from DeepJIT (not yet seen on a GPU)
        assert facts["dispatch_h64"] == "ok", facts
        assert set(facts["handle_attrs"]) <= set(REAL_ATTRIBUTES_V25["EPHandle"].split())
        assert facts["combine_h64"].startswith("RuntimeError: ") and '"Invalid hidden"' in facts["combine_h64"], facts
    if cls_name == "HybridEPBuffer":
        assert facts["hidden8"] == facts["local3"] == "RuntimeError: The buffer config is not valid.", facts
        assert facts["dispatch"] == "ok" and facts["cached"] == "ok", facts
        assert facts["cached_without_num_of_experts"] == (
            "AssertionError: The number of experts should be provided on index-based routing.")
        assert facts["odd_tokens"].startswith("RuntimeError: TMA 16B alignment error: tma_load_size = "
                                              "remainder_chunk(3) * ranks_per_node(2) * 4 = 24B"), facts


@pytest.mark.parametrize("cls_name", ["Buffer", "ElasticBuffer", "EPBuffer", "HybridEPBuffer"])
def test_emulator_fails_like_the_real_library(deepep_emulator, cls_name):
    deepep_emulator("v25" if cls_name == "EPBuffer" else "v2")
    for facts in run_ranks(deepep_facts, 2, cls_name):
        check_deepep_facts(cls_name, facts)


def _param_names(fn):
    return [(p.name, p.default if p.default is not inspect.Parameter.empty else "<required>")
            for p in inspect.signature(fn).parameters.values()]


# The real signatures (DeepEP main dd758caf deep_ep/buffers/{legacy,elastic}.py, branch hybrid-ep 94a9f8f6
# deep_ep/hybrid_ep_buffer.py); the emulator must take exactly these arguments with these defaults.
REAL_SIGNATURES = {
    ("Buffer", "__init__"): "self group num_nvl_bytes=0 num_rdma_bytes=0 low_latency_mode=False num_qps_per_rank=24 "
                            "allow_nvlink_for_low_latency_mode=True allow_mnnvl=False explicitly_destroy=False "
                            "enable_shrink=False comm=None",
    ("Buffer", "dispatch"): "self x handle=None num_tokens_per_rank=None num_tokens_per_rdma_rank=None "
                            "is_token_in_rank=None num_tokens_per_expert=None topk_idx=None topk_weights=None "
                            "expert_alignment=1 num_worst_tokens=0 config=None previous_event=None async_finish=False "
                            "allocate_on_comm_stream=False",
    ("Buffer", "combine"): "self x handle topk_weights=None bias=None config=None previous_event=None "
                           "async_finish=False allocate_on_comm_stream=False",
    ("ElasticBuffer", "__init__"): "self group num_bytes=None num_cpu_bytes=0 num_max_tokens_per_rank=0 hidden=0 "
                                   "num_topk=0 use_fp8_dispatch=False deterministic=False allow_hybrid_mode=True "
                                   "allow_multiple_reduction=True prefer_overlap_with_compute=True sl_idx=3 "
                                   "num_allocated_qps=0 num_cpu_timeout_secs=300 num_gpu_timeout_secs=100 "
                                   "explicitly_destroy=False",
    ("ElasticBuffer", "dispatch"): "self x topk_idx=None topk_weights=None cumulative_local_expert_recv_stats=None "
                                   "num_experts=None num_max_tokens_per_rank=None expert_alignment=None num_sms=0 "
                                   "num_qps=0 previous_event=None previous_event_before_epilogue=None "
                                   "async_with_compute_stream=False allocate_on_comm_stream=False handle=None "
                                   "do_handle_copy=True do_cpu_sync=None do_expand=False do_zero_padding=False "
                                   "use_tma_aligned_col_major_sf=False",
    ("ElasticBuffer", "combine"): "self x handle topk_weights=None bias=None num_sms=0 num_qps=0 previous_event=None "
                                  "previous_event_before_epilogue=None async_with_compute_stream=False "
                                  "allocate_on_comm_stream=False",
    ("HybridEPBuffer", "__init__"): "self group hidden_dim max_num_of_tokens_per_rank num_local_experts use_fp8=False "
                                    "num_sms_dispatch_api=None num_sms_combine_api=None num_sms_preprocessing_api=None "
                                    "num_blocks_permute=None num_blocks_unpermute=None load_cached_kernels=False "
                                    "use_shared_buffer=True enable_custom_allgather=False "
                                    "num_of_hybrid_ep_ranks_per_nvlink_domain=None use_mnnvl=None",
    ("HybridEPBuffer", "dispatch"): "self hidden scaling_factor=None topk_idx=None topk_weights=None "
                                    "num_of_experts=None probs=None routing_map=None num_dispatched_tokens_tensor=None "
                                    "num_dispatched_tokens=None handle=None",
    ("HybridEPBuffer", "combine"): "self hidden probs=None handle=None",
    # DeepEP V2.5 (sgl-deep-ep-v25 0.1.0rc0 buffers/ep.py:242-261, :374-378, :562-580, :770-779), v25 layout
    ("EPBuffer", "__init__"): "self group num_bytes=None num_max_tokens_per_rank=0 hidden=0 num_topk=0 "
                              "use_fp8_dispatch=False lb_allocation_plan_or_num_bytes=0 deterministic=False "
                              "allow_hybrid_mode=True allow_multiple_reduction=True prefer_overlap_with_compute=True "
                              "sl_idx=None num_allocated_qps=0 num_cpu_timeout_secs=300 num_gpu_timeout_secs=100 "
                              "explicitly_destroy=False",
    ("EPBuffer", "get_buffer_size_hint"): "group num_max_tokens_per_rank hidden num_topk=0 use_fp8_dispatch=False "
                                          "allow_hybrid_mode=True allow_multiple_reduction=True",
    ("EPBuffer", "dispatch"): "self x topk_idx=None topk_weights=None cumulative_local_expert_recv_stats=None "
                              "num_experts=None num_max_tokens_per_rank=None expert_alignment=None num_sms=0 num_qps=0 "
                              "previous_event=None async_with_compute_stream=False allocate_on_comm_stream=False "
                              "handle=None do_handle_copy=False do_cpu_sync=None do_expand=False do_zero_padding=False "
                              "use_tma_aligned_col_major_sf=False defer_epilogue=False",
    ("EPBuffer", "combine"): "self x handle topk_weights=None bias=None num_sms=0 num_qps=0 previous_event=None "
                             "async_with_compute_stream=False allocate_on_comm_stream=False defer_epilogue=False",
}


@pytest.mark.parametrize("cls, method", list(REAL_SIGNATURES))
def test_emulator_signatures_match_the_real_library(deepep_emulator, cls, method):
    deep_ep = deepep_emulator("v25" if cls == "EPBuffer" else "v2")
    expected = []
    for token in REAL_SIGNATURES[cls, method].split():
        name, _, default = token.partition("=")
        expected.append((name, "<required>" if not _ else eval(default)))  # noqa: S307 - literals above
    assert _param_names(getattr(getattr(deep_ep, cls), method)) == expected


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


V25_LEGACY = ["removed the V1 Buffer", "use the 'elastic' backend", "install DeepEP <= 2.1"]


@pytest.mark.parametrize("api, module, cls, version", [
    ("v1", "deep_ep", None, "V1"),
    ("v2", "deep_ep", "ElasticBuffer", "V2"),
    ("v25", "deep_ep", "EPBuffer", "V2.5"),  # upstream DeepEP 2.5
    ("v25", "deep_ep_v25", "EPBuffer", "V2.5"),  # the sgl-deep-ep-v25 wheel: no deep_ep at all
])
def test_probes_tell_which_deepep_is_installed(deepep_emulator, api, module, cls, version):
    """What a user sees: the API generation, class, version and NCCL needed vs loaded, and why a backend is off."""
    deepep_emulator(api, module=module)
    verdicts = _probes()
    elastic, legacy = verdicts["elastic"], verdicts["legacy"]
    assert elastic.available is (cls is not None), elastic.reason
    if cls is None:
        assert "has no ElasticBuffer or EPBuffer: this DeepEP is V1-only" in elastic.reason
        assert elastic.details["deep_ep_api"] == "V1" and legacy.details["deep_ep_api"] == "V1"
    else:
        need = "2.32.3" if version == "V2.5" else "2.30.4"
        assert elastic.details["deep_ep_api"] == version and elastic.details["deep_ep_module"] == module
        assert elastic.details["deep_ep_class"] == f"{module}.{cls}"
        assert elastic.details["deep_ep"] == f"0.0.0+emulator.{api}"
        assert elastic.details["nccl_needed"] == need and elastic.details["nccl"] == need  # loaded
        assert elastic.reason.startswith(f"{module}.{cls} (DeepEP {version}, {module} 0.0.0+emulator.{api}), NCCL "
                                         f"{need} (needs >= {need})"), elastic.reason
    assert legacy.available is (version != "V2.5"), legacy.reason
    if version == "V2.5":
        for part in V25_LEGACY:
            assert part in legacy.reason, legacy.reason
        if module == "deep_ep":
            assert "this DeepEP (V2.5, deep_ep 0.0.0+emulator.v25, EPBuffer only)" in legacy.reason
            assert legacy.details["deep_ep_api"] == "V2.5" and legacy.details["deep_ep_classes"] == "EPBuffer"
        else:
            assert "deep_ep not importable" in legacy.reason and "deep_ep_v25 is installed" in legacy.reason
        assert not verdicts["hybridep"].available
        from megatron_ep_plugins.backends.deepep_legacy import DeepEPLegacyBackend

        with pytest.raises(ImportError) as info:  # the constructor says the same
            DeepEPLegacyBackend()
        assert all(part in str(info.value) for part in V25_LEGACY), info.value


def test_cli_list_shows_which_deepep_is_installed(deepep_emulator, capsys):
    from megatron_ep_plugins.cli import main

    deepep_emulator("v25")
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "deep_ep.EPBuffer (DeepEP V2.5, deep_ep 0.0.0+emulator.v25), NCCL 2.32.3 (needs >= 2.32.3)" in text
    assert "this DeepEP (V2.5, deep_ep 0.0.0+emulator.v25, EPBuffer only) removed the V1 Buffer" in text


@pytest.mark.parametrize("api, nccl, available", [
    ("v2", (2, 30, 4), True),
    ("v25", (2, 30, 4), False),  # enough for V2, not for V2.5
    ("v25", (2, 32, 2), False),
    ("v25", (2, 32, 3), True),
])
def test_elastic_probe_needs_the_nccl_of_the_installed_deepep(deepep_emulator, api, nccl, available):
    deepep_emulator(api, nccl=nccl)
    verdict = _probes()["elastic"]
    assert verdict.available is available, verdict.reason
    if not available:
        loaded = ".".join(map(str, nccl))
        assert (f"NCCL {loaded} < 2.32.3 (the loaded libnccl.so.2): DeepEP V2.5 (deep_ep.EPBuffer "
                "0.0.0+emulator.v25) needs NCCL >= 2.32.3") in verdict.reason, verdict.reason


def test_elastic_prefers_deep_ep_and_says_another_deepep_is_installed(deepep_emulator):
    import importlib.machinery
    import types

    from megatron_ep_plugins.backends.deepep_elastic import resolve_elastic_api

    deepep_emulator("v2")
    other = types.ModuleType("deep_ep_v25")
    other.__spec__ = importlib.machinery.ModuleSpec("deep_ep_v25", None)
    sys.modules["deep_ep_v25"] = other  # removed by the fixture
    api = resolve_elastic_api()
    assert api.qualname == "deep_ep.ElasticBuffer" and "deep_ep_v25" in api.details()["note"]


def _fake_deep_ep(monkeypatch, dispatch):
    """A ``deep_ep`` whose EPBuffer has the given ``dispatch`` (to check the choice by signature)."""
    import types

    module = types.ModuleType("deep_ep")
    module.__version__ = "9.9.9"

    class EPBuffer:
        def __init__(self, group, num_bytes=None, num_max_tokens_per_rank=0, hidden=0, num_topk=0,
                     use_fp8_dispatch=False, deterministic=False, allow_hybrid_mode=True, num_allocated_qps=0):
            pass

        def combine(self, x, handle, topk_weights=None, num_sms=0, previous_event=None,
                    async_with_compute_stream=False, allocate_on_comm_stream=False):
            pass

    EPBuffer.dispatch = dispatch
    module.EPBuffer = EPBuffer
    monkeypatch.setitem(sys.modules, "deep_ep", module)


def test_elastic_reads_the_installed_signatures(monkeypatch):
    from megatron_ep_plugins.backends.deepep_elastic import resolve_elastic_api

    def v25_like(self, x, topk_idx=None, topk_weights=None, num_experts=None, num_sms=0, previous_event=None,
                 async_with_compute_stream=False, allocate_on_comm_stream=False, handle=None, do_handle_copy=False,
                 do_expand=False, defer_epilogue=False):
        pass

    def copying(self, x, topk_idx=None, topk_weights=None, num_experts=None, num_sms=0, previous_event=None,
                async_with_compute_stream=False, allocate_on_comm_stream=False, handle=None, do_handle_copy=True,
                do_expand=False):
        pass

    def renamed(self, x, topk_idx=None, topk_weights=None, num_experts=None, num_sms=0, previous_event=None,
                async_mode=False, allocate_on_comm_stream=False, handle=None, do_expand=False):
        pass

    _drop_deep_ep_modules()
    _fake_deep_ep(monkeypatch, v25_like)
    api = resolve_elastic_api()
    assert (api.generation, api.copies_topk, api.even_sms, api.min_nccl) == ("V2.5", False, True, (2, 32, 3))
    assert api.size_hint is None  # no get_buffer_size_hint: the constructor sizes the buffer
    _fake_deep_ep(monkeypatch, copying)  # an EPBuffer that copies topk_idx itself: the adapter need not
    assert resolve_elastic_api().copies_topk is True
    _fake_deep_ep(monkeypatch, renamed)
    with pytest.raises(ImportError, match=re.escape("deep_ep.EPBuffer.dispatch (deep_ep 9.9.9) takes no "
                                                    "async_with_compute_stream: this DeepEP V2.5 differs")):
        resolve_elastic_api()


def _topk_idx_reuse(rank, world):
    """The caller may modify its topk_idx in place after dispatch (V2 copies it; on V2.5 the adapter does)."""
    import torch.distributed as dist

    backend, group = make_backend("elastic"), dist.group.WORLD
    x, idx, w = _tokens(7 + rank, HIDDEN, 2, 4)
    res = backend.dispatch(x, idx, w, 4, group)
    idx.add_(0)  # in place: bumps the version counter V2.5's handle checks
    backend.combine(res.recv_x, res.handle, group)
    backend.dispatch_cached(x, res.handle, group)
    return backend.api.copies_topk, backend._clone_topk


@pytest.mark.parametrize("api", ["v2", "v25"])
def test_elastic_caller_may_reuse_topk_idx_after_dispatch(deepep_emulator, api):
    deepep_emulator(api)
    expected = (False, True) if api == "v25" else (True, False)
    assert run_ranks(_topk_idx_reuse, 2) == [expected] * 2


@pytest.mark.parametrize("capability, nccl, expected", [
    ((8, 0), (2, 30, 4), "compute capability 8.0 < 9.0"),
    ((9, 0), (2, 28, 3), "NCCL 2.28.3 < 2.30.4"),
])
def test_elastic_probe_rejects_old_gpu_or_nccl(deepep_emulator, capability, nccl, expected):
    deepep_emulator("v2", capability=capability, nccl=nccl)
    verdict = _probes()["elastic"]
    assert not verdict.available and expected in verdict.reason


@pytest.mark.parametrize("compiled, loaded, available, decided", [
    ((2, 28, 9), (2, 30, 7), True, "2.30.7"),  # the 2 x H200 machine: torch built with 2.28.9, 2.30.7 loaded
    ((2, 30, 7), (2, 28, 3), False, "2.28.3"),  # a newer compile-time NCCL does not help an old loaded one
    ((2, 30, 5), RuntimeError("libnccl.so.2 is not loaded in this process"), True, "2.30.5"),
    ((2, 28, 9), RuntimeError("libnccl.so.2 is not loaded in this process"), False, "2.28.9"),
])
def test_elastic_probe_decides_on_the_loaded_nccl(deepep_emulator, monkeypatch, compiled, loaded, available, decided):
    from megatron_ep_plugins.backends import _deepep_common

    deepep_emulator("v2", nccl=compiled)

    def fake_loaded():
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    monkeypatch.setattr(_deepep_common, "loaded_nccl_version", fake_loaded)
    verdict = _probes()["elastic"]
    assert verdict.available is available, verdict.reason
    assert verdict.details["nccl"] == decided and verdict.details["nccl_compiled"] == ".".join(map(str, compiled))
    if isinstance(loaded, Exception):
        assert verdict.details["nccl_loaded"].startswith("unknown (libnccl.so.2 is not loaded")
        assert "torch's compiled NCCL; the loaded libnccl.so.2 could not be asked" in verdict.details["nccl_source"]
    else:
        assert verdict.details["nccl_loaded"] == decided and verdict.details["nccl_source"] == "the loaded libnccl.so.2"
    if not available:
        assert f"NCCL {decided} < 2.30.4" in verdict.reason


def test_loaded_nccl_version_asks_the_library_torch_loaded():
    from megatron_ep_plugins.backends._deepep_common import decode_nccl_version, loaded_nccl_version

    assert decode_nccl_version(23007) == (2, 30, 7) and decode_nccl_version(2708) == (2, 7, 8)
    assert decode_nccl_version((2, 30, 4)) == (2, 30, 4)
    try:
        version = loaded_nccl_version()
    except RuntimeError as exc:  # e.g. a CPU-only torch: the reason says why
        assert "libnccl.so.2" in str(exc) or "RTLD_NOLOAD" in str(exc)
    else:
        assert len(version) == 3 and all(isinstance(v, int) for v in version) and version >= (2, 0, 0)


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


def _hybridep_graph_capture_fails(rank, world):
    """Routing-map graphs forced on where capture cannot work (CPU: no CUDA): the second dispatch of a shape tries to
    capture, fails, logs one warning and runs eagerly; results stay those of a backend that never tried."""
    import torch.distributed as dist

    records = package_log_messages()
    tried, plain, group = make_backend("hybridep"), make_backend("hybridep"), dist.group.WORLD
    tried._graph_devices = ("cpu", "cuda")  # as on CUDA: the shape's second dispatch tries to capture
    same = []
    for i in range(3):
        x, idx, w = _tokens(12, HIDDEN, 2, 4, seed=10 * i + rank)
        a, b = tried.dispatch(x, idx, w, 4, group), plain.dispatch(x, idx, w, 4, group)
        same.append(all(torch.equal(u, v) for u, v in zip(a[:4], b[:4])))
    return same, sum(v is None for v in tried._graphs.values()), [m for m in records if "CUDA graph capture" in m]


def test_hybridep_failed_graph_capture_falls_back_to_eager_with_one_warning(deepep_emulator):
    deepep_emulator("v1")
    for same, failed, warnings in run_ranks(_hybridep_graph_capture_fails, 2):
        assert all(same), same
        assert failed == 1 and len(warnings) == 1, (failed, warnings)
        assert "runs eagerly" in warnings[0] and "MCORE_EP_HYBRIDEP_CUDA_GRAPHS=0" in warnings[0]
