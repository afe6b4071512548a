"""Where does ``ep_bench``'s plugin/direct gap at small T come from? (issue 11; one process, paths interleaved.)

At 256 tokens ``ep_bench`` measured the ``elastic`` plugin 26-37 us slower per dispatch and the ``legacy`` plugin
18-31 us slower per combine than the bare DeepEP calls, while ``host_overhead.py`` on the same host timed the
adapters' own Python at about 7 us per dispatch and 1.5 us per combine. This script builds the adapter's call up
from ep_bench's bare call one piece at a time, on the same buffer and inputs, and times every step the way ep_bench
does (``measure.time_pair``: CUDA events, slowest rank per pair), in rounds whose order rotates:

* ``bare``: ep_bench's direct path;
* ``+kwargs``: the same DeepEP calls with every keyword the adapter passes (events, stream flags, ``x.contiguous()``);
* ``+outputs``: plus what the adapter builds from the result (the per-expert count tensor, its handle record);
* ``adapter``: the adapter's ``dispatch``/``combine``;
* ``slot``: the plugin slot's ``fused_dispatch``/``fused_combine`` (no gradient: no autograd Function), what
  ep_bench's plugin column times.

``GAP_BACKENDS`` (default ``legacy,elastic``), ``GAP_T`` (256), ``GAP_ROUNDS`` (8), ``GAP_ITERS`` (40). Each rank's
host speed (``measure.host_python_us``) is sampled before and after. Writes ``GAP_OUT`` (default
``$OUT/small_t_gap.json``) and prints a table. Launch: ``torchrun --nproc-per-node 2 benchmarks/gpu/small_t_gap.py``
(``GAP_DEVICE=cpu GAP_H=256`` with ``tests/emulators`` on ``PYTHONPATH``: a gloo smoke run over the CPU emulator).
"""
import gc
import json
import os
import statistics
import sys
import types

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ep_plugins import api  # noqa: E402
from megatron_ep_plugins.autograd import build_slot  # noqa: E402
from megatron_ep_plugins.backends._deepep_common import counts_tensor  # noqa: E402
from megatron_ep_plugins.bench.measure import gather_host_speed, host_python_us, time_pair  # noqa: E402
from megatron_ep_plugins.testing.reference import expert_output, make_inputs  # noqa: E402

BACKENDS = os.environ.get("GAP_BACKENDS", "legacy,elastic").split(",")
T, ROUNDS, ITERS = int(os.environ.get("GAP_T", 256)), int(os.environ.get("GAP_ROUNDS", 8)), int(os.environ.get(
    "GAP_ITERS", 40))
H, K, E, NUM_SMS = int(os.environ.get("GAP_H", 7168)), 8, 256, 20
DEVICE = os.environ.get("GAP_DEVICE", "cuda")
OUT = os.environ.get("GAP_OUT") or os.path.join(os.environ.get("OUT", "/tmp"), "small_t_gap.json")

rank = int(os.environ["RANK"])
if DEVICE == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", device_id=dev)
else:
    dev = torch.device("cpu")
    dist.init_process_group("gloo")
group, world = dist.group.WORLD, dist.get_world_size()
args = types.SimpleNamespace(seed=0, tokens=T, hidden=H, topk=K, experts=E, fp8=False)
x, idx, probs, _ = make_inputs(args, rank, world, dev)
factories = {c.spec.name: c.spec.factory for c in api.list_backends()[1]}


def legacy_paths(backend, slot):
    from megatron_ep_plugins.backends.deepep_legacy import LegacyHandle

    y = expert_output(slot.fused_dispatch(x, idx, probs, E, group)[0], rank)  # builds the buffer
    buf = backend._buffers[group]

    def bare_d():
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        return buf.dispatch(x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=per_rank,
                            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)[4]

    def kw_d(outputs=False):
        per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(
            idx, E, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
        recv_x, recv_idx, _, counts, raw, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, previous_event=event, async_finish=False,
            allocate_on_comm_stream=False)
        if outputs:
            counts_tensor(counts)
            return LegacyHandle(raw, recv_idx, T, recv_x.shape[0], E).raw
        return raw

    return {
        "bare": (bare_d, lambda h: buf.combine(y, h)),
        "+kwargs": (kw_d, lambda h: buf.combine(y.contiguous(), h, topk_weights=None, previous_event=None,
                                                async_finish=False, allocate_on_comm_stream=False)),
        "+outputs": (lambda: kw_d(True), lambda h: buf.combine(y.contiguous(), h, topk_weights=None,
                                                               previous_event=None, async_finish=False,
                                                               allocate_on_comm_stream=False)),
        "adapter": (lambda: backend.dispatch(x, idx, probs, E, group).handle,
                    lambda h: backend.combine(y, h, group)),
        "slot": (lambda: slot.fused_dispatch(x, idx, probs, E, group)[4], lambda h: slot.fused_combine(y, group, h)),
    }


def elastic_paths(backend, slot):
    from megatron_ep_plugins.backends.deepep_elastic import ElasticHandle

    y = expert_output(slot.fused_dispatch(x, idx, probs, E, group)[0], rank)  # builds the buffer
    buf = backend._groups[group].buffer
    ns = backend.num_sms or 0

    def kw_d(outputs=False):
        recv_x, recv_idx, _, raw, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=probs, num_experts=E, num_sms=ns, previous_event=None,
            async_with_compute_stream=False, allocate_on_comm_stream=False, do_expand=False)
        if outputs:
            counts_tensor(raw.num_recv_tokens_per_expert_list)
            return ElasticHandle(raw, buf, recv_idx, T, recv_x.shape[0], H).raw
        return raw

    def kw_c(h):
        return buf.combine(y.contiguous(), h, topk_weights=None, num_sms=0, previous_event=None,
                           async_with_compute_stream=False, allocate_on_comm_stream=False)

    return {
        "bare": (lambda: buf.dispatch(x, topk_idx=idx, topk_weights=probs, num_experts=E, num_sms=ns,
                                      do_expand=False)[3], lambda h: buf.combine(y, h, num_sms=0)),
        "+kwargs": (kw_d, kw_c),
        "+outputs": (lambda: kw_d(True), kw_c),
        "adapter": (lambda: backend.dispatch(x, idx, probs, E, group).handle,
                    lambda h: backend.combine(y, h, group)),
        "slot": (lambda: slot.fused_dispatch(x, idx, probs, E, group)[4], lambda h: slot.fused_combine(y, group, h)),
    }


report = {"T": T, "rounds": ROUNDS, "iters": ITERS, "backends": {}}
for name in BACKENDS:
    backend = factories[name]()
    slot = build_slot(backend)
    slot.set_deepep_num_sms(NUM_SMS)
    with torch.no_grad():
        paths = (legacy_paths if name == "legacy" else elastic_paths)(backend, slot)
        speed = [gather_host_speed(host_python_us(), world, group)]
        samples = {k: ([], []) for k in paths}
        order = list(paths)
        for r in range(ROUNDS):
            for k in order[r % len(order):] + order[:r % len(order)]:  # rotate: no path always first or last
                d, c = paths[k]
                td, tc = time_pair(d, c, ITERS, 3, DEVICE, group)
                samples[k][0].extend(td)
                samples[k][1].extend(tc)
        speed.append(gather_host_speed(host_python_us(), world, group))
    med = {k: [statistics.median(v) * 1e6 for v in dc] for k, dc in samples.items()}
    report["backends"][name] = {"median_us": med, "host_python_us_per_rank": speed}
    if rank == 0:
        base = med["bare"]
        print(f"## {name}, T={T}: median us (slowest rank), {ROUNDS} rounds x {ITERS} pairs; host us by rank {speed}")
        print("| path | dispatch | combine | dispatch - bare | combine - bare |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for k, (d, c) in med.items():
            print(f"| {k} | {d:.1f} | {c:.1f} | {d - base[0]:+.1f} | {c - base[1]:+.1f} |", flush=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # every rank done with the peers' buffers before any rank frees its own
    dist.barrier()
    if hasattr(backend, "release"):
        backend.release(group)
    del slot, backend, paths, d, c
    gc.collect()  # free this backend's buffers on every rank before the next one is built
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dist.barrier()

if rank == 0:
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)
dist.barrier()
dist.destroy_process_group()
