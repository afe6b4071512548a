"""Measuring: time dispatch/combine per backend (through the slot, the DeepEP buffer directly, Megatron's own
path), bandwidth, the ratios; one rank's whole run (:func:`run_rank`). Reporting is :mod:`.report`; the
conformance check against the reference is :mod:`megatron_ep_plugins.testing.reference`.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
import time
import sys
import traceback
from datetime import timedelta

from ..testing.reference import compare, dequant, expected_blocks, expert_output, forward_backward, make_inputs
from .progress import Progress


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


def grad_mode(autograd: bool):
    """``torch.enable_grad()`` for the training path (the slot's and Megatron's autograd Functions build their
    nodes), ``torch.no_grad()`` for the evaluation path (the slot then calls the adapter without a Function)."""
    import torch

    return torch.enable_grad() if autograd else torch.no_grad()


def leaf(t, autograd: bool):
    """``t`` as a leaf that requires grad (training path) or ``t`` itself."""
    return t.detach().requires_grad_(True) if autograd else t


def timing_plugin(slot, x_in, idx, probs, E, group, rank, args, autograd=False):
    """The slot's calls; ``autograd``: with inputs that require grad, as in training (the backward is not run:
    its calls are the same kernels, timed by the conformance round trip's correctness only)."""
    x_in, probs = leaf(x_in, autograd), leaf(probs, autograd)  # (FP8 input, a tuple, is timed without autograd)
    with grad_mode(autograd):
        first = slot.fused_dispatch(x_in, idx, probs, E, group)
        recv_x = first[0] if isinstance(first[0], tuple) else first[0].detach()
        y = leaf(expert_output(recv_x, rank), autograd)

        def d():
            return slot.fused_dispatch(x_in, idx, probs, E, group)[4]

        def c(handle):
            return slot.fused_combine(y, group, handle)

        td, tc = time_pair(d, c, args.iters, args.warmup, args.device, group)
    return td, tc, recv_x


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


def dedup_rows(x_in, idx, E, group):
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

    send, send_counts, recv_counts = dedup_rows(x_in, idx, E, group)
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

    send, send_counts, _ = dedup_rows(x_in, idx, E, group)
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


def hybridep_direct_pair(buffer_cls, x_in, idx, probs, E, group, rank):
    """``(dispatch, combine)`` closures over a bare ``HybridEPBuffer`` (``buffer_cls``), routing-map form as Megatron's
    non-permute HybridEP use: its own buffer for the raw hidden size, the routing map and probs built once from
    the top-k (``-1`` sets nothing), equal T on every rank. ``timing_direct_hybridep`` and
    ``benchmarks/gpu/hybridep_ab.py`` time these. Call under ``torch.no_grad()``."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    T, H = x_in.shape
    align = 64
    buf = buffer_cls(group=group, hidden_dim=H, max_num_of_tokens_per_rank=max(align, -(-T // align) * align),
                     num_local_experts=E // world, use_fp8=False)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    routing_map = torch.zeros(T, E, dtype=torch.int32, device=idx.device).scatter_add_(
        1, safe, valid.to(torch.int32)) > 0
    dense = torch.zeros(T, E, dtype=torch.float32, device=idx.device).scatter_add_(
        1, safe, torch.where(valid, probs, 0.0))

    def d():
        return buf.dispatch(hidden=x_in, routing_map=routing_map, probs=dense, num_of_experts=E)[3]

    recv = buf.dispatch(hidden=x_in, routing_map=routing_map, probs=dense, num_of_experts=E)[0]
    y = expert_output(recv, rank)

    def c(handle):
        return buf.combine(hidden=y, handle=handle)

    return d, c


def timing_direct_hybridep(backend, x_in, idx, probs, E, group, rank, args):
    """deep_ep.HybridEPBuffer called directly (:func:`hybridep_direct_pair`)."""
    import torch

    with torch.no_grad():
        d, c = hybridep_direct_pair(backend._HybridEPBuffer, x_in, idx, probs, E, group, rank)
        return time_pair(d, c, args.iters, args.warmup, args.device, group)


def timing_megatron_legacy(backend, x_in, idx, probs, E, group, rank, args, autograd=False):
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
        x_in, probs = leaf(x_in, autograd), leaf(probs, autograd)
        with grad_mode(autograd):
            def d():
                return fa.FusedDispatch.apply(x_in.contiguous(), idx, probs, E, group, False, False)[4]

            recv_x = fa.FusedDispatch.apply(x_in.contiguous(), idx, probs, E, group, False, False)[0]
            y = leaf(expert_output(recv_x.detach(), rank), autograd)

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


def timing_direct_ncclep(backend, x_in, idx, probs, E, group, rank, args):
    """nccl.ep called bare on the group the adapter made (HT, FLAT layout, eager sizing), as its own tests call it:
    ``Group.create_handle`` with the receive counters, one device-to-host copy of the counters, ``Handle.dispatch``
    (FWD); ``Handle.combine`` (FWD). No agreement across ranks, no checks, no autograd."""
    import torch

    ep = backend._ep
    entries = [e for e in backend._groups.values() if e.algorithm == "ht" and not e.closed]
    if not entries:
        raise RuntimeError("backend 'ncclep' has no HT group yet (plugin dispatch must run first)")
    entry = max(entries, key=lambda e: e.max_tokens)
    stream = int(torch.cuda.current_stream().cuda_stream)
    hidden, topk = x_in.shape[1], idx.shape[1]
    local = E // entry.num_ranks
    ids = idx.to(torch.int64).contiguous()
    w = probs.float().contiguous()
    state = {}

    def d():
        counters = torch.zeros(1 + local, dtype=torch.int32, device=x_in.device)
        info = ep.LayoutInfo(recv_total_counter=ep.Tensor(counters[:1]), expert_counters=ep.Tensor(counters[1:]),
                             recv_topk_idx_kind=ep.ExpertIdKind.LOCAL)
        raw = entry.group.create_handle(ep.Layout.FLAT, ep.Tensor(ids), layout_info=info, stream=stream)
        rows = max(int(counters[0].item()), 1)  # the host sync eager sizing needs
        recv_x = torch.empty(rows, hidden, dtype=x_in.dtype, device=x_in.device)
        recv_w = torch.empty(rows, topk, dtype=torch.float32, device=x_in.device)
        recv_i = torch.empty(rows, topk, dtype=torch.int64, device=x_in.device)
        raw.dispatch(ep.DispatchInputs(tokens=ep.Tensor(x_in), topk_weights=ep.Tensor(w)),
                     ep.DispatchOutputs(tokens=ep.Tensor(recv_x), topk_weights=ep.Tensor(recv_w),
                                        topk_idx=ep.Tensor(recv_i)),
                     config=ep.DispatchConfig(pass_direction=ep.PassDir.FWD), stream=stream)
        old = state.pop("raw", None)  # keep each handle alive until its combine has been queued
        state["raw"] = raw
        if old is not None:
            old.destroy()
        return raw, recv_x

    def c(h):
        raw, recv_x = h
        out = torch.empty(x_in.shape[0], hidden, dtype=x_in.dtype, device=x_in.device)
        raw.combine(ep.CombineInputs(tokens=ep.Tensor(recv_x)), ep.CombineOutputs(tokens=ep.Tensor(out)),
                    config=ep.CombineConfig(pass_direction=ep.PassDir.FWD), stream=stream)
        return out

    with torch.no_grad():
        return time_pair(d, c, args.iters, args.warmup, args.device, group)


DIRECT = {"legacy": timing_direct_legacy, "elastic": timing_direct_elastic, "torch": timing_direct_torch,
          "hybridep": timing_direct_hybridep, "ncclep": timing_direct_ncclep}
EXTRA_DIRECT = {"torch": ("direct_counts", timing_direct_torch_counts)}
MEGATRON = {"legacy": timing_megatron_legacy}


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


def host_python_us() -> float:
    """This process's pure-Python speed: us per ``sum(range(200))``, best of 5 x 2000. Host-bound timings (small T,
    the ``torch`` backend) track it: on the 2 x H200 VM some processes ran at half this machine's usual speed
    (16.6 against 8.4 us), and every host-bound number of such a process is slower by about as much."""
    import timeit

    return min(timeit.repeat("sum(range(200))", number=2000, repeat=5)) / 2000 * 1e6


def gather_host_speed(sample: float, world: int, group) -> list:
    """Every rank's host speed ``sample`` (us, rounded), by rank: one small collective, called off the clock."""
    import torch.distributed as dist

    speeds = [None] * world
    dist.all_gather_object(speeds, round(sample, 2), group=group)
    return speeds


def machine(device, world):
    import torch

    m = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
         "device": device, "world_size": world, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
        m["gpu_count"] = torch.cuda.device_count()
        m["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for var in ("EP_DISABLE_GIN", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                "OMP_NUM_THREADS"):
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
        # what is timed, in this order: (result key, timing callable of the per-round args)
        plan = [("plugin", lambda a: timing_plugin(slot, x_in, idx, probs, E, group, rank, a))]
        if not args.fp8:  # the training path: inputs that require grad, so the slot's Functions run
            plan.append(("plugin_autograd",
                         lambda a: timing_plugin(slot, x_in, idx, probs, E, group, rank, a, autograd=True)))
        direct = DIRECT.get(name)
        # auto: on CUDA; the torch floor (plain collectives) also on CPU
        if direct is not None and (args.direct == "on" or (
                args.direct == "auto" and (args.device == "cuda" or name == "torch"))):
            plan.append(("direct", lambda a: direct(backend, x_in, idx, probs, E, group, rank, a)))
            extra = EXTRA_DIRECT.get(name)
            if extra is not None:
                plan.append((extra[0], lambda a: extra[1](backend, x_in, idx, probs, E, group, rank, a)))
        megatron = MEGATRON.get(name)
        if megatron is not None and not args.fp8 and (
                args.megatron == "on" or (args.megatron == "auto" and args.device == "cuda")):
            plan.append(("megatron", lambda a: megatron(backend, x_in, idx, probs, E, group, rank, a)))
            plan.append(("megatron_autograd",
                         lambda a: megatron(backend, x_in, idx, probs, E, group, rank, a, autograd=True)))
        # --rounds R: the plan R times over, iters / R pairs each time, so slow drift of a host-bound machine hits
        # every path alike; each path's median is over all its iterations
        per_round = copy.copy(args)
        per_round.iters = -(-args.iters // args.rounds)
        times: dict = {}
        for _ in range(args.rounds):
            for key, timing in plan:
                out = timing(per_round)
                acc = times.setdefault(key, ([], []))
                acc[0].extend(out[0])
                acc[1].extend(out[1])
                if key == "plugin":
                    recv_x = out[2]
                elif key == "megatron":
                    res["megatron_have_deep_ep"] = out[2]
        for key, (td, tc) in times.items():
            res[key] = {"dispatch": summarize(td), "combine": summarize(tc)}
        res["recv_rows"] = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
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


def init_rank(rank, world, args):
    """One benchmark rank's device and process group (NCCL on CUDA, gloo on CPU); ``(device, WORLD)``."""
    import torch
    import torch.distributed as dist

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(seconds=300))
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {world}")
    return device, dist.group.WORLD


def run_rank(rank, world, args):
    import torch
    import torch.distributed as dist

    from megatron_ep_plugins.autograd import build_slot

    device, group = init_rank(rank, world, args)
    if args.fp8:
        os.environ.setdefault("MCORE_EP_ELASTIC_FP8", "1")
    if len(args.token_list) > 1:
        # one DeepEP V2 buffer (one JIT specialisation) for the whole sweep, as a job pins it
        os.environ.setdefault("MCORE_EP_ELASTIC_MAX_TOKENS_PER_RANK", str(max(args.token_list)))
        # HybridEP pads every rank to its buffer's capacity once a shape is agreed; in a sweep the buffer grows
        # with T, so agree at every dispatch (pad to that dispatch's T) instead of padding small T to the largest
        os.environ.setdefault("MCORE_EP_HYBRIDEP_CHECK_EACH_DISPATCH", "1")
    registry, cands, by_name = resolve_backends(args.backends)
    made = {}
    for cand in cands:  # each backend once per run, reused across token counts
        if skip_reason(cand, args) is None:
            try:
                made[cand.spec.name] = make_backend(cand, args)
            except Exception as exc:  # noqa: BLE001 - reported per size
                made[cand.spec.name] = exc
    ref_slot = build_slot(by_name["torch"].spec.factory())
    progress = Progress(len(args.token_list) * len(cands), getattr(args, "progress", "auto") if rank == 0 else "off")

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
            progress.start(f"T={tokens} {cand.spec.name}")
            before = host_python_us()  # this row's host speed, sampled on each side of its timings (off the clock)
            res = bench_backend(cand, made.get(cand.spec.name), ref, blocks, inputs, args, rank, world, group)
            if res["status"] == "ok":
                bandwidth(res, args, world, group)
            if args.device == "cuda":
                torch.cuda.synchronize()
            # the slower of the two samples, by rank
            res["host_python_us_per_rank"] = gather_host_speed(max(before, host_python_us()), world, group)
            dist.barrier(group=group)
            results.append(res)
            if rank == 0:
                progress.done(f"T={tokens} {cand.spec.name}: {res['status']}")
        derive(results)
        runs.append({"tokens_per_rank": tokens, "results": results})
    speeds = gather_host_speed(host_python_us(), world, group)  # each rank's, after all the timings
    report = {
        "benchmark": "ep_bench",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(args.device, world), "host_python_us_per_rank": speeds},
        "versions": versions(args.device),
        "sizes": {"tokens_per_rank": args.token_list[0] if len(args.token_list) == 1 else args.token_list,
                  "hidden": args.hidden, "topk": args.topk,
                  "experts": args.experts, "fp8_dispatch": args.fp8, "iters": args.iters, "warmup": args.warmup,
                  "rounds": args.rounds, "num_sms": args.num_sms, "seed": args.seed, "masked": "idx[::7, 0] = -1"},
        "targets": {"plugin_over_direct_min": 0.97, "elastic_over_legacy_min": 1.5,
                    "plugin_minus_megatron_us_max": 5.0},
        "results": runs[0]["results"] if len(runs) == 1 else [r for run in runs for r in run["results"]],
    }
    if len(runs) > 1:
        report["sweep"] = runs
    if rank == 0:
        progress.close()
        from .report import write_report

        write_report(report, args)
    dist.barrier(group=group)
    failed = [r["backend"] for r in report["results"]
              if r["status"] == "error" or (r["status"] == "ok" and not r["conformance"]["passed"])]
    # Free the backends' communication buffers while the process group still exists, one backend at a time
    # with every rank at the same point: a DeepEP V2 ElasticBuffer's destructor runs a GPU barrier with its
    # peers, so it must not be destroyed after destroy_process_group() (cudaErrorIllegalAddress, seen on
    # 2 x H200) nor while a peer is still inside another buffer's destructor (sweeps with legacy and elastic
    # still ended in that SIGABRT when every backend was dropped in one gc pass).
    ref_slot = None
    for name in list(made):
        item = made.pop(name)
        close = getattr(item[0], "close", None) if isinstance(item, tuple) else None
        if close is not None:
            close()
        del item
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
        for suffix in ("", "_autograd"):  # evaluation path (no_grad), training path (inputs require grad)
            p_, m = total(r, "plugin" + suffix), total(r, "megatron" + suffix)
            if p_ and m:
                r[f"plugin_over_megatron{suffix}"] = m / p_
                for op in ("dispatch", "combine"):  # host cost per call the plugin adds over Megatron's own path
                    r[f"plugin_minus_megatron{suffix}_{op}_us"] = (r["plugin" + suffix][op]["median_us"]
                                                                   - r["megatron" + suffix][op]["median_us"])
        pa = total(r, "plugin_autograd")
        if pa and d:
            r["plugin_autograd_over_direct"] = d / pa
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
