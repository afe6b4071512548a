"""Does a job that used a DeepEP backend through the plugin exit cleanly? (One launch = one case; rc is the answer.)

A DeepEP V2 ``ElasticBuffer`` runs a GPU barrier with its peers in its destructor; ``ep_bench`` died in it
(``cudaErrorIllegalAddress``, SIGABRT after its report) until it freed its backends before
``destroy_process_group()``. This script is what a user's job does instead: install the plugin, run a few
dispatch/combine pairs through the slot Megatron calls, then end the way training scripts end, and nothing else:

* ``EXIT_MODE=destroy``: ``dist.destroy_process_group()`` while the slot (and so the backend and its buffers) is
  still held by a module global, as an installed plugin's is by Megatron's patched module, then exit;
* ``EXIT_MODE=plain``: exit with the process group alive (interpreter teardown frees everything);
* ``EXIT_MODE=release``: drop the slot, ``gc.collect()``, barrier, then ``destroy_process_group()`` (what
  ``ep_bench`` does);
* ``EXIT_MODE=install``: the backend through ``megatron_ep_plugins.install()`` (which hooks ``destroy_process_group``
  to call the backend's ``release`` first, ``megatron_ep_plugins/teardown.py``), then ``destroy_process_group()``.

2 x H200, 2026-11-30 (``validate.sh lease18``): ``elastic`` + ``destroy`` exited with SIGABRT (-6) on both ranks after
reaching the end; ``release`` and ``plain`` exited with 0, and ``legacy`` with 0 in all three. ``install`` (``lease19a``):
rc=0 for ``elastic`` and ``legacy``, with ``elastic`` + ``destroy`` still dying with SIGABRT in the same lease.

``EXIT_BACKEND`` names the backend (default ``elastic``). Launch:
``EXIT_BACKEND=elastic EXIT_MODE=destroy torchrun --nproc-per-node 2 benchmarks/gpu/exit_check.py``; each rank prints
``exit_check: <backend> <mode> rank R reached the end`` before its teardown, so a crash after that line is a teardown
crash.
"""
import gc
import os

import torch
import torch.distributed as dist

BACKEND, MODE = os.environ.get("EXIT_BACKEND", "elastic"), os.environ.get("EXIT_MODE", "destroy")
HELD = {}  # module global, as Megatron's patched module holds an installed slot


def main():
    from megatron_ep_plugins import api
    from megatron_ep_plugins.autograd import build_slot

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    if MODE == "install":
        slot = HELD["slot"] = build_slot(api.install(BACKEND).backend)  # the installation holds the backend too
    else:
        backends = {c.spec.name: c for c in api.list_backends()[1]}
        slot = HELD["slot"] = build_slot(backends[BACKEND].spec.factory())
    gen = torch.Generator().manual_seed(rank)
    tokens, hidden, experts, topk = 256, 7168, 256, 8
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices.cuda()
    probs = torch.rand(tokens, topk, generator=gen).cuda()
    for _ in range(3):
        recv_x, _, _, _, handle = slot.fused_dispatch(x, idx, probs, experts, dist.group.WORLD)
        slot.fused_combine(recv_x, dist.group.WORLD, handle)
    torch.cuda.synchronize()
    dist.barrier()
    print(f"exit_check: {BACKEND} {MODE} rank {rank} reached the end", flush=True)
    if MODE == "release":
        del slot, handle, recv_x
        HELD.clear()
        gc.collect()
        torch.cuda.synchronize()
        dist.barrier()
    if MODE == "install":
        del slot, handle, recv_x  # a training step's handles are gone by the end of the job
        HELD.clear()
    if MODE in ("destroy", "release", "install"):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
