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
    with pytest.raises(ConfigError, match="MCORE_EP_FALLBACK='nope' names no registered backend; valid names: .*torch"):
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


# -- issue 8.4: a malformed value is an error whatever the mode; only a missing library is "unavailable" ---------

@pytest.mark.parametrize("mode", ["auto", "torch"])
@pytest.mark.parametrize("env,fragment", [
    ({"MCORE_EP_ELASTIC_NUM_SMS": "abc"}, "MCORE_EP_ELASTIC_NUM_SMS='abc' is not an integer"),
    ({"MCORE_EP_ELASTIC_NUM_SMS": "99999999999999999999"}, "is out of range: it must be at least 0 and no larger than 1024"),
    ({"MCORE_EP_NCCLEP_TIMEOUT_MS": "99999999999999999999"}, "no larger than 86400000"),
    ({"MCORE_EP_LEGACY_NUM_SMS": "7"}, "MCORE_EP_LEGACY_NUM_SMS='7' is not even"),
    ({"MCORE_EP_ELASTIC_HYBRID_MODE": "maybe"}, "use one of auto, 1, 0"),
    ({"MCORE_EP_NCCLEP_ALGORITHM": "ht", "MCORE_EP_NCCLEP_ACTIVE_MASK": "1"}, "LL algorithm only"),
    ({"MCORE_EP_FALLBACK": "nonexistent"}, "MCORE_EP_FALLBACK='nonexistent' names no registered backend"),
    ({"MCORE_EP_CHECK_RANKS_TIMEOUT": "0"}, "MCORE_EP_CHECK_RANKS_TIMEOUT='0' is out of range"),
])
def test_malformed_variable_is_an_error_whatever_the_mode(env, fragment, mode):
    """`MCORE_EP_ELASTIC_NUM_SMS=abc` used to move an `auto` job to the next backend."""
    add_backend("fast", priority=900, factory=Live)
    with pytest.raises(ConfigError) as info:
        choose({"MCORE_EP_BACKEND": mode, **env})
    assert fragment in str(info.value)


def test_every_bad_value_is_reported_at_once_naming_its_reader():
    with pytest.raises(ConfigError) as info:
        choose({"MCORE_EP_ELASTIC_NUM_SMS": "abc", "MCORE_EP_NCCLEP_NUM_SMS": "-1"})
    msg = str(info.value)
    assert "MCORE_EP_ELASTIC_NUM_SMS='abc'" in msg and "(read by elastic)" in msg
    assert "MCORE_EP_NCCLEP_NUM_SMS='-1'" in msg and "(read by ncclep)" in msg


def test_unavailable_library_is_still_just_unavailable_under_auto():
    choice = choose({"MCORE_EP_ELASTIC_NUM_SMS": "24"})  # valid value, no deep_ep here
    assert choice.name == "torch"
    assert {v.name: v.outcome for v in choice.verdicts}["elastic"] == "rejected"


def test_factory_raising_config_error_stops_auto_instead_of_moving_on():
    from megatron_ep_plugins.errors import ConfigError as CE

    def picky():
        raise CE("MCORE_EP_FAST_MODE='x' is invalid")
    add_backend("fast", priority=900, factory=picky)
    settings = load_settings({})
    with pytest.raises(ConfigError, match="MCORE_EP_FAST_MODE"):
        select_and_create(discover(settings), settings)


def test_undeclared_mcore_ep_variable_is_noted_with_the_closest_names():
    choice = choose({"MCORE_EP_ELASTIC_NUM_SM": "24"})
    assert any("MCORE_EP_ELASTIC_NUM_SM is set but no loaded plugin" in n and "MCORE_EP_ELASTIC_NUM_SMS" in n
               for n in choice.notes)


def test_empty_value_means_the_default_not_false():
    assert load_settings({"MCORE_EP_CHECK_RANKS": ""}).check_ranks is True
    assert load_settings({"MCORE_EP_CHECK_RANKS": " 0 "}).check_ranks is False


# -- issue 8.6: the environment reaches the backends ----------------------------------------------------------------

def _env_backend(seen):
    from megatron_ep_plugins.config import read_int
    from megatron_ep_plugins.spec import EnvVar, Integer

    settings = (EnvVar("MCORE_EP_ENVTEST_SIZE", "3", "a size", parse=Integer(1, 100)),)

    def probe(env):
        seen.append(("probe", env["MCORE_EP_ENVTEST_SIZE"], read_int("MCORE_EP_ENVTEST_SIZE")))
        return Availability.yes(f"size {env['MCORE_EP_ENVTEST_SIZE']}")

    def factory():
        seen.append(("factory", read_int("MCORE_EP_ENVTEST_SIZE")))
        return Live("envtest")

    class P:
        @hookimpl
        def ep_register_backends(self):
            return [BackendSpec("envtest", priority=-50, factory=factory, probe=probe, settings=settings)]
    register_plugin(P(), "envtest_plugin")


def test_probes_and_factories_see_the_environment_they_are_asked_about(monkeypatch):
    from megatron_ep_plugins.api import list_backends
    from megatron_ep_plugins.config import declare

    seen = []
    _env_backend(seen)
    monkeypatch.setenv("MCORE_EP_ENVTEST_SIZE", "99")  # os.environ says 99; the callers ask about 7
    choice = explain("envtest", environ={"MCORE_EP_ENVTEST_SIZE": "7"})
    assert choice.name == "envtest" and ("probe", 7, 7) in seen
    _, candidates = list_backends(environ={"MCORE_EP_ENVTEST_SIZE": "8"})
    assert next(c for c in candidates if c.name == "envtest").availability.reason == "size 8"
    settings = load_settings({"MCORE_EP_ENVTEST_SIZE": "9"})
    select_and_create(discover(settings), settings, "envtest")
    assert ("factory", 9) in seen
    with pytest.raises(ConfigError, match="MCORE_EP_ENVTEST_SIZE='0' is out of range"):
        explain("torch", environ={"MCORE_EP_ENVTEST_SIZE": "0"})
    declare()  # no-op


def test_builtin_backends_read_the_environment_asked_about(monkeypatch):
    """ncclep's probe reads its variables itself (no `env` parameter): it must see `environ=`."""
    from megatron_ep_plugins.api import list_backends

    _, candidates = list_backends(environ={"MCORE_EP_NCCLEP_ALGORITHM": "ht", "MCORE_EP_NCCLEP_ACTIVE_MASK": "1"})
    assert "LL algorithm only" in next(c for c in candidates if c.name == "ncclep").availability.reason
    _, candidates = list_backends(environ={})
    assert "LL algorithm only" not in next(c for c in candidates if c.name == "ncclep").availability.reason
