"""What the emulated DeepEP V2 ``ElasticBuffer`` and V2.5 ``EPBuffer`` share word for word (the two real classes
carry the same code here). CPU TEST DOUBLE: see the package docstring."""

from __future__ import annotations

from .._collective import _align, _gather_objects
from ..utils.event import EventHandle


def v2_buffer_bytes(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int, use_fp8_dispatch: bool,
                    alignment: int) -> int:
    """The emulator's buffer size for V2 and V2.5 (``get_buffer_size_hint`` after its class's asserts): rows of
    hidden x element size plus 16 bytes per top-k slot (32 slots when ``num_topk`` is 0, as csrc/buffers/ep.hpp:260
    says: "we use 32 to calculate token size"), per rank, x4, aligned up to ``alignment``."""
    elem = 1 if use_fp8_dispatch else 2
    raw = group.size() * num_max_tokens_per_rank * (hidden * elem + (num_topk or 32) * 16) * 4
    return _align(max(raw, 1), alignment)


def agree_on_max_tokens(group, num_max_tokens_per_rank: int, what: str) -> None:
    """Collective: every rank must construct with the same ``num_max_tokens_per_rank``; ``what`` ends the error."""
    values = _gather_objects(group, num_max_tokens_per_rank)
    if len(set(values)) != 1:
        raise RuntimeError(f"num_max_tokens_per_rank differs across ranks {values}: all ranks must hold the "
                           f"same value ({what})")


def set_one_domain(buffer) -> None:
    """The domain attributes of a buffer whose ranks all share one NVLink domain (no scale-out)."""
    buffer.num_scaleout_ranks, buffer.num_scaleup_ranks = 1, buffer.num_ranks
    buffer.scaleout_rank_idx, buffer.scaleup_rank_idx = 0, buffer.rank_idx
    buffer.num_rdma_ranks, buffer.num_nvlink_ranks = 1, buffer.num_ranks


class V2RuntimeFacts:
    """Event capture, QP count and domain sizes; the class using it sets ``allow_hybrid_mode``,
    ``num_allocated_qps`` and the domain sizes (:func:`set_one_domain`). Adds only methods the real classes have
    (tests/test_deepep_backends.py compares the attribute sets)."""

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        # mirrors DeepEP deep_ep/buffers/elastic.py:get_theoretical_num_qps (dd758caf) and V2.5 buffers/ep.py:543-560
        # (sgl-deep-ep-v25 0.1.0rc0): the same computation
        num_qps = min(num_sms, 8 + 1)
        if self.allow_hybrid_mode:
            num_qps = num_sms * 16 + 1
        return min(num_qps, self.num_allocated_qps)

    def get_physical_domain_size(self):
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self):
        return self.num_scaleout_ranks, self.num_scaleup_ranks
