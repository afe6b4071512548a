"""Combine's sum of a token's two returned rows in one pass over memory (CUDA, a Triton kernel).

The ``torch`` backend's combine sums, for every token, the (at most two) rows the destination ranks sent
back. In eager torch that is a gather of both rows side by side (``index_select``: reads 2 rows, writes 2)
and an add of the two halves (reads 2, writes 1): seven row-sized passes over memory, 67 + 82 us at T=4096
H=7168 bf16 on H200 (``benchmarks/results/2xH200/``), a third of the combine. :func:`pair_sum` reads the two
rows once and writes the sum once (three passes), with the same arithmetic: both values converted to fp32,
added, rounded once to the input dtype (round to nearest even), which is what ``torch.add`` of two bf16/fp16
tensors computes, bit for bit.

Triton ships with torch's CUDA builds; it is imported on the first call, never at import time. When it is
missing or the kernel cannot be built, :func:`pair_sum` returns ``None`` (logged once) and the caller keeps
the eager gather + add.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger("megatron_ep_plugins")

__all__ = ["pair_sum"]

_BLOCK = 1024  # columns per program: 2 KiB of bf16 per row load, coalesced
_state: dict = {}  # "kernel": the jitted kernel, or None once building it failed


def _kernel() -> Optional[Any]:
    if "kernel" in _state:
        return _state["kernel"]
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _pair_sum_kernel(back, bags, out, hidden, BLOCK: tl.constexpr):
            token = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            mask = cols < hidden
            first = tl.load(bags + 2 * token).to(tl.int64)
            second = tl.load(bags + 2 * token + 1).to(tl.int64)
            a = tl.load(back + first * hidden + cols, mask=mask).to(tl.float32)
            b = tl.load(back + second * hidden + cols, mask=mask).to(tl.float32)
            # fp32 -> bf16/fp16 is LLVM's fptrunc: round to nearest even on the GPU, as torch.add rounds. (Triton's
            # CPU interpreter truncates fp32 -> bf16 instead, triton/runtime/interpreter.py cast_impl, so CPU tests
            # check the kernel's bits in fp16/fp32 and the GPU test in bf16.)
            tl.store(out + token * hidden + cols, (a + b).to(out.dtype.element_ty), mask=mask)

        _state["kernel"] = (_pair_sum_kernel, triton.cdiv)
    except Exception as exc:  # ImportError, or a Triton too old for this syntax
        log.warning("backend 'torch': no one-pass combine sum (%s: %s); combine gathers and adds in two steps",
                    type(exc).__name__, exc)
        _state["kernel"] = None
    return _state["kernel"]


def pair_sum(back, bags) -> Optional[Any]:
    """``back[bags[:, 0]] + back[bags[:, 1]]`` (fp32 add, one rounding to ``back.dtype``) in one kernel, or ``None``
    when no kernel is available (then the caller computes it eagerly).

    ``back``: contiguous ``[rows, H]`` CUDA tensor (bf16, fp16 or fp32); ``bags``: contiguous ``[T, 2]`` int64 row
    indices into ``back``, all in range (the caller built them). Returns a new ``[T, H]`` tensor.

    Example (what ``torch``'s combine does on CUDA with two ranks)::

        combined = pair_sum(back, bags)
        if combined is None:
            both = back.index_select(0, bags.view(-1)).view(-1, 2, back.shape[1])
            combined = torch.add(both[:, 0], both[:, 1])
    """
    entry = _kernel()
    if entry is None:
        return None
    kernel, cdiv = entry
    num_tokens, hidden = bags.shape[0], back.shape[1]
    out = back.new_empty(num_tokens, hidden)
    if num_tokens and hidden:
        try:
            kernel[(num_tokens, cdiv(hidden, _BLOCK))](back, bags, out, hidden, BLOCK=_BLOCK)
        except Exception as exc:  # compile failure on this machine (no ptxas, unsupported arch): fall back for good
            log.warning("backend 'torch': the one-pass combine sum failed to build (%s: %s); combine gathers and "
                        "adds in two steps from now on", type(exc).__name__, exc)
            _state["kernel"] = None
            return None
    return out
