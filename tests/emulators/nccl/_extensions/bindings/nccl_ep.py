"""Emulated ``nccl._extensions.bindings.nccl_ep`` (generated from ``nccl_ep.h``; ``nccl_ep.pxd`` lists the
functions): the pointer-level calls the facade does not wrap -- the active-mask and async-error API."""

from nccl.ep._library import (  # noqa: F401
    NCCLEpError,
    error_clear,
    get_async_error,
    get_library_path,
    get_version,
    mask_clean,
    mask_query,
    mask_update,
)
