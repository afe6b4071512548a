#!/usr/bin/env python
"""Train a small Megatron-Core MoE GPT with expert parallelism through megatron_ep_plugins.

The model is megatron-core's own ``GPTModel`` with MoE layers (``get_gpt_layer_local_spec``,
``SequentialMLP`` experts), the *flex* token dispatcher and ``moe_flex_dispatcher_backend="deepep"``
in the Megatron config, exactly as a DeepEP job would set it. ``megatron_ep_plugins.install()``
swaps the implementation under that slot (``fused_dispatch`` / ``fused_combine``) for the selected
backend; Megatron itself is not modified.

Launch:

* ``python examples/train_moe.py`` - spawns 2 local processes itself (gloo on CPU; NCCL on CUDA
  when ``--device`` resolves to cuda and there are enough GPUs). No torchrun needed.
* ``torchrun --nproc-per-node 2 examples/train_moe.py`` - uses the launcher's processes
  (``RANK``/``WORLD_SIZE`` set): NCCL + cuda when CUDA is available, else gloo + cpu.

Backend: ``--backend NAME`` (default: ``$MCORE_EP_BACKEND`` or ``auto``) is passed to
``megatron_ep_plugins.install()``. Rank 0 prints the choice and its explanation, the loss per step,
and first/last loss; the script exits 1 if the loss did not fall. ``--json-out PATH`` writes a
machine-readable record for comparisons across machines/backends.

Task: synthetic next-token prediction on sequences ``x[t+1] = (x[t] + stride) % vocab`` with a
random start and a stride from a small set, so the model has to read the previous tokens (attention)
and map them through the MoE MLPs; with a fixed seed the loss falls clearly within a few dozen steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
import warnings
from datetime import timedelta
from typing import Any, Optional

# Megatron warns at import about optional accelerated packages (TE, Apex, absl); not relevant here.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default=os.environ.get("MCORE_EP_BACKEND", "").strip() or "auto",
                   help="megatron_ep_plugins backend name/alias or 'auto' (default: $MCORE_EP_BACKEND or auto)")
    p.add_argument("--no-install", action="store_true",
                   help="do not call megatron_ep_plugins.install(): rely on zero-code activation "
                        "(MCORE_EP_BACKEND set in the environment, the .pth import hook)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (one GPU per process), else cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not launched by torchrun")
    p.add_argument("--ep", type=int, default=0, help="expert-parallel size (0: world size)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA (Megatron's Float16Module + fp32 master weights, as real jobs run; "
                        "DeepEP kernels take bf16 tokens), fp32 on CPU")
    p.add_argument("--hidden", type=int, default=256,
                   help="hidden size; 256 is valid for every backend (DeepEP V2 combine needs hidden %% 256 == 0, "
                        "V1 and HybridEP hidden %% 16 == 0 in bf16)")
    p.add_argument("--ffn", type=int, default=256, help="expert FFN hidden size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--json-out", default=None, help="write {backend, losses, steps, ...} to this path (rank 0)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Megatron-Core on CPU: every workaround in one place
# --------------------------------------------------------------------------------------------------
def megatron_device_setup(device: torch.device, seed: int) -> dict[str, Any]:
    """Seed Megatron's RNG tracker and return TransformerConfig overrides for ``device``.

    On CUDA this is Megatron's normal path (``model_parallel_cuda_manual_seed``) and the fused
    kernels stay at their defaults where they have pure-PyTorch fallbacks. On CPU Megatron-Core
    0.19.2 needs these workarounds (each one is a CUDA-only code path otherwise):

    * ``use_cpu_initialization=True``: weights are created on the CPU with the default torch RNG
      instead of ``torch.cuda.current_device()`` + the CUDA RNG tracker.
    * RNG tracker: ``model_parallel_cuda_manual_seed`` calls ``torch.cuda.manual_seed`` and the
      tracker's ``add``/``fork`` save/restore *CUDA* generator states. We create Megatron's no-op
      tracker variant (``initialize_rng_tracker(inference_rng_tracker=True)``) whose ``add`` and
      ``fork`` do nothing; dropout is 0 so no tracked RNG stream is consumed, and weight init on the
      CPU uses ``torch.manual_seed``.
    * ``gradient_accumulation_fusion=False``: needs the APEX/TE ``fused_weight_gradient_mlp_cuda``.
    * ``moe_permute_fusion=False``, ``moe_router_fusion=False``: TE/Triton permute and router kernels.
    * ``bias_dropout_fusion=False``, ``bias_activation_fusion=False``: ``@jit_fuser`` (torch.compile /
      nvFuser) versions; the eager ones are used instead.
    * ``masked_softmax_fusion=False``, ``persist_layer_norm=False``, ``apply_rope_fusion=False``,
      ``cross_entropy_loss_fusion=False``: Apex/TE/CUDA kernels.
    * ``attention_backend=AttnBackend.local``: Megatron's unfused ``DotProductAttention`` (no TE/flash).
    * ``parallel_state``'s global memory buffer (used by the unfused attention for its ``baddbmm``
      scratch tensor) allocates on ``torch.cuda.current_device()``; we replace it with one that
      allocates on the CPU (call this after ``initialize_model_parallel``).
    * ``Router.gating`` moves a CPU router weight to ``torch.cuda.current_device()`` on every call
      (it assumes CPU weights mean "CPU initialisation, GPU training"); for CPU inputs we route
      through the same ``router_gating_linear`` without that move.
    * dispatcher: the ``alltoall`` dispatcher needs ``torch.cuda.Stream``; the *flex* dispatcher with
      ``moe_flex_dispatcher_backend="deepep"`` runs on CPU once the slot is served by a CPU-capable
      backend (``torch``: gloo all_to_all).
    """
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.enums import AttnBackend

    torch.manual_seed(seed)
    if device.type == "cuda":
        mrandom.model_parallel_cuda_manual_seed(seed)
        return {"use_cpu_initialization": False, "attention_backend": AttnBackend.local,
                "gradient_accumulation_fusion": False, "moe_permute_fusion": False,
                "moe_router_fusion": False, "masked_softmax_fusion": False, "persist_layer_norm": False,
                "apply_rope_fusion": False, "cross_entropy_loss_fusion": False}
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    from megatron.core import parallel_state as ps
    from megatron.core.utils import GlobalMemoryBuffer

    class _CPUMemoryBuffer(GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            return torch.empty(tuple(tensor_shape), dtype=dtype, device="cpu")

    ps._GLOBAL_MEMORY_BUFFER = _CPUMemoryBuffer()

    from megatron.core.transformer.moe import router as mrouter

    if not getattr(mrouter.Router.gating, "_cpu_safe", False):
        cuda_gating = mrouter.Router.gating

        def gating(self, input):
            if input.device.type != "cpu":
                return cuda_gating(self, input)
            # Megatron's router_gating_linear in plain torch: the same product in the router dtype (its
            # fused Function references TransformerEngine's te_general_gemm, undefined without TE in 0.16)
            dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)

        gating._cpu_safe = True
        mrouter.Router.gating = gating
    return {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
        "bias_dropout_fusion": False,
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "cross_entropy_loss_fusion": False,
        "attention_backend": AttnBackend.local,
    }


# --------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device, overrides: dict[str, Any]):
    """Megatron's GPTModel; in bf16 wrapped in Megatron's ``Float16Module`` exactly as a training job does."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = args.precision_resolved == "bf16"

    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        expert_model_parallel_size=args.ep,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        # The flex dispatcher with Megatron's DeepEP slot; megatron_ep_plugins serves that slot.
        moe_token_dispatcher_type="flex",
        moe_flex_dispatcher_backend="deepep",
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        fp16=False,
        add_bias_linear=False,
        **overrides,
    )
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="learned_absolute",
                     parallel_output=True, share_embeddings_and_output_weights=False)
    model = model.to(device)
    if bf16:
        model = Float16Module(config, model)  # bf16 weights and activations, fp32 logits/loss
    return model, config


class MasterWeights:
    """fp32 master copies of bf16 parameters (what Megatron's mixed-precision optimizer keeps).

    Adam steps the fp32 copies; the bf16 model weights are refreshed from them after each step, so
    updates smaller than bf16's resolution are not lost.
    """

    def __init__(self, model: torch.nn.Module, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.Adam(self.master, lr=lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)


def synthetic_batch(gen: torch.Generator, args: argparse.Namespace, device: torch.device):
    """Arithmetic sequences mod vocab: the next token is the previous plus a per-sample stride."""
    b, s, v = args.micro_batch, args.seq, args.vocab
    start = torch.randint(0, v, (b, 1), generator=gen)
    stride = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (b, 1), generator=gen)]
    seq = (start + stride * torch.arange(s + 1)) % v
    tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked out
    return tokens.to(device), position_ids.to(device), causal.to(device), labels.to(device)


def allreduce_grads(model: torch.nn.Module) -> None:
    """Average gradients across data-parallel replicas (what Megatron's DDP wrapper does).

    Dense parameters are replicated on the data-parallel group; expert parameters (Megatron marks
    them ``allreduce=False``) are replicated only on the expert-data-parallel group.
    """
    from megatron.core import parallel_state as ps

    dense_group, dense_n = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
    expert_group = ps.get_expert_data_parallel_group()
    expert_n = dist.get_world_size(expert_group)
    for p in model.parameters():
        if p.grad is None:
            continue
        is_expert = not getattr(p, "allreduce", True)
        group, n = (expert_group, expert_n) if is_expert else (dense_group, dense_n)
        if n > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("megatron-core", "megatron-ep-plugins", "deep_ep", "deep-ep"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolve_device(choice: str, local_world: int, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice == "auto" and torch.cuda.device_count() < local_world:
        return torch.device("cpu")  # NCCL needs one GPU per process
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def train(args: argparse.Namespace) -> int:
    """One rank's job; the process group is already initialised. Returns the exit code."""
    import megatron_ep_plugins as mep
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device_resolved)
    args.ep = args.ep or world

    def say(*a: Any) -> None:
        if rank == 0:
            print(*a, flush=True)

    # The plugin system: select a backend and rebind Megatron's fused_dispatch/fused_combine slot.
    if args.no_install:
        # zero-code activation: MCORE_EP_BACKEND + the .pth hook installed (or not) when Megatron's
        # token_dispatcher was imported; this script calls nothing
        import megatron.core.transformer.moe.token_dispatcher  # noqa: F401 - triggers the hook if armed
        from megatron_ep_plugins.api import installed

        inst = installed()
        say(f"--no-install: MCORE_EP_BACKEND={os.environ.get('MCORE_EP_BACKEND', '(unset)')}; the import hook "
            f"{'installed ' + repr(inst.name) if inst else 'installed nothing'}")
    elif args.backend.strip().lower() in ("off", "none", "0", "false", "disabled"):
        inst = None  # Megatron's own fused_a2a (real DeepEP) stays in place
    else:
        inst = mep.install(args.backend)
    if inst is None:
        say("megatron_ep_plugins: nothing installed (backend off); Megatron's own DeepEP slot is used")
        backend_name = "megatron-native"
    else:
        backend_name = inst.name
        say(f"selected backend: {backend_name}")
        say(inst.choice.summary())

    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 expert_model_parallel_size=args.ep)
    overrides = megatron_device_setup(device, args.seed)
    args.precision_resolved = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    model, config = build_model(args, device, overrides)
    gpt = getattr(model, "module", model)  # the GPTModel inside Float16Module
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))
    say(f"model: GPTModel layers={args.layers} hidden={args.hidden} experts={args.experts} topk={args.topk} "
        f"EP={args.ep} DP={ps.get_data_parallel_world_size()} world={world} device={device} "
        f"precision={args.precision_resolved} "
        f"params/rank={n_params} (expert {n_expert})")
    say(f"dispatcher: {type(gpt.decoder.layers[0].mlp.token_dispatcher).__name__} "
        f"(moe_flex_dispatcher_backend={config.moe_flex_dispatcher_backend!r})")

    if args.precision_resolved == "bf16":
        opt = MasterWeights(model, args.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Each data-parallel rank draws its own batches (the seed differs by DP rank).
    gen = torch.Generator().manual_seed(args.seed * 1000 + ps.get_data_parallel_rank())
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        tokens, pos, mask, labels = synthetic_batch(gen, args, device)
        opt.zero_grad()
        per_token = model(tokens, pos, mask, labels=labels)  # [b, s] cross entropy
        loss = per_token.float().mean()
        loss.backward()  # MoE aux loss gradients are attached inside Megatron's router
        allreduce_grads(model)
        opt.step()
        report = loss.detach().clone()
        dist.all_reduce(report)
        losses.append(report.item() / world)
        say(f"step {step:3d}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f}s)")
    seconds = time.perf_counter() - t0

    from megatron.core.transformer.moe import token_dispatcher as td

    slot = getattr(td.fused_dispatch, "__megatron_ep_backend__", None)
    say(f"token_dispatcher.fused_dispatch served by: {slot or 'Megatron original'}")
    first, last = losses[0], losses[-1]
    fell = last < first * 0.95  # a clear fall, not noise
    say(f"first loss {first:.4f}  last loss {last:.4f}  ({'fell' if fell else 'DID NOT FALL'}) "
        f"in {seconds:.1f}s, {args.steps} steps, backend {backend_name}")
    if rank == 0 and args.json_out:
        record = {
            "backend": backend_name,
            "requested": "(zero-code: MCORE_EP_BACKEND=" + os.environ.get("MCORE_EP_BACKEND", "") + ")"
            if args.no_install else args.backend,
            "losses": losses,
            "steps": args.steps,
            "world_size": world,
            "ep": args.ep,
            "precision": args.precision_resolved,
            "seed": args.seed,
            "sizes": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "experts": args.experts,
                      "topk": args.topk, "seq": args.seq, "micro_batch": args.micro_batch},
            "versions": versions(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "seconds": seconds,
            "installation": inst.as_dict() if inst is not None else None,
        }
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=2, default=str)
        say(f"wrote {args.json_out}")
    ps.destroy_model_parallel()
    mep.uninstall()
    return 0 if fell else 1


def _run_rank(args: argparse.Namespace) -> int:
    """Initialise the process group from the environment, train, shut down cleanly."""
    # Rank 0 prints the backend explanation itself; keep the library's INFO log (the same text) quiet.
    # Set before Megatron is imported, so a zero-code install (MCORE_EP_BACKEND + the .pth hook) and
    # our install() see the same settings (and the second is a no-op).
    os.environ.setdefault("MCORE_EP_LOG", "warning")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(args.device, local_world, local_rank)
    args.device_resolved = str(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned(local_rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(args.nproc))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.nproc))
    code = _run_rank(args)
    if code:
        sys.exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or any launcher)
        return _run_rank(args)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_spawned, args=(args, port), nprocs=args.nproc, join=True)
    except mp.ProcessExitedException as e:
        print(f"train_moe: rank {e.error_index} exited with code {e.exit_code}", file=sys.stderr)
        return e.exit_code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
