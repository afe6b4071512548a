"""Discovery through entry points: built-ins, third parties, failures, blocking, duplicates, ordering."""

from __future__ import annotations

import sys

import pytest

from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.config import load_settings
from megatron_ep_plugins.errors import DuplicateBackendError
from megatron_ep_plugins.manager import discover, register_plugin, unregister_plugin
from megatron_ep_plugins.spec import Availability, BackendSpec
from plugin_factory import make_dist, spec_module

BUILTINS = {"torch", "legacy", "elastic", "hybridep"}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    def add(dist, entry_points, modules):
        make_dist(tmp_path / dist, dist, entry_points, modules)
        monkeypatch.syspath_prepend(str(tmp_path / dist))
        for name in modules:
            sys.modules.pop(name, None)
    return add


def test_builtins_come_through_the_entry_point_group():
    reg = discover(load_settings({}))
    builtin = {p.name for p in reg.plugins if p.builtin}
    assert BUILTINS <= builtin
    assert all(p.distribution.startswith("megatron-ep-plugins") for p in reg.plugins if p.builtin)
    torch_spec = reg.lookup("reference")
    assert torch_spec is not None and torch_spec.name == "torch" and torch_spec.provider == "torch"


def test_broken_plugins_are_recorded_and_do_not_stop_the_others(plugin_dir):
    plugin_dir("broken-ep", {
        "import_fails": "ep_import_fails",
        "hook_raises": "ep_hook_raises",
        "bad_return": "ep_bad_return",
        "unknown_hook": "ep_unknown_hook",
        "good": "ep_good",
    }, {
        "ep_import_fails": "raise ImportError('needs libfoo.so')\n",
        "ep_hook_raises": "from megatron_ep_plugins import hookimpl\n@hookimpl\ndef ep_register_backends():\n    raise RuntimeError('boom')\n",
        "ep_bad_return": "from megatron_ep_plugins import hookimpl\n@hookimpl\ndef ep_register_backends():\n    return ['not a spec']\n",
        "ep_unknown_hook": "from megatron_ep_plugins import hookimpl\n@hookimpl\ndef ep_register_backend():\n    return []\n",
        "ep_good": spec_module("goodep", priority=-5),
    })
    reg = discover(load_settings({}))
    by_name = {p.name: p for p in reg.plugins}
    assert by_name["import_fails"].status == "failed" and "needs libfoo.so" in by_name["import_fails"].error
    assert by_name["hook_raises"].status == "failed" and "RuntimeError: boom" in by_name["hook_raises"].error
    assert by_name["bad_return"].status == "failed" and "expected BackendSpec" in by_name["bad_return"].error
    err = by_name["unknown_hook"].error
    assert by_name["unknown_hook"].status == "failed" and "ep_register_backend" in err and "ep_register_backends" in err
    assert by_name["good"].status == "loaded" and by_name["good"].backends == ("goodep",)
    assert by_name["good"].distribution == "broken-ep 1.0"
    assert reg.lookup("goodep").provider == "good"
    assert reg.lookup("torch") is not None


def test_autoload_zero_loads_builtins_only(plugin_dir):
    plugin_dir("third-ep", {"third": "ep_third"}, {"ep_third": spec_module("thirdep")})
    assert discover(load_settings({})).lookup("thirdep") is not None
    reg = discover(load_settings({"MCORE_EP_PLUGINS_AUTOLOAD": "0"}))
    assert reg.lookup("thirdep") is None
    third = next(p for p in reg.plugins if p.name == "third")
    assert third.status == "skipped" and "MCORE_EP_PLUGINS_AUTOLOAD=0" in third.error
    assert reg.lookup("torch") is not None


def test_disable_blocks_plugins_and_backends_by_name(plugin_dir):
    plugin_dir("third-ep", {"third": "ep_third2"}, {"ep_third2": spec_module("thirdep")})
    reg = discover(load_settings({"MCORE_EP_PLUGINS_DISABLE": " Third , reference,nosuch"}))
    assert next(p for p in reg.plugins if p.name == "third").status == "blocked"
    assert reg.lookup("thirdep") is None
    assert reg.lookup("torch") is None and reg.lookup_disabled("torch").name == "torch"  # blocked by alias
    assert any("['nosuch']" in n and "torch" in n for n in reg.notes)  # unknown words listed with valid ones


def test_duplicate_backend_names_name_both_providers(plugin_dir):
    plugin_dir("dup-ep", {"dup_a": "ep_dup_a", "dup_b": "ep_dup_b"},
               {"ep_dup_a": spec_module("twin"), "ep_dup_b": spec_module("other", aliases=("twin",))})
    with pytest.raises(DuplicateBackendError) as info:
        discover(load_settings({}))
    msg = str(info.value)
    assert "'twin'" in msg and "'dup_a'" in msg and "'dup_b'" in msg and "MCORE_EP_PLUGINS_DISABLE" in msg
    discover(load_settings({"MCORE_EP_PLUGINS_DISABLE": "dup_b"}))  # the advertised fix works


def test_duplicate_of_a_builtin_is_rejected_too():
    class Clash:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("mine", aliases=("torch",), factory=object, probe=lambda: Availability.yes())]

    register_plugin(Clash(), "clash")
    with pytest.raises(DuplicateBackendError) as info:
        discover(load_settings({}))
    assert "'torch' is registered twice" in str(info.value)
    assert "plugin 'torch'" in str(info.value) and "plugin 'clash'" in str(info.value)


def test_hook_order_is_the_tie_break_between_equal_priorities():
    def plugin(name, **marker):
        class P:
            @hookimpl(**marker)
            def ep_register_backends(self):
                return [BackendSpec(name, priority=50, factory=object, probe=lambda: Availability.yes())]
        return P()

    register_plugin(plugin("late", trylast=True), "p_late")
    register_plugin(plugin("early", tryfirst=True), "p_early")
    register_plugin(plugin("middle"), "p_middle")
    names = [s.name for s in discover(load_settings({})).backends if s.priority == 50]
    assert names == ["early", "middle", "late"]


def test_register_plugin_api_rejects_misuse():
    obj = object()
    register_plugin(obj, "x")
    register_plugin(obj, "x")  # same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_plugin(object(), "x")
    unregister_plugin("x")
    with pytest.raises(KeyError, match="registered: \\[\\]"):
        unregister_plugin("x")


@pytest.mark.parametrize("bad", ["Torch", "1ep", "", "auto", "off", "a b"])
def test_invalid_backend_names_are_rejected_with_the_rule(bad):
    with pytest.raises(ValueError, match="invalid backend name|reserved"):
        BackendSpec(bad, factory=object, probe=lambda: Availability.yes())


def test_spec_type_errors():
    with pytest.raises(TypeError, match="aliases must be a tuple"):
        BackendSpec("x", aliases="y", factory=object, probe=object)
    with pytest.raises(TypeError, match="priority must be an int"):
        BackendSpec("x", priority="high", factory=object, probe=object)
