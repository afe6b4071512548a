"""Measure what megatron_ep_plugins costs at start-up; prints a table and saves JSON + markdown.

Each number is the median of several fresh interpreter runs (so module caches are cold):
  pth_unset_us      the .pth line with MCORE_EP_BACKEND unset (what every Python start pays)
  import_ms         `import megatron_ep_plugins`
  discovery_ms      entry-point discovery (all plugins), settings parsed
  selection_ms      probes + policy (explain) after discovery, torch already imported
  install_ms        discovery + selection + backend creation + patch, Megatron already imported
  autoload_hook_ms  interpreter start with MCORE_EP_BACKEND=torch minus start without (hook armed, no Megatron)

Usage: python benchmarks/startup_cost.py [--runs 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
import timeit
from pathlib import Path

PROBE = r"""
import time, json, sys
tt = time.perf_counter(); import torch; t0 = time.perf_counter()  # paid by any training job anyway
import megatron_ep_plugins; t1 = time.perf_counter()
from megatron_ep_plugins.config import load_settings
from megatron_ep_plugins.manager import discover
from megatron_ep_plugins.selection import select
t2 = time.perf_counter(); s = load_settings(); reg = discover(s); t3 = time.perf_counter()
select(reg, s, "auto"); t4 = time.perf_counter()
import megatron.core.transformer.moe.token_dispatcher
t5 = time.perf_counter(); megatron_ep_plugins.install("torch"); t6 = time.perf_counter()
print(json.dumps({"torch_import_ms": (t0-tt)*1e3, "import_ms": (t1-t0)*1e3, "discovery_ms": (t3-t2)*1e3, "selection_ms": (t4-t3)*1e3,
                  "install_ms": (t6-t5)*1e3}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")} | {"MCORE_EP_LOG": "warning"} | extra


def start_time(env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    pth = Path(sysconfig.get_paths()["purelib"]) / "megatron_ep_plugins.pth"
    os.environ.pop("MCORE_EP_BACKEND", None)
    code = compile(pth.read_text().strip(), str(pth), "exec")
    pth_us = min(timeit.repeat(lambda: exec(code, {}), number=1000, repeat=5)) / 1000 * 1e6

    samples = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], env=clean_env(), capture_output=True,
                             text=True, check=True)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    unset = start_time(clean_env(), args.runs)
    armed = start_time(clean_env(MCORE_EP_BACKEND="torch"), args.runs)

    import torch

    result = {
        "pth_unset_us": pth_us, **med, "python_start_ms_unset": unset, "python_start_ms_armed": armed,
        "autoload_hook_ms": armed - unset, "runs": args.runs,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    rows = [("`.pth` line, MCORE_EP_BACKEND unset", f"{pth_us:.2f} us"),
            ("`import megatron_ep_plugins`", f"{med['import_ms']:.2f} ms"),
            ("discovery (entry points, all plugins)", f"{med['discovery_ms']:.2f} ms"),
            ("selection (probes + policy; torch already imported)", f"{med['selection_ms']:.2f} ms"),
            ("install: discovery + selection + create + patch (Megatron imported)", f"{med['install_ms']:.2f} ms"),
            ("autoload hook armed (MCORE_EP_BACKEND=torch), per interpreter start", f"{armed - unset:.2f} ms")]
    table = "| what | cost |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "startup_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "startup_cost.md").write_text(
        f"# Start-up cost ({result['machine']['platform']}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}; median of {args.runs} fresh interpreters)\n\n{table}\n")


if __name__ == "__main__":
    main()
