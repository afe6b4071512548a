"""What the emulated DeepEP V2 ``ElasticBuffer`` and V2.5 ``EPBuffer`` share word for word (the two real classes
carry the same code here). CPU TEST DOUBLE: see the package docstring."""

from __future__ import annotations

from ..utils.event import EventHandle


class V2RuntimeFacts:
    """Event capture, QP count and domain sizes; the class using it sets ``allow_hybrid_mode``,
    ``num_allocated_qps`` and the four domain sizes in its constructor."""

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
