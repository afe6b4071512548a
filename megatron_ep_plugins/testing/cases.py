"""Conformance cases: a frozen description of one dispatch/combine round on every rank, and its inputs.

A :class:`Case` names everything (group size, tokens per rank, shapes, seed, masking, flags); every rank
rebuilds *every* rank's inputs from it (:func:`rank_inputs`), so each rank can compute what it must
receive without any communication. The named scenarios (:func:`scenarios`) cover the contract's corners;
:func:`case_strategy` draws random ones with hypothesis (imported only when called).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Case", "Inputs", "Shape", "case_strategy", "rank_inputs", "scenarios"]

_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Shape:
    """What the kit may vary, within what a backend accepts (``--ep-hidden`` etc.)."""

    hidden: tuple[int, ...] = (256,)
    experts_per_rank: tuple[int, ...] = (2, 4)
    max_topk: int = 8
    max_tokens: int = 48
    dtypes: tuple[str, ...] = ("bfloat16",)
    uneven_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive ints, got {self.hidden}")
        if not self.experts_per_rank or any(e < 1 for e in self.experts_per_rank):
            raise ValueError(f"experts per rank must be positive ints, got {self.experts_per_rank}")
        if self.max_topk < 1 or self.max_tokens < 1:
            raise ValueError(f"max top-k and max tokens must be >= 1, got {self.max_topk}, {self.max_tokens}")
        bad = [d for d in self.dtypes if d not in _DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"dtypes must be among {list(_DTYPES)}, got {list(self.dtypes)}")


@dataclass(frozen=True)
class Case:
    """One round: dispatch, expert, combine, backward, cached dispatch, on ``world`` ranks.

    ``mask``: fraction of top-k entries set to -1 (dropped); ``nowhere``: also route every 4th token
    nowhere (all -1). ``bad``: ``(rank, value)`` puts one out-of-range id on that rank; the round must
    then raise :class:`~megatron_ep_plugins.errors.InvalidInputError` on every rank.
    """

    world: int
    tokens: tuple[int, ...]
    hidden: int
    topk: int
    experts_per_rank: int
    seed: int = 0
    mask: float = 0.0
    nowhere: bool = False
    dtype: str = "bfloat16"
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    bad: Optional[tuple[int, int]] = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != self.world:
            raise ValueError(f"case {self.name!r}: {len(self.tokens)} token counts for {self.world} ranks")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"case {self.name!r}: top-k {self.topk} not in [1, {self.num_experts}]")

    @property
    def num_experts(self) -> int:
        return self.world * self.experts_per_rank

    def describe(self) -> str:
        flags = [f for f, on in (("async_finish", self.async_finish),
                                 ("allocate_on_comm_stream", self.allocate_on_comm_stream), ("nowhere", self.nowhere))
                 if on]
        bad = f", bad id {self.bad[1]} on rank {self.bad[0]}" if self.bad else ""
        return (f"{self.name or 'case'}: {self.world} ranks, T={list(self.tokens)}, H={self.hidden}, K={self.topk}, "
                f"E={self.num_experts}, {self.dtype}, mask {self.mask:g}, seed {self.seed}"
                f"{', ' + ', '.join(flags) if flags else ''}{bad}")


@dataclass
class Inputs:
    """One rank's tensors for a case (on the CPU; the runner moves them)."""

    x: "torch.Tensor"  # [T, H] dtype
    idx: "torch.Tensor"  # [T, K] int64 global expert ids, -1 = masked
    weights: "torch.Tensor"  # [T, K] float32
    grad: "torch.Tensor"  # [T, H] float32: d loss / d combined
    cached: "torch.Tensor"  # [T, H] dtype: what the cached dispatch sends


def rank_inputs(case: Case, rank: int) -> Inputs:
    """The inputs of ``rank`` in ``case``, identical wherever they are computed."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.seed}/{rank}/{case.world}".encode()))
    tokens, hidden, topk, experts = case.tokens[rank], case.hidden, case.topk, case.num_experts
    dtype = getattr(torch, case.dtype)
    # rows spanning several exponents, so sums round and a wrong order or scale shows
    scale = torch.logspace(-2, 2, 9)[torch.randint(0, 9, (tokens, 1), generator=gen)]
    x = (torch.randn(tokens, hidden, generator=gen) * scale).to(dtype)
    idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices  # distinct, as a router's
    if case.mask > 0:
        idx[torch.rand(tokens, topk, generator=gen) < case.mask] = -1
    if case.nowhere:
        idx[::4] = -1
    weights = torch.rand(tokens, topk, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen)
    cached = torch.randn(tokens, hidden, generator=gen).to(dtype)
    if case.bad is not None and case.bad[0] == rank:
        if tokens == 0:
            raise ValueError(f"case {case.name!r}: the bad id needs a token on rank {rank}")
        idx[tokens // 2, topk - 1] = case.bad[1]
    return Inputs(x, idx, weights, grad, cached)


def scenarios(world: int, shape: Shape) -> list[Case]:
    """The named corners of the contract, sized within ``shape``."""
    hidden, per_rank = shape.hidden[0], shape.experts_per_rank[0]
    experts = world * per_rank
    k2 = min(2, experts, shape.max_topk)
    t = min(shape.max_tokens, 24)
    uneven = tuple(max(1, t - 5 * r) for r in range(world)) if shape.uneven_tokens else (t,) * world
    dtype = shape.dtypes[0]
    base = dict(world=world, hidden=hidden, experts_per_rank=per_rank, dtype=dtype)
    out = [
        Case(tokens=uneven, topk=k2, mask=0.3, nowhere=True, seed=1, name="uneven_tokens_masks", **base),
        Case(tokens=(t,) * world, topk=1, seed=2, name="top1", **base),
        Case(tokens=(t,) * world, topk=min(experts, shape.max_topk), seed=3, name="topk_max", **base),
        Case(tokens=(t,) * world, topk=k2, mask=1.0, seed=4, name="all_masked", **base),
        Case(tokens=(t,) * world, topk=k2, seed=5, async_finish=True, allocate_on_comm_stream=True,
             name="async_flags", **base),
    ]
    if shape.uneven_tokens:
        out.append(Case(tokens=tuple(0 if r == world - 1 else t for r in range(world)), topk=k2, mask=0.2, seed=6,
                        name="zero_tokens_on_one_rank", **base))
        out.append(Case(tokens=(0,) * world, topk=k2, seed=7, name="zero_tokens_everywhere", **base))
    if len(shape.hidden) > 1 or len(shape.experts_per_rank) > 1:
        out.append(Case(tokens=(t,) * world, topk=k2, seed=8, name="other_sizes",
                        **(base | dict(hidden=shape.hidden[-1], experts_per_rank=shape.experts_per_rank[-1]))))
    for extra_dtype in shape.dtypes[1:]:
        out.append(Case(tokens=uneven, topk=k2, mask=0.2, seed=9, name=f"dtype_{extra_dtype}",
                        **(base | dict(dtype=extra_dtype))))
    return out


def bad_id_cases(world: int, shape: Shape) -> list[Case]:
    """Out-of-range ids on one rank (the last): every rank must raise InvalidInputError."""
    good = scenarios(world, shape)[1]
    experts = good.num_experts
    return [replace(good, bad=(world - 1, experts), seed=11, name="bad_id_too_large"),
            replace(good, bad=(world - 1, -2), seed=12, name="bad_id_below_minus_one")]


def case_strategy(world: int, shape: Shape) -> Any:
    """A hypothesis strategy of random (valid) cases on ``world`` ranks within ``shape``."""
    from hypothesis import strategies as st

    @st.composite
    def draw_case(draw) -> Case:
        per_rank = draw(st.sampled_from(shape.experts_per_rank))
        experts = world * per_rank
        if shape.uneven_tokens:
            tokens = tuple(draw(st.lists(st.integers(0, shape.max_tokens), min_size=world, max_size=world)))
        else:
            tokens = (draw(st.integers(0, shape.max_tokens)),) * world
        return Case(
            world=world,
            tokens=tokens,
            hidden=draw(st.sampled_from(shape.hidden)),
            topk=draw(st.integers(1, min(experts, shape.max_topk))),
            experts_per_rank=per_rank,
            seed=draw(st.integers(0, 2 ** 31 - 1)),
            mask=draw(st.sampled_from((0.0, 0.0, 0.1, 0.5, 1.0))),
            nowhere=draw(st.booleans()),
            dtype=draw(st.sampled_from(shape.dtypes)),
            async_finish=draw(st.booleans()),
            allocate_on_comm_stream=draw(st.booleans()),
            name="random",
        )

    return draw_case()
