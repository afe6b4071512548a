"""Emulated ``nccl.ep`` (nccl-extensions 0.1.0): the facade of ``nccl/ep/__init__.py`` over a CPU emulation
of ``libnccl_ep.so`` (``_library.py``). Test double only: see ``tests/emulators/nccl/__init__.py``."""

from pathlib import Path as _Path

IS_EMULATOR = True

from nccl.ep.enums import (  # noqa: E402
    Algorithm,
    CombineQuantizationRecipe,
    DispatchQuantizationRecipe,
    ExpertIdKind,
    Layout,
    OverflowPolicy,
    PassDir,
    ZeroCopyMode,
)
from nccl.ep.group import AllocConfig, Group, GroupConfig  # noqa: E402
from nccl.ep.handle import (  # noqa: E402
    CombineConfig,
    CombineInputs,
    CombineOutputs,
    DispatchConfig,
    DispatchInputs,
    DispatchOutputs,
    Handle,
    HandleConfig,
    LayoutInfo,
)
from nccl.ep.tensor import Tensor  # noqa: E402
from nccl.ep import _library  # noqa: E402

__all__ = ["Algorithm", "AllocConfig", "CombineConfig", "CombineInputs", "CombineOutputs",
           "CombineQuantizationRecipe", "DispatchConfig", "DispatchInputs", "DispatchOutputs",
           "DispatchQuantizationRecipe", "ExpertIdKind", "get_lib_path", "get_lib_version", "Group", "GroupConfig",
           "Handle", "HandleConfig", "Layout", "LayoutInfo", "OverflowPolicy", "PassDir", "Tensor", "ZeroCopyMode"]


def get_lib_version():
    """Release of the (emulated) ``libnccl_ep.so``: the header's NCCL_EP_MAJOR.MINOR.PATCH (0.2.0)."""
    from packaging.version import Version

    v = _library.get_version()
    return Version(f"{v // 10000}.{(v % 10000) // 100}.{v % 100}")


def get_lib_path():
    return _Path(_library.__file__)
