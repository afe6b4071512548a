"""``megatron-ep doctor``: each check's verdict and fix, the exit status, and that it is fast on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_ep_plugins import doctor, hookimpl
from test_deepep_backends import deepep_emulator  # noqa: F401 - fixture

EXE = Path(sys.executable).with_name("megatron-ep")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_EP_") and k != "EP_DISABLE_GIN"}
    env.update(extra)
    return env


def _by(report, check):
    found = [f for f in report.findings if f.check == check]
    assert found, f"no {check!r} finding in:\n{report.text()}"
    return found


def test_cpu_host_is_healthy_fast_and_says_so():
    t0 = time.perf_counter()
    proc = subprocess.run([str(EXE), "doctor", "--json"], capture_output=True, text=True, env=_env(), timeout=120)
    wall = time.perf_counter() - t0
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 == data["exit_code"], proc.stdout
    checks = {f["check"] for f in data["findings"]}
    assert {"python", "torch", "gpus", "nccl", "deep_ep", "nvshmem", "gin", "variables", "megatron", "have_deep_ep",
            "backends", "selection", "activation"} <= checks
    selection = next(f for f in data["findings"] if f["check"] == "selection")
    assert "auto would choose 'torch'" in selection["summary"]
    print(f"doctor: {data['seconds']:.2f} s of checks, {wall:.2f} s with interpreter start")
    assert data["seconds"] < 10 and wall < 30  # < 2 s on an idle CPU host; generous for a loaded CI machine
    text = subprocess.run([str(EXE), "doctor"], capture_output=True, text=True, env=_env(), timeout=120).stdout
    assert "exit status 0" in text and " s; " in text


def test_bad_variables_are_problems_with_a_fix():
    proc = subprocess.run([str(EXE), "doctor"], capture_output=True, text=True, timeout=120,
                          env=_env(MCORE_EP_LEGACY_NUM_SMS="abc", MCORE_EP_BACKND="torch"))
    assert proc.returncode == 1, proc.stdout
    assert "MCORE_EP_LEGACY_NUM_SMS='abc' is not an integer" in proc.stdout
    assert "MCORE_EP_BACKND is set but no loaded plugin declares it (did you mean MCORE_EP_BACKEND?)" in proc.stdout


def test_named_backend_unavailable_is_a_problem(monkeypatch):
    monkeypatch.setenv("MCORE_EP_BACKEND", "legacy")
    report = doctor.run()
    assert report.exit_code == 1
    bad = [f for f in _by(report, "selection") if f.status == doctor.PROBLEM]
    assert bad and "MCORE_EP_BACKEND='legacy' would fail" in bad[0].summary and "deep_ep" in bad[0].summary


def _fake_gpus(monkeypatch, n=2, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Emulated H200")


def test_deepep_v2_without_gin_and_stock_megatron_blind_to_it(deepep_emulator, monkeypatch):
    deepep_emulator("v2")
    _fake_gpus(monkeypatch)
    monkeypatch.setattr(doctor, "rdma_devices", lambda: [])
    monkeypatch.delenv("EP_DISABLE_GIN", raising=False)
    report = doctor.run()
    (dep,) = _by(report, "deep_ep")
    assert dep.status == doctor.OK and {"Buffer", "ElasticBuffer"} <= set(dep.details["classes"]), dep
    assert "CPU test double" in dep.summary
    (gin,) = _by(report, "gin")
    assert gin.status == doctor.PROBLEM and "export EP_DISABLE_GIN=1" in gin.fix
    (have,) = _by(report, "have_deep_ep")
    assert have.status == doctor.WARNING and "HAVE_DEEP_EP=False" in have.summary and "EventOverlap" in have.summary
    assert "MCORE_EP_BACKEND=legacy|elastic" in have.fix
    (gpus,) = _by(report, "gpus")
    assert gpus.status == doctor.OK and "2 GPU(s)" in gpus.summary
    assert report.exit_code == 1
    monkeypatch.setenv("EP_DISABLE_GIN", "1")
    report = doctor.run()
    assert _by(report, "gin")[0].status == doctor.OK
    assert "auto would choose 'elastic'" in " ".join(f.summary for f in _by(report, "selection"))


def test_deepep_v1_is_seen_by_stock_megatron(deepep_emulator, monkeypatch):
    deepep_emulator("v1")
    _fake_gpus(monkeypatch)
    report = doctor.run()
    (have,) = _by(report, "have_deep_ep")
    assert have.status == doctor.OK and "from deep_ep.utils import EventHandle, EventOverlap" in have.summary
    assert "ElasticBuffer" not in _by(report, "deep_ep")[0].details["classes"]


def test_older_loaded_nccl_than_compiled_is_a_problem(monkeypatch):
    from megatron_ep_plugins.backends import _deepep_common

    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 30, 7))
    monkeypatch.setattr(_deepep_common, "loaded_nccl_version", lambda: (2, 21, 5))
    (nccl,) = _by(doctor.run(), "nccl")
    assert nccl.status == doctor.PROBLEM and "compiled with NCCL 2.30.7" in nccl.summary
    assert "loaded 2.21.5" in nccl.summary and "LD_LIBRARY_PATH" in nccl.fix


def test_deep_ep_built_for_another_torch(tmp_path, monkeypatch):
    pkg = tmp_path / "deep_ep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('deep_ep_cpp.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deep_ep", raising=False)
    (dep,) = _by(doctor.run(), "deep_ep")
    assert dep.status == doctor.PROBLEM and "undefined symbol" in dep.summary
    assert "built against another torch" in dep.fix and torch.__version__ in dep.fix


def test_megatron_outside_the_patch_table(monkeypatch):
    from megatron_ep_plugins import patching

    monkeypatch.setattr(patching, "megatron_version", lambda: "0.12.0")
    (meg,) = _by(doctor.run(), "megatron")
    assert meg.status == doctor.PROBLEM and "0.12.0" in meg.summary and "megatron-ep compat" in meg.fix


def test_plugin_that_registers_no_backend_is_a_warning():
    from megatron_ep_plugins.manager import register_plugin

    class Empty:
        @hookimpl
        def ep_register_backends(self):
            return []

    register_plugin(Empty(), "empty_plugin")
    found = [f for f in _by(doctor.run(), "plugins") if "'empty_plugin'" in f.summary]
    assert found and found[0].status == doctor.WARNING and "registered no backend" in found[0].summary


def test_cannot_run_without_torch_exits_2():
    code = ("import sys; sys.modules['torch'] = None; from megatron_ep_plugins.cli import main; "
            "sys.exit(main(['doctor']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot run: torch does not import" in proc.stdout


def test_deepep_v25_needs_a_newer_nccl_than_loaded(deepep_emulator, monkeypatch):
    deepep_emulator("v25", nccl=(2, 30, 7))
    _fake_gpus(monkeypatch)
    findings = _by(doctor.run(), "deep_ep")
    assert any("EPBuffer" in f.details.get("classes", ()) for f in findings), findings
    bad = [f for f in findings if f.status == doctor.PROBLEM]
    assert bad and "EPBuffer needs NCCL >= 2.32.3" in bad[0].summary and "loaded 2.30.7" in bad[0].summary
