"""Smoke test of benchmarks/ep_bench.py on CPU: two self-spawned gloo ranks, tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ep_bench.py"
TINY = ["--device", "cpu", "--tokens", "64", "--hidden", "32", "--topk", "2", "--experts", "4", "--iters", "3",
        "--warmup", "1"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_bench_cpu_torch_and_allgather(tmp_path):
    proc = _run(*TINY, "--backends", "torch,allgather", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "ep_bench.json").read_text())
    assert (tmp_path / "ep_bench.md").read_text().startswith("# ep_bench")
    assert report["machine"]["world_size"] == 2 and report["machine"]["device"] == "cpu"
    assert report["versions"]["torch"] and report["sizes"]["tokens_per_rank"] == 64
    by = {r["backend"]: r for r in report["results"]}
    assert set(by) == {"torch", "allgather"}
    for name, res in by.items():
        assert res["status"] == "ok", (name, res)
        assert res["conformance"]["passed"], (name, res["conformance"])
        checks = res["conformance"]["checks"]
        assert {"dispatch_rows", "tokens_per_expert", "recv_topk", "combine", "x_grad", "probs_grad"} <= set(checks)
        for op in ("dispatch", "combine"):
            assert res["plugin"][op]["median_us"] > 0 and res["plugin"][op]["mean_us"] > 0
    assert "| allgather | ok | pass |" in proc.stdout


def test_bench_unknown_backend_lists_valid_names(tmp_path):
    proc = _run(*TINY, "--backends", "torch,no-such-ep", "--out", str(tmp_path), timeout=60)
    assert proc.returncode != 0
    assert "no-such-ep" in proc.stderr and "Valid names" in proc.stderr
    for name in ("torch", "allgather", "legacy", "elastic"):
        assert f"'{name}'" in proc.stderr
    assert not (tmp_path / "ep_bench.json").exists()
