"""Emulated ``deep_ep.utils.event`` (CPU test double): events that only record whether they were waited.

In the ``v25`` layout ``EventOverlap`` is V2.5's (``_V25EventOverlap``: hooks run after the wait)."""

from __future__ import annotations

_PENDING: dict[int, "EventOverlap"] = {}


class EventHandle:
    """Stands in for the C++ ``EventHandle`` (a CUDA event recorded on the current stream)."""

    def current_stream_wait(self) -> None:
        pass


class EventOverlap:
    """``EventOverlap(event=None, extra_tensors=None)``; ``current_stream_wait()`` asserts an event exists."""

    def __init__(self, event: EventHandle | None = None, extra_tensors=None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None, "EventOverlap.current_stream_wait() on an empty event (call was not async)"
        self.event.current_stream_wait()
        _PENDING.pop(id(self), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.event is not None:
            self.event.current_stream_wait()
            _PENDING.pop(id(self), None)


class _V25EventOverlap(EventOverlap):
    """DeepEP V2.5's ``EventOverlap``: ``current_stream_wait`` runs (once) and returns a hook registered after the
    wait (the deferred dispatch/combine epilogue, the deterministic sort); ``deep_ep.EventOverlap`` in the v25
    layout."""

    def __init__(self, event: EventHandle | None = None, extra_tensors=None) -> None:
        # mirrors DeepEP V2.5 utils/event.py:17-34 (sgl-deep-ep-v25 0.1.0rc0)
        super().__init__(event, extra_tensors)
        self._release_handle_by_call = False
        self.hook_after_wait = None

    def current_stream_wait(self, release_handle: bool = False):
        # mirrors DeepEP V2.5 utils/event.py:36-58 (sgl-deep-ep-v25 0.1.0rc0)
        assert self.event is not None
        self.event.current_stream_wait()
        _PENDING.pop(id(self), None)
        result = None
        if self.hook_after_wait is not None:
            result = self.hook_after_wait()
            self.hook_after_wait = None
        if release_handle:
            self.event = None
        return result

    def wait(self):
        return self.current_stream_wait()

    def register_hook_after_wait(self, hook_after_wait) -> None:
        # mirrors DeepEP V2.5 utils/event.py:64-69 (sgl-deep-ep-v25 0.1.0rc0)
        assert self.hook_after_wait is None, "A hook is already registered on this `EventOverlap`"
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> "_V25EventOverlap":
        self._release_handle_by_call = release_handle
        return self

    def __exit__(self, *exc):
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False


def new_event(is_async: bool, cls: type = EventOverlap) -> EventOverlap:
    """The event a communication call returns: real (and tracked until waited) only when async."""
    event = cls(EventHandle() if is_async else None)
    if is_async:
        _PENDING[id(event)] = event
    return event


def consume(previous_event) -> None:
    """A tracked event passed on as ``previous_event`` is waited on by the next kernel (as on the GPU)."""
    if previous_event is not None:
        _PENDING.pop(id(previous_event), None)


from .. import API as _API  # noqa: E402

if _API == "v25":  # V2.5's deep_ep.utils.event.EventOverlap is the one with hooks
    EventOverlap = _V25EventOverlap  # noqa: F811
