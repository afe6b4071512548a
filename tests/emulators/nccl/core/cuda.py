"""Mirror of nccl4py 0.6.0 ``nccl/core/cuda.py:get_stream_ptr``."""


def get_stream_ptr(stream=None) -> int:
    """A stream spec -> integer ``cudaStream_t`` (0 = default stream); a bool is a TypeError (as nccl4py)."""
    if isinstance(stream, bool):
        raise TypeError("stream must not be a bool")
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    handle = getattr(stream, "handle", None)
    if handle is not None:
        return int(handle)
    raise TypeError(f"cannot resolve a CUDA stream from {type(stream).__name__}")
