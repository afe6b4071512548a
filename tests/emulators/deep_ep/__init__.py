"""CPU TEST DOUBLE of DeepEP's Python API -- not DeepEP, never installed, never selectable by users.

This package exists only under ``tests/emulators/`` and is importable only when a test prepends that
folder to ``sys.path`` (see ``deepep_emulator`` in ``tests/test_deepep_backends.py``). It lets the
``legacy``/``elastic``/``hybridep`` adapters run on CPU gloo ranks. Its algorithm (every rank
all-gathers every rank's tokens and selects its own rows locally) is deliberately different from the
reference ``torch`` backend's all-to-all, so agreement between the two is an independent check.

It is at least as strict as the library it stands for: it enforces DeepEP's Python asserts, C++ host
asserts, JIT ``static_assert`` s (as the NVCC compile failure they cause) and device asserts (as a sticky
device-side error), each with a comment citing the DeepEP source line it mirrors (``_emulator.py``), and
raises on every rank where the real library would hang, so adapter misuse fails loudly in tests. Its
classes expose only attributes the real objects have; test bookkeeping is :func:`constructed`.

``DEEP_EP_EMULATOR_API`` (read at import) picks the API layout:

* ``v1`` (default): ``Buffer`` + ``HybridEPBuffer``; ``EventOverlap``/``EventHandle`` re-exported from
  ``deep_ep.utils`` (as DeepEP V1 and the ``hybrid-ep`` branch do); no ``ElasticBuffer``.
* ``v2``: adds ``ElasticBuffer``/``EPHandle``; ``deep_ep.utils`` no longer re-exports ``EventOverlap``
  (it lives in ``deep_ep.utils.event`` and ``deep_ep``), as after DeepEP PR #605.
"""

import os as _os

API = _os.environ.get("DEEP_EP_EMULATOR_API", "v1").strip().lower()
if API not in ("v1", "v2"):
    raise ImportError(f"DEEP_EP_EMULATOR_API={API!r}: use v1 or v2")

IS_EMULATOR = True
__version__ = "0.0.0+emulator." + API

from ._emulator import (Buffer, Config, HybridEPBuffer, constructed, pending_async_events,  # noqa: E402
                        reset_emulator_state)
from .utils.event import EventHandle, EventOverlap  # noqa: E402

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "HybridEPBuffer"]

if API == "v2":
    from ._emulator import ElasticBuffer, EPHandle  # noqa: E402,F401

    __all__ += ["ElasticBuffer", "EPHandle"]
