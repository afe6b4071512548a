"""Side-by-side benchmark of expert-parallel backends through the plugin, with conformance checks.

For every backend named in ``--backends`` (same inputs on every backend, same seed per rank):

* conformance vs the ``torch`` reference backend: dispatched rows bit-identical after sorting each
  source-rank block by source token id (the id is encoded in the first 5 columns of ``x``),
  ``tokens_per_expert`` equal, ``recv_topk_idx`` equal and ``recv_topk_weights`` equal where
  ``idx >= 0``, combine ``||a-b||/||b|| < 1e-2``, and ``x.grad`` / ``probs.grad`` through the core's
  autograd slot (``megatron_ep_plugins.autograd.build_slot``) within the same bound;
* timing of dispatch and combine through the slot functions Megatron calls (``fused_dispatch`` /
  ``fused_combine``): CUDA events on GPU, ``perf_counter`` + barrier on CPU; per iteration the
  slowest rank counts; median and mean over ``--iters`` after ``--warmup``;
* for ``legacy`` / ``elastic`` on GPU, the same DeepEP buffer called directly (V1: layout + dispatch
  + combine as Megatron's ``fused_a2a.py``; V2: ``dispatch(do_expand=False)`` + ``combine`` as
  DeepEP's tests) in the same run, and the ratio direct/plugin time (>= 0.97: plugin overhead <= 3%).

Unavailable backends are reported as skipped with their probe's reason, never replaced.

Launch::

    torchrun --nproc-per-node 2 benchmarks/ep_bench.py --backends torch,legacy,elastic --out benchmarks/results
    python benchmarks/ep_bench.py --device cpu --backends torch,allgather      # spawns 2 gloo ranks

Rank 0 prints a markdown table and writes ``OUT/ep_bench.json`` and ``OUT/ep_bench.md``.
Exit status: 0 when every backend that ran passed conformance, 1 when one failed or errored,
2 for bad arguments (an unknown backend name lists the valid ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

ID_COLS = 5  # x[:, :5] = (rank, token id in 4 base-16 digits): exact in bf16 and in e4m3
REL_TOL = 1e-2
GPU_DEFAULTS = dict(tokens=4096, hidden=7168, topk=8, experts=256, iters=50, warmup=10)
CPU_DEFAULTS = dict(tokens=256, hidden=256, topk=4, experts=8, iters=10, warmup=2)


# ---------------------------------------------------------------------------------------------------
# arguments and backend names
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch,legacy,elastic",
                    help="comma-separated backend names or aliases (default: torch,legacy,elastic)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available, else cpu (gloo)")
    ap.add_argument("--fp8", action="store_true",
                    help="FP8 dispatch input (e4m3 + fp32 scales per 128 columns) for backends that support it")
    ap.add_argument("--tokens", default=None,
                    help=f"tokens per rank, or a comma-separated list for a token sweep in one run (e.g. "
                         f"128,256,512); default {GPU_DEFAULTS['tokens']} on cuda, {CPU_DEFAULTS['tokens']} on cpu")
    for name in ("hidden", "topk", "experts", "iters", "warmup"):
        ap.add_argument(f"--{name}", type=int, default=None,
                        help=f"default {GPU_DEFAULTS[name]} on cuda, {CPU_DEFAULTS[name]} on cpu")
    ap.add_argument("--name", default="ep_bench",
                    help="basename of the output files (OUT/NAME.json, .md, .png); default ep_bench")
    ap.add_argument("--megatron", choices=("auto", "on", "off"), default="auto",
                    help="also time Megatron-Core's own fused_a2a path (FusedDispatch/FusedCombine over its own "
                         "DeepEP V1 Buffer) for legacy (auto: on cuda only)")
    ap.add_argument("--num-sms", type=int, default=20,
                    help="SMs for DeepEP kernels, as Megatron's moe_flex_dispatcher_num_sms (default 20)")
    ap.add_argument("--direct", choices=("auto", "on", "off"), default="auto",
                    help="also time deep_ep called directly for legacy/elastic (auto: on cuda only)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun (default 2)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                    help="directory for ep_bench.json / ep_bench.md (default benchmarks/results)")
    ap.add_argument("--plot", action="store_true", help="also write ep_bench.png if matplotlib is importable")
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hidden < ID_COLS:
        ap.error(f"--hidden must be >= {ID_COLS} (the source token id is encoded in the first columns)")
    try:
        args.token_list = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tokens must be an int or a comma-separated list of ints, got {args.tokens!r}")
    if not args.token_list or any(t < 0 or t >= 16 ** 4 for t in args.token_list):
        ap.error("--tokens must be in [0, 65536)")
    args.tokens = args.token_list[0]
    if not 1 <= args.topk <= args.experts:
        ap.error("--topk must be in [1, --experts]")
    if args.fp8 and args.hidden % 128:
        ap.error("--fp8 needs --hidden divisible by 128 (one scale per 128 columns)")
    args.backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
    if not args.backends:
        ap.error("--backends is empty")
    return args


def resolve_backends(requested):
    """Map requested names/aliases to registered specs and probe verdicts; unknown names -> SystemExit(2)."""
    from megatron_ep_plugins.api import list_backends

    registry, candidates = list_backends()
    by_name = {n: c for c in candidates for n in c.spec.names}
    unknown = [r for r in requested if r not in by_name]
    if unknown:
        valid = sorted(by_name)
        sys.stderr.write(f"ep_bench: unknown backend name(s) {unknown}. Valid names: {valid}\n")
        for c in candidates:
            sys.stderr.write(f"  - {c.spec.name} (aliases {list(c.spec.aliases)}): "
                             f"{'available' if c.availability else 'unavailable'} - {c.availability.reason}\n")
        raise SystemExit(2)
    out, seen = [], set()
    for r in requested:
        c = by_name[r]
        if c.spec.name not in seen:
            seen.add(c.spec.name)
            out.append(c)
    return registry, out, by_name


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# conformance
# ---------------------------------------------------------------------------------------------------
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
            ri, gi = ref["recv_idx"][pr].long().cpu(), got["recv_idx"][pg].long().cpu()
            rw, gw = ref["recv_w"][pr].float().cpu(), got["recv_w"][pg].float().cpu()
            mask = ri >= 0
            ok_meta = torch.equal(ri, gi) and torch.equal(rw[mask], gw[mask])
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


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def time_pair(dispatch_fn, combine_fn, iters, warmup, device, group):
    """Per-iteration (dispatch, combine) seconds, slowest rank per iteration."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        combine_fn(dispatch_fn())
    if device == "cuda":
        torch.cuda.synchronize()
        dist.barrier(group=group)
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
        for e0, e1, e2 in events:
            e0.record()
            h = dispatch_fn()
            e1.record()
            combine_fn(h)
            e2.record()
        torch.cuda.synchronize()
        times = [[e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3] for e0, e1, e2 in events]
        t = torch.tensor(times, dtype=torch.float64, device="cuda")
    else:
        times = []
        for _ in range(iters):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            h = dispatch_fn()
            t1 = time.perf_counter()
            dist.barrier(group=group)  # gloo returns when this rank's part is done; align before combine
            t2 = time.perf_counter()
            combine_fn(h)
            t3 = time.perf_counter()
            times.append([t1 - t0, t3 - t2])
        t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    t = t.cpu()
    return t[:, 0].tolist(), t[:, 1].tolist()


def summarize(times):
    return {"median_us": statistics.median(times) * 1e6, "mean_us": statistics.fmean(times) * 1e6,
            "min_us": min(times) * 1e6}


def timing_plugin(slot, x_in, idx, probs, E, group, rank, args):
    import torch

    with torch.no_grad():
        first = slot.fused_dispatch(x_in, idx, probs, E, group)
        y = expert_output(first[0], rank)

        def d():
            return slot.fused_dispatch(x_in, idx, probs, E, group)[4]

        def c(handle):
            return slot.fused_combine(y, group, handle)

        td, tc = time_pair(d, c, args.iters, args.warmup, args.device, group)
    return td, tc, first[0]


def plugin_buffer(backend, group):
    """The DeepEP buffer the plugin's adapter built for ``group`` (so direct calls use the same buffer)."""
    buf = None
    buffers = getattr(backend, "_buffers", None)  # legacy: group -> Buffer
    if isinstance(buffers, dict):
        buf = buffers.get(group)
    states = getattr(backend, "_groups", None)  # elastic / hybridep: group -> state with .buffer
    if buf is None and isinstance(states, dict) and group in states:
        buf = getattr(states[group], "buffer", None)
    if buf is None:
        raise RuntimeError(f"backend {backend.name!r} has no buffer for this group yet (plugin dispatch must run first)")
    return buf


def timing_direct_legacy(backend, x_in, idx, probs, E, group, rank, args):
    """deep_ep.Buffer called as Megatron's fused_a2a.py does: layout + dispatch, then combine."""
    import torch

    buf = plugin_buffer(backend, group)  # the plugin's own buffer: same size, same channels
    backend._Buffer.set_num_sms(args.num_sms)
    with torch.no_grad():
        def d():
            per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
            recv_x, _, _, _, handle, _ = buf.dispatch(
                x_in, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            return handle

        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        recv_x = buf.dispatch(x_in, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=per_rank,
                              num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                              num_tokens_per_expert=per_expert)[0]
        y = expert_output(recv_x, rank)

        def c(handle):
            return buf.combine(y, handle)

        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def timing_direct_elastic(backend, x_in, idx, probs, E, group, rank, args):
    """deep_ep.ElasticBuffer called as DeepEP's V2 tests do: dispatch(do_expand=False) + combine."""
    import torch

    buf = plugin_buffer(backend, group)  # the plugin's own buffer: same num_max_tokens_per_rank, same kernels
    num_sms = backend.num_sms or 0
    with torch.no_grad():
        def d():
            return buf.dispatch(x_in, topk_idx=idx, topk_weights=probs, num_experts=E, num_sms=num_sms,
                                do_expand=False)[3]

        recv_x = buf.dispatch(x_in, topk_idx=idx, topk_weights=probs, num_experts=E, num_sms=num_sms,
                              do_expand=False)[0]
        y = expert_output(recv_x, rank)

        def c(handle):
            return buf.combine(y, handle, num_sms=0)

        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def _dedup_rows(x_in, idx, E, group):
    """What any token-major backend must move: each token once per destination rank (destination-major)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = E // world
    dest = torch.where(idx >= 0, idx // local, world)
    in_rank = torch.zeros(idx.shape[0], world + 1, dtype=torch.bool, device=idx.device)
    in_rank.scatter_(1, dest, True)
    in_rank = in_rank[:, :world]
    token_ids = in_rank.t().nonzero()[:, 1]
    send_counts = in_rank.sum(0).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return x_in[token_ids].contiguous(), send_counts, recv_counts


def timing_direct_torch(backend, x_in, idx, probs, E, group, rank, args):
    """The floor for the ``torch`` backend: ``all_to_all_single`` of the same deduplicated rows, both ways,
    split sizes known (no count exchange, no index building, preallocated outputs)."""
    import torch
    import torch.distributed as dist

    send, send_counts, recv_counts = _dedup_rows(x_in, idx, E, group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    recv = send.new_empty(sum(recv_splits), send.shape[1])
    back = torch.empty_like(send)
    with torch.no_grad():
        def d():
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)

        def c(_):
            dist.all_to_all_single(back, recv, send_splits, recv_splits, group=group)

        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def timing_direct_torch_counts(backend, x_in, idx, probs, E, group, rank, args):
    """As :func:`timing_direct_torch`, plus what split sizes cost: the count exchange and its host sync per
    dispatch (the count tensor is precomputed; only the exchange and ``.tolist()`` are timed)."""
    import torch
    import torch.distributed as dist

    send, send_counts, _ = _dedup_rows(x_in, idx, E, group)
    send_splits = send_counts.tolist()
    got = torch.empty_like(send_counts)
    state = {}
    with torch.no_grad():
        def d():
            dist.all_to_all_single(got, send_counts, group=group)
            recv_splits = got.tolist()  # the host sync
            recv = send.new_empty(sum(recv_splits), send.shape[1])
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
            state["recv"], state["recv_splits"] = recv, recv_splits

        def c(_):
            back = torch.empty_like(send)
            dist.all_to_all_single(back, state["recv"], send_splits, state["recv_splits"], group=group)

        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def timing_direct_hybridep(backend, x_in, idx, probs, E, group, rank, args):
    """deep_ep.HybridEPBuffer called directly (routing-map form, as Megatron's non-permute HybridEP use):
    its own buffer for the raw hidden size, equal T on every rank (the bench gives every rank the same T)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    T, H = x_in.shape
    align = 64
    buf = backend._HybridEPBuffer(group=group, hidden_dim=H, max_num_of_tokens_per_rank=max(align, -(-T // align) * align),
                                  num_local_experts=E // world, use_fp8=False)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    routing_map = torch.zeros(T, E, dtype=torch.int32, device=idx.device).scatter_add_(
        1, safe, valid.to(torch.int32)) > 0
    dense = torch.zeros(T, E, dtype=torch.float32, device=idx.device).scatter_add_(
        1, safe, torch.where(valid, probs, 0.0))
    with torch.no_grad():
        def d():
            return buf.dispatch(hidden=x_in, routing_map=routing_map, probs=dense, num_of_experts=E)[3]

        recv = buf.dispatch(hidden=x_in, routing_map=routing_map, probs=dense, num_of_experts=E)[0]
        y = expert_output(recv, rank)

        def c(handle):
            return buf.combine(hidden=y, handle=handle)

        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def timing_megatron_legacy(backend, x_in, idx, probs, E, group, rank, args):
    """Megatron-Core's own path: ``fused_a2a.FusedDispatch``/``FusedCombine`` (the autograd Functions its
    ``fused_dispatch``/``fused_combine`` call, over its own ``get_buffer`` DeepEP V1 Buffer), exactly what a
    job runs without this plugin. With DeepEP 2.x, stock Megatron 0.19 reports ``HAVE_DEEP_EP=False`` (it
    imports ``EventOverlap`` from ``deep_ep.utils``); the missing names are filled in for the measurement
    only and restored afterwards."""
    import deep_ep
    import torch
    from megatron.core.transformer.moe import fused_a2a as fa

    from megatron_ep_plugins.backends._deepep_common import import_event_classes

    names = ("Buffer", "EventOverlap", "EventHandle", "_buffer")
    saved = {n: getattr(fa, n, None) for n in names}
    have = bool(getattr(fa, "HAVE_DEEP_EP", False))
    try:
        if not have:
            fa.Buffer = deep_ep.Buffer
            fa.EventOverlap, fa.EventHandle = import_event_classes()
        fa.Buffer.set_num_sms(args.num_sms)
        with torch.no_grad():
            def d():
                return fa.FusedDispatch.apply(x_in.contiguous(), idx, probs, E, group, False, False)[4]

            recv_x = fa.FusedDispatch.apply(x_in.contiguous(), idx, probs, E, group, False, False)[0]
            y = expert_output(recv_x, rank)

            def c(handle):
                return fa.FusedCombine.apply(y, group, handle, False, False)

            td, tc = time_pair(d, c, args.iters, args.warmup, args.device, group)
    finally:
        for n, v in saved.items():
            if v is None and n != "_buffer":
                if hasattr(fa, n) and not have:
                    delattr(fa, n)
            else:
                setattr(fa, n, v)
    return td, tc, have


DIRECT = {"legacy": timing_direct_legacy, "elastic": timing_direct_elastic, "torch": timing_direct_torch,
          "hybridep": timing_direct_hybridep}
EXTRA_DIRECT = {"torch": ("direct_counts", timing_direct_torch_counts)}
MEGATRON = {"legacy": timing_megatron_legacy}


# ---------------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------------
def versions(device):
    import importlib.metadata as md

    import torch

    def dist_version(*names):
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return None

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": dist_version("megatron-core", "megatron_core"),
            "megatron_ep_plugins": dist_version("megatron-ep-plugins", "megatron_ep_plugins"),
            "deep_ep": None, "nccl": None}
    try:
        import deep_ep

        from megatron_ep_plugins.backends._deepep_common import deep_ep_version

        info["deep_ep"] = deep_ep_version(deep_ep)
        if getattr(deep_ep, "IS_EMULATOR", False):
            info["deep_ep"] = f"{info['deep_ep']} (CPU emulator)"
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        info["deep_ep"] = f"not importable: {type(exc).__name__}: {exc}"
    if device == "cuda":
        try:
            info["nccl_compiled"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001
            info["nccl_compiled"] = f"unknown ({exc})"
        try:  # the library torch actually loaded (what DeepEP V2 runs against)
            from megatron_ep_plugins.backends import _deepep_common

            loaded = _deepep_common.loaded_nccl_version()
            info["nccl"] = ".".join(map(str, loaded)) if isinstance(loaded, tuple) else str(loaded)
        except Exception as exc:  # noqa: BLE001
            info["nccl"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def machine(device, world):
    import torch

    m = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
         "device": device, "world_size": world}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
        m["gpu_count"] = torch.cuda.device_count()
        m["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for var in ("EP_DISABLE_GIN", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        if var in os.environ:
            m.setdefault("env", {})[var] = os.environ[var]
    return m


class AdapterSlot:
    """Slot-shaped calls straight into the backend adapter (used for FP8 input, forward only)."""

    def __init__(self, backend):
        self.backend = backend

    def fused_dispatch(self, x, idx, probs, num_experts, group):
        return tuple(self.backend.dispatch(x, idx, probs, num_experts, group))

    def fused_combine(self, x, group, handle):
        return self.backend.combine(x, handle, group)


def make_backend(cand, args):
    """Create a backend once per run (reused across token counts: buffers, JIT caches and groups persist)."""
    from megatron_ep_plugins.autograd import build_slot

    backend = cand.spec.factory()
    if getattr(backend, "name", None) != cand.spec.name:
        backend.name = cand.spec.name
    slot = build_slot(backend)
    slot.set_deepep_num_sms(args.num_sms)
    return backend, slot


def skip_reason(cand, args):
    if not cand.availability:
        return cand.availability.reason
    if args.device not in cand.spec.capabilities.devices:
        return f"declares devices {list(cand.spec.capabilities.devices)}, this run is on {args.device}"
    if args.fp8 and not cand.spec.capabilities.fp8_dispatch:
        return "does not declare fp8_dispatch"
    return None


def bench_backend(cand, made, ref, blocks, inputs, args, rank, world, group):
    import torch
    import torch.distributed as dist

    name = cand.spec.name
    res = {"backend": name, "provider": cand.spec.provider, "probe": cand.availability.reason,
           "tokens_per_rank": args.tokens}
    why = skip_reason(cand, args)
    if why:
        res.update(status="skipped", reason=why)
        return res
    x_in, idx, probs, grad_out = inputs
    E = args.experts
    try:
        if isinstance(made, BaseException):
            raise made
        backend, slot = made
        res["plugin_path"] = "slot (build_slot: fused_dispatch / fused_combine)"
        if args.fp8:
            # The slot's fused_dispatch calls x.contiguous(), so it cannot take the (e4m3, scales) pair;
            # time the backend adapter (what the slot calls underneath, minus autograd.Function.apply).
            slot = AdapterSlot(backend)
            res["plugin_path"] = "adapter (FP8: the slot's fused_dispatch does not accept the (e4m3, scales) tuple)"
        # conformance: forward (+ gradients for bf16) through the autograd slot
        got = forward_backward(slot, x_in, idx, probs, grad_out, E, group, rank, with_grad=not args.fp8)
        checks = compare(ref, got, blocks)
        ok = torch.tensor([int(all(c["ok"] for c in checks.values()))], device=args.device)  # NCCL: on the GPU
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        res["conformance"] = {"passed": bool(ok.item()), "checks": checks}
        # timing through the plugin
        td, tc, recv_x = timing_plugin(slot, x_in, idx, probs, E, group, rank, args)
        rows = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
        res["plugin"] = {"dispatch": summarize(td), "combine": summarize(tc)}
        res["recv_rows"] = rows
        direct = DIRECT.get(name)
        # auto: on CUDA; the torch floor (plain collectives) also on CPU
        if direct is not None and (args.direct == "on" or (
                args.direct == "auto" and (args.device == "cuda" or name == "torch"))):
            dd, dc = direct(backend, x_in, idx, probs, E, group, rank, args)
            res["direct"] = {"dispatch": summarize(dd), "combine": summarize(dc)}
            extra = EXTRA_DIRECT.get(name)
            if extra is not None:
                dd, dc = extra[1](backend, x_in, idx, probs, E, group, rank, args)
                res[extra[0]] = {"dispatch": summarize(dd), "combine": summarize(dc)}
        megatron = MEGATRON.get(name)
        if megatron is not None and not args.fp8 and (
                args.megatron == "on" or (args.megatron == "auto" and args.device == "cuda")):
            md, mc, have = megatron(backend, x_in, idx, probs, E, group, rank, args)
            res["megatron"] = {"dispatch": summarize(md), "combine": summarize(mc)}
            res["megatron_have_deep_ep"] = have
        res["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded; the other backends still run
        res.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return res


def bandwidth(res, args, world, group):
    """Logical GB/s as in DeepEP's tests: received rows x hidden x element size / time (mean over ranks)."""
    import torch
    import torch.distributed as dist

    rows = res.get("recv_rows", 0)
    disp_elem = (1 + 4 / 128) if args.fp8 else 2  # e4m3 + one fp32 scale per 128 values
    nbytes = torch.tensor([rows * args.hidden * disp_elem, rows * args.hidden * 2], dtype=torch.float64,
                          device=args.device)
    dist.all_reduce(nbytes, group=group)
    nbytes = (nbytes / world).tolist()
    for path in ("plugin", "direct"):
        if path in res:
            for op, b in zip(("dispatch", "combine"), nbytes):
                t = res[path][op]["median_us"] * 1e-6
                res[path][op]["gbps"] = b / t / 1e9 if t > 0 else None
    res["bytes_per_rank"] = {"dispatch": nbytes[0], "combine": nbytes[1]}


def run_rank(rank, world, args):
    import torch
    import torch.distributed as dist

    from megatron_ep_plugins.autograd import build_slot

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(seconds=300))
    group = dist.group.WORLD
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {world}")
    if args.fp8:
        os.environ.setdefault("MCORE_EP_ELASTIC_FP8", "1")
    if len(args.token_list) > 1:
        # one DeepEP V2 buffer (one JIT specialisation) for the whole sweep, as a job pins it
        os.environ.setdefault("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", str(max(args.token_list)))
    registry, cands, by_name = resolve_backends(args.backends)
    made = {}
    for cand in cands:  # each backend once per run, reused across token counts
        if skip_reason(cand, args) is None:
            try:
                made[cand.spec.name] = make_backend(cand, args)
            except Exception as exc:  # noqa: BLE001 - reported per size
                made[cand.spec.name] = exc
    ref_slot = build_slot(by_name["torch"].spec.factory())

    runs = []
    for tokens in args.token_list:
        args.tokens = tokens
        inputs = make_inputs(args, rank, world, device)
        x_in, idx, probs, grad_out = inputs
        blocks = expected_blocks(args, rank, world, device)
        # the reference: torch backend on the same inputs (bf16 view of FP8 inputs)
        ref = forward_backward(ref_slot, dequant(x_in), idx, probs, grad_out, args.experts, group, rank,
                               with_grad=not args.fp8)
        results = []
        for cand in cands:
            res = bench_backend(cand, made.get(cand.spec.name), ref, blocks, inputs, args, rank, world, group)
            if res["status"] == "ok":
                bandwidth(res, args, world, group)
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier(group=group)
            results.append(res)
            if rank == 0:
                print(f"ep_bench: T={tokens} {cand.spec.name}: {res['status']}", flush=True)
        derive(results)
        runs.append({"tokens_per_rank": tokens, "results": results})
    report = {
        "benchmark": "ep_bench",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(args.device, world),
        "versions": versions(args.device),
        "sizes": {"tokens_per_rank": args.token_list[0] if len(args.token_list) == 1 else args.token_list,
                  "hidden": args.hidden, "topk": args.topk,
                  "experts": args.experts, "fp8_dispatch": args.fp8, "iters": args.iters, "warmup": args.warmup,
                  "num_sms": args.num_sms, "seed": args.seed, "masked": "idx[::7, 0] = -1"},
        "targets": {"plugin_over_direct_min": 0.97, "elastic_over_legacy_min": 1.5,
                    "plugin_minus_megatron_us_max": 5.0},
        "results": runs[0]["results"] if len(runs) == 1 else [r for run in runs for r in run["results"]],
    }
    if len(runs) > 1:
        report["sweep"] = runs
    if rank == 0:
        write_report(report, args)
    dist.barrier(group=group)
    failed = [r["backend"] for r in report["results"]
              if r["status"] == "error" or (r["status"] == "ok" and not r["conformance"]["passed"])]
    # Free the backends' communication buffers while the process group still exists: a DeepEP V2
    # ElasticBuffer destroyed after destroy_process_group() dies in its destructor (cudaErrorIllegalAddress,
    # seen on 2 x H200), which turned finished runs into SIGABRT exits.
    for item in made.values():
        close = getattr(item[0], "close", None) if isinstance(item, tuple) else None
        if close is not None:
            close()
    made.clear()
    ref_slot = None
    import gc

    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 1 if failed else 0


def derive(results):
    """Ratios: direct/plugin time per backend, speedups vs torch and elastic vs legacy (dispatch+combine)."""
    def total(res, path):
        if res.get("status") != "ok" or path not in res:
            return None
        return res[path]["dispatch"]["median_us"] + res[path]["combine"]["median_us"]

    by = {r["backend"]: r for r in results}
    for r in results:
        p, d = total(r, "plugin"), total(r, "direct")
        if p and d:
            r["plugin_over_direct"] = d / p  # throughput ratio: >= 0.97 means plugin overhead <= 3%
            r["plugin_overhead_pct"] = (p / d - 1) * 100
            for op in ("dispatch", "combine"):
                r[f"plugin_over_direct_{op}"] = r["direct"][op]["median_us"] / r["plugin"][op]["median_us"]
        m = total(r, "megatron")
        if p and m:
            r["plugin_over_megatron"] = m / p
            for op in ("dispatch", "combine"):  # host cost per call the plugin adds over Megatron's own path
                r[f"plugin_minus_megatron_{op}_us"] = (r["plugin"][op]["median_us"]
                                                       - r["megatron"][op]["median_us"])
        dc = total(r, "direct_counts")
        if p and dc:
            r["plugin_over_direct_counts"] = dc / p
        t = total(by.get("torch", {}), "plugin")
        if p and t:
            r["speedup_vs_torch"] = t / p
    lp, ep = total(by.get("legacy", {}), "plugin"), total(by.get("elastic", {}), "plugin")
    if lp and ep:
        by["elastic"]["elastic_over_legacy"] = lp / ep
        ld, ed = total(by["legacy"], "direct"), total(by["elastic"], "direct")
        if ld and ed:
            by["elastic"]["elastic_over_legacy_direct"] = ld / ed


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _header(report):
    m, v, s = report["machine"], report["versions"], report["sizes"]
    return (f"# ep_bench: {m['world_size']} x {m.get('gpu', 'CPU (gloo)')}, T={s['tokens_per_rank']} "
            f"H={s['hidden']} K={s['topk']} E={s['experts']} {'fp8' if s['fp8_dispatch'] else 'bf16'} dispatch\n\n"
            f"{m['platform']}; torch {v['torch']}, NCCL {v.get('nccl') or '-'}"
            f"{' (torch compiled with ' + v['nccl_compiled'] + ')' if v.get('nccl_compiled') else ''}, "
            f"deep_ep {v['deep_ep'] or '-'}, megatron-core {v['megatron_core'] or '-'}, "
            f"megatron_ep_plugins {v.get('megatron_ep_plugins') or '-'}; {report['time_utc']}; median of "
            f"{s['iters']} iterations after {s['warmup']} warm-up, slowest rank per iteration; "
            "GB/s = received rows x hidden x element size / time.\n\n")


def _us(r, path, op):
    return r.get(path, {}).get(op, {}).get("median_us")


def _conformance(r):
    c = r["conformance"]
    return "pass" if c["passed"] else "FAIL: " + ", ".join(k for k, x in c["checks"].items() if not x["ok"])


def markdown(report):
    cols = ["backend", "status", "conformance", "dispatch us", "combine us", "dispatch GB/s", "combine GB/s",
            "direct dispatch us", "direct combine us", "plugin/direct", "megatron dispatch us",
            "megatron combine us", "plugin-megatron us (d / c)", "vs torch", "notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in report["results"] if "sweep" not in report else []:
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error", "")
            lines.append(f"| {r['backend']} | {r['status']} |" + " - |" * (len(cols) - 3)
                         + f" {why.replace('|', '/')} |")
            continue
        ck = r["conformance"]["checks"]
        errs = [f"combine err {ck['combine']['rel_err']:.1e}"]
        for g in ("x_grad", "probs_grad"):
            if g in ck and ck[g].get("rel_err") is not None:
                errs.append(f"{g} err {ck[g]['rel_err']:.1e}")
        notes = "; ".join(errs)
        if "plugin_over_direct_counts" in r:
            notes += (f"; direct+count exchange {_f(_us(r, 'direct_counts', 'dispatch'))} / "
                      f"{_f(_us(r, 'direct_counts', 'combine'))} us, plugin/that {r['plugin_over_direct_counts']:.3f}")
        if "elastic_over_legacy" in r:
            notes += f"; elastic/legacy {r['elastic_over_legacy']:.2f}x"
            if "elastic_over_legacy_direct" in r:
                notes += f" (direct {r['elastic_over_legacy_direct']:.2f}x)"
        if r.get("megatron_have_deep_ep") is False:
            notes += "; stock Megatron reports HAVE_DEEP_EP=False with this DeepEP (filled in for the measurement)"
        p = r["plugin"]
        pm = "-"
        if "plugin_minus_megatron_dispatch_us" in r:
            pm = f"{r['plugin_minus_megatron_dispatch_us']:+.1f} / {r['plugin_minus_megatron_combine_us']:+.1f}"
        lines.append("| " + " | ".join([
            r["backend"], "ok", _conformance(r),
            _f(p["dispatch"]["median_us"]), _f(p["combine"]["median_us"]),
            _f(p["dispatch"].get("gbps"), "{:.3g}"), _f(p["combine"].get("gbps"), "{:.3g}"),
            _f(_us(r, "direct", "dispatch")), _f(_us(r, "direct", "combine")),
            _f(r.get("plugin_over_direct"), "{:.3f}"),
            _f(_us(r, "megatron", "dispatch")), _f(_us(r, "megatron", "combine")), pm,
            _f(r.get("speedup_vs_torch"), "{:.2f}x"), notes]) + " |")
    if "sweep" in report:
        lines = sweep_markdown(report)
    return _header(report) + "\n".join(lines) + "\n"


def sweep_markdown(report):
    cols = ["backend", "tokens/rank", "conformance", "dispatch us", "combine us", "direct d+c us", "plugin/direct",
            "megatron d+c us", "plugin-megatron us (d / c)", "us per 1k tokens (plugin d+c)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    rows = sorted((r for run in report["sweep"] for r in run["results"]),
                  key=lambda r: (r["backend"], r["tokens_per_rank"]))
    for r in rows:
        if r["status"] != "ok":
            why = (r.get("reason") or r.get("error", "")).replace("|", "/")
            lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | {r['status']}: {why} |" + " - |" * 7)
            continue
        p = _us(r, "plugin", "dispatch") + _us(r, "plugin", "combine")
        d = (_us(r, "direct", "dispatch") or 0) + (_us(r, "direct", "combine") or 0) if "direct" in r else None
        m = _us(r, "megatron", "dispatch") + _us(r, "megatron", "combine") if "megatron" in r else None
        pm = "-"
        if "plugin_minus_megatron_dispatch_us" in r:
            pm = f"{r['plugin_minus_megatron_dispatch_us']:+.1f} / {r['plugin_minus_megatron_combine_us']:+.1f}"
        per_k = p / r["tokens_per_rank"] * 1000 if r["tokens_per_rank"] else None
        lines.append("| " + " | ".join([
            r["backend"], str(r["tokens_per_rank"]), _conformance(r), _f(_us(r, "plugin", "dispatch")),
            _f(_us(r, "plugin", "combine")), _f(d), _f(r.get("plugin_over_direct"), "{:.3f}"), _f(m), pm,
            _f(per_k)]) + " |")
    return lines


def write_report(report, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    print(text, flush=True)
    stem = out / args.name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    if args.plot:
        plot(report, stem.with_suffix(".png"))
    print(f"ep_bench: wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", flush=True)


def plot(report, path):
    """PNG: bars per backend (single size) or time and plugin/direct against tokens (sweep)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional extra: say so, keep the JSON/markdown
        print("ep_bench: matplotlib not importable, no plot written (pip install matplotlib)", flush=True)
        return
    if "sweep" in report:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        series = {}
        for run in report["sweep"]:
            for r in run["results"]:
                if r["status"] == "ok":
                    series.setdefault(r["backend"], []).append(r)
        for name, rs in sorted(series.items()):
            ts = [r["tokens_per_rank"] for r in rs]
            ax.plot(ts, [_us(r, "plugin", "dispatch") + _us(r, "plugin", "combine") for r in rs], "o-",
                    label=f"{name} (plugin)")
            if all("direct" in r for r in rs):
                ax.plot(ts, [_us(r, "direct", "dispatch") + _us(r, "direct", "combine") for r in rs], "x--",
                        label=f"{name} direct")
            if all("megatron" in r for r in rs):
                ax.plot(ts, [_us(r, "megatron", "dispatch") + _us(r, "megatron", "combine") for r in rs], "s:",
                        label=f"{name} Megatron's path")
            if all("plugin_over_direct" in r for r in rs):
                ax2.plot(ts, [r["plugin_over_direct"] for r in rs], "o-", label=name)
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per rank")
            a.legend(fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("dispatch + combine, median us")
        ax2.axhline(0.97, color="grey", lw=0.8, ls="--")
        ax2.set_ylabel("plugin/direct (1 = no overhead)")
        fig.suptitle(_header(report).splitlines()[0].lstrip("# "), fontsize=9)
    else:
        bars = []
        for r in report["results"]:
            if r["status"] != "ok":
                continue
            for path, label in (("plugin", ""), ("direct", " direct"), ("megatron", " Megatron")):
                if path in r:
                    bars.append((r["backend"] + label, _us(r, path, "dispatch"), _us(r, path, "combine")))
        if not bars:
            return
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(bars)), 4))
        xs = range(len(bars))
        ax.bar([i - 0.2 for i in xs], [b[1] for b in bars], width=0.4, label="dispatch")
        ax.bar([i + 0.2 for i in xs], [b[2] for b in bars], width=0.4, label="combine")
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=20)
        ax.set_ylabel("median us (lower is better)")
        ax.legend()
        ax.set_title(_header(report).splitlines()[0].lstrip("# "), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# launch: torchrun, or self-spawned local ranks
# ---------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        code = run_rank(rank, world, args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            sys.stderr.write(f"rank {rank}: {exc.code}\n")
    except BaseException:  # noqa: BLE001
        sys.stderr.write(f"rank {rank} failed:\n{traceback.format_exc()}")
        code = 1
    queue.put((rank, code))


def main(argv=None):
    args = parse_args(argv)
    resolve_backends(args.backends)  # unknown names fail here, before any rank starts
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    import multiprocessing as mp

    ctx = mp.get_context("spawn" if args.device == "cuda" else "fork")
    world, port = args.nproc, _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    codes = {}
    for p in procs:
        p.join()
    import queue as queue_module

    for _ in range(world):
        try:
            r, c = queue.get(timeout=2)
        except queue_module.Empty:
            break
        codes[r] = c
    for r, p in enumerate(procs):
        codes.setdefault(r, p.exitcode if p.exitcode else 1)
    return max(codes.values()) if codes else 1


if __name__ == "__main__":
    sys.exit(main())
