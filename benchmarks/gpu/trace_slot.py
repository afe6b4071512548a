"""Why the slot's ``autograd.Function`` costs more on a GPU host than with no-work doubles (issue 11).

``host_gap.py`` showed a call through ``_Dispatch.apply`` taking 50-90 us longer than the same adapter call
made directly, on the 2 x H200 host, while the same Function costs about 12 us around a backend that does no
work. This script takes that apart, per call, on one backend (``TRACE_BACKEND``, default ``torch``) at one
token count (``TRACE_T``, 256), H=7168 K=8 E=256 bf16, on 2 ranks:

1. *Function alone*: ``autograd.Function.apply`` around a forward that returns five precomputed tensors
   (CPU tensors, then CUDA tensors), under ``no_grad`` and with an input that requires grad: what ``apply``
   itself costs on this host;
2. wall time per call, interleaved (slot dispatch, ``_Dispatch.apply``, adapter dispatch; slot combine, adapter
   combine), under ``no_grad`` and with grad, the device synchronised around each call;
3. ``cProfile`` of 50 slot calls and 50 adapter calls: the Python functions that differ;
4. ``torch.profiler`` (CPU + CUDA) of 20 slot calls and 20 adapter calls: the aten ops that differ, with the
   chrome traces written to ``TRACE_OUT`` (default ``$OUT`` or ``/tmp``).

Rank 0 prints everything. Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/trace_slot.py``
(``TRACE_DEVICE=cpu``: gloo, for a smoke run).
"""
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _interleaved import interleaved  # noqa: E402 (this folder: the script's own)

CUDA = os.environ.get("TRACE_DEVICE", "cuda") == "cuda"
dist.init_process_group("nccl" if CUDA else "gloo")
rank = dist.get_rank()
if CUDA:
    torch.cuda.set_device(rank)
dev = torch.device("cuda", rank) if CUDA else torch.device("cpu")
OUTDIR = os.environ.get("TRACE_OUT") or os.environ.get("OUT") or "/tmp"
NAME = os.environ.get("TRACE_BACKEND", "torch")
T = int(os.environ.get("TRACE_T", 256))
H, K, E = int(os.environ.get("TRACE_H", 7168)), 8, 256
ITERS = int(os.environ.get("TRACE_ITERS", 40))
g = dist.group.WORLD


def p(*a):
    if rank == 0:
        print(*a, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(cases, iters=ITERS):
    return interleaved(cases, iters, dev)


def show(title, res):
    p(f"{title}: " + "; ".join(f"{k} {v:.1f}" for k, v in res.items()))


# -- 1. the Function alone ----------------------------------------------------------------------------------
class _FiveFlat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, c, d, bound):
        ctx.bound = bound
        return a.view_as(a), b, c, d, object()

    @staticmethod
    def backward(ctx, *grads):
        return grads[0], None, None, None, None, None


class _Ctx:
    pass


def alone(device):
    x = torch.zeros(T, 64, device=device)
    xg = x.clone().requires_grad_(True)
    outs = [torch.zeros(T, 64, device=device), torch.zeros(T, K, dtype=torch.long, device=device),
            torch.zeros(T, K, device=device), torch.zeros(E, dtype=torch.long)]
    py_only = lambda: (outs[0], outs[1], outs[2], outs[3], object())  # noqa: E731
    cases = {
        "python call": py_only,
        "pure Python (sum of range(200))": lambda: sum(range(200)),
        "aten view_as": lambda: x.view_as(x),
        "aten empty": lambda: torch.empty(0, device=device),
        "apply no_grad": lambda: _nograd(_FiveFlat.apply, x, *outs, None),
        "apply grad": lambda: _FiveFlat.apply(xg, *outs, None),
        "Function.forward only": lambda: _FiveFlat.forward(_Ctx(), xg, *outs, None),
    }
    return timed(cases, iters=200)


def _nograd(fn, *args):
    with torch.no_grad():
        return fn(*args)


show("Function alone, CPU tensors (us/call)", alone(torch.device("cpu")))
if CUDA:
    show("Function alone, CUDA tensors (us/call)", alone(dev))
# RecordFunction: a global observer on this host (profiler daemon, tracing hook) makes every aten op and every
# Function.apply pay for it; switched off for this one measurement only
torch._C._autograd._enable_record_function(False)
show("Function alone, CPU tensors, RecordFunction off (us/call)", alone(torch.device("cpu")))
torch._C._autograd._enable_record_function(True)

# -- 2. the backend through the slot and directly --------------------------------------------------------------
from megatron_ep_plugins.api import list_backends  # noqa: E402
from megatron_ep_plugins.autograd import _Bound, _Combine, _Dispatch, build_slot  # noqa: E402

by = {c.spec.name: c for c in list_backends()[1]}
if NAME not in by or not by[NAME].availability:
    p(f"{NAME}: not available here ({by.get(NAME) and by[NAME].availability.reason})")
    dist.barrier()
    os._exit(0)
b = by[NAME].spec.factory()
if hasattr(b, "set_num_sms"):
    b.set_num_sms(20)
slot = build_slot(b)
bound = _Bound(b, None)
gen = torch.Generator().manual_seed(5 + rank)
x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
idx[::7, 0] = -1
idx = idx.to(dev)
w = torch.rand(T, K, generator=gen).to(dev)
xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
F = dict(async_finish=True, allocate_on_comm_stream=True)
r = slot.fused_dispatch(x, idx, w, E, g, **F)
y = r[0].detach().clone()
yg = y.clone().requires_grad_(True)
handle = r[4]


def cases_for(xin, win, yin):
    return {
        "slot dispatch": lambda: slot.fused_dispatch(xin, idx, win, E, g, **F),
        "_Dispatch.apply": lambda: _Dispatch.apply(xin, idx, win, E, g, True, True, bound),
        "adapter dispatch": lambda: b.dispatch(xin, idx, win, E, g, **F),
        "slot combine": lambda: slot.fused_combine(yin, g, handle, **F),
        "_Combine.apply": lambda: _Combine.apply(yin, g, handle, True, True, bound),
        "adapter combine": lambda: b.combine(yin, handle, g, **F),
    }


with torch.no_grad():
    show(f"{NAME} T={T} no_grad (us/call)", timed(cases_for(x, w, y)))
show(f"{NAME} T={T} grad (us/call)", timed(cases_for(xg, wg, yg)))
# adapter with detached inputs: what the Function's forward sees (autograd is off inside it)
with torch.no_grad():
    show(f"{NAME} T={T} adapter under no_grad, grad inputs (us/call)",
         timed({"adapter dispatch": lambda: b.dispatch(xg, idx, wg, E, g, **F),
                "adapter combine": lambda: b.combine(yg, handle, g, **F)}))


# -- 3. cProfile ---------------------------------------------------------------------------------------------
def cprof(label, fn, n=50):
    sync()
    dist.barrier()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    p(f"--- cProfile {label} ({n} calls), by own time ---")
    p("\n".join(line for line in s.getvalue().splitlines()[4:] if line.strip()))


cprof("slot dispatch (grad)", lambda: slot.fused_dispatch(xg, idx, wg, E, g, **F))
cprof("adapter dispatch (grad)", lambda: b.dispatch(xg, idx, wg, E, g, **F))
cprof("slot combine (grad)", lambda: slot.fused_combine(yg, g, handle, **F))
cprof("adapter combine (grad)", lambda: b.combine(yg, handle, g, **F))

# -- 4. torch.profiler -------------------------------------------------------------------------------------------
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])


def tprof(label, fn, n=20):
    for _ in range(3):
        fn()
    sync()
    dist.barrier()
    with profile(activities=acts) as prof:
        for _ in range(n):
            with record_function(label):
                fn()
            sync()
    p(f"--- torch.profiler {label} ({n} calls), by CPU total ---")
    p(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
    if rank == 0:
        prof.export_chrome_trace(os.path.join(OUTDIR, f"trace_{NAME}_{label.replace(' ', '_')}.json"))


tprof("slot dispatch", lambda: slot.fused_dispatch(xg, idx, wg, E, g, **F))
tprof("adapter dispatch", lambda: b.dispatch(xg, idx, wg, E, g, **F))
tprof("slot combine", lambda: slot.fused_combine(yg, g, handle, **F))
tprof("adapter combine", lambda: b.combine(yg, handle, g, **F))
dist.barrier()
os._exit(0)  # skip V2 teardown
