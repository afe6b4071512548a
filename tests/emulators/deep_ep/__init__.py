"""CPU TEST DOUBLE of DeepEP's Python API -- not DeepEP, never installed, never selectable by users.

This package exists only under ``tests/emulators/`` and is importable only when a test prepends that
folder to ``sys.path`` (see ``deepep_emulator`` in ``tests/test_deepep_backends.py``). It lets the
``legacy``/``elastic``/``hybridep`` adapters run on CPU gloo ranks. Its algorithm (every rank
all-gathers every rank's tokens and selects its own rows locally) is deliberately different from the
reference ``torch`` backend's all-to-all, so agreement between the two is an independent check.

It is at least as strict as the library it stands for: it enforces DeepEP's Python asserts, C++ host
asserts, JIT ``static_assert`` s (as the NVCC compile failure they cause) and device asserts (as a sticky
device-side error), each with a comment citing the DeepEP source line it mirrors, and
raises on every rank where the real library would hang, so adapter misuse fails loudly in tests. Its
classes expose only attributes the real objects have; test bookkeeping is :func:`constructed` and
:func:`host_syncs`.

``DEEP_EP_EMULATOR_API`` (read at import) picks the API layout:

* ``v1`` (default): ``Buffer`` + ``HybridEPBuffer``; ``EventOverlap``/``EventHandle`` re-exported from
  ``deep_ep.utils`` (as DeepEP V1 and the ``hybrid-ep`` branch do); no ``ElasticBuffer``.
* ``v2``: adds ``ElasticBuffer``/``EPHandle``; ``deep_ep.utils`` no longer re-exports ``EventOverlap``
  (it lives in ``deep_ep.utils.event`` and ``deep_ep``), as after DeepEP PR #605.
* ``v25``: DeepEP V2.5 (``buffers/ep.py``): ``EPBuffer``/``EPHandle`` and V2.5's ``EventOverlap`` (hooks); no
  ``Buffer``, ``ElasticBuffer``, ``HybridEPBuffer`` or ``Config`` (V2.5 ``__init__.py:70-78``, sgl-deep-ep-v25
  0.1.0rc0); ``deep_ep.utils`` re-exports ``EventHandle`` only. The real wheel names the package
  ``deep_ep_v25``; tests alias this package under that name to emulate it.
"""

import os as _os

API = _os.environ.get("DEEP_EP_EMULATOR_API", "v1").strip().lower()
if API not in ("v1", "v2", "v25"):
    raise ImportError(f"DEEP_EP_EMULATOR_API={API!r}: use v1, v2 or v25")

IS_EMULATOR = True
__version__ = "0.0.0+emulator." + API

from ._collective import constructed, host_syncs, pending_async_events, reset_emulator_state  # noqa: E402
from .utils.event import EventHandle, EventOverlap  # noqa: E402

if API == "v25":
    from .buffers.ep import EPBuffer, EPHandle  # noqa: E402,F401

    __all__ = ["EPBuffer", "EPHandle", "EventHandle", "EventOverlap"]
else:
    from .buffers.legacy import Buffer, Config  # noqa: E402,F401
    from .hybrid_ep_buffer import HybridEPBuffer  # noqa: E402,F401

    __all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "HybridEPBuffer"]

if API == "v2":
    from .buffers.elastic import ElasticBuffer, EPHandle  # noqa: E402,F401

    __all__ += ["ElasticBuffer", "EPHandle"]
