"""Single-process oracle of the dispatch/combine contract (docs/backend-contract.md), for tests only.

Written as loops over tokens, independent of every backend's vectorised code.
"""

from __future__ import annotations

import torch


def oracle_dispatch(xs, idxs, ws, num_experts):
    """All ranks' inputs -> per destination rank: list of (src_rank, src_token, row, local_idx, weights)."""
    world = len(xs)
    local = num_experts // world
    out = {d: [] for d in range(world)}
    counts = {d: torch.zeros(local, dtype=torch.int64) for d in range(world)}
    for src in range(world):
        for t in range(xs[src].shape[0]):
            ids = idxs[src][t].tolist()
            for d in range(world):
                owned = [e - d * local if e >= 0 and e // local == d else -1 for e in ids]
                if any(o >= 0 for o in owned):
                    w = torch.tensor([ws[src][t, k].item() if owned[k] >= 0 else 0.0 for k in range(len(ids))])
                    out[d].append((src, t, xs[src][t], torch.tensor(owned), w))
                    for o in owned:
                        if o >= 0:
                            counts[d][o] += 1
    return out, counts


def oracle_combine(ys_by_dest, rows_by_dest, shapes, dtype):
    """Rows returned per destination (aligned with rows_by_dest) -> per source rank [T, H] sums."""
    outs = [torch.zeros(shape, dtype=torch.float32) for shape in shapes]
    for d, rows in rows_by_dest.items():
        for (src, t, *_), y in zip(rows, ys_by_dest[d]):
            outs[src][t] += y.float()
    return [o.to(dtype) for o in outs]
