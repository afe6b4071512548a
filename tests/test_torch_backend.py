"""The reference backend `torch` against the single-process oracle, on 2, 3 and 4 gloo ranks."""

from __future__ import annotations

import zlib

import pytest
import torch

from distributed import package_log_messages, run_ranks
from oracle import oracle_combine, oracle_dispatch

SCENARIOS = {
    # name: (tokens per rank (callable of rank), hidden, topk, experts per rank)
    "uneven_masked": (lambda r: 11 + 5 * r, 8, 2, 2),
    "zero_tokens_on_rank1": (lambda r: 0 if r == 1 else 9, 8, 2, 2),
    "all_to_rank0": (lambda r: 7, 8, 2, 2),
    "k1": (lambda r: 10, 4, 1, 2),
    "k8": (lambda r: 6 + r, 4, 8, 4),
}


def make_inputs(name: str, rank: int, world: int):
    count, hidden, topk, per_rank = SCENARIOS[name]
    num_experts = per_rank * world
    # crc32, not hash(): str hashes differ between processes (spawned NCCL ranks vs the oracle's process)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{world}".encode()))
    tokens = count(rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    scores = torch.rand(tokens, num_experts, generator=gen)
    if name == "all_to_rank0":
        scores[:, per_rank:] = -1.0
    idx = scores.topk(min(topk, num_experts), dim=1).indices
    if name == "uneven_masked":
        idx[::3, 0] = -1  # dropped by capacity
        if tokens > 4:
            idx[4, :] = -1  # a token routed nowhere
    w = torch.rand(tokens, idx.shape[1], generator=gen)
    return x, idx, w, num_experts


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def random_case(case: int, rank: int, world: int):
    """Random routing no hand-written scenario covers: case-wide (hence equal on every rank) hidden, top-k,
    experts per rank and dtype; per rank T (0 now and then), rows spanning many exponents (sums that round),
    expert ids with -1 masks and, in every other case, repeated experts within one token's top-k."""
    case_gen = torch.Generator().manual_seed(zlib.crc32(f"random/{case}/{world}".encode()))
    hidden, topk, per_rank = (int(torch.randint(lo, hi, (1,), generator=case_gen))
                              for lo, hi in ((1, 17), (1, 7), (1, 5)))
    dtype = DTYPES[case % len(DTYPES)]
    num_experts = per_rank * world
    gen = torch.Generator().manual_seed(zlib.crc32(f"random/{case}/{rank}/{world}".encode()))
    tokens = 0 if int(torch.randint(0, 6, (1,), generator=gen)) == 0 else int(torch.randint(1, 41, (1,), generator=gen))
    scale = torch.logspace(-3, 3, 13)[torch.randint(0, 13, (tokens, 1), generator=gen)]
    x = (torch.randn(tokens, hidden, generator=gen) * scale).to(dtype)
    if case % 2 and topk <= num_experts:  # distinct experts, as a router's top-k gives
        idx = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    else:  # repeats allowed: each entry still counts once in tokens_per_expert and owns its own weight
        idx = torch.randint(0, num_experts, (tokens, topk), generator=gen)
    idx[torch.rand(tokens, topk, generator=gen) < 0.3] = -1
    w = torch.rand(tokens, topk, generator=gen)
    return x, idx, w, num_experts


INPUTS = {"scenario": make_inputs, "random": random_case}


def _expert(recv_x):
    """What the ranks' "experts" return for combine: a deterministic function of the received rows."""
    return (recv_x.float() * 2 + 1).to(recv_x.dtype)


def _cpu(obj):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}


def _rank_dispatch_combine(rank, world, names, device="cpu", gather_before_sync=None, inputs="scenario"):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    backend = TorchA2ABackend()
    backend.gather_before_sync = gather_before_sync  # None: the device's default (before the sync on CUDA only)
    out = {}
    for name in names:
        x, idx, w, num_experts = (t.to(device) if isinstance(t, torch.Tensor) else t
                                  for t in INPUTS[inputs](name, rank, world))
        res = backend.dispatch(x, idx, w, num_experts, dist.group.WORLD, async_finish=True, allocate_on_comm_stream=True)
        y = _expert(res.recv_x)
        combined, none = backend.combine(y, res.handle, dist.group.WORLD)
        grad_w_in = torch.arange(res.recv_topk_weights.numel(), dtype=torch.float32,
                                 device=device).view_as(res.recv_topk_weights)
        _, back_w = backend.combine(y, res.handle, dist.group.WORLD, topk_weights=grad_w_in)
        cached = backend.dispatch_cached(x.float() * 3, res.handle, dist.group.WORLD)
        out[name] = _cpu(dict(recv_x=res.recv_x, recv_idx=res.recv_topk_idx, recv_w=res.recv_topk_weights,
                              tpe=res.tokens_per_expert, tpe_device=str(res.tokens_per_expert.device),
                              combined=combined, none=none, back_w=back_w, grad_w_in=grad_w_in, cached=cached))
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("gather_before_sync", [None, True])
def test_dispatch_combine_match_oracle(world, gather_before_sync):
    # None = CPU default (rows gathered once the sizes are known); True = the CUDA default (gathered with
    # the upper bound before the host waits, then sliced)
    check_against_oracle(run_ranks(_rank_dispatch_combine, world, list(SCENARIOS), "cpu", gather_before_sync), world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_random_routings_match_oracle(world):
    """Property-style: many random routings (uneven and zero T, masks, repeats, bf16/fp16/fp32, K above and
    below the group size), every output exact against the oracle, both gather placements."""
    cases = list(range(24))
    for gather_before_sync in (False, True):
        results = run_ranks(_rank_dispatch_combine, world, cases, "cpu", gather_before_sync, "random")
        check_against_oracle(results, world, cases, "random")


def check_against_oracle(results, world, names=None, inputs="scenario"):
    """Every rank's dispatch/combine/cached results (moved to the CPU) against the single-process oracle."""
    names = list(SCENARIOS) if names is None else names
    for name in names:
        by_rank = [INPUTS[inputs](name, r, world) for r in range(world)]
        xs, idxs, ws = [i[0] for i in by_rank], [i[1] for i in by_rank], [i[2] for i in by_rank]
        dtype = xs[0].dtype
        rows, counts = oracle_dispatch(xs, idxs, ws, by_rank[0][3])
        for d in range(world):
            got = results[d][name]
            want = rows[d]
            assert got["recv_x"].shape[0] == len(want), (name, d)
            if want:
                # torch keeps source-rank blocks in ascending rank and token order: compare exactly
                assert torch.equal(got["recv_x"], torch.stack([r[2] for r in want])), (name, d)
                assert torch.equal(got["recv_idx"], torch.stack([r[3] for r in want])), (name, d)
                valid = got["recv_idx"] >= 0
                assert torch.equal(got["recv_w"][valid], torch.stack([r[4] for r in want])[valid]), (name, d)
            assert torch.equal(got["tpe"], counts[d]), (name, d)
            assert got["tpe_device"] == "cpu"
            assert got["none"] is None
        ys = {d: _expert(results[d][name]["recv_x"]) for d in range(world)}
        want_combined = oracle_combine(ys, rows, [x.shape for x in xs], dtype)
        for r in range(world):
            got = results[r][name]["combined"]
            assert got.dtype == dtype and got.shape == xs[r].shape
            # fp32 sum in ascending destination order, one cast: the oracle's arithmetic, so bit-exact
            assert torch.equal(got, want_combined[r]), (name, r)
            # combine's weights: each source entry comes back from the rank owning that expert
            want_w = torch.zeros(idxs[r].shape)
            for d in range(world):
                for row, (src, t, _, local_idx, _) in enumerate(rows[d]):
                    if src == r:
                        for k in range(local_idx.numel()):
                            if local_idx[k] >= 0:
                                want_w[t, k] = results[d][name]["grad_w_in"][row, k]
            assert torch.equal(results[r][name]["back_w"], want_w), (name, r)
        for d in range(world):  # dispatch with a cached handle moves the same rows
            want = [xs[src][t].float() * 3 for (src, t, *_ ) in rows[d]]
            got = results[d][name]["cached"]
            assert got.shape[0] == len(want)
            if want:
                assert torch.equal(got, torch.stack(want).to(got.dtype))


def _rank_round_trip(rank, world, device="cpu"):
    import torch.distributed as dist

    from megatron_ep_plugins.autograd import build_slot
    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    slot = build_slot(TorchA2ABackend())
    gen = torch.Generator().manual_seed(100 + rank)
    tokens, hidden, topk, num_experts = 13 + rank, 6, 2, 2 * world
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
    idx = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices.to(device)
    probs = torch.full((tokens, topk), 1.0 / topk, device=device, requires_grad=True)
    recv_x, recv_idx, recv_probs, tpe, handle = slot.fused_dispatch(x, idx, probs, num_experts, dist.group.WORLD)
    # identity experts weighted by the probs that reached this rank (Megatron's dropless check)
    weight = torch.where(recv_idx >= 0, recv_probs, torch.zeros_like(recv_probs)).sum(1, keepdim=True)
    out, _ = slot.fused_combine(recv_x * weight, dist.group.WORLD, handle)
    grad = torch.randn(tokens, hidden, generator=gen).to(device)
    (out * grad).sum().backward()
    return tuple(t.cpu() for t in (x.detach(), out.detach(), grad, x.grad, probs.grad))


@pytest.mark.parametrize("world", [2, 4])
def test_autograd_dropless_round_trip(world):
    check_round_trip(run_ranks(_rank_round_trip, world))


def check_round_trip(results):
    for x, out, grad, x_grad, probs_grad in results:
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(x_grad, grad, rtol=0, atol=1e-6)
        want = (x * grad).sum(1, keepdim=True).expand_as(probs_grad)
        torch.testing.assert_close(probs_grad, want, rtol=1e-5, atol=1e-5)


def _rank_bad_ids_on_one_rank(rank, world, bad_ids, zero_tokens_on_rank0):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.errors import InvalidInputError

    backend, group = TorchA2ABackend(), dist.group.WORLD
    idx = torch.tensor([[0, 1], [2, 3]])
    if rank == 1:
        idx = torch.tensor([[0, bad_ids[0]], [2, bad_ids[1]]])  # out of range on rank 1 only
    if rank == 0 and zero_tokens_on_rank0:
        idx = idx[:0]
    try:
        backend.dispatch(torch.zeros(idx.shape[0], 4), idx, torch.ones(idx.shape[0], 2), 4, group)
        message = "no error"
    except InvalidInputError as exc:
        message = str(exc)
    # every rank stopped at the same point (after the header exchange): the group is still usable
    res = backend.dispatch(torch.ones(2, 4), torch.tensor([[0, 3], [-1, 2]]), torch.ones(2, 2), 4, group)
    return message, res.recv_x.shape[0]


@pytest.mark.parametrize("bad_ids,count", [((9, -5), 2), ((4, 0), 1), ((-2, 1), 1), ((-1, 4), 1)])
@pytest.mark.parametrize("zero_tokens_on_rank0", [False, True])
def test_out_of_range_ids_on_one_rank_raise_on_every_rank(bad_ids, count, zero_tokens_on_rank0):
    results = run_ranks(_rank_bad_ids_on_one_rank, 2, bad_ids, zero_tokens_on_rank0)
    for rank, (msg, rows_after) in enumerate(results):  # no rank hangs: both get the same diagnosis, naming rank 1
        assert "expert ids out of range on rank(s) [1]" in msg and "[0, 4)" in msg and "-1" in msg, msg
        assert f"({count} entries)" in msg, msg
        assert rows_after == (2, 4)[rank]  # from each rank: token 0 to ranks 0 and 1, token 1 to rank 1


def _rank_shape_mismatch(rank, world, what):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.errors import InvalidInputError

    hidden, topk, dtype = 4, 1, torch.float32
    if what == "hidden size":
        hidden += rank
    elif what == "top-k":
        topk += rank
    else:
        dtype = (torch.float32, torch.bfloat16)[rank]
    idx = torch.tensor([[0], [3]]).expand(2, topk).contiguous()
    try:
        TorchA2ABackend().dispatch(torch.zeros(2, hidden, dtype=dtype), idx, torch.ones(2, topk), 4, dist.group.WORLD)
    except InvalidInputError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("what,values", [("hidden size", "[4, 5]"), ("top-k", "[1, 2]"), ("dtype code", "[2, 0]")])
def test_ranks_disagreeing_on_shapes_fail_instead_of_hanging(what, values):
    for msg in run_ranks(_rank_shape_mismatch, 2, what):
        assert f"ranks disagree on the {what}" in msg and values in msg, msg


#: aten ops that make the host wait for a CUDA device (or hide a data-dependent size), forbidden on the hot path
SYNCING_OPS = ("aten.nonzero.", "aten._local_scalar_dense", "aten.item", "aten.bincount", "aten.unique",
               "aten._unique", "aten.masked_select", "aten.repeat_interleave", "aten.is_nonzero", "aten.equal",
               "aten.allclose", "aten.masked_scatter", "aten._assert_async")


def _rank_op_audit(rank, world, hidden, topk, per_rank):
    """Every aten/c10d op dispatch, combine (with and without weights) and a cached dispatch call."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            self.ops.append((str(func), any(t.dtype == torch.bool for t in tensors if t.dim() > 0),
                             [(o.dtype, o.numel()) for o in outs]))
            return out

    backend, group = TorchA2ABackend(), dist.group.WORLD
    gen = torch.Generator().manual_seed(7 + rank)
    tokens, num_experts = 64, per_rank * world
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    idx[::5, 0] = -1
    w = torch.rand(tokens, topk, generator=gen)
    calls = {}
    for label in ("warm-up", "measured"):
        with Record() as rec:
            res = backend.dispatch(x, idx, w, num_experts, group)
        calls["dispatch"] = rec.ops
        y = res.recv_x * 2
        with Record() as rec:
            backend.combine(y, res.handle, group)
        calls["combine"] = rec.ops
        with Record() as rec:
            backend.combine(y, res.handle, group, topk_weights=res.recv_topk_weights)
        calls["combine with weights"] = rec.ops
        with Record() as rec:
            backend.dispatch_cached(x, res.handle, group)
        calls["cached dispatch"] = rec.ops
    return calls, res.handle.num_sent


@pytest.mark.parametrize("topk,per_rank", [(4, 4), (2, 1)])  # group size 4 <= K and 4 > K
def test_hot_path_has_no_hidden_sync_and_fixed_collectives(topk, per_rank):
    """The ops each call runs, as the dispatcher sees them (the same ops run on CUDA): no op that syncs the host
    on CUDA; per dispatch 3 collectives (header, rows, metadata; the host reads the header once, outside aten),
    per combine 1 (2 with weights), per cached dispatch 1; and combine makes no fp32 copy of the received block
    nor an fp32 [T, H] buffer for a bf16 input."""
    hidden = 32
    for calls, num_sent in run_ranks(_rank_op_audit, 4, hidden, topk, per_rank):
        for call, ops in calls.items():
            names = [name for name, *_ in ops]
            for name in names:
                assert not name.startswith(SYNCING_OPS), (call, name)
            bool_indexing = [name for name, has_bool, _ in ops
                             if has_bool and name.startswith(("aten.index.", "aten.index_put"))]
            assert not bool_indexing, (call, bool_indexing)  # boolean-mask indexing = nonzero = a sync
            want = {"dispatch": 3, "combine": 1, "combine with weights": 2, "cached dispatch": 1}[call]
            assert sum(name.startswith("c10d.alltoall_base_") for name in names) == want, (call, names)
        for call in ("combine", "combine with weights"):
            big_fp32 = [(name, outs) for name, _, outs in calls[call]
                        if any(dtype == torch.float32 and numel >= 64 * hidden for dtype, numel in outs)]
            assert not big_fp32, (call, big_fp32)
        assert num_sent > 64  # tokens do go to several ranks: the block is larger than [T, H]


def _rank_graph_capture_fails(rank, world):
    """Routing graphs forced on where capture cannot work (CPU: no CUDA): the second dispatch of a shape tries to
    capture, fails, logs one warning and runs eagerly; results stay those of a backend that never tried."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends import torch_a2a

    records = package_log_messages()
    tried, plain, g = torch_a2a.TorchA2ABackend(), torch_a2a.TorchA2ABackend(), dist.group.WORLD
    same = []
    for i in range(3):
        gen = torch.Generator().manual_seed(10 * i + rank)  # one shape (T=12, H=16, K=2), a new routing each time
        num_experts = 2 * world
        x = torch.randn(12, 16, generator=gen).to(torch.bfloat16)
        idx = torch.randint(-1, num_experts, (12, 2), generator=gen)
        w = torch.rand(12, 2, generator=gen)
        c = tried._constants(x.device, world, num_experts, x.shape[1], idx.shape[1], x.dtype)
        c.graphs = True  # as on CUDA with MCORE_EP_TORCH_CUDA_GRAPHS=1
        a = tried.dispatch(x, idx, w, num_experts, g)
        b = plain.dispatch(x, idx, w, num_experts, g)
        same.append(all(torch.equal(u, v) for u, v in zip(a[:4], b[:4])))
        same.append(torch.equal(tried.combine(a.recv_x, a.handle, g)[0], plain.combine(b.recv_x, b.handle, g)[0]))
    return same, sum(v is None for v in tried._graphs.values()), [m for m in records if "CUDA graph capture" in m]


def test_failed_graph_capture_falls_back_to_eager_with_one_warning():
    for same, failed, warnings in run_ranks(_rank_graph_capture_fails, 2):
        assert all(same), same
        assert failed >= 1 and len(warnings) == failed, (failed, warnings)
        assert "runs eagerly" in warnings[0] and "MCORE_EP_TORCH_CUDA_GRAPHS=0" in warnings[0]


def test_graph_outputs_unpack_to_the_routing_they_packed():
    """_RouteGraph's unpacking (CPU; replay stubbed, since the flat block already holds one routing): every field
    comes back with its shape, dtype and values, as views of one fresh copy (not of the graph's memory)."""
    from megatron_ep_plugins.backends import torch_a2a
    from megatron_ep_plugins.backends._cuda_graph import Replay

    backend = torch_a2a.TorchA2ABackend()
    gen = torch.Generator().manual_seed(7)
    for world, topk, tokens in ((2, 4, 9), (4, 2, 5), (3, 1, 1)):  # R <= K, R > K (distinct bags), one token
        num_experts = 2 * world
        idx = torch.randint(-1, num_experts, (tokens, topk), generator=gen)
        w = torch.rand(tokens, topk, generator=gen)
        c = backend._constants(torch.device("cpu"), world, num_experts, 8, topk, torch.bfloat16)
        r = torch_a2a._route(c, idx, w, tokens, min(world, topk) * tokens)
        flat, layout = torch_a2a._pack(r)

        class Replayed:  # the graph's replay has already written ``flat``
            def replay(self):
                pass

        replay = Replay(Replayed(), [torch.empty_like(idx), torch.empty_like(w)], (flat, layout))
        graph = torch_a2a._RouteGraph(replay, layout)
        got = graph(idx, w)
        for name, a, b in zip(torch_a2a._Routing._fields, got, r):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
            assert a.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr(), name  # a copy, not the graph's


def _rank_gpu_sync_count(rank, world):
    """CUDA only: count host syncs per call with sync debug mode set to raise on any implicit one."""
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    waits = []

    class CountingEvent(torch.cuda.Event):
        def synchronize(self):  # the deliberate wait: counted, exempt from the debug mode
            waits.append(1)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return super().synchronize()
            finally:
                torch.cuda.set_sync_debug_mode(mode)

    torch.cuda.Event = CountingEvent
    backend, group = TorchA2ABackend(), dist.group.WORLD
    gen = torch.Generator().manual_seed(3 + rank)
    tokens, hidden, topk, num_experts = 256, 128, 4, 4 * world
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.rand(tokens, num_experts, generator=gen).topk(topk, dim=1).indices.cuda()
    w = torch.rand(tokens, topk, generator=gen).cuda()
    for _ in range(2):  # warm-up: constants, allocator, NCCL, and the routing's CUDA graph (captured at the 2nd)
        backend.dispatch(x, idx, w, num_experts, group)
    torch.cuda.synchronize()
    counts = {}
    torch.cuda.set_sync_debug_mode("error")  # any implicit sync (.item(), nonzero, blocking copy) raises
    try:
        for call in ("dispatch", "combine", "combine with weights", "cached dispatch"):
            before = len(waits)
            if call == "dispatch":
                res = backend.dispatch(x, idx, w, num_experts, group)
            elif call == "combine":
                backend.combine(res.recv_x, res.handle, group)
            elif call == "combine with weights":
                backend.combine(res.recv_x, res.handle, group, topk_weights=res.recv_topk_weights)
            else:
                backend.dispatch_cached(x, res.handle, group)
            counts[call] = len(waits) - before
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
def test_gpu_one_host_sync_per_dispatch_none_per_combine():
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    for counts in run_ranks(_rank_gpu_sync_count, min(2, torch.cuda.device_count()), backend="nccl", env=env):
        assert counts == {"dispatch": 1, "combine": 0, "combine with weights": 0, "cached dispatch": 0}


def _rank_bad_inputs(rank, world):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.errors import InvalidInputError

    b, g = TorchA2ABackend(), dist.group.WORLD
    x, idx, w = torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    cases = {
        "int x": (x.long(), idx, w, 4),
        "3d x": (x[None], idx, w, 4),
        "fp8 tuple": ((x, x), idx, w, 4),
        "float idx": (x, idx.float(), w, 4),
        "short idx": (x, idx[:2], w, 4),
        "bf16 weights": (x, idx, w.bfloat16(), 4),
        "weights shape": (x, idx, w[:, :1], 4),
        "experts % world": (x, idx, w, 3),
        "zero experts": (x, idx, w, 0),
    }
    messages = {}
    for name, args in cases.items():
        try:
            b.dispatch(*args, g)
        except InvalidInputError as exc:
            messages[name] = str(exc)
    res = b.dispatch(x, idx, w, 4, g)
    for name, call in {
        "combine rows": lambda: b.combine(torch.zeros(res.recv_x.shape[0] + 1, 4), res.handle, g),
        "foreign handle": lambda: b.combine(res.recv_x, object(), g),
        "cached rows": lambda: b.dispatch_cached(torch.zeros(5, 4), res.handle, g),
    }.items():
        try:
            call()
        except InvalidInputError as exc:
            messages[name] = str(exc)
    return messages


def test_bad_inputs_get_clear_errors():
    messages = run_ranks(_rank_bad_inputs, 2)[0]
    expected = {
        "int x": "bf16, fp16 or fp32", "3d x": "[num_tokens, hidden]", "fp8 tuple": "does not support FP8",
        "float idx": "must be int64", "short idx": "topk_idx must be [num_tokens=3, topk]",
        "bf16 weights": "moe_router_dtype='fp32'", "weights shape": "shape of topk_idx",
        "experts % world": "not divisible by the group size 2", "zero experts": "positive int",
        "combine rows": "one row per row dispatch delivered", "foreign handle": "handle of type object",
        "cached rows": "token count of the dispatch",
    }
    for name, fragment in expected.items():
        assert name in messages, f"{name}: no error raised"
        assert fragment in messages[name], (name, messages[name])


def test_profile_script_smoke(tmp_path):
    """benchmarks/profile_torch_backend.py on CPU: two self-spawned gloo ranks, two copies of the module, tiny sizes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "copy_of_torch_a2a.py"
    copy.write_text((root / "megatron_ep_plugins" / "backends" / "torch_a2a.py").read_text())
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "profile_torch_backend.py"), "--device", "cpu", "--tokens", "16,32",
         "--hidden", "8", "--topk", "2", "--experts", "4", "--iters", "2", "--warmup", "1", "--backward",
         "--impl", f"copy={copy}", "--impl", "installed", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["world_size"] == 2 and report["machine"]["device"] == "cpu"
    assert [i["label"] for i in report["impls"]] == ["copy", "installed"]
    assert report["impls"][0]["sha256"] == report["impls"][1]["sha256"]  # the same text, loaded twice
    assert [r["tokens"] for r in report["results"]] == [16, 32]
    for entry in report["results"]:
        assert set(entry["floors"]) == {"raw a2a pair (split sizes known)", "raw pair + count exchange + host sync"}
        for label in ("copy", "installed"):
            res = entry["impls"][label]
            assert set(res["end_to_end_us"]) == {"dispatch", "combine", "combine with weights", "cached dispatch"}
            assert all(v > 0 for v in res["end_to_end_us"].values())
            pieces = res["pieces_us"]
            for name in ("header exchange", "row collective", "metadata collective", "row gather (packing)"):
                assert pieces["dispatch"][name] > 0, (label, name, pieces)
            assert pieces["combine"]["row collective"] > 0 and pieces["combine"]["sum + cast"] > 0
            assert res["ops"]["dispatch"]["header exchange"] == {"all_to_all_single": {"calls": 1}}
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# torch backend: where the time goes") and "raw pair / (dispatch + combine)" in text


def test_shape_graphs_capture_at_second_sight_keep_failures_and_a_limit():
    """The per-shape graph policy both graph-using backends share (``backends/_cuda_graph.ShapeGraphs``)."""
    from megatron_ep_plugins.backends._cuda_graph import ShapeGraphs

    made = []

    def make(value):
        return lambda: (made.append(value), value)[1]

    graphs = ShapeGraphs(limit=2)
    assert graphs.lookup("a", make("A")) is None and made == []  # first sight: eager, nothing captured
    assert graphs.lookup("a", make("A")) == "A" and graphs.lookup("a", make("again")) == "A" and made == ["A"]
    graphs.lookup("b", make(None)), graphs.lookup("b", make(None))  # capture failed: remembered as None
    assert graphs.lookup("b", make("retry")) is None and made == ["A", None]
    graphs.lookup("c", make("C"))
    assert graphs.lookup("c", make("C")) is None and len(graphs) == 2  # the limit: later shapes stay eager
    assert sorted(map(str, graphs.values())) == ["A", "None"]


_PAIR_SUM_CHECK = r"""
import torch
from megatron_ep_plugins.backends import _pair_sum

results = []
for dtype in (torch.float16, torch.float32):
    for tokens, hidden in ((5, 1500), (3, 1024), (0, 64), (4, 7)):
        gen = torch.Generator().manual_seed(tokens * hidden + 1)
        back = (torch.randn(1 + 2 * tokens, hidden, generator=gen) * 50).to(dtype)
        back[0] = 0  # the spare row empty slots point at
        bags = torch.randint(0, 1 + 2 * tokens, (tokens, 2), generator=gen)
        out = _pair_sum.pair_sum(back, bags)
        both = back.index_select(0, bags.view(-1)).view(tokens, 2, hidden)
        ref = torch.add(both[:, 0], both[:, 1])
        results.append((str(dtype), tokens, hidden, out is not None and out.dtype == dtype and torch.equal(out, ref)))
print(results)
assert all(r[-1] for r in results), results
print("OK")
"""


def test_one_pass_pair_sum_kernel_matches_gather_and_add_in_tritons_interpreter():
    """The Triton kernel of combine's two-row sum (``backends/_pair_sum.py``), run by Triton's own CPU interpreter
    (``TRITON_INTERPRET=1``, in a subprocess since Triton reads it when the kernel is decorated): bit-identical to
    the eager gather + ``torch.add`` for fp16 and fp32, hidden sizes not a multiple of the block, no tokens, slots
    pointing at the spare row. bf16 rounding is checked on the GPU (``tests/test_gpu.py``): the interpreter
    truncates fp32 -> bf16 where the GPU rounds to nearest even."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", _PAIR_SUM_CHECK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_pair_sum_without_triton_falls_back_with_one_warning(monkeypatch, caplog):
    """No Triton (or a Triton that cannot build the kernel): ``pair_sum`` answers ``None`` (the combine then gathers
    and adds eagerly), warns once, and does not try again on every call."""
    import logging
    import sys

    from megatron_ep_plugins.backends import _pair_sum

    monkeypatch.setattr(_pair_sum, "_state", {})
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    back, bags = torch.zeros(3, 4), torch.tensor([[1, 2]])
    with caplog.at_level(logging.WARNING, logger="megatron_ep_plugins"):
        assert _pair_sum.pair_sum(back, bags) is None
        assert _pair_sum.pair_sum(back, bags) is None
    warnings = [r.getMessage() for r in caplog.records if "one-pass combine sum" in r.getMessage()]
    assert len(warnings) == 1 and "gathers and adds in two steps" in warnings[0], warnings


def test_fused_sum_setting_is_declared_and_read_once(monkeypatch):
    from megatron_ep_plugins.backends.torch_a2a import SETTINGS, TorchA2ABackend

    assert "MCORE_EP_TORCH_FUSED_SUM" in {v.name for v in SETTINGS}
    monkeypatch.setenv("MCORE_EP_TORCH_FUSED_SUM", "0")
    assert TorchA2ABackend().fused_sum is False
    monkeypatch.setenv("MCORE_EP_TORCH_FUSED_SUM", "1")
    assert TorchA2ABackend().fused_sum is True
