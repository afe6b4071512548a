"""Every megatron-core release in the patch table, verified (not assumed), plus the table's own rules.

* The CI matrix: each release in :data:`MATRIX` is installed (``pip install --no-deps --target``, about
  2 MB each, cached under ``.venv/megatron-matrix/``) next to the tested torch stack and checked in a
  fresh interpreter by ``tests/megatron_matrix_check.py``: the version read, patch + uninstall, Megatron's
  flex dispatcher round trip and a ``MoELayer`` forward/backward with the ``torch`` backend on 2 gloo
  ranks. megatron-core 0.19.2 is the main stack (requirements-dev.txt) and is covered by the rest of the
  suite. Megatron-LM main (0.20.0) has no release: its row was verified from the source (see the row).
* Megatron-LM dev's ``deepepv2`` flex backend: its slot group is patched when present, tested here on the
  installed megatron-core with the dev branch's call shape added (a stand-in mirroring Megatron-LM dev
  d48bd6b ``megatron/core/transformer/moe/fused_a2a.py``).
* The version is read from ``megatron/core/package_info.py`` (source checkouts have no metadata).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".venv" / "megatron-matrix"
#: Releases checked in CI besides the main stack's 0.19.2 (one per patch-table row).
MATRIX = ("0.15.3", "0.16.1", "0.17.1", "0.18.2")


def _release_dir(version: str) -> Path:
    target = CACHE / version
    if (target / "megatron" / "core" / "package_info.py").exists():
        return target
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--target", str(target), f"megatron-core=={version}"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        message = f"could not install megatron-core=={version} for the matrix: {proc.stderr[-800:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI can reach the package registry: a failure here is real
        pytest.skip(message)
    return target


@pytest.mark.parametrize("version", MATRIX)
def test_megatron_release(version):
    target = _release_dir(version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    # megatron-core 0.15.3's `import megatron.core` on a CPU-only host needs TORCH_CUDA_ARCH_LIST (a Megatron bug)
    env.update(PYTHONPATH=str(target), TORCH_CUDA_ARCH_LIST="9.0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "megatron_matrix_check.py"), version], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=420)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MATRIX-RESULT ")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("MATRIX-RESULT "):])
    failed = {k: v for k, v in result.items() if k in ("version", "patch", "round_trip", "moe_layer") and v != "ok"}
    assert not failed, json.dumps(failed, indent=1)
    assert result["stock_HAVE_DEEP_EP"] == "False"  # no DeepEP here: stock Megatron's own slot is off


def test_patch_table_rows_cover_the_matrix_without_overlap():
    from megatron_ep_plugins import patching

    rows = sorted(patching.PATCH_TABLE, key=lambda e: e.min_version)
    for a, b in zip(rows, rows[1:]):
        assert a.max_version <= b.min_version, (a.describe(), b.describe())
    for version in (*MATRIX, "0.19.2", "0.20.0", "0.17.0rc0"):
        entry = patching.entry_for(version)
        assert entry.targets == patching.FLEX_DEEPEP and patching.FLEX_DEEPEPV2 in entry.optional
    assert patching.entry_for("0.15.3").verified_with == "0.15.3"
    with pytest.raises(patching.PatchError, match="MCORE_EP_ALLOW_UNTESTED_MEGATRON"):
        patching.entry_for("0.14.0")


def test_version_is_read_from_package_info_of_a_source_checkout(tmp_path):
    """A Megatron-LM checkout on PYTHONPATH (no distribution metadata) in front of an installed release."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")  # a checkout's megatron/core is a regular package
    (core / "package_info.py").write_text("MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = ''\nimport subprocess  # executing this file would be wrong\n__version__ = subprocess.run(['false']).args\n")
    code = "from megatron_ep_plugins import patching; print(patching.megatron_version())"
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.20.0"


# -- Megatron-LM dev's deepepv2 flex backend ------------------------------------------------------------------
# Stand-ins with the call shape of Megatron-LM dev d48bd6b megatron/core/transformer/moe/fused_a2a.py (only the
# signatures matter: the patch replaces them; calling one unpatched is an error).
def _dev_get_elastic_buffer(group, num_max_tokens_per_rank, hidden, num_topk):
    raise AssertionError("Megatron's own get_elastic_buffer ran: the deepepv2 slot was not patched")


def _dev_deepepv2_dispatch(buffer, x, token_indices, token_probs, num_experts, num_max_tokens_per_rank,
                           expert_alignment=1, num_sms=0, async_finish=False, allocate_on_comm_stream=False):
    raise AssertionError("Megatron's own deepepv2_dispatch ran: the deepepv2 slot was not patched")


def _dev_deepepv2_combine(buffer, x, handle, num_sms=0, async_finish=False, allocate_on_comm_stream=False):
    raise AssertionError("Megatron's own deepepv2_combine ran: the deepepv2 slot was not patched")


def _add_dev_shape(monkeypatch, names=("deepepv2_dispatch", "deepepv2_combine", "get_elastic_buffer")):
    from megatron_ep_plugins import patching

    fns = {"deepepv2_dispatch": _dev_deepepv2_dispatch, "deepepv2_combine": _dev_deepepv2_combine,
           "get_elastic_buffer": _dev_get_elastic_buffer}
    fa = importlib.import_module(patching.FUSED_A2A)
    td = importlib.import_module(patching.TOKEN_DISPATCHER)
    monkeypatch.setattr(fa, "HAVE_DEEP_EP_V2", False, raising=False)
    for name in names:
        monkeypatch.setattr(fa, name, fns[name], raising=False)
        monkeypatch.setattr(td, name, fns[name], raising=False)
    return fa, td


def _rank_deepepv2_round_trip(rank, world):
    import pytest as _pytest
    import torch
    import torch.distributed as dist

    import megatron_ep_plugins as mep

    mp = _pytest.MonkeyPatch()
    try:
        fa, td = _add_dev_shape(mp)
        inst = mep.install("torch")
        patched = set(inst.patched)
        group = dist.group.WORLD
        gen = torch.Generator().manual_seed(5 + rank)
        tokens, hidden, experts, topk = 6 + rank, 16, 4, 2
        x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
        idx = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
        probs = torch.full((tokens, topk), 1.0 / topk, requires_grad=True)
        # what Megatron dev's _DeepepV2Manager does: get_elastic_buffer, then deepepv2_dispatch/combine
        buf = td.get_elastic_buffer(group, num_max_tokens_per_rank=tokens, hidden=hidden, num_topk=topk)
        recv_x, recv_idx, recv_w, tpe, handle = td.deepepv2_dispatch(buf, x, idx, probs, experts,
                                                                       num_max_tokens_per_rank=tokens,
                                                                       expert_alignment=1, num_sms=20)
        owned = torch.where(recv_idx >= 0, recv_w, 0.0).sum(1, keepdim=True)
        out, _ = td.deepepv2_combine(buf, recv_x * owned, handle, num_sms=20)
        out.sum().backward()
        flags = (fa.HAVE_DEEP_EP_V2, td.deepepv2_dispatch.__megatron_ep_backend__)
        mep.uninstall()
        restored = td.deepepv2_dispatch is _dev_deepepv2_dispatch and fa.get_elastic_buffer is _dev_get_elastic_buffer
        return {"patched": sorted(patched), "flags": flags, "out_err": (out - x).abs().max().item(),
                "dx_err": (x.grad - 1).abs().max().item(), "restored": restored, "tpe": int(tpe.sum())}
    finally:
        mp.undo()


def test_deepepv2_slot_of_megatron_dev_is_patched_and_routed():
    from megatron_ep_plugins import patching

    for r in run_ranks(_rank_deepepv2_round_trip, 2, timeout=120):
        assert set(r["patched"]) == {t.path for t in patching.FLEX_DEEPEP + patching.FLEX_DEEPEPV2}
        assert r["flags"] == (True, "torch") and r["restored"]
        assert r["out_err"] < 1e-5 and r["dx_err"] < 1e-5 and r["tpe"] > 0


def test_partial_deepepv2_shape_is_refused(monkeypatch):
    import megatron_ep_plugins as mep
    from megatron_ep_plugins import patching
    from megatron_ep_plugins.errors import PatchError

    _add_dev_shape(monkeypatch, names=("deepepv2_dispatch",))
    fa = importlib.import_module(patching.FUSED_A2A)
    monkeypatch.delattr(fa, "HAVE_DEEP_EP_V2")
    with pytest.raises(PatchError, match="part of an optional slot group"):
        mep.install("torch")
    assert patching.current() is None


def test_every_row_says_how_it_was_verified_and_the_matrix_covers_the_ci_rows():
    from megatron_ep_plugins import patching

    for entry in patching.PATCH_TABLE:
        if entry.verified_by == patching.VERIFIED_MATRIX:
            assert entry.verified_with in MATRIX, entry.describe()
        elif entry.verified_by == patching.VERIFIED_SUITE:
            assert entry.verified_with == "0.19.2"  # requirements-dev.txt's pin: the whole suite runs on it
        else:
            assert entry.verified_by == patching.VERIFIED_SOURCE
            branch = entry.verified_with.split()[1]
            record = json.loads((ROOT / "benchmarks" / "results" / "megatron" / f"source_{branch}.json").read_text())
            assert record["commit"].startswith(entry.verified_with.split()[2])
            assert all(v == "ok" for k, v in record["results"].items() if k in ("patch", "round_trip", "moe_layer"))


def test_with_deepep_2x_stock_megatron_sees_no_deepep_and_the_patch_restores_the_slot():
    """Megatron 0.15-0.19 imports ``EventOverlap`` from ``deep_ep.utils``, which DeepEP 2.x no longer exports:
    with a 2.x layout installed (here the CPU DeepEP test double in its V2 layout, tests/emulators/deep_ep) stock
    Megatron reports ``HAVE_DEEP_EP=False`` and has no ``fused_dispatch`` although ``deep_ep.Buffer`` exists.
    Installing a backend through this package puts the slot back."""
    code = "\n".join([
        "import deep_ep, deep_ep.utils",
        "assert hasattr(deep_ep, 'Buffer') and not hasattr(deep_ep.utils, 'EventOverlap')",
        "from megatron.core.transformer.moe import fused_a2a as fa, token_dispatcher as td",
        "print('stock', fa.HAVE_DEEP_EP, fa.fused_dispatch, td.fused_dispatch)",
        "import megatron_ep_plugins as mep",
        "mep.install('torch')",
        "print('patched', fa.HAVE_DEEP_EP, td.fused_dispatch.__megatron_ep_backend__)",
    ])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    env.update(PYTHONPATH=str(ROOT / "tests" / "emulators"), DEEP_EP_EMULATOR_API="v2", MCORE_EP_LOG="warning")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stock False None None" in proc.stdout
    assert "patched True torch" in proc.stdout
