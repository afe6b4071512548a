"""Mirror of nccl-extensions 0.1.0 ``nccl/ep/handle.py``: the typed argument bundles and ``Handle``.

Same classes, fields, defaults (``binding_dataclass`` makes them keyword-only dataclasses) and method
signatures; the methods call the emulated library (``_library.py``) where the real ones call
``nccl._extensions.bindings.nccl_ep``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from nccl.core.cuda import get_stream_ptr
from nccl.core.typing import NcclInvalid
from nccl.ep import _library
from nccl.ep.enums import CombineQuantizationRecipe, DispatchQuantizationRecipe, ExpertIdKind, PassDir

if TYPE_CHECKING:
    from nccl.ep.tensor import Tensor

__all__ = ["CombineConfig", "CombineInputs", "CombineOutputs", "DispatchConfig", "DispatchInputs", "DispatchOutputs",
           "Handle", "HandleConfig", "LayoutInfo"]


@dataclass(kw_only=True)
class HandleConfig:
    dispatch_output_per_expert_alignment: int = 0


@dataclass(kw_only=True)
class DispatchConfig:
    send_only: int = 0
    round_scales: int = 0
    pass_direction: PassDir = PassDir.FWD
    quantization_recipe: DispatchQuantizationRecipe = DispatchQuantizationRecipe.NONE


@dataclass(kw_only=True)
class CombineConfig:
    send_only: int = 0
    pass_direction: PassDir = PassDir.FWD
    quantization_recipe: CombineQuantizationRecipe = CombineQuantizationRecipe.NONE


@dataclass(kw_only=True)
class LayoutInfo:
    expert_counters: Optional["Tensor"] = None
    src_rank_counters: Optional["Tensor"] = None
    expert_offsets: Optional["Tensor"] = None
    recv_total_counter: Optional["Tensor"] = None
    recv_topk_idx_kind: ExpertIdKind = ExpertIdKind.AUTO


@dataclass(kw_only=True)
class DispatchInputs:
    tokens: Optional["Tensor"] = None
    topk_weights: Optional["Tensor"] = None
    scales: Optional["Tensor"] = None


@dataclass(kw_only=True)
class DispatchOutputs:
    tokens: Optional["Tensor"] = None
    topk_weights: Optional["Tensor"] = None
    scales: Optional["Tensor"] = None
    topk_idx: Optional["Tensor"] = None


@dataclass(kw_only=True)
class CombineInputs:
    tokens: Optional["Tensor"] = None
    topk_weights: Optional["Tensor"] = None
    scales: Optional["Tensor"] = None


@dataclass(kw_only=True)
class CombineOutputs:
    tokens: Optional["Tensor"] = None
    topk_weights: Optional["Tensor"] = None


class Handle:
    """Per-step routing handle (construct via ``Group.create_handle``; release with :meth:`destroy`)."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    def _check_valid(self, operation: str) -> None:
        if not self._ptr:
            raise NcclInvalid(f"Cannot {operation}: Handle is not initialized or has been destroyed")

    @property
    def ptr(self) -> int:
        self._check_valid("read ptr")
        return self._ptr

    def update(self, topk_idx: "Tensor", *, layout_info: Optional[LayoutInfo] = None, stream) -> None:
        self._check_valid("update")
        _library.update_handle(self._ptr, topk_idx, layout_info, get_stream_ptr(stream))

    def dispatch(self, inputs: DispatchInputs, outputs: DispatchOutputs, *, layout_info: Optional[LayoutInfo] = None,
                 config: Optional[DispatchConfig] = None, stream) -> None:
        self._check_valid("dispatch")
        _library.dispatch(self._ptr, inputs, outputs, layout_info, config, get_stream_ptr(stream))

    def combine(self, inputs: CombineInputs, outputs: CombineOutputs, *, config: Optional[CombineConfig] = None,
                stream) -> None:
        self._check_valid("combine")
        _library.combine(self._ptr, inputs, outputs, config, get_stream_ptr(stream))

    def complete(self, *, config: int = 0, stream) -> None:
        self._check_valid("complete")
        _library.complete(self._ptr, config, get_stream_ptr(stream))

    def destroy(self) -> None:
        if self._ptr:
            _library.handle_destroy(self._ptr)
            self._ptr = 0

    def __repr__(self) -> str:
        return f"<Handle ptr={self._ptr:#x}>" if self._ptr else "<Handle destroyed>"
