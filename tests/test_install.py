"""install()/uninstall(): the patch table, verification, idempotency, rank agreement."""

from __future__ import annotations

import importlib
import os

import pytest

import megatron_ep_plugins as mep
from megatron_ep_plugins import hookimpl, patching
from megatron_ep_plugins.autograd import SLOT_MARK
from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend as TorchA2ABackendForTests
from megatron_ep_plugins.errors import EPPluginError, PatchError, RankMismatchError
from megatron_ep_plugins.spec import Availability, BackendSpec
from distributed import run_ranks

FA = "megatron.core.transformer.moe.fused_a2a"
TD = "megatron.core.transformer.moe.token_dispatcher"


def slots():
    fa, td = importlib.import_module(FA), importlib.import_module(TD)
    return {
        "fa.dispatch": fa.fused_dispatch, "fa.combine": fa.fused_combine, "fa.sms": fa.set_deepep_num_sms,
        "fa.flag": fa.HAVE_DEEP_EP, "td.dispatch": td.fused_dispatch, "td.combine": td.fused_combine,
        "td.sms": td.set_deepep_num_sms,
    }


def register_clone(name, priority=-1):
    from megatron_ep_plugins.backends.torch_a2a import TorchA2ABackend

    class Clone(TorchA2ABackend):
        def agreement_key(self):
            return {"clone": name}

    class P:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec(name, priority=priority, factory=Clone, probe=lambda: Availability.yes())]
    mep.register_plugin(P(), f"p_{name}")


def test_install_rebinds_every_copy_and_uninstall_restores_the_originals():
    before = slots()
    inst = mep.install("torch")
    after = slots()
    assert inst.name == "torch" and inst.megatron_version.startswith("0.19")
    assert after["fa.flag"] is True
    for key in ("dispatch", "combine", "sms"):
        assert getattr(after[f"td.{key}"], SLOT_MARK) == "torch"
        assert after[f"td.{key}"] is after[f"fa.{key}"]
    assert set(inst.patched) == {f"{FA}.fused_dispatch", f"{FA}.fused_combine", f"{FA}.set_deepep_num_sms",
                                 f"{FA}.HAVE_DEEP_EP", f"{TD}.fused_dispatch", f"{TD}.fused_combine",
                                 f"{TD}.set_deepep_num_sms"}
    assert mep.installed() is inst and patching.current()["backend"] == "torch"
    restored = mep.uninstall()
    assert len(restored) == 7
    now = slots()
    for key, value in before.items():
        assert now[key] is value, key
    assert mep.installed() is None and patching.current() is None and mep.uninstall() == []


def test_install_is_idempotent_and_a_new_backend_replaces_the_old():
    before = slots()
    register_clone("clone")
    first = mep.install("torch")
    assert mep.install("torch") is first and mep.install("reference") is first
    second = mep.install("clone")
    assert second is not first and getattr(slots()["td.dispatch"], SLOT_MARK) == "clone"
    mep.uninstall()
    assert all(slots()[k] is v for k, v in before.items())


def test_env_selects_and_off_installs_nothing(monkeypatch):
    monkeypatch.setenv("MCORE_EP_BACKEND", " Torch ")
    assert mep.install().name == "torch"
    mep.uninstall()
    before = slots()
    monkeypatch.setenv("MCORE_EP_BACKEND", "off")
    assert mep.install() is None
    assert all(slots()[k] is v for k, v in before.items())


def test_installed_hook_is_called_once():
    seen = []

    class Watcher:
        @hookimpl
        def ep_backend_installed(self, choice, backend):
            seen.append((choice.name, backend.name))
    mep.register_plugin(Watcher(), "watcher")
    mep.install("torch")
    mep.install("torch")
    assert seen == [("torch", "torch")]


def test_missing_target_refuses_and_patches_nothing(monkeypatch):
    td = importlib.import_module(TD)
    monkeypatch.delattr(td, "set_deepep_num_sms")
    fa = importlib.import_module(FA)
    original, flag = fa.fused_dispatch, fa.HAVE_DEEP_EP
    with pytest.raises(PatchError) as info:
        mep.install("torch")
    msg = str(info.value)
    assert "megatron-core 0.19" in msg and f"{TD}.set_deepep_num_sms does not exist" in msg and "PATCH_TABLE" in msg
    assert fa.fused_dispatch is original and fa.HAVE_DEEP_EP is flag and mep.installed() is None


def test_changed_signature_refuses(monkeypatch):
    fa = importlib.import_module(FA)
    monkeypatch.setattr(fa, "fused_combine", lambda x, group, handle, previous_event=None: None)
    with pytest.raises(PatchError, match=r"fused_a2a.fused_combine has parameters \('x', 'group', 'handle', "
                                         r"'previous_event'\), expected"):
        mep.install("torch")


def test_unknown_megatron_version_needs_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(patching, "megatron_version", lambda: "0.27.0rc1")
    with pytest.raises(PatchError, match="megatron-core 0.27.0rc1 is not in .*MCORE_EP_ALLOW_UNTESTED_MEGATRON=1"):
        mep.install("torch")
    monkeypatch.setenv("MCORE_EP_ALLOW_UNTESTED_MEGATRON", "1")
    assert mep.install("torch").megatron_version == "0.27.0rc1"


def _rank_mismatch(rank, world):
    import torch
    import torch.distributed as dist

    import megatron_ep_plugins as mep
    from megatron.core.transformer.moe import token_dispatcher as td

    register_clone("clone")
    mep.install("torch" if rank == 0 else "clone")
    x, idx, w = torch.zeros(2, 4), torch.tensor([[0], [1]]), torch.ones(2, 1)
    try:
        td.fused_dispatch(x, idx, w, 2, dist.group.WORLD)
    except RankMismatchError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_chose_different_backends_fail_together_naming_both():
    for msg in run_ranks(_rank_mismatch, 2, timeout=120):
        assert "selected different backends or parameters" in msg
        assert "global ranks [0]" in msg and '"backend": "torch"' in msg
        assert "global ranks [1]" in msg and '"backend": "clone"' in msg


# -- issue 8.6: the environment reaches the backends; a changed value is a new installation; a raising hook ------

def test_changed_backend_variable_is_not_answered_with_the_stale_installation(monkeypatch):
    first = mep.install("torch")
    monkeypatch.setenv("MCORE_EP_ELASTIC_NUM_QPS", "4")
    second = mep.install("torch")
    assert second is not first and mep.install("torch") is second
    assert mep.install("torch", environ=dict(os.environ)) is second  # same values, other mapping: same
    assert mep.install("torch", environ={}) is not second


def test_install_environ_reaches_the_backend_factory(monkeypatch):
    from megatron_ep_plugins.config import read_int
    from megatron_ep_plugins.spec import EnvVar, Integer

    class Sized(TorchA2ABackendForTests):
        def __init__(self, env=None):
            super().__init__()
            self.n = env["MCORE_EP_SIZED_N"] if env is not None else None
            self.read = read_int("MCORE_EP_SIZED_N")

    class P:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("sized", priority=-1, factory=lambda env: Sized(env), probe=lambda: Availability.yes(),
                                settings=(EnvVar("MCORE_EP_SIZED_N", "1", "n", parse=Integer(1, 64)),))]
    mep.register_plugin(P(), "sized_plugin")
    monkeypatch.setenv("MCORE_EP_SIZED_N", "9")
    inst = mep.install("sized", environ={"MCORE_EP_SIZED_N": "5"})
    assert inst.backend.n == 5 and inst.backend.read == 5
    assert mep.install("sized").backend.n == 9


def test_a_raising_installed_hook_leaves_megatron_unpatched():
    before = slots()

    class Telemetry:
        @hookimpl
        def ep_backend_installed(self, choice):
            raise RuntimeError("telemetry endpoint down")
    mep.register_plugin(Telemetry(), "telemetry")
    with pytest.raises(EPPluginError, match="plugin 'telemetry': its ep_backend_installed hook raised RuntimeError: "
                                            "telemetry endpoint down.*restored"):
        mep.install("torch")
    assert mep.installed() is None and patching.current() is None
    assert all(slots()[k] is v for k, v in before.items())


def test_teardown_hook_releases_first_never_stacks_and_unhooks(monkeypatch, caplog):
    """``teardown.hook``: ``destroy_process_group(group)`` calls the backend's ``release(group)`` first, then the
    original (in ``torch.distributed`` and ``distributed_c10d`` alike); a second hook replaces the first; a release
    that raises is logged and the user's teardown still runs; ``unhook`` restores the original."""
    import logging

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_ep_plugins import teardown

    calls = []

    def original(group=None):
        calls.append(("destroy", group))

    monkeypatch.setattr(dist, "destroy_process_group", original)
    monkeypatch.setattr(c10d, "destroy_process_group", original)
    teardown.hook(lambda group: calls.append(("first", group)))
    teardown.hook(lambda group: calls.append(("release", group)))
    assert teardown.hooked() is original and c10d.destroy_process_group is dist.destroy_process_group
    dist.destroy_process_group("g")
    assert calls == [("release", "g"), ("destroy", "g")]

    def broken(group):
        raise RuntimeError("boom")

    teardown.hook(broken)
    with caplog.at_level(logging.WARNING, logger="megatron_ep_plugins"):
        c10d.destroy_process_group()
    assert calls[-1] == ("destroy", None)
    assert any("could not free the backend's buffers" in r.getMessage() and "boom" in r.getMessage()
               for r in caplog.records)
    teardown.unhook()
    assert dist.destroy_process_group is original and c10d.destroy_process_group is original
    assert teardown.hooked() is None
    teardown.unhook()  # no-op when not hooked
