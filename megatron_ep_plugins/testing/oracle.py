"""What one rank must see in a conformance round, computed from every rank's inputs on that rank alone.

The contract (``EPBackend`` in :mod:`megatron_ep_plugins.spec`): dispatch delivers each source token once to
every rank that owns at least one of its top-k experts (``owner = id // experts_per_rank``, ``-1`` = dropped),
with the local expert ids (``id - owner * experts_per_rank``, ``-1`` where the expert lives elsewhere) and the
weights of the entries that rank owns; ``tokens_per_expert`` counts owned entries per local expert. Combine
returns, per source token, the fp32 sum of the rows its destinations send back, cast once to the dtype.

The kit's "expert" on rank ``d`` multiplies a received row by ``f = (d + 1) * (1 + s)``, ``s`` = the sum of
the row's owned weights; it depends only on the row and its metadata, so any row order gives the same result.
Gradients below are those of ``loss = sum(combined.float() * grad)`` through that expert.

Written as plain per-source-rank selections, independent of every backend's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cases import Case, Inputs

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Expected", "expect", "expert", "expert_factor", "row_keys"]


def expert_factor(rank: int, local_idx: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """``[N, 1]`` fp32 ``(rank + 1) * (1 + sum of owned weights)``."""
    import torch

    owned = torch.where(local_idx >= 0, weights.float(), torch.zeros((), device=weights.device))
    # summed in ascending order: the same bits whatever the entries' positions in the row (the contract fixes a
    # row's (id, weight) pairs, not where they sit: nccl.ep packs them, DeepEP keeps the source's slots)
    return (rank + 1) * (1 + owned.sort(dim=1).values.sum(dim=1, keepdim=True))


def expert(rank: int, rows: "torch.Tensor", local_idx: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """The kit's expert: ``(rows.float() * f).to(rows.dtype)`` (differentiable in ``rows`` and ``weights``)."""
    return (rows.float() * expert_factor(rank, local_idx, weights)).to(rows.dtype)


def row_keys(rows: "torch.Tensor", local_idx: "torch.Tensor", weights: "torch.Tensor") -> list[tuple]:
    """One hashable key per received row: its bytes, its (local id, owned weight bits) pairs in canonical order."""
    import torch

    from .reference import canonical_topk

    rows = rows.detach().cpu().contiguous()
    local_idx, weights = canonical_topk(local_idx.detach(), weights.detach())  # positions within a row are free
    w_bits = weights.view(torch.int32)
    raw = rows.view(torch.uint8).reshape(rows.shape[0], -1).numpy() if rows.numel() else None
    ids, bits = local_idx.tolist(), w_bits.tolist()
    return [(raw[i].tobytes() if raw is not None else b"", tuple(ids[i]), tuple(bits[i])) for i in range(rows.shape[0])]


@dataclass
class Expected:
    """What rank ``rank`` must receive and get back (CPU tensors)."""

    rank: int
    sources: list[tuple[int, int]]  # (source rank, source token) of every row to receive
    keys: list[tuple]  # row_keys of those rows, same order
    rows: "torch.Tensor"  # [N, H]
    local_idx: "torch.Tensor"  # [N, K]
    weights: "torch.Tensor"  # [N, K] (0 where not owned)
    tokens_per_expert: "torch.Tensor"  # [L] int64
    cached_rows: "torch.Tensor"  # [N, H] rows of the cached dispatch, same order
    combined32: "torch.Tensor"  # [T, H] fp32 sum over destinations (before the cast)
    combined_abs: "torch.Tensor"  # [T, H] sum of |terms| (bounds fp32 reordering error)
    weights_back: "torch.Tensor"  # [T, K] what combine(topk_weights=...) must return for the probe weights
    grad_x32: "torch.Tensor"  # [T, H] fp32 sum of the gradient rows
    grad_x_abs: "torch.Tensor"
    grad_w: "torch.Tensor"  # [T, K] fp32
    grad_w_abs: "torch.Tensor"


def probe_weights(rank: int, local_idx: "torch.Tensor") -> "torch.Tensor":
    """The ``topk_weights`` each destination passes to a direct ``combine``: a value naming (rank, local expert)
    where it owns the entry, and 1e6 (garbage that must be ignored) where it does not."""
    import torch

    named = (rank + 1) * 10000.0 + local_idx.float()  # names (rank, local expert): exact in fp32, any position
    return torch.where(local_idx >= 0, named, torch.full((), 1e6, device=local_idx.device))


def expect(case: Case, rank: int, inputs: list[Inputs]) -> Expected:
    import torch

    per_rank = case.experts_per_rank
    dtype = getattr(torch, case.dtype)
    sources, rows, local, weights, cached = [], [], [], [], []
    counts = torch.zeros(per_rank, dtype=torch.int64)
    for src, inp in enumerate(inputs):
        idx = inp.idx
        owner = torch.where(idx >= 0, torch.div(idx, per_rank, rounding_mode="floor"), -1)
        mine = owner == rank
        take = mine.any(dim=1)
        tokens = take.nonzero().flatten().tolist()
        sources += [(src, t) for t in tokens]
        rows.append(inp.x[take])
        local.append(torch.where(mine, idx - rank * per_rank, -1)[take])
        weights.append(torch.where(mine, inp.weights, 0.0)[take])
        cached.append(inp.cached[take])
        counts += torch.bincount((idx[mine] - rank * per_rank).flatten(), minlength=per_rank)
    rows_t, local_t, weights_t = torch.cat(rows), torch.cat(local), torch.cat(weights)

    # what comes back to this rank's own tokens from each destination d
    mine_in = inputs[rank]
    tokens, hidden, topk = mine_in.x.shape[0], case.hidden, case.topk
    owner = torch.where(mine_in.idx >= 0, torch.div(mine_in.idx, per_rank, rounding_mode="floor"), -1)
    combined = torch.zeros(tokens, hidden)
    combined_abs = torch.zeros(tokens, hidden)
    grad_x = torch.zeros(tokens, hidden)
    grad_x_abs = torch.zeros(tokens, hidden)
    grad_w = torch.zeros(tokens, topk)
    grad_w_abs = torch.zeros(tokens, topk)
    weights_back = torch.zeros(tokens, topk)
    g = mine_in.grad.to(dtype).float()  # the cast backward of combined.float()
    for d in range(case.world):
        owned = owner == d
        sent = owned.any(dim=1, keepdim=True)
        loc = torch.where(owned, mine_in.idx - d * per_rank, -1)
        f = expert_factor(d, loc, mine_in.weights)
        y = (mine_in.x.float() * f).to(dtype).float() * sent
        combined += y
        combined_abs += y.abs()
        gy = (g * f).to(dtype).float() * sent
        grad_x += gy
        grad_x_abs += gy.abs()
        dot = (g * mine_in.x.float()).sum(dim=1, keepdim=True)
        dot_abs = (g * mine_in.x.float()).abs().sum(dim=1, keepdim=True)
        grad_w += torch.where(owned, (d + 1) * dot, 0.0)
        grad_w_abs += torch.where(owned, (d + 1) * dot_abs, 0.0)
        weights_back += torch.where(owned, probe_weights(d, loc), 0.0)
    return Expected(rank, sources, row_keys(rows_t, local_t, weights_t), rows_t, local_t, weights_t, counts,
                    torch.cat(cached), combined, combined_abs, weights_back, grad_x, grad_x_abs, grad_w, grad_w_abs)


def ulp_half(value32: "torch.Tensor", dtype) -> "torch.Tensor":
    """Half a unit in the last place of ``dtype`` at ``value32`` (the larger of the two neighbours' gaps)."""
    import torch

    a = value32.to(dtype)
    up = torch.nextafter(a, torch.full_like(a, float("inf"))).float() - a.float()
    down = a.float() - torch.nextafter(a, torch.full_like(a, float("-inf"))).float()
    return torch.maximum(up, down).nan_to_num(posinf=float("inf")) / 2


def rounded_sum_error(got: "torch.Tensor", exact32: "torch.Tensor", abs_sum: "torch.Tensor") -> tuple[float, str]:
    """Worst excess of ``|got - exact32|`` over what "fp32 sum in any order, one rounding to got.dtype" allows
    (half an ulp of the dtype plus the fp32 reordering bound); ``<= 0`` passes. Also the worst element's text."""
    import torch

    if got.numel() == 0:
        return 0.0, ""
    g = got.detach().cpu().float()
    allowed = ulp_half(exact32, got.dtype) + 8 * torch.finfo(torch.float32).eps * abs_sum + 1e-30
    excess = (g - exact32).abs() - allowed
    excess = torch.where(torch.isnan(g) | torch.isnan(excess), torch.full_like(excess, float("inf")), excess)
    worst = int(excess.flatten().argmax())
    row, col = divmod(worst, g.shape[1])
    text = (f"token {row}, column {col}: got {g[row, col].item():.9g}, expected {exact32[row, col].item():.9g} "
            f"(tolerance {allowed[row, col].item():.3g})")
    return float(excess.flatten()[worst]), text
