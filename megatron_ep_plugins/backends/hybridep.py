"""Backend ``hybridep``: DeepEP's ``HybridEPBuffer`` (branch ``hybrid-ep``) adapted to the token-major contract.

HybridEP's non-permute ``dispatch``/``combine`` differ from the contract in three ways; the adapter bridges
them (tested against a CPU emulator only, never on real HybridEP hardware):

* **Equal token counts.** HybridEP all-gathers routing maps and hangs when ranks pass different T. The
  adapter agrees on the largest T with one ``all_reduce(MAX)`` per dispatch and pads every rank's tokens to
  it; padded rows have an all-False routing map, so they go nowhere and come back as zeros (dropped).
* **No ``-1`` indices.** HybridEP's ``topk_idx`` path scatters the indices (a ``-1`` faults). The adapter
  never passes ``topk_idx``: it builds the ``routing_map [T, E]`` bool / ``probs [T, E]`` fp32 form itself,
  where a ``-1`` entry simply sets nothing.
* **No per-slot routing on the receiving side.** HybridEP returns probs per expert, not the token's top-k
  slots. The adapter appends each token's global expert ids to its row (``int16`` bits viewed as the row's
  2-byte dtype; HybridEP moves rows bit-exactly), so the receiver rebuilds ``recv_topk_idx`` slot by slot;
  weights come from the dispatched probs. The same extra columns ride along (zeros) in combine and cached
  dispatch so the buffer's hidden size never changes.

Buffer: ``max_num_of_tokens_per_rank`` from ``MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK`` or the agreed largest T
rounded up to a multiple of 64 (grown, on every rank together, when a larger T arrives). Only bf16/fp16
tokens (HybridEP moves 2-byte elements); FP8 is not supported by this adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..config import read_int
from ..errors import InvalidInputError
from ..hookspecs import hookimpl
from ..spec import Availability, BackendSpec, Capabilities, DispatchResult
from ._deepep_common import agree_on_inputs, check_dispatch_args, check_handle, probe_deep_ep

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["HybridEPBackend", "HybridEPHandle", "ep_register_backends"]

TOKEN_ALIGNMENT = 64  # Megatron's HYBRIDEP_TOKEN_ALIGNMENT
_ID_COL_ALIGN = 8  # pad the appended id columns to 16 bytes
_MAX_EXPERTS = 32767  # expert ids travel as int16


@dataclass
class HybridEPHandle:
    raw: Any  # HybridEP's handle tuple
    buffer: Any
    topk_idx: "torch.Tensor"  # [T, K] this rank's original global ids (unpadded), for probs' backward
    recv_topk_idx: "torch.Tensor"  # [N, K] local ids, -1 elsewhere
    num_tokens: int  # T on this rank
    padded_tokens: int  # agreed T of the dispatch
    hidden: int
    width: int  # hidden + id columns
    num_experts: int
    prob_offset: int  # first column of this rank's experts in the dispatched probs


class HybridEPBackend:
    """HybridEP behind the :class:`~megatron_ep_plugins.spec.EPBackend` protocol (see module docstring)."""

    name = "hybridep"

    def __init__(self) -> None:
        self._pinned = read_int("MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK", minimum=1)
        import deep_ep

        cls = getattr(deep_ep, "HybridEPBuffer", None)
        if cls is None:
            raise ImportError("deep_ep has no HybridEPBuffer: install DeepEP from its 'hybrid-ep' branch")
        self._HybridEPBuffer = cls
        self.num_sms: Optional[int] = None
        self._buffer = None
        self._shape: Optional[tuple] = None  # (group, max_tokens, width, local_experts)

    def set_num_sms(self, num_sms: int) -> None:
        if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0:
            raise InvalidInputError(f"num_sms={num_sms!r} is invalid: use a positive int")
        self.num_sms = num_sms  # used for the next buffer (HybridEP fixes SM counts at construction)

    def agreement_key(self) -> Mapping[str, Any]:
        return {"algorithm": "deep_ep.HybridEPBuffer", "max_tokens_per_rank": self._pinned, "num_sms": self.num_sms}

    def _get_buffer(self, group, max_tokens: int, width: int, local: int):
        if self._pinned is not None:
            if max_tokens > self._pinned:
                raise InvalidInputError(
                    f"a rank of the group passed {max_tokens} tokens, more than MCORE_EP_HYBRIDEP_MAX_TOKENS_PER_RANK="
                    f"{self._pinned}: raise it or unset it")
            need = self._pinned
        else:
            need = -(-max(max_tokens, 1) // TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT
        if self._shape is not None:
            g, m, w, e = self._shape
            if g is group and m >= need and w == width and e == local:
                return self._buffer
            if g is group:
                need = max(need, m)
        kwargs = {}
        if self.num_sms is not None:
            kwargs = {"num_sms_dispatch_api": self.num_sms, "num_sms_combine_api": self.num_sms}
        self._buffer = self._HybridEPBuffer(group=group, hidden_dim=width, max_num_of_tokens_per_rank=need,
                                            num_local_experts=local, use_fp8=False, **kwargs)
        self._shape = (group, need, width, local)
        return self._buffer

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False) -> DispatchResult:
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(group)
        me = dist.get_rank(group)
        _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world)
        topk_idx = topk_idx.long()
        num_tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        local = num_experts // world
        device = x.device
        max_t = agree_on_inputs(self.name, group, num_tokens, hidden, topk, topk_idx, num_experts, device)
        id_cols = -(-topk // _ID_COL_ALIGN) * _ID_COL_ALIGN
        width = hidden + id_cols
        buffer = self._get_buffer(group, max_t, width, local)

        # pad to the agreed T; masked (-1) and padded entries select no expert
        ids = torch.full((max_t, id_cols), -1, dtype=torch.int16, device=device)
        ids[:num_tokens, :topk] = topk_idx.to(torch.int16)
        rows = torch.zeros(max_t, width, dtype=x.dtype, device=device)
        rows[:num_tokens, :hidden] = x
        rows[:, hidden:] = ids.view(x.dtype)
        valid = topk_idx >= 0
        safe = topk_idx.clamp(min=0)
        # scatter_add_ so that a clamped -1 (adding 0 at column 0) never hides a real entry
        hits = torch.zeros(max_t, num_experts, dtype=torch.int32, device=device)
        hits[:num_tokens].scatter_add_(1, safe, valid.to(torch.int32))
        routing_map = hits > 0
        probs = torch.zeros(max_t, num_experts, dtype=torch.float32, device=device)
        probs[:num_tokens].scatter_add_(1, safe, torch.where(valid, topk_weights, 0.0))

        tokens, dprobs, _, raw = buffer.dispatch(hidden=rows, routing_map=routing_map, probs=probs)
        recv_x = tokens[:, :hidden].contiguous()
        gids = tokens[:, hidden:hidden + topk].contiguous().view(torch.int16).long()
        owned = (gids >= 0) & (gids // local == me)
        recv_idx = torch.where(owned, gids - me * local, -1)
        offset = _prob_offset(buffer, me, local)
        recv_w = torch.where(owned, dprobs.gather(1, offset + recv_idx.clamp(min=0)), 0.0)
        tokens_per_expert = torch.bincount(recv_idx[owned], minlength=local).to(torch.int64).cpu()
        handle = HybridEPHandle(raw, buffer, topk_idx, recv_idx, num_tokens, max_t, hidden, width, num_experts,
                                offset)
        return DispatchResult(recv_x, recv_idx, recv_w, tokens_per_expert, handle)

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        import torch

        h = check_handle(handle, HybridEPHandle, "hybridep")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != (h.num_tokens, h.hidden):
            raise InvalidInputError(f"dispatch with a cached handle expects x of shape [{h.num_tokens}, {h.hidden}], "
                                    f"got {tuple(getattr(x, 'shape', ()))}")
        _check_dtype(x)
        rows = torch.zeros(h.padded_tokens, h.width, dtype=x.dtype, device=x.device)
        rows[:h.num_tokens, :h.hidden] = x
        tokens, _, _, _ = h.buffer.dispatch(hidden=rows, handle=h.raw)
        return tokens[:, :h.hidden].contiguous()

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        import torch

        h = check_handle(handle, HybridEPHandle, "hybridep")
        num_recv = h.recv_topk_idx.shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != num_recv:
            raise InvalidInputError(f"combine expects x of shape [{num_recv}, H] (one row per row dispatch delivered "
                                    f"here, same order), got {tuple(getattr(x, 'shape', ()))}")
        _check_dtype(x)
        rows = torch.zeros(num_recv, h.width, dtype=x.dtype, device=x.device)
        rows[:, :x.shape[1]] = x
        probs = None
        if topk_weights is not None:
            if topk_weights.shape != h.recv_topk_idx.shape:
                raise InvalidInputError(f"combine's topk_weights must have shape {tuple(h.recv_topk_idx.shape)}, "
                                        f"got {tuple(topk_weights.shape)}")
            owned = h.recv_topk_idx >= 0
            width = h.buffer.num_local_experts * _ranks_per_domain(h.buffer)
            probs = torch.zeros(num_recv, width, dtype=torch.float32, device=x.device)
            probs.scatter_add_(1, h.prob_offset + h.recv_topk_idx.clamp(min=0),
                               torch.where(owned, topk_weights.float(), 0.0))
        combined, combined_probs = h.buffer.combine(hidden=rows, probs=probs, handle=h.raw)
        out = combined[:h.num_tokens, :x.shape[1]].contiguous()
        combined_w = None
        if topk_weights is not None:
            valid = h.topk_idx >= 0
            combined_w = torch.where(valid, combined_probs[:h.num_tokens].float().gather(1, h.topk_idx.clamp(min=0)),
                                     0.0)
        return out, combined_w


def _ranks_per_domain(buffer) -> int:
    return int(getattr(buffer, "num_of_hybrid_ep_ranks_per_nvlink_domain", None)
               or getattr(buffer, "num_of_ranks_per_node", None) or buffer.group_size)


def _prob_offset(buffer, rank: int, local: int) -> int:
    """Column of this rank's first expert in HybridEP's dispatched probs ``[N, local * ranks_per_domain]``."""
    local_rank = getattr(buffer, "local_rank", None)
    if local_rank is None:
        local_rank = rank % _ranks_per_domain(buffer)
    return int(local_rank) * local


def _check_dtype(x) -> None:
    import torch

    if x.dtype != torch.bfloat16:
        raise InvalidInputError(f"backend 'hybridep' moves bf16 tokens, got {x.dtype}; cast x to torch.bfloat16")


def _check_dispatch_args(x, topk_idx, topk_weights, num_experts, world) -> None:
    check_dispatch_args("hybridep", x, topk_idx, topk_weights, num_experts, world, fp8=False)
    if num_experts > _MAX_EXPERTS:
        raise InvalidInputError(f"backend 'hybridep': num_experts={num_experts} is above its limit of {_MAX_EXPERTS}")


def _probe() -> Availability:
    facts = probe_deep_ep("HybridEPBuffer", "HybridEP ships in DeepEP's 'hybrid-ep' branch, no wheel",
                          "deep_ep has no HybridEPBuffer: install DeepEP from its 'hybrid-ep' branch",
                          "HybridEP needs an NVIDIA GPU", (8, 0))
    problems, details = facts.problems, facts.details
    if problems:
        return Availability.no("; ".join(problems), **details)
    return Availability.yes(f"deep_ep {details['deep_ep']}: HybridEPBuffer (token-major adapter, padded to equal T)",
                            **details)


@hookimpl
def ep_register_backends():
    return [
        BackendSpec(
            name="hybridep",
            aliases=("hybrid-ep",),
            priority=100,
            factory=HybridEPBackend,
            probe=_probe,
            capabilities=Capabilities(devices=("cuda",), fp8_dispatch=False, uneven_tokens=True, async_overlap=False,
                                      deterministic_order=False, internode=False),
            description="DeepEP HybridEPBuffer (hybrid-ep branch), padded to equal T; emulator-tested only",
        )
    ]
