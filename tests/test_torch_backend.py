"""The reference backend `torch` against the single-process oracle, on 2 and 4 gloo ranks."""

from __future__ import annotations

import zlib

import pytest
import torch

from distributed import run_ranks
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


def _cpu(obj):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}


def _rank_dispatch_combine(rank, world, names, device="cpu"):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    backend = TorchA2ABackend()
    out = {}
    for name in names:
        x, idx, w, num_experts = (t.to(device) if isinstance(t, torch.Tensor) else t
                                  for t in make_inputs(name, rank, world))
        res = backend.dispatch(x, idx, w, num_experts, dist.group.WORLD, async_finish=True, allocate_on_comm_stream=True)
        y = (res.recv_x.float() * 2 + 1).to(torch.bfloat16)
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
def test_dispatch_combine_match_oracle(world):
    check_against_oracle(run_ranks(_rank_dispatch_combine, world, list(SCENARIOS)), world)


def check_against_oracle(results, world):
    """Every rank's dispatch/combine/cached results (moved to the CPU) against the single-process oracle."""
    names = list(SCENARIOS)
    for name in names:
        inputs = [make_inputs(name, r, world) for r in range(world)]
        xs, idxs, ws = [i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs]
        rows, counts = oracle_dispatch(xs, idxs, ws, inputs[0][3])
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
        ys = {d: (results[d][name]["recv_x"].float() * 2 + 1).to(torch.bfloat16) for d in range(world)}
        want_combined = oracle_combine(ys, rows, [x.shape for x in xs], torch.bfloat16)
        for r in range(world):
            got = results[r][name]["combined"]
            assert got.dtype == torch.bfloat16 and got.shape == xs[r].shape
            torch.testing.assert_close(got.float(), want_combined[r].float(), rtol=1e-2, atol=1e-2)
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


def _rank_bad_ids_on_one_rank(rank, world):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.errors import InvalidInputError

    idx = torch.tensor([[0, 1], [2, 3]])
    if rank == 1:
        idx = torch.tensor([[0, 9], [2, -5]])  # out of range on rank 1 only
    try:
        TorchA2ABackend().dispatch(torch.zeros(2, 4), idx, torch.ones(2, 2), 4, dist.group.WORLD)
    except InvalidInputError as exc:
        return str(exc)
    return "no error"


def test_out_of_range_ids_on_one_rank_raise_on_every_rank():
    messages = run_ranks(_rank_bad_ids_on_one_rank, 2)
    for msg in messages:  # no rank hangs: both get the same diagnosis, naming rank 1
        assert "expert ids out of range on rank(s) [1]" in msg and "[0, 4)" in msg and "-1" in msg


def _rank_hidden_mismatch(rank, world):
    import torch.distributed as dist

    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend
    from megatron_ep_plugins.errors import InvalidInputError

    try:
        TorchA2ABackend().dispatch(torch.zeros(2, 4 + rank), torch.tensor([[0], [3]]), torch.ones(2, 1), 4, dist.group.WORLD)
    except InvalidInputError as exc:
        return str(exc)
    return "no error"


def test_ranks_disagreeing_on_hidden_size_fail_instead_of_hanging():
    for msg in run_ranks(_rank_hidden_mismatch, 2):
        assert "ranks disagree on the hidden size" in msg and "[4, 5]" in msg


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
