"""One megatron-core release, checked in a fresh interpreter (run by tests/test_megatron_versions.py).

Usage: ``PYTHONPATH=<dir holding that megatron-core> python tests/megatron_matrix_check.py VERSION [--source]``.
``--source``: the Megatron on PYTHONPATH is a Megatron-LM source checkout (main or dev, which have no
release); then the flex dispatcher's ``deepepv2`` backend is checked too when that Megatron has it.
Prints one JSON object: each check's outcome ("ok" or the error). Checks, with the ``torch`` backend:

* ``version``: the version megatron_ep_plugins reads is VERSION (the release under test is the one imported);
* ``patch``: ``install("torch")`` finds this release in the patch table (no opt-in), patches every slot of
  the flex dispatcher's DeepEP backend, sets ``HAVE_DEEP_EP``; ``uninstall()`` restores the exact objects;
* ``round_trip``: Megatron's ``MoEFlexTokenDispatcher`` dispatch/combine round trip with autograd on 2 gloo
  ranks through the installed slot (tests/test_megatron_e2e.py);
* ``moe_layer``: Megatron's ``MoELayer`` forward and backward on 2 gloo ranks against a hand-written
  non-parallel computation (tests/test_megatron_e2e.py);
* ``deepepv2_round_trip`` (only where Megatron has the ``deepepv2`` flex backend): the same round trip with
  ``moe_flex_dispatcher_backend="deepepv2"``, i.e. through Megatron's own ``_DeepepV2Manager``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rank_deepepv2_round_trip(rank, world):
    import megatron_ep_plugins as mep
    import test_megatron_e2e as e2e
    from megatron.core import parallel_state as ps

    e2e.flex_deepep_config = lambda: {"moe_flex_dispatcher_backend": "deepepv2"}
    mep.install("torch")
    try:
        return e2e._flex_round_trip(rank, world)
    finally:
        ps.destroy_model_parallel()


def main(version: str, source: bool = False) -> dict:
    out: dict[str, str] = {}

    def check(name, fn):
        try:
            fn()
            out[name] = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(exc).__name__}: {str(exc)[-1500:]}"

    def version_check():
        from megatron_ep_plugins import patching

        got = patching.megatron_version()
        assert got == version, f"megatron_ep_plugins reads megatron-core {got}, expected {version}"
        import megatron.core

        out["megatron_core_file"] = megatron.core.__file__
        if not source:
            assert f"megatron-matrix/{version}" in megatron.core.__file__.replace(os.sep, "/"), megatron.core.__file__

    def patch_check():
        import megatron_ep_plugins as mep
        from megatron_ep_plugins import patching

        fa = importlib.import_module(patching.FUSED_A2A)
        td = importlib.import_module(patching.TOKEN_DISPATCHER)
        before = {t: getattr(importlib.import_module(t.module), t.name) for t in patching.FLEX_DEEPEP}
        out["stock_HAVE_DEEP_EP"] = repr(fa.HAVE_DEEP_EP)
        inst = mep.install("torch")
        want = {t.path for t in patching.FLEX_DEEPEP}
        if hasattr(fa, "deepepv2_dispatch"):
            want |= {t.path for t in patching.FLEX_DEEPEPV2}
            out["deepepv2_slots"] = "present, patched"
        assert set(inst.patched) == want and len(inst.patched) == len(want), inst.patched
        assert fa.HAVE_DEEP_EP is True and td.fused_dispatch is fa.fused_dispatch
        assert td.fused_dispatch.__megatron_ep_backend__ == "torch"
        mep.uninstall()
        after = {t: getattr(importlib.import_module(t.module), t.name) for t in patching.FLEX_DEEPEP}
        assert all(after[t] is before[t] for t in before), "uninstall() did not restore the original objects"

    def ranks_check(rank_fn, checker):
        def run():
            from distributed import run_ranks

            results = run_ranks(rank_fn, 2, timeout=150)
            if checker is not None:
                checker(results)
        return run

    import test_megatron_e2e as e2e

    def moe_checker(results):
        for r in results:
            assert r["backend"] == "torch" and r["experts_used"] == e2e.EXPERTS and r["remote_tokens"] > 0, r
            assert r["out_err"] < 1e-5 * max(1.0, r["out_scale"]), r
            assert r["dx_err"] < 1e-5 * max(1.0, r["dx_scale"]), r
            assert r["router_grad_err"] < 1e-4, r
            assert max(r["fc1_grad_err"], r["fc2_grad_err"]) < 1e-5 * max(1.0, r["fc_grad_scale"]), r

    check("version", version_check)
    check("patch", patch_check)
    check("round_trip", ranks_check(e2e._rank_dispatcher_round_trip, e2e._check_round_trip))
    check("moe_layer", ranks_check(e2e._rank_moe_layer_vs_reference, moe_checker))
    from megatron.core.transformer.moe import fused_a2a

    if hasattr(fused_a2a, "deepepv2_dispatch"):
        check("deepepv2_round_trip", ranks_check(_rank_deepepv2_round_trip, e2e._check_round_trip))
    return out


if __name__ == "__main__":
    os.environ.setdefault("MCORE_EP_LOG", "warning")
    print("MATRIX-RESULT " + json.dumps(main(sys.argv[1], source="--source" in sys.argv[2:])), flush=True)
