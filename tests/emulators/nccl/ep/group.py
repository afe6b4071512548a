"""Mirror of nccl-extensions 0.1.0 ``nccl/ep/group.py`` (``GroupConfig``, ``Group``) and
``nccl/ep/allocator.py`` (``AllocConfig``): same fields, defaults and signatures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nccl.core.cuda import get_stream_ptr
from nccl.core.typing import NcclInvalid
from nccl.ep import _library
from nccl.ep.enums import Algorithm, Layout, OverflowPolicy, ZeroCopyMode
from nccl.ep.handle import Handle, HandleConfig, LayoutInfo

__all__ = ["AllocConfig", "Group", "GroupConfig"]


@dataclass(kw_only=True)
class AllocConfig:
    alloc_fn: int = 0
    free_fn: int = 0
    context: int = 0


@dataclass(kw_only=True)
class GroupConfig:
    algorithm: Algorithm = Algorithm.LOW_LATENCY
    num_experts: int = 0
    max_dispatch_tokens_per_rank: int = 0
    max_recv_tokens_per_rank: int = 0
    max_token_bytes: int = 0
    rdma_buffer_size: int = 0
    num_qp_per_rank: int = 0
    num_channels: int = 0
    max_num_sms: int = 0
    alloc: AllocConfig = field(default_factory=AllocConfig)
    enable_mask: bool = False
    timeout_ns: int = 0
    zero_copy: ZeroCopyMode = ZeroCopyMode.AUTO
    overflow_policy: OverflowPolicy = OverflowPolicy.AUTO
    num_topk: int = 0


class Group:
    """A NCCL EP group over an initialised ``nccl.core.Communicator`` (construct via :meth:`create`)."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    @classmethod
    def create(cls, comm, config: GroupConfig) -> "Group":
        """Collectively create an EP group across all ranks of ``comm`` (``ncclEpCreateGroup``)."""
        return cls(_library.create_group(comm, config))

    def _check_valid(self, operation: str) -> None:
        if not self._ptr:
            raise NcclInvalid(f"Cannot {operation}: Group is not initialized or has been destroyed")

    @property
    def ptr(self) -> int:
        self._check_valid("read ptr")
        return self._ptr

    def create_handle(self, layout: Layout, topk_idx, *, layout_info: Optional[LayoutInfo] = None,
                      config: Optional[HandleConfig] = None, stream) -> Handle:
        """Collectively create and initialise a handle (``ncclEpCreateHandle``)."""
        self._check_valid("create_handle")
        return Handle(_library.create_handle(self._ptr, int(layout), topk_idx, layout_info, config,
                                             get_stream_ptr(stream)))

    def destroy(self) -> None:
        if self._ptr:
            _library.group_destroy(self._ptr)
            self._ptr = 0

    def __repr__(self) -> str:
        return f"<Group ptr={self._ptr:#x}>" if self._ptr else "<Group destroyed>"
