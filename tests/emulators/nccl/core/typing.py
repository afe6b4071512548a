"""Mirror of nccl4py 0.6.0 ``nccl/core/typing.py`` (the parts nccl.ep and the adapter use)."""

from enum import IntEnum


class NcclInvalid(Exception):
    """Raised when an argument provided to an NCCL4Py API is invalid (nccl/core/typing.py)."""


class NcclDataType(IntEnum):
    """``ncclDataType_t`` values (nccl/core/typing.py NcclDataType)."""

    INT8 = 0
    CHAR = 0
    UINT8 = 1
    INT32 = 2
    INT = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    HALF = 6
    FLOAT32 = 7
    FLOAT = 7
    FLOAT64 = 8
    DOUBLE = 8
    BFLOAT16 = 9
    FLOAT8E4M3 = 10
    FLOAT8E5M2 = 11


class NcclGinType(IntEnum):
    """``ncclGinType_t`` (nccl/core/typing.py NcclGinType)."""

    NONE = 0
    PROXY = 2
    GDAKI = 3
    GPI = 4
    EFA_GDA = 5
