"""Where the plugin's time goes at small token counts, per call, on GPUs (issue 11's diagnostic).

For each backend (``GAP_BACKENDS``, default legacy,elastic,torch) and token count (``GAP_TOKENS``, 256,4096),
H=7168 K=8 E=256 bf16, times in one process, *interleaved round robin* (each iteration times every
configuration once, so warm-up and clock drift hit them alike), the wall time of one call with the device
synchronised before and after (so host time is not hidden behind queued GPU work):

* the Megatron-signature slot (``build_slot``) with Megatron's flags, with and without the fault watcher;
* the slot's autograd Function alone (``_Dispatch.apply``);
* the backend adapter called directly;
* DeepEP's buffer called bare (legacy: ``get_dispatch_layout`` + ``dispatch``; elastic: ``dispatch(do_expand=False)``).

Rank 0 prints one line per (backend, T); the slowest rank's median over ``GAP_ITERS`` (40) per column.
Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/host_gap.py`` (``GAP_DEVICE=cpu``: gloo, for a smoke run).
"""
import os, sys
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist
from _interleaved import interleaved  # this folder: the script's own
CUDA = os.environ.get("GAP_DEVICE", "cuda") == "cuda"
dist.init_process_group("nccl" if CUDA else "gloo"); rank = dist.get_rank(); world = dist.get_world_size()
if CUDA: torch.cuda.set_device(rank)
dev = "cuda" if CUDA else "cpu"
g = dist.group.WORLD
from megatron_ep_plugins.api import list_backends
from megatron_ep_plugins.autograd import build_slot, _Bound, _Dispatch
from megatron_ep_plugins.bench.measure import plugin_buffer
by = {c.spec.name: c for c in list_backends()[1]}
H, K, E = int(os.environ.get("GAP_H", 7168)), 8, 256
ITERS = int(os.environ.get("GAP_ITERS", 40))
def p(*a):
    if rank == 0: print(*a, flush=True)
for name in [n for n in os.environ.get("GAP_BACKENDS", "legacy,elastic,torch").split(",") if n in by and by[n].availability]:
    b = by[name].spec.factory(); b.name = name
    if hasattr(b, "set_num_sms"): b.set_num_sms(20)
    slot = build_slot(b)
    os.environ["MCORE_EP_FAULT_PROPAGATION"] = "0"; quiet = build_slot(b); os.environ.pop("MCORE_EP_FAULT_PROPAGATION")
    bound = _Bound(b, None)
    for T in [int(t) for t in os.environ.get("GAP_TOKENS", "256,4096").split(",")]:
        gen = torch.Generator().manual_seed(5 + rank)
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
        idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices; idx[::7, 0] = -1; idx = idx.to(dev)
        w = torch.rand(T, K, generator=gen).to(dev)
        F = dict(async_finish=True, allocate_on_comm_stream=True)
        with torch.no_grad():
            r = slot.fused_dispatch(x, idx, w, E, g, **F); quiet.fused_dispatch(x, idx, w, E, g, **F)
            y = r[0].clone()
            cases = {"slot dispatch": lambda: slot.fused_dispatch(x, idx, w, E, g, **F),
                     "slot dispatch (no fault watcher)": lambda: quiet.fused_dispatch(x, idx, w, E, g, **F),
                     "_Dispatch.apply": lambda: _Dispatch.apply(x, idx, w, E, g, True, True, bound),
                     "adapter dispatch": lambda: b.dispatch(x, idx, w, E, g),
                     "slot combine": lambda: slot.fused_combine(y, g, r[4], **F),
                     "adapter combine": lambda: b.combine(y, r[4], g)}
            if name == "legacy":
                buf = plugin_buffer(b, g)
                def d():
                    a0, a1, a2, a3, _ = buf.get_dispatch_layout(idx, E)
                    return buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=a0, num_tokens_per_rdma_rank=a1, is_token_in_rank=a3, num_tokens_per_expert=a2)
                rr = d()
                cases["bare dispatch"] = d
                cases["bare combine"] = lambda: buf.combine(rr[0], rr[4])
            if name == "elastic":
                buf = plugin_buffer(b, g)
                d = lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, num_sms=b.num_sms or 0, do_expand=False)
                rr = d()
                cases["bare dispatch"] = d
                cases["bare combine"] = lambda: buf.combine(rr[0], rr[3], num_sms=0)
            res = interleaved(cases, ITERS, dev)
        p(f"{name} T={T}: " + "; ".join(f"{k} {v:.0f}" for k, v in res.items()))
dist.barrier()
os._exit(0)  # skip V2 teardown
