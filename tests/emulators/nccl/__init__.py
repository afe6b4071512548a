"""CPU TEST DOUBLE of NCCL's Python packages ``nccl.core`` (nccl4py 0.6.0) and ``nccl.ep`` (nccl-extensions
0.1.0) -- not NCCL, never installed, never selectable by users.

It exists only under ``tests/emulators/`` and is importable only when a test prepends that folder to
``sys.path`` (see ``ncclep_emulator`` in ``tests/test_ncclep.py``). It lets the ``ncclep`` adapter run on CPU
gloo ranks. The real wheels own the ``nccl`` namespace the same way (nccl4py: ``nccl/__init__.py``,
``nccl/core``; nccl-extensions: ``nccl/ep``, ``nccl/_extensions``).

What it models (each check cites the file or the ``libnccl_ep.so`` assertion text it mirrors):

* ``nccl.core``: ``get_unique_id``/``UniqueId`` (128 bytes, to be broadcast by the caller) and
  ``Communicator.init(nranks, rank, unique_id)``, rendezvousing through the default torch store (the real
  NCCL uses its own socket bootstrap); ``nranks``/``rank``/``n_lsa_teams``/``gin_type``.
* ``nccl.ep``: the facade's signatures (``Group.create``, ``Group.create_handle``, ``Handle.dispatch``/
  ``combine``/``complete``/``destroy``, the typed ``*Inputs``/``*Outputs``/``*Config`` dataclasses,
  ``Tensor``), HT flat layout and LL rank-major layout, the asserts of ``ncclEpCreateGroup``,
  ``ncclEpInitHandle``, ``ncclEpUpdateHandle``, ``ncclEpDispatch``, ``ncclEpCombine`` and the JIT kernels'
  static asserts, HT eager mode (``recv_total_counter``/``expert_counters`` at handle time), and the
  GPU-side timeout: LL waits for a peer at most ``timeout_ns`` (``NCCL_EP_TIMEOUT_MS`` overrides), then
  traps (a sticky device fault: every later call of this process fails too) or, with ``enable_mask``,
  masks that peer and sets the async-error flag (``ncclEpGetAsyncError``/``ncclEpMaskQuery`` in
  ``nccl._extensions.bindings.nccl_ep``). HT kernels have no timeout (unbounded waits in ``ht_ep.cuh``):
  there the emulator stops after ``NCCL_EP_EMULATOR_HANG_S`` (default 60 s) with an error saying the real
  library would hang.

Algorithm (deliberately unlike the reference ``torch`` backend's all-to-all): every operation all-gathers
each rank's whole message through the store and each rank selects its own rows locally. Row order inside
a source rank's block is shuffled (HT: once per handle, fixed by the handle like the real slot map; LL: at
every dispatch, like the real ``atomicAdd`` slot assignment), so a caller cannot depend on it.

Not emulated (explicit errors): expert-major layout, quantization recipes, windows/zero-copy, ``send_only``
/``complete``, ``Handle.update``, custom allocators.
"""

IS_EMULATOR = True
