"""Discovery through entry points: built-ins, third parties, failures, blocking, duplicates, ordering."""

from __future__ import annotations

import sys

import pytest

import re

from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.api import explain, list_backends
from megatron_ep_plugins.cli import main
from megatron_ep_plugins.config import load_settings
from megatron_ep_plugins.errors import ConfigError, DuplicateBackendError
from megatron_ep_plugins.manager import discover, register_plugin, unregister_plugin
from megatron_ep_plugins.spec import Availability, BackendSpec, EnvVar, Integer
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


def _suggested_fixes(message):
    return re.findall(r"MCORE_EP_PLUGINS_DISABLE=(\S+?)(?=[\s,.;)]|$)", message)


def test_duplicate_backend_names_name_both_providers(plugin_dir):
    plugin_dir("dup-ep", {"dup_a": "ep_dup_a", "dup_b": "ep_dup_b"},
               {"ep_dup_a": spec_module("twin"), "ep_dup_b": spec_module("other", aliases=("twin",))})
    reg = discover(load_settings({}))  # recorded, not raised: `megatron-ep list` must still work
    assert len(reg.conflicts) == 1 and {p.status for p in reg.plugins if p.name in ("dup_a", "dup_b")} == {"conflict"}
    with pytest.raises(DuplicateBackendError) as info:
        explain("torch", environ={})
    msg = str(info.value)
    assert "'twin'" in msg and "'dup_a'" in msg and "'dup_b'" in msg and "MCORE_EP_PLUGINS_DISABLE" in msg
    for fix in _suggested_fixes(msg):  # each advertised fix works
        assert explain("torch", environ={"MCORE_EP_PLUGINS_DISABLE": fix}).name == "torch"


def test_duplicate_of_a_builtin_is_rejected_too():
    class Clash:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("mine", aliases=("torch",), factory=object, probe=lambda: Availability.yes())]

    register_plugin(Clash(), "clash")
    with pytest.raises(DuplicateBackendError) as info:
        explain("torch", environ={})
    assert "'torch' is registered twice" in str(info.value)
    assert "plugin 'torch'" in str(info.value) and "plugin 'clash'" in str(info.value)


def test_duplicate_error_suggests_a_fix_that_blocks_exactly_one_provider():
    """Issue 8.3: `MCORE_EP_PLUGINS_DISABLE=mine` also matched the other plugin's backend `mine`."""
    def plugin(backend, aliases=()):
        class P:
            @hookimpl
            def ep_register_backends(self):
                return [BackendSpec(backend, aliases=aliases, factory=object, probe=lambda: Availability.yes())]
        return P()

    register_plugin(plugin("solo"), "mine")
    register_plugin(plugin("mine"), "theirs")
    register_plugin(plugin("extra", aliases=("solo",)), "other")
    with pytest.raises(DuplicateBackendError) as info:
        explain("torch", environ={})
    fixes = _suggested_fixes(str(info.value))
    assert "plugin:mine" in fixes and "plugin:other" in fixes
    reg = discover(load_settings({"MCORE_EP_PLUGINS_DISABLE": "plugin:mine"}))
    assert not reg.conflicts
    assert reg.lookup("mine").provider == "theirs"  # the other provider's backend named 'mine' is untouched
    assert reg.lookup("solo").provider == "other"


def test_while_a_conflict_exists_list_still_shows_everything(capsys):
    """Issue 8.3: every command failed while a duplicate existed, `megatron-ep list` included."""
    class Clash:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("torch", factory=object, probe=lambda: Availability.yes())]

    register_plugin(Clash(), "clash")
    registry, candidates = list_backends(environ={})
    assert registry.conflicts and any(c.name == "torch" for c in candidates)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "CONFLICT" in out and "plugin 'clash'" in out and "conflict" in out
    assert main(["explain"]) == 1
    assert "DuplicateBackendError" in capsys.readouterr().err


def test_entry_point_colliding_with_a_builtin_is_an_error_naming_both(plugin_dir):
    """Issue 8.1: an entry point named `torch` silently replaced the built-in reference backend."""
    plugin_dir("evil-ep", {"torch": "ep_evil"}, {"ep_evil": spec_module("evil")})
    reg = discover(load_settings({}))
    rows = [p for p in reg.plugins if p.name == "torch"]
    assert {p.status for p in rows} == {"conflict"} and len(rows) == 2
    assert {p.builtin for p in rows} == {True, False}
    with pytest.raises(DuplicateBackendError) as info:
        explain("torch", environ={"MCORE_EP_BACKEND": "torch"})
    msg = str(info.value)
    assert "plugin name 'torch'" in msg and "megatron-ep-plugins" in msg and "evil-ep 1.0 (ep_evil)" in msg
    assert "pip uninstall evil-ep" in msg and "MCORE_EP_PLUGINS_DISABLE=dist:evil-ep" in msg
    choice = explain(environ={"MCORE_EP_BACKEND": "torch", "MCORE_EP_PLUGINS_DISABLE": "dist:Evil_EP"})
    assert choice.name == "torch" and choice.spec.provider == "torch"


def test_entry_point_collision_between_third_parties_in_one_directory(tmp_path, monkeypatch):
    """Issue 8.1: installed in the same site-packages, one colliding third party vanished from the list."""
    make_dist(tmp_path, "alpha-ep", {"fast": "ep_alpha"}, {"ep_alpha": spec_module("alpha")})
    make_dist(tmp_path, "beta-ep", {"fast": "ep_beta"}, {"ep_beta": spec_module("beta")})
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("ep_alpha", "ep_beta"):
        sys.modules.pop(name, None)
    registry, _ = list_backends(environ={})
    rows = {p.distribution: p for p in registry.plugins if p.name == "fast"}
    assert set(rows) == {"alpha-ep 1.0", "beta-ep 1.0"} and {p.status for p in rows.values()} == {"conflict"}
    assert registry.lookup("alpha") is None and registry.lookup("beta") is None  # neither silently chosen
    reg = discover(load_settings({"MCORE_EP_PLUGINS_DISABLE": "dist:beta-ep"}))
    assert reg.lookup("alpha") is not None and not reg.conflicts


def test_disable_matches_plugin_names_in_any_case(plugin_dir):
    """Issue 8.2: the words were lower-cased, the entry-point names were not."""
    plugin_dir("third-ep", {"ThirdEP": "ep_third_case"}, {"ep_third_case": spec_module("thirdcase")})
    assert discover(load_settings({})).lookup("thirdcase") is not None
    for word in ("ThirdEP", "thirdep", "plugin:THIRDEP"):
        reg = discover(load_settings({"MCORE_EP_PLUGINS_DISABLE": word}))
        assert reg.lookup("thirdcase") is None, word
        assert next(p for p in reg.plugins if p.name == "ThirdEP").status == "blocked"
        assert not reg.notes, reg.notes


def test_disable_words_with_an_unknown_kind_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match="'pluign:x' is not understood: use NAME, plugin:NAME, backend:NAME, dist:NAME"):
        load_settings({"MCORE_EP_PLUGINS_DISABLE": "pluign:x"})


def test_backends_declare_their_variables_and_the_registry_collects_them():
    reg = discover(load_settings({}))
    by_name = {v.name: v for v in reg.variables}
    assert by_name["MCORE_EP_ELASTIC_NUM_SMS"].scope == "elastic" and by_name["MCORE_EP_ELASTIC_NUM_SMS"].provider == "elastic"
    assert by_name["MCORE_EP_NCCLEP_ALGORITHM"].scope == "ncclep" and by_name["MCORE_EP_BACKEND"].scope == "core"
    assert by_name["MCORE_EP_LEGACY_NUM_SMS"].describe() == "an integer from 2 to 1024, even"


def test_variable_declared_twice_is_a_conflict_naming_both_and_settings_hook_works():
    class Own:
        @hookimpl
        def ep_register_settings(self):
            return [EnvVar("MCORE_EP_SITE_LIMIT", "4", "a site knob", parse=Integer(1, 8))]

    class Thief:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("thief", factory=object, probe=lambda: Availability.yes(),
                                settings=(EnvVar("MCORE_EP_ELASTIC_NUM_SMS", "", "mine now"),))]

    register_plugin(Own(), "site")
    reg = discover(load_settings({}))
    assert reg.variable("MCORE_EP_SITE_LIMIT").scope == "site" and not reg.conflicts
    register_plugin(Thief(), "thief_plugin")
    with pytest.raises(DuplicateBackendError, match="MCORE_EP_ELASTIC_NUM_SMS is declared twice") as info:
        explain("torch", environ={})
    msg = str(info.value)
    assert "'thief_plugin' (scope 'thief')" in msg and "'elastic' (scope 'elastic')" in msg
    assert "MCORE_EP_PLUGINS_DISABLE=plugin:thief_plugin" in msg


def test_a_declared_default_that_does_not_parse_fails_the_plugin():
    class Bad:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("badvar", factory=object, probe=lambda: Availability.yes(),
                                settings=(EnvVar("MCORE_EP_BADVAR_N", "lots", "n", parse=Integer(0, 9)),))]

    register_plugin(Bad(), "bad")
    rec = next(p for p in discover(load_settings({})).plugins if p.name == "bad")
    assert rec.status == "failed" and "MCORE_EP_BADVAR_N='lots' is not an integer" in rec.error


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
