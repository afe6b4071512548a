"""Selection policy: names, aliases, auto, unknown and unavailable backends, fallback, site policy."""

from __future__ import annotations

import pytest

from megatron_ep_plugins import hookimpl
from megatron_ep_plugins.api import explain
from megatron_ep_plugins.config import load_settings
from megatron_ep_plugins.errors import (BackendUnavailableError, ConfigError,
                                        EPPluginError, NoBackendAvailableError, UnknownBackendError)
from megatron_ep_plugins.manager import discover, register_plugin
from megatron_ep_plugins.selection import select, select_and_create
from megatron_ep_plugins.spec import Availability, BackendSpec


class Live:
    def __init__(self, name="?"):
        self.name = name


def add_backend(name, priority=10, available=True, reason="ok", factory=None, aliases=(), **marker):
    class P:
        @hookimpl(**marker)
        def ep_register_backends(self):
            return [BackendSpec(name, aliases=aliases, priority=priority, factory=factory or Live,
                                probe=lambda: Availability(available, reason))]
    register_plugin(P(), f"plugin_{name}")


def choose(env, requested=None):
    settings = load_settings(env)
    return select(discover(settings), settings, requested)


def test_auto_picks_highest_priority_available_and_explains_everyone():
    add_backend("fast", priority=500, available=False, reason="needs SM90")
    add_backend("good", priority=400)
    add_backend("meh", priority=300)
    choice = choose({})
    assert choice.name == "good" and choice.mode == "auto"
    outcome = {v.name: (v.outcome, v.why) for v in choice.verdicts}
    assert outcome["fast"] == ("rejected", "needs SM90")
    assert outcome["good"][0] == "chosen" and "highest-priority" in outcome["good"][1]
    assert outcome["meh"][0] == "skipped" and "lower priority than 'good'" in outcome["meh"][1]
    assert outcome["torch"][0] == "skipped"
    data = choice.as_dict()
    assert data["backend"] == "good" and {c["name"] for c in data["candidates"]} >= {"fast", "good", "meh", "torch"}
    assert "* good" in choice.summary()


@pytest.mark.parametrize("value", ["torch", " TORCH ", "Reference", "torch-a2a\n"])
def test_names_and_aliases_ignore_case_and_space(value):
    choice = choose({"MCORE_EP_BACKEND": value})
    assert choice.name == "torch" and choice.mode == "explicit"


def test_unknown_name_lists_every_backend_with_availability_and_reason():
    add_backend("fast", available=False, reason="needs SM90")
    with pytest.raises(UnknownBackendError) as info:
        choose({"MCORE_EP_BACKEND": "elastik"})
    msg = str(info.value)
    assert "unknown backend 'elastik'" in msg and "'auto'" in msg
    assert "fast" in msg and "unavailable - needs SM90" in msg and "torch" in msg and "available" in msg


def test_named_unavailable_backend_is_an_error_never_a_downgrade():
    add_backend("fast", priority=500, available=False, reason="NCCL 2.28 < 2.30.4")
    with pytest.raises(BackendUnavailableError) as info:
        choose({"MCORE_EP_BACKEND": "fast"})
    msg = str(info.value)
    assert "'fast'" in msg and "NCCL 2.28 < 2.30.4" in msg and "MCORE_EP_FALLBACK=torch" in msg


def test_fallback_only_when_asked_and_recorded():
    add_backend("fast", priority=500, available=False, reason="no GPU")
    choice = choose({"MCORE_EP_BACKEND": "fast", "MCORE_EP_FALLBACK": "torch"})
    assert choice.name == "torch" and choice.mode == "fallback" and choice.requested == "fast"
    assert any("'fast' is unusable (no GPU)" in n for n in choice.notes)
    assert {v.name: v.outcome for v in choice.verdicts}["fast"] == "rejected"


def test_fallback_that_is_unusable_too_names_both_reasons():
    add_backend("fast", available=False, reason="no GPU")
    add_backend("slow", available=False, reason="no NIC")
    with pytest.raises(BackendUnavailableError, match="(?s)no GPU.*slow.*no NIC"):
        choose({"MCORE_EP_BACKEND": "fast", "MCORE_EP_FALLBACK": "slow"})
    with pytest.raises(UnknownBackendError, match="MCORE_EP_FALLBACK='nope'"):
        choose({"MCORE_EP_BACKEND": "fast", "MCORE_EP_FALLBACK": "nope"})


def test_factory_failure_of_named_backend_is_an_error_with_the_reason():
    def broken():
        raise RuntimeError("cudaMalloc failed")
    add_backend("fast", priority=500, factory=broken)
    settings = load_settings({"MCORE_EP_BACKEND": "fast"})
    with pytest.raises(BackendUnavailableError, match="failed to initialise: RuntimeError: cudaMalloc failed"):
        select_and_create(discover(settings), settings)
    settings = load_settings({"MCORE_EP_BACKEND": "fast", "MCORE_EP_FALLBACK": "torch"})
    choice, live = select_and_create(discover(settings), settings)
    assert choice.name == "torch" and choice.mode == "fallback" and live.name == "torch"


def test_auto_moves_past_a_backend_that_fails_to_initialise_and_says_so():
    def broken():
        raise RuntimeError("cudaMalloc failed")
    add_backend("fast", priority=500, factory=broken)
    add_backend("good", priority=400)
    settings = load_settings({})
    choice, live = select_and_create(discover(settings), settings)
    assert choice.name == "good" and isinstance(live, Live) and live.name == "good"
    assert {v.name: v.outcome for v in choice.verdicts}["fast"] == "failed"
    assert any("cudaMalloc failed" in n for n in choice.notes)


def test_auto_with_nothing_available():
    add_backend("fast", available=False, reason="no GPU")
    with pytest.raises(NoBackendAvailableError, match="(?s)no usable backend.*fast.*no GPU.*torch.*blocked"):
        choose({"MCORE_EP_PLUGINS_DISABLE": "torch,allgather"})


def test_naming_a_blocked_backend_says_it_is_blocked():
    with pytest.raises(BackendUnavailableError, match="blocked by MCORE_EP_PLUGINS_DISABLE"):
        choose({"MCORE_EP_BACKEND": "torch", "MCORE_EP_PLUGINS_DISABLE": "torch"})


def test_probe_that_raises_or_lies_is_reported_unavailable():
    class P:
        @hookimpl
        def ep_register_backends(self):
            def boom():
                raise OSError("libcuda.so.1 missing")
            return [BackendSpec("raiser", priority=900, factory=Live, probe=boom),
                    BackendSpec("liar", priority=800, factory=Live, probe=lambda: True)]
    register_plugin(P(), "p")
    verdicts = {v.name: v for v in choose({}).verdicts}
    assert "probe raised OSError: libcuda.so.1 missing" in verdicts["raiser"].why
    assert "returned True instead of an Availability" in verdicts["liar"].why


def test_site_policy_hook_overrides_auto_but_never_a_named_backend():
    add_backend("good", priority=400)

    class Policy:
        @hookimpl
        def ep_select_backend(self, candidates, settings):
            assert [c.name for c in candidates][:1] == ["good"]  # default order is visible to the policy
            return "reference"

    class Deferring:
        @hookimpl(tryfirst=True)
        def ep_select_backend(self, candidates):
            return None

    register_plugin(Policy(), "site_policy")
    register_plugin(Deferring(), "deferring")
    choice = choose({})
    assert choice.name == "torch" and choice.mode == "policy"
    assert choose({"MCORE_EP_BACKEND": "good"}).name == "good"


def test_policy_returning_unknown_or_unavailable_backend_fails():
    add_backend("fast", available=False, reason="no GPU")

    class Policy:
        @hookimpl
        def ep_select_backend(self):
            return "fast"
    register_plugin(Policy(), "site_policy")
    with pytest.raises(BackendUnavailableError, match="(?s)policy hook chose backend 'fast'.*no GPU"):
        choose({})


def test_policy_hook_failure_is_reported():
    class Policy:
        @hookimpl
        def ep_select_backend(self):
            raise KeyError("cluster db")
    register_plugin(Policy(), "site_policy")
    with pytest.raises(EPPluginError, match="ep_select_backend raised KeyError"):
        choose({})


@pytest.mark.parametrize("env,fragment", [
    ({"MCORE_EP_PLUGINS_AUTOLOAD": "maybe"}, "MCORE_EP_PLUGINS_AUTOLOAD='maybe' is not a boolean"),
    ({"MCORE_EP_FALLBACK": "auto"}, "MCORE_EP_FALLBACK='auto' is ambiguous"),
    ({"MCORE_EP_LOG": "loud"}, "MCORE_EP_LOG='loud' is not a log level"),
    ({"MCORE_EP_CHECK_RANKS": "2"}, "is not a boolean"),
])
def test_bad_env_values(env, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert fragment in str(info.value)


def test_off_means_off():
    with pytest.raises(EPPluginError, match="'off'"):
        choose({"MCORE_EP_BACKEND": "off"})
    assert explain("torch", environ={"MCORE_EP_BACKEND": "off"}).name == "torch"  # explicit argument wins
