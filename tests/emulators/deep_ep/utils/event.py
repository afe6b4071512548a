"""Emulated ``deep_ep.utils.event`` (CPU test double): events that only record whether they were waited."""

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


def new_event(is_async: bool) -> EventOverlap:
    """The event a communication call returns: real (and tracked until waited) only when async."""
    event = EventOverlap(EventHandle() if is_async else None)
    if is_async:
        _PENDING[id(event)] = event
    return event


def consume(previous_event) -> None:
    """A tracked event passed on as ``previous_event`` is waited on by the next kernel (as on the GPU)."""
    if previous_event is not None:
        _PENDING.pop(id(previous_event), None)
