"""Mirror of nccl-extensions 0.1.0 ``nccl/ep/tensor.py`` (``Tensor``: an ``ncclEpTensor_t`` descriptor).

The real descriptor keeps only a data pointer, a dtype and the sizes (``nccl_ep.h`` ``ncclEpTensor_t``: no
strides), resolved by ``nccl.core.interop.torch.resolve_tensor`` (``tensor.data_ptr()``, ``_to_nccl_dtype``).
The emulator keeps the torch tensor to read and write it, and refuses a non-contiguous tensor: the real
library would silently read or write the wrong elements through the bare pointer.
"""

from __future__ import annotations

import ctypes
import numbers

import torch

from nccl.core.typing import NcclDataType, NcclInvalid

__all__ = ["Tensor"]

_TENSOR_MAGIC = 0xCAFECAFE  # NCCL_EP_TENSOR_MAGIC

# nccl/core/interop/torch.py _to_nccl_dtype
_TORCH_TO_NCCL = {
    torch.float16: NcclDataType.FLOAT16,
    torch.float32: NcclDataType.FLOAT32,
    torch.float64: NcclDataType.FLOAT64,
    torch.bfloat16: NcclDataType.BFLOAT16,
    torch.int8: NcclDataType.INT8,
    torch.int32: NcclDataType.INT32,
    torch.int64: NcclDataType.INT64,
    torch.uint8: NcclDataType.UINT8,
    torch.bool: NcclDataType.UINT8,
    torch.float8_e4m3fn: NcclDataType.FLOAT8E4M3,
    torch.float8_e5m2: NcclDataType.FLOAT8E5M2,
}
NCCL_TO_TORCH = {
    NcclDataType.FLOAT16: torch.float16, NcclDataType.FLOAT32: torch.float32, NcclDataType.FLOAT64: torch.float64,
    NcclDataType.BFLOAT16: torch.bfloat16, NcclDataType.INT8: torch.int8, NcclDataType.INT32: torch.int32,
    NcclDataType.INT64: torch.int64, NcclDataType.UINT8: torch.uint8, NcclDataType.FLOAT8E4M3: torch.float8_e4m3fn,
    NcclDataType.FLOAT8E5M2: torch.float8_e5m2,
}
ELEMENT_SIZE = {d: torch.empty(0, dtype=t).element_size() for d, t in NCCL_TO_TORCH.items()}


def _to_nccl_dtype(torch_dtype) -> NcclDataType:
    try:
        return _TORCH_TO_NCCL[torch_dtype]
    except KeyError:
        raise NcclInvalid(f"Unsupported torch dtype {torch_dtype} has no NCCL equivalent. "
                          "NCCL does not support complex, int16, or quantized types.") from None


class Tensor:
    """Caller-owned descriptor of a buffer (torch tensor, or a raw CPU pointer with ``dtype`` and ``shape``)."""

    def __init__(self, buffer, *, dtype=None, shape=None, window=None, window_offset=None) -> None:
        if window is not None or window_offset is not None:
            if window is not None and window_offset is None:
                raise NcclInvalid("`window` requires an explicit `window_offset` (in bytes)")
            if window is None:
                raise NcclInvalid("`window_offset` is only valid when `window` is provided")
            raise NcclInvalid("nccl emulator: window-backed tensors (zero copy) are not emulated")
        if isinstance(buffer, numbers.Integral) and not isinstance(buffer, bool):
            if dtype is None or shape is None:
                raise ValueError("Raw integer pointer requires `dtype` and `shape` kwargs")
            nccl_dtype = NcclDataType(dtype)
            sizes = tuple(int(s) for s in shape)
            count = 1
            for s in sizes:
                count *= s
            nbytes = count * ELEMENT_SIZE[nccl_dtype]
            raw = (ctypes.c_char * max(nbytes, 1)).from_address(int(buffer))
            tensor = torch.frombuffer(raw, dtype=torch.uint8, count=nbytes).view(NCCL_TO_TORCH[nccl_dtype])
            tensor = tensor.view(sizes)
            self._buffer = None
            data_ptr = int(buffer)
        else:
            if dtype is not None or shape is not None:
                raise ValueError("`dtype`/`shape` are only valid with a raw integer pointer")
            if not isinstance(buffer, torch.Tensor):
                raise NcclInvalid(f"Cannot resolve {type(buffer).__name__!r}: expected torch.Tensor (the emulator "
                                  "resolves torch tensors and raw pointers only)")
            tensor = buffer
            nccl_dtype = _to_nccl_dtype(buffer.dtype)
            sizes = tuple(buffer.shape)
            data_ptr = buffer.data_ptr()
            self._buffer = buffer  # lifetime anchor
        if not sizes:
            raise ValueError("Tensor requires at least one dimension")
        if not tensor.is_contiguous():
            raise NcclInvalid(
                f"nccl emulator: tensor of shape {tuple(tensor.shape)} with strides {tensor.stride()} is not contiguous; "
                "ncclEpTensor_t carries a pointer and sizes only, so nccl.ep would read or write the wrong elements")
        self._sizes = sizes
        self._datatype = nccl_dtype
        self._data = data_ptr
        self._magic = _TENSOR_MAGIC
        self._torch = tensor

    @property
    def ptr(self) -> int:
        return id(self)

    @property
    def ndim(self) -> int:
        return len(self._sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def datatype(self) -> NcclDataType:
        return self._datatype

    @property
    def data(self) -> int:
        return self._data

    @property
    def buffer(self):
        return self._buffer

    def __repr__(self) -> str:
        return f"<Tensor sizes={self._sizes} dtype={self._datatype.name} data={self.data:#x}>"
