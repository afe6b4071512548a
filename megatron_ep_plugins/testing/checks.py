"""The rank side of the kit: run one case through a backend and compare everything with the oracle.

Runs inside the kit's rank processes (:mod:`.pool`); each function returns plain data (lists of failure
texts) to the parent. A backend is created once per rank and backend name, like a training job keeps its
backend; ``fresh=True`` creates a new one (a group's first dispatch, where every backend must check ids).
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

from .cases import Case, rank_inputs
from .oracle import expect, expert, probe_weights, rounded_sum_error, row_keys

__all__ = ["run_bad_case", "run_case"]

_BACKENDS: dict[tuple[str, bool], Any] = {}


def _backend(name: str, fresh: bool):
    """``(backend, slot)`` for ``name``; ``fresh`` replaces the previous fresh one."""
    key = (name, fresh)
    if fresh or key not in _BACKENDS:
        from ..autograd import build_slot
        from ..config import load_settings
        from ..manager import discover

        spec = discover(load_settings()).lookup(name)
        if spec is None:
            raise LookupError(f"backend {name!r} is not registered in this rank process")
        backend = spec.factory()
        if getattr(backend, "name", None) != spec.name:
            backend.name = spec.name
        old = _BACKENDS.pop(key, None)
        if old is not None and hasattr(old[0], "close"):
            old[0].close()
        _BACKENDS[key] = (backend, build_slot(backend))
    return _BACKENDS[key]


def _device(device: str) -> Any:
    import torch

    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe_rows(sources: list, keys_exp: list, keys_got: list, limit: int = 4) -> str:
    """Which expected rows are missing / which received rows are unexpected (by source rank and token)."""
    by_key: dict = {}
    for src, key in zip(sources, keys_exp):
        by_key.setdefault(key[0], []).append((src, key))
    missing = Counter(keys_exp) - Counter(keys_got)
    extra = Counter(keys_got) - Counter(keys_exp)
    parts = []
    for key in list(missing)[:limit]:
        src = next((s for s, k in by_key.get(key[0], []) if k == key), None)
        parts.append(f"missing the row of source rank {src[0]} token {src[1]}" if src else "a row is missing")
    for key in list(extra)[:limit]:
        same_row = by_key.get(key[0])
        if same_row:
            (s, t), k = same_row[0]
            what = "ids" if k[1] != key[1] else "weights"
            parts.append(f"the row of source rank {s} token {t} came with wrong {what}: local ids {list(key[1])}, "
                         f"expected {list(k[1])}")
        else:
            parts.append("a received row matches no source token (wrong contents)")
    n_missing, n_extra = sum(missing.values()), sum(extra.values())
    return f"{n_missing} expected row(s) not received, {n_extra} unexpected; " + "; ".join(parts)


def _grad(t):
    return None if t is None else t.detach().cpu()


def run_case(case: Case, name: str, device: str = "cpu", fresh: bool = False) -> dict:
    """One round on this rank; returns ``{"failures": [...], "raised": bool}``."""
    try:
        return {"failures": _run_case(case, name, device, fresh), "raised": False}
    except Exception as exc:  # noqa: BLE001 - reported to the parent (on every rank, or the others hang)
        return {"failures": [f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"],
                "raised": True}


def _run_case(case: Case, name: str, device: str, fresh: bool) -> list[str]:
    import torch
    import torch.distributed as dist

    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world != case.world:
        raise ValueError(f"case for {case.world} ranks run on {world}")
    backend, slot = _backend(name, fresh)
    dev = _device(device)
    inputs = [rank_inputs(case, r) for r in range(world)]
    exp = expect(case, rank, inputs)
    mine = inputs[rank]
    flags = dict(async_finish=case.async_finish, allocate_on_comm_stream=case.allocate_on_comm_stream)
    failures: list[str] = []

    # -- dispatch, expert, combine and backward, through the slot Megatron calls ---------------------------
    x = mine.x.to(dev).requires_grad_(True)
    probs = mine.weights.to(dev).requires_grad_(True)
    idx = mine.idx.to(dev)
    recv_x, recv_idx, recv_w, tpe, handle = slot.fused_dispatch(x, idx, probs, case.num_experts, group, **flags)
    n = exp.rows.shape[0]
    shapes_ok = (isinstance(recv_x, torch.Tensor) and recv_x.dim() == 2 and recv_x.shape[1] == case.hidden
                 and recv_idx.shape == (recv_x.shape[0], case.topk) and recv_w.shape == recv_idx.shape)
    if not shapes_ok:
        failures.append(f"dispatch: shapes recv_x {tuple(getattr(recv_x, 'shape', ()))}, recv_topk_idx "
                        f"{tuple(recv_idx.shape)}, recv_topk_weights {tuple(recv_w.shape)}; expected [{n}, "
                        f"{case.hidden}], [{n}, {case.topk}], [{n}, {case.topk}]")
    else:
        if recv_x.dtype != x.dtype:
            failures.append(f"dispatch: recv_x has dtype {recv_x.dtype}, the input {x.dtype}")
        if recv_idx.dtype != torch.int64 or recv_w.dtype != torch.float32:
            failures.append(f"dispatch: recv_topk_idx must be int64 and recv_topk_weights float32, got "
                            f"{recv_idx.dtype} and {recv_w.dtype}")
        keys = row_keys(recv_x, recv_idx, recv_w)
        if Counter(keys) != Counter(exp.keys):
            failures.append(f"dispatch rows: received {len(keys)} rows, expected {n}: "
                            + _describe_rows(exp.sources, exp.keys, keys))
    if not isinstance(tpe, torch.Tensor) or tpe.device.type != "cpu" or tpe.dtype != torch.int64:
        failures.append(f"tokens_per_expert must be a CPU int64 tensor, got {getattr(tpe, 'device', type(tpe))} "
                        f"{getattr(tpe, 'dtype', '')}")
    elif not torch.equal(tpe.flatten(), exp.tokens_per_expert):
        failures.append(f"tokens_per_expert: got {tpe.tolist()}, expected {exp.tokens_per_expert.tolist()}")
    if not _agree(not failures, dev):
        return failures  # the rest compares values derived from these rows (every rank stops here together)

    y = expert(rank, recv_x, recv_idx, recv_w)
    combined, _ = slot.fused_combine(y, group, handle, **flags)
    if tuple(combined.shape) != (mine.x.shape[0], case.hidden) or combined.dtype != x.dtype:
        failures.append(f"combine: got {tuple(combined.shape)} {combined.dtype}, expected "
                        f"({mine.x.shape[0]}, {case.hidden}) {x.dtype}")
    if not _agree(not failures, dev):
        return failures
    excess, where = rounded_sum_error(combined, exp.combined32, exp.combined_abs)
    if excess > 0:
        failures.append(f"combine: not the fp32 sum of the returned rows rounded once ({where})")
    (combined.float() * mine.grad.to(dev)).sum().backward()
    if x.grad is None or probs.grad is None:
        failures.append(f"autograd: no gradient reached {'x' if x.grad is None else 'probs'}")
    else:
        excess, where = rounded_sum_error(x.grad, exp.grad_x32, exp.grad_x_abs)
        if excess > 0:
            failures.append(f"autograd: x.grad is not the sum of the gradient rows ({where})")
        gw = probs.grad.detach().cpu().float()
        if gw.shape != exp.grad_w.shape:
            failures.append(f"autograd: probs.grad has shape {tuple(gw.shape)}, expected {tuple(exp.grad_w.shape)}")
            return failures
        bad = (gw - exp.grad_w).abs() > 1e-4 * exp.grad_w_abs + 1e-30  # fp32 dot products in any order
        if bad.any():
            failures.append(f"autograd: probs.grad differs from the expected one at {int(bad.sum())} entries "
                            f"(got {gw[bad][:4].tolist()}, expected {exp.grad_w[bad][:4].tolist()})")

    # -- combine with topk_weights (dispatch's backward) straight on the backend: garbage where not owned ------
    with torch.no_grad():
        _, back_w = backend.combine(y.detach(), handle, group, topk_weights=probe_weights(rank, recv_idx), **flags)
        if back_w is None or tuple(back_w.shape) != tuple(exp.weights_back.shape):
            failures.append(f"combine(topk_weights=...): got {None if back_w is None else tuple(back_w.shape)}, "
                            f"expected [{mine.x.shape[0]}, {case.topk}] float32")
        else:
            routed = mine.idx >= 0
            got_w = back_w.detach().cpu().float()
            if not torch.equal(got_w[routed], exp.weights_back[routed]):
                failures.append("combine(topk_weights=...): each routed entry must come back from the rank owning "
                                f"its expert: got {got_w[routed][:6].tolist()}, expected "
                                f"{exp.weights_back[routed][:6].tolist()} (1e6 = a non-owning rank's slot leaked)")

        # -- cached dispatch: the same routing moves other rows ------------------------------------------------
        cached = backend.dispatch_cached(mine.cached.to(dev), handle, group, **flags)
        if tuple(cached.shape) != tuple(exp.cached_rows.shape):
            failures.append(f"dispatch_cached: got {tuple(cached.shape)}, expected {tuple(exp.cached_rows.shape)}")
        else:
            # rows of the cached dispatch arrive in the order of the dispatch's rows
            order = _match(row_keys(recv_x, recv_idx, recv_w), exp.keys)
            expected = exp.cached_rows[order] if order is not None else None
            if expected is None or not torch.equal(cached.cpu().view(torch.uint8) if cached.numel() else cached.cpu(),
                                                   expected.view(torch.uint8) if expected.numel() else expected):
                failures.append("dispatch_cached: rows differ from the cached inputs of the tokens dispatch delivered "
                                "in that position")
    return failures


def _agree(ok: bool, device) -> bool:
    """True when every rank is ``ok`` (the kit's own collective: all ranks go on, or all stop, together)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _match(got_keys: list, exp_keys: list):
    """Indices into the expected rows, in the received order (None when the multisets differ)."""
    import torch

    slots: dict = {}
    for i, k in enumerate(exp_keys):
        slots.setdefault(k, []).append(i)
    out = []
    for k in got_keys:
        if not slots.get(k):
            return None
        out.append(slots[k].pop())
    return torch.tensor(out, dtype=torch.long)


def run_bad_case(case: Case, name: str, device: str = "cpu") -> dict:
    """Dispatch with an out-of-range id on one rank, on a fresh backend: returns what was raised, if anything."""
    import torch.distributed as dist

    from ..errors import InvalidInputError

    group = dist.group.WORLD
    rank = dist.get_rank(group)
    _, slot = _backend(name, fresh=True)
    dev = _device(device)
    mine = rank_inputs(case, rank)
    try:
        slot.fused_dispatch(mine.x.to(dev), mine.idx.to(dev), mine.weights.to(dev), case.num_experts, group)
    except InvalidInputError as exc:
        return {"raised": "InvalidInputError", "message": str(exc), "failures": [], "raised_any": True}
    except Exception as exc:  # noqa: BLE001
        return {"raised": type(exc).__name__, "message": str(exc), "raised_any": True,
                "failures": [f"raised {type(exc).__name__} instead of InvalidInputError: {exc}"]}
    return {"raised": None, "message": "", "raised_any": False,
            "failures": [f"dispatch accepted expert id {case.bad[1]} (valid: 0..{case.num_experts - 1} or -1) "
                         f"passed on rank {case.bad[0]}"]}
