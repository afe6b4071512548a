"""Zero-code activation through the .pth file, its start-up cost, and the megatron-ep CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import timeit
from pathlib import Path

import pytest

from megatron_ep_plugins.cli import main

PTH = Path(sysconfig.get_paths()["purelib"]) / "megatron_ep_plugins.pth"


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=180)


def test_pth_is_installed_next_to_the_package():
    assert PTH.is_file(), f"{PTH} missing: reinstall with pip install -e ."
    assert "MCORE_EP_BACKEND" in PTH.read_text()


def test_unset_variable_does_nothing_and_costs_microseconds(monkeypatch):
    monkeypatch.delenv("MCORE_EP_BACKEND", raising=False)
    line = PTH.read_text().strip()
    code = compile(line, str(PTH), "exec")
    per_call = min(timeit.repeat(lambda: exec(code, {}), number=200, repeat=5)) / 200
    assert per_call < 0.002, f"the .pth line costs {per_call * 1e3:.3f} ms with MCORE_EP_BACKEND unset"
    out = run_py("import sys; print(sorted(m for m in sys.modules if m.startswith(('megatron', 'pluggy'))))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_set_variable_arms_the_hook_without_importing_megatron():
    out = run_py("import sys, megatron_ep_plugins.autoload as a; "
                 "print(a.is_active(), any(m.startswith('megatron.') for m in sys.modules))",
                 MCORE_EP_BACKEND="torch")
    assert out.returncode == 0 and out.stdout.split() == ["True", "False"], out.stdout + out.stderr
    out = run_py("import megatron_ep_plugins.autoload as a; print(a.is_active())", MCORE_EP_BACKEND=" OFF ")
    assert out.stdout.split() == ["False"] or "No module" in out.stderr


def test_importing_megatron_installs_the_backend():
    code = ("from megatron.core.transformer.moe import token_dispatcher as td, fused_a2a as fa; "
            "print(td.fused_dispatch.__megatron_ep_backend__, fa.HAVE_DEEP_EP)")
    out = run_py(code, MCORE_EP_BACKEND="torch")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["torch", "True"]
    assert "backend 'torch'" in out.stderr  # the explanation is logged at start-up


def test_misconfigured_job_stops_at_import_with_the_reason():
    out = run_py("import megatron.core.transformer.moe.token_dispatcher", MCORE_EP_BACKEND="elastik")
    assert out.returncode != 0
    assert "UnknownBackendError" in out.stderr and "unknown backend 'elastik'" in out.stderr and "torch" in out.stderr


@pytest.mark.parametrize("env,fragment", [
    ({"MCORE_EP_BACKEND": "elastik"}, "megatron_ep_plugins: UnknownBackendError: MCORE_EP_BACKEND='elastik'"),
    ({"MCORE_EP_BACKEND": "torch", "MCORE_EP_ELASTIC_NUM_SMS": "abc"},
     "megatron_ep_plugins: ConfigError: invalid megatron_ep_plugins settings"),
])
def test_zero_code_activation_error_is_the_only_thing_printed(env, fragment):
    """Issue 8.7: a bad value printed a 50-frame traceback per rank through Megatron's import chain."""
    out = run_py("import megatron.core.transformer.moe.token_dispatcher", **env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("megatron_ep_plugins: ") == 1 and fragment in out.stderr
    assert "MCORE_EP_LOG=debug shows the traceback" in out.stderr


def test_zero_code_activation_error_is_still_catchable_and_debug_keeps_the_traceback():
    code = ("from megatron_ep_plugins.errors import UnknownBackendError\n"
            "try:\n    import megatron.core.transformer.moe.token_dispatcher\n"
            "except UnknownBackendError as exc:\n    print('caught', type(exc).__name__)\n")
    out = run_py(code, MCORE_EP_BACKEND="elastik")
    assert out.returncode == 0 and "caught UnknownBackendError" in out.stdout, out.stderr[-3000:]
    out = run_py("import megatron.core.transformer.moe.token_dispatcher", MCORE_EP_BACKEND="elastik", MCORE_EP_LOG="debug")
    assert out.returncode == 1 and "Traceback" in out.stderr and "UnknownBackendError" in out.stderr


def test_cli_reader_going_away_is_not_a_traceback():
    """Issue 8.8: `megatron-ep list | head -1` ended in a BrokenPipeError traceback."""
    exe = Path(sys.executable).with_name("megatron-ep")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_")}
    proc = subprocess.Popen([str(exe), "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    out = subprocess.run(f"'{exe}' list | head -1", shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("megatron_ep_plugins ") and "Traceback" not in out.stderr, out.stderr


def test_cli_env_reports_malformed_and_undeclared_values(capsys, monkeypatch):
    monkeypatch.setenv("MCORE_EP_ELASTIC_NUM_SMS", "abc")
    monkeypatch.setenv("MCORE_EP_ELASTC_FP8", "1")
    assert main(["env"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: MCORE_EP_ELASTIC_NUM_SMS='abc' is not an integer" in out
    assert "MCORE_EP_ELASTC_FP8" in out and "declared by no loaded plugin" in out
    assert main(["list"]) == 0  # list still shows everything, with the problem
    assert "SETTINGS (install/explain refuse until it is fixed): MCORE_EP_ELASTIC_NUM_SMS='abc'" in capsys.readouterr().out


def test_cli_list_and_json(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "available" in text and "plugins:" in text
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    torch_row = next(b for b in data["backends"] if b["name"] == "torch")
    assert torch_row["available"] is True and torch_row["provider"] == "torch" and torch_row["priority"] == 0
    assert {p["name"] for p in data["plugins"]} >= {"torch", "legacy", "elastic", "hybridep"}


def test_cli_explain(capsys, monkeypatch):
    assert main(["explain", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "auto" and any(c["outcome"] == "chosen" for c in data["candidates"])
    monkeypatch.setenv("MCORE_EP_BACKEND", "nope")
    assert main(["explain"]) == 1
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["explain", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "UnknownBackendError"
    assert main(["explain", "--backend", "reference"]) == 0
    assert "backend 'torch'" in capsys.readouterr().out


def test_cli_env_lists_every_variable(capsys, monkeypatch):
    monkeypatch.setenv("MCORE_EP_FALLBACK", "torch")
    assert main(["env", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["MCORE_EP_FALLBACK"]["value"] == "torch" and "MCORE_EP_BACKEND" in rows


def test_console_script_and_usage_errors():
    exe = Path(sys.executable).with_name("megatron-ep")
    out = subprocess.run([str(exe), "list", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["version"]
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
