"""Smoke test of benchmarks/ep_bench.py on CPU: two self-spawned gloo ranks, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    if "OMP_NUM_THREADS" not in os.environ:  # spawned ranks get one intra-op thread each, as under torchrun
        assert report["machine"]["torch_threads"] == 1 and report["machine"]["env"]["OMP_NUM_THREADS"] == "1"
    speeds = report["machine"]["host_python_us_per_rank"]
    assert len(speeds) == 2 and all(v > 0 for v in speeds)  # each rank's host speed, for reading host-bound rows
    assert all(len(r["host_python_us_per_rank"]) == 2 for r in report["results"])  # and each row's own
    assert "host us by rank" in (tmp_path / "ep_bench.md").read_text()
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
            assert res["plugin_autograd"][op]["median_us"] > 0  # the training path, timed in the same run
    assert "| allgather | ok | pass |" in proc.stdout


def test_bench_rounds_alternate_the_paths_and_are_bounded(tmp_path):
    """``--rounds 2``: every path of a backend (plugin, its training path, the raw collectives) timed in two
    alternating rounds of iters/2 pairs; the report says so. ``--rounds`` outside [1, iters] is a usage error."""
    proc = _run(*TINY, "--iters", "4", "--rounds", "2", "--backends", "torch", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "ep_bench.json").read_text())
    assert report["sizes"]["rounds"] == 2
    res = report["results"][0]
    assert res["conformance"]["passed"] and res["recv_rows"] > 0
    for path in ("plugin", "plugin_autograd", "direct", "direct_counts"):
        assert res[path]["dispatch"]["median_us"] > 0, path
    assert "paths alternating in 2 rounds" in (tmp_path / "ep_bench.md").read_text()
    bad = _run(*TINY, "--rounds", "0", "--out", str(tmp_path / "bad"), timeout=60)
    assert bad.returncode == 2 and "--rounds must be in [1, --iters=3]" in bad.stderr


def test_bench_unknown_backend_lists_valid_names(tmp_path):
    proc = _run(*TINY, "--backends", "torch,no-such-ep", "--out", str(tmp_path), timeout=60)
    assert proc.returncode != 0
    assert "no-such-ep" in proc.stderr and "Valid names" in proc.stderr
    for name in ("torch", "allgather", "legacy", "elastic"):
        assert f"'{name}'" in proc.stderr
    assert not (tmp_path / "ep_bench.json").exists()


def test_bench_command_writes_json_markdown_plot_and_progress(tmp_path):
    """``megatron-ep bench`` is the same benchmark: same options, same files, plus the PNG with matplotlib."""
    exe = Path(sys.executable).with_name("megatron-ep")
    proc = subprocess.run([str(exe), "bench", *TINY, "--tokens", "32,64", "--backends", "torch,allgather", "--plot",
                           "--progress", "lines", "--out", str(tmp_path), "--name", "sweep"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [run["tokens_per_rank"] for run in report["sweep"]] == [32, 64]
    assert all(r["conformance"]["passed"] for run in report["sweep"] for r in run["results"])
    assert (tmp_path / "sweep.md").read_text().startswith("# ep_bench")
    assert "ep_bench: [4/4," in proc.stdout  # progress: one line per (size, backend) when not on a terminal
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib not importable" in proc.stdout
    else:
        assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_help_and_validate_sh_options_still_parse():
    from megatron_ep_plugins.bench.cli import parse_args

    exe = Path(sys.executable).with_name("megatron-ep")
    help_text = subprocess.run([str(exe), "bench", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--backends" in help_text and "--progress" in help_text and help_text.startswith("usage: megatron-ep bench")
    validate = (SCRIPT.parent / "gpu" / "validate.sh").read_text()
    lines = [line.split(" bench ", 1)[1] for line in validate.splitlines() if " bench " in line and "step " in line]
    assert len(lines) >= 5
    for line in lines:  # every benchmark run of the GPU validation, as the script passes it (bench() adds these)
        args = parse_args(["--plot", "--out", "/tmp/x", "--device", "cpu", *line.split()])
        assert args.backends and args.plot


def test_hybridep_ab_script_runs_on_the_cpu_emulator(tmp_path):
    """``benchmarks/gpu/hybridep_ab.py`` (a GPU diagnostic) on 2 gloo ranks over the CPU DeepEP emulator: the three
    variants run, the table and the JSON come out (so the script does not rot between GPU sessions)."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, AB_DEVICE="cpu", AB_T="64", AB_H="256", AB_ROUNDS="2", AB_ITERS="2",
               AB_OUT=str(tmp_path / "ab.json"), PYTHONPATH=os.pathsep.join([str(root / "tests" / "emulators"),
                                                                            str(root)]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "benchmarks" / "gpu" / "hybridep_ab.py")], capture_output=True, text=True,
                          timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "ab.json").read_text())
    assert set(record["median_us"]) == {"scan", "copy", "bare"} and record["bare_over_case"]["bare"] == 1.0
    assert all(len(rounds) == 2 for rounds in record["per_round_us"].values())
    assert "| scan |" in proc.stdout and "| bare |" in proc.stdout


def test_combine_sum_ab_script_runs_on_cpu_through_tritons_interpreter(tmp_path):
    """``benchmarks/gpu/combine_sum_ab.py`` (a one-GPU diagnostic of the ``torch`` backend's combine sum) on CPU: the
    eager gather + add and the Triton kernel under ``TRITON_INTERPRET=1`` (fp16, whose rounding the interpreter
    models), the table and the JSON come out, and the kernel's bits equal eager's."""
    import os

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, SUM_DEVICE="cpu", SUM_VARIANTS="eager,triton", TRITON_INTERPRET="1", SUM_DTYPE="float16",
               SUM_H="100", SUM_TOKENS="8,20", SUM_ROUNDS="2", SUM_ITERS="1", SUM_OUT=str(tmp_path / "sum.json"))
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu" / "combine_sum_ab.py")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "sum.json").read_text())
    assert [r["tokens"] for r in record["results"]] == [8, 20]
    for row in record["results"]:
        assert row["triton"]["bit_identical_to_eager"] and row["eager"]["gpu_us"] > 0
    assert "| 20 |" in proc.stdout


def test_small_t_gap_script_runs_on_the_cpu_emulator(tmp_path):
    """``benchmarks/gpu/small_t_gap.py`` (issue 11's decomposition of the plugin/direct gap, a GPU diagnostic) on 2
    gloo ranks over the CPU DeepEP emulator: every step from the bare calls to the slot runs for legacy and elastic,
    the JSON and the tables come out, and each backend records both ranks' host speed before and after."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, GAP_DEVICE="cpu", GAP_H="256", GAP_T="32", GAP_ROUNDS="2", GAP_ITERS="2",
               GAP_OUT=str(tmp_path / "gap.json"), DEEP_EP_EMULATOR_API="v2",
               PYTHONPATH=os.pathsep.join([str(root / "tests" / "emulators"), str(root)]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "benchmarks" / "gpu" / "small_t_gap.py")], capture_output=True, text=True,
                          timeout=240, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "gap.json").read_text())
    assert set(record["backends"]) == {"legacy", "elastic"}
    for res in record["backends"].values():
        assert list(res["median_us"]) == ["bare", "+kwargs", "+outputs", "adapter", "slot"]
        assert all(d > 0 and c > 0 for d, c in res["median_us"].values())
        assert [len(s) for s in res["host_python_us_per_rank"]] == [2, 2]
    assert "| +outputs |" in proc.stdout


def test_report_header_flags_a_rank_on_a_slow_cpu():
    """Host-bound numbers of a run where one rank's vCPU ran at half speed (seen on the 2 x H200 VM) are marked as
    such in the report, naming the rank; similar speeds are not."""
    from megatron_ep_plugins.bench.report import _header

    base = {"versions": {"torch": "2", "deep_ep": None, "megatron_core": None}, "time_utc": "t",
            "sizes": {"tokens_per_rank": 256, "hidden": 7168, "topk": 8, "experts": 256, "fp8_dispatch": False,
                      "iters": 10, "warmup": 1}}
    machine = {"world_size": 2, "platform": "p"}
    slow = _header({**base, "machine": {**machine, "host_python_us_per_rank": [0.9, 1.8]}})
    assert "0.9 / 1.8" in slow and "rank(s) 1 ran on a slower CPU" in slow
    even = _header({**base, "machine": {**machine, "host_python_us_per_rank": [0.9, 1.0]}})
    assert "0.9 / 1.0" in even and "slower CPU" not in even
    assert "host speed" not in _header({**base, "machine": machine})  # reports from before the field


def test_report_rows_show_their_host_speed_and_flag_slow_ranks_against_the_runs_fastest():
    """Each row carries its ranks' host speed (sampled around its own timings); a rank is flagged slow against the
    fastest speed seen anywhere in the run, so a row where every rank was slow is flagged too."""
    from megatron_ep_plugins.bench.report import _fastest, _row_host

    rows = [{"host_python_us_per_rank": [0.9, 1.0]}, {"host_python_us_per_rank": [1.8, 1.9]},
            {"host_python_us_per_rank": [0.9, 1.6]}, {}]
    report = {"machine": {"host_python_us_per_rank": [1.0, 1.0]}, "sweep": [{"results": rows[:2]},
                                                                          {"results": rows[2:]}]}
    fastest = _fastest(report)
    assert fastest == 0.9
    assert _row_host(rows[0], fastest) == "0.9 / 1.0"
    assert _row_host(rows[1], fastest) == "1.8 / 1.9 (rank 0, 1 slow)"
    assert _row_host(rows[2], fastest) == "0.9 / 1.6 (rank 1 slow)"
    assert _row_host(rows[3], fastest) == "-"
    assert _fastest({"machine": {}, "results": [{}]}) is None
