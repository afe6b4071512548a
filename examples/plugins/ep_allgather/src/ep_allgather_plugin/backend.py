"""The backend of the example plugin: dispatch by all-gather, combine by all-to-all.

Dispatch: every rank all-gathers all tokens (padded to the largest token count) and keeps the rows
that name one of its experts. Combine: each rank sends every source rank its rows back with one
``all_to_all_single``; the source sums them in fp32. Simple, correct on any torch.distributed backend,
and a fair choice for small expert-parallel groups; traffic grows with the group size.

Contract points worth copying: every rank sees every rank's expert ids after the all-gather, so bad ids
raise the same ``InvalidInputError`` on every rank (a rank that raised alone would leave its peers waiting
in the next collective); ``tokens_per_expert`` is a CPU int64 tensor; combine sums in fp32 and casts once.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ep_plugins.errors import InvalidInputError
from megatron_ep_plugins.spec import DispatchResult


@dataclass
class Handle:
    counts: list[int]  # tokens on each source rank
    masks: list  # per source rank: [T_src] bool, rows this rank received
    num_tokens: int
    owned: object  # [N, K] bool: received top-k entries that name an expert of this rank


class AllGatherBackend:
    name = "allgather"

    def set_num_sms(self, num_sms):
        pass  # no kernels of its own

    def agreement_key(self):
        return {"algorithm": "all_gather+all_to_all"}

    def _gather(self, t, counts, group):
        import torch
        import torch.distributed as dist

        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded, group=group)
        return [o[:n] for o, n in zip(out, counts)]

    def dispatch(self, x, topk_idx, topk_weights, num_experts, group, *, async_finish=False,
                 allocate_on_comm_stream=False):
        import torch
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = num_experts // world
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        counts = [int(c) for c in counts]
        xs, idxs, ws = (self._gather(t, counts, group) for t in (x, topk_idx.long(), topk_weights))
        bad = [src for src in range(world) if bool(((idxs[src] < -1) | (idxs[src] >= num_experts)).any())]
        if bad:  # every rank sees the same gathered ids: all raise alike
            raise InvalidInputError(f"expert ids out of range on rank(s) {bad}: topk_idx must be in "
                                    f"[0, {num_experts}) or -1 for a dropped entry")
        rows, ids, weights, masks = [], [], [], []
        for src in range(world):
            mine = (idxs[src] >= rank * local) & (idxs[src] < (rank + 1) * local)
            keep = mine.any(dim=1)
            masks.append(keep)
            rows.append(xs[src][keep])
            ids.append(torch.where(mine, idxs[src] - rank * local, -1)[keep])
            weights.append(torch.where(mine, ws[src], 0.0)[keep])
        recv_idx = torch.cat(ids)
        per_expert = torch.bincount(recv_idx[recv_idx >= 0], minlength=local).cpu()
        return DispatchResult(torch.cat(rows), recv_idx, torch.cat(weights), per_expert,
                              Handle(counts, masks, x.shape[0], recv_idx >= 0))

    def dispatch_cached(self, x, handle, group, *, async_finish=False, allocate_on_comm_stream=False):
        import torch

        xs = self._gather(x, handle.counts, group)
        return torch.cat([xs[s][m] for s, m in enumerate(handle.masks)])

    def _return_rows(self, y, handle, group):
        """Scatter received rows back to their source ranks; returns this rank's fp32 sum [T, ...]."""
        import torch
        import torch.distributed as dist

        send, start = [], 0
        for src, mask in enumerate(handle.masks):
            n = int(mask.sum())
            buf = y.new_zeros((handle.counts[src], *y.shape[1:]), dtype=torch.float32)
            buf[mask] = y[start:start + n].float()
            send.append(buf)
            start += n
        world = len(handle.masks)
        recv = y.new_empty((world * handle.num_tokens, *y.shape[1:]), dtype=torch.float32)
        dist.all_to_all_single(recv, torch.cat(send), [handle.num_tokens] * world, handle.counts, group=group)
        return recv.view(world, handle.num_tokens, *y.shape[1:]).sum(0)

    def combine(self, x, handle, group, *, topk_weights=None, async_finish=False, allocate_on_comm_stream=False):
        out = self._return_rows(x, handle, group).to(x.dtype)
        weights = None
        if topk_weights is not None:  # each entry comes back from the one rank that owns its expert
            weights = self._return_rows(topk_weights.float() * handle.owned, handle, group)
        return out, weights
