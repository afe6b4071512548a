"""Mirror of nccl-extensions 0.1.0 ``nccl/ep/enums.py`` (values of the C enums in ``ep_enums.h``)."""

from enum import IntEnum

__all__ = ["Algorithm", "CombineQuantizationRecipe", "DispatchQuantizationRecipe", "ExpertIdKind", "Layout",
           "OverflowPolicy", "PassDir", "ZeroCopyMode"]


class Algorithm(IntEnum):
    LOW_LATENCY = 0
    HIGH_THROUGHPUT = 1


class Layout(IntEnum):
    UNSET = 0
    EXPERT_MAJOR = 1
    RANK_MAJOR = 2
    FLAT = 3


class PassDir(IntEnum):
    FWD = 0
    BWD = 1


class OverflowPolicy(IntEnum):
    AUTO = 0
    TRAP = 1
    DROP = 2


class ZeroCopyMode(IntEnum):
    AUTO = 0
    OFF = 1
    ON = 2


class ExpertIdKind(IntEnum):
    AUTO = 0
    LOCAL = 1
    GLOBAL = 2


class DispatchQuantizationRecipe(IntEnum):
    NONE = 0
    FWD = 1
    DS_FP8E3M4 = 2


class CombineQuantizationRecipe(IntEnum):
    NONE = 0
    NVFP4 = 1
