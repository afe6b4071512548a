"""The benchmark's conformance check: a backend against the ``torch`` reference on the same (large) inputs.

Used by ``megatron-ep bench`` / ``benchmarks/ep_bench.py`` at benchmark sizes (GPU-sized T, H), where the
conformance kit's single-process oracle would be slow: every backend gets the same inputs (same seed per rank),
the source (rank, token) id written into ``x[:, :5]`` (base-16 digits, exact in bf16 and e4m3), and is compared
with the reference backend: dispatched rows bit-identical after sorting each source-rank block by source id,
each row's (local id, weight) pairs equal in any order (``canonical_topk``), ``tokens_per_expert`` equal, combine
and the gradients of ``x`` and the probs through the core's autograd slot within ``||a-b||/||b|| < 1e-2``.
"""

from __future__ import annotations

ID_COLS = 5  # x[:, :5] = (rank, token id in 4 base-16 digits): exact in bf16 and in e4m3
REL_TOL = 1e-2


def make_inputs(args, rank, world, device):
    """Same inputs for every backend: x (bf16 or FP8 pair) with the source id in x[:, :5], idx, probs."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    if T > 4:
        idx[::7, 0] = -1  # dropped by capacity: routes nowhere for that entry
    probs = torch.rand(T, K, generator=gen)
    ids = torch.arange(T)
    digits = torch.stack([torch.full((T,), rank)] + [(ids >> s) & 15 for s in (12, 8, 4, 0)], dim=1).float()
    x = torch.randn(T, H, generator=gen)
    x[:, :ID_COLS] = digits
    grad_out = torch.randn(T, H, generator=gen)
    if args.fp8:
        blocks = x.view(T, H // 128, 128)
        scales = blocks.abs().amax(dim=2).clamp(min=1e-4) / 448.0
        scales[:, 0] = 1.0  # keep the id digits exact in block 0
        data = (blocks / scales.unsqueeze(2)).view(T, H).to(torch.float8_e4m3fn)
        x_in = (data.to(device), scales.to(device).contiguous())
    else:
        x_in = x.to(torch.bfloat16).to(device)
    return x_in, idx.to(device), probs.to(device), grad_out.to(device)


def dequant(x):
    """bf16 view of a dispatch payload (the FP8 pair is scaled back)."""
    import torch

    if isinstance(x, tuple):
        data, scales = x
        n, h = data.shape
        return (data.float().view(n, h // 128, 128) * scales.float().unsqueeze(2)).view(n, h).to(torch.bfloat16)
    return x


def row_ids(recv_x):
    data = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    d = data[:, :ID_COLS].float().round().long()
    return d[:, 0] * 65536 + d[:, 1] * 4096 + d[:, 2] * 256 + d[:, 3] * 16 + d[:, 4]


def raw_bytes(t):
    import torch

    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int16)


def rel_err(a, b):
    import torch

    a, b = a.float(), b.float()
    denom = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / denom if denom > 0 else num


def expert_output(recv_x, rank):
    """A deterministic per-row 'expert' (depends only on the row's content): y = dequant(row) * (rank + 1)."""
    import torch

    return (dequant(recv_x).float() * (rank + 1)).to(torch.bfloat16)


def forward_backward(slot, x_in, idx, probs, grad_out, E, group, rank, with_grad):
    import torch

    x_leaf = probs_leaf = None
    if with_grad:
        x_leaf = x_in.detach().clone().requires_grad_(True)
        probs_leaf = probs.detach().clone().requires_grad_(True)
        x_arg, p_arg = x_leaf, probs_leaf
    else:
        x_arg, p_arg = x_in, probs
    recv_x, recv_idx, recv_w, tpe, handle = slot.fused_dispatch(x_arg, idx, p_arg, E, group)
    y = expert_output(recv_x, rank) if not with_grad else recv_x * (rank + 1)
    if with_grad:
        # order-independent use of the probs: scale each row by the sum of the weights it owns here
        owned = torch.where(recv_idx >= 0, recv_w, torch.zeros_like(recv_w)).sum(dim=1, keepdim=True)
        y = (y.float() * (1.0 + owned)).to(torch.bfloat16)
    combined, _ = slot.fused_combine(y, group, handle)
    out = {"recv_x": recv_x, "recv_idx": recv_idx, "recv_w": recv_w, "tpe": tpe, "combined": combined}
    if with_grad:
        (combined.float() * grad_out).sum().backward()
        out["x_grad"] = x_leaf.grad
        out["probs_grad"] = probs_leaf.grad
    return out


def expected_blocks(args, rank, world, device):
    """Rows rank ``rank`` receives from each source rank (regenerating every rank's routing)."""
    local = args.experts // world
    sizes = []
    for src in range(world):
        _, idx, _, _ = make_inputs(args, src, world, "cpu")
        dest = (idx // local).masked_fill(idx < 0, -1)
        sizes.append(int((dest == rank).any(dim=1).sum()))
    return sizes


def canonical_topk(idx, w):
    """A received row's (local expert id, weight) pairs in a canonical order: ascending id (stable), the -1
    entries last with weight 0. The contract fixes the pairs, not their positions within the row (DeepEP keeps
    the source's top-k slots; nccl.ep's HT layout packs them in ascending id), since Megatron turns them into a
    per-expert map. Returns CPU tensors (int64, float32)."""
    import torch

    idx, w = idx.long().cpu(), w.float().cpu()
    key = torch.where(idx >= 0, idx, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=1, stable=True)
    si = idx.gather(1, order)
    return si, torch.where(si >= 0, w.gather(1, order), 0.0)


def compare(ref, got, blocks):
    """Dict of checks; each value (ok, number or message)."""
    import torch

    checks = {}
    # dispatch rows, per source-rank block, sorted by source token id
    n_ref = ref["recv_idx"].shape[0]
    n_got = got["recv_idx"].shape[0]
    ok_rows = ok_meta = True
    msg = ""
    if n_got != n_ref or n_ref != sum(blocks):
        ok_rows = ok_meta = False
        msg = f"received {n_got} rows, reference {n_ref}, expected {sum(blocks)}"
    else:
        ids_ref, ids_got = row_ids(ref["recv_x"]), row_ids(got["recv_x"])
        start = 0
        perm_ref, perm_got = [], []
        for size in blocks:
            sl = slice(start, start + size)
            perm_ref.append(start + torch.argsort(ids_ref[sl]))
            perm_got.append(start + torch.argsort(ids_got[sl]))
            start += size
        pr = torch.cat(perm_ref) if perm_ref else torch.zeros(0, dtype=torch.long)
        pg = torch.cat(perm_got) if perm_got else torch.zeros(0, dtype=torch.long)
        pr, pg = pr.to(ids_ref.device), pg.to(ids_got.device)
        if not torch.equal(ids_ref[pr].cpu(), ids_got[pg].cpu()):
            ok_rows = ok_meta = False
            msg = "a source-rank block holds other tokens than the reference's"
        else:
            rx, gx = ref["recv_x"], got["recv_x"]
            if isinstance(gx, tuple):  # FP8 run: the reference dispatched the dequantised bf16 rows
                gx = dequant(gx)
            if isinstance(rx, tuple):
                rx = dequant(rx)
            ok_rows = torch.equal(raw_bytes(rx[pr]).cpu(), raw_bytes(gx[pg]).cpu())
            ri, rw = canonical_topk(ref["recv_idx"][pr], ref["recv_w"][pr])
            gi, gw = canonical_topk(got["recv_idx"][pg], got["recv_w"][pg])
            ok_meta = torch.equal(ri, gi) and torch.equal(rw, gw)
            if not ok_rows:
                msg = "row contents differ"
    checks["dispatch_rows"] = {"ok": bool(ok_rows), "rows": int(n_got), "detail": msg}
    checks["recv_topk"] = {"ok": bool(ok_meta)}
    tr, tg = ref["tpe"].cpu().long(), got["tpe"].cpu().long()
    checks["tokens_per_expert"] = {"ok": bool(torch.equal(tr, tg)), "ref": tr.tolist(), "got": tg.tolist()}
    e = rel_err(got["combined"], ref["combined"])
    checks["combine"] = {"ok": e < REL_TOL, "rel_err": e}
    for key in ("x_grad", "probs_grad"):
        if key in ref and key in got:
            if got[key] is None or ref[key] is None:
                checks[key] = {"ok": False, "rel_err": None, "detail": "no gradient"}
            else:
                e = rel_err(got[key], ref[key])
                checks[key] = {"ok": e < REL_TOL, "rel_err": e}
    return checks
