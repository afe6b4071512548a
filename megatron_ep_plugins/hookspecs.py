"""The plugin contract: the hooks a ``megatron_ep_plugins`` plugin may implement.

A plugin is a module (or object) with functions marked ``@megatron_ep_plugins.hookimpl`` and named
after the hooks below, announced through an entry point in the group ``megatron_ep_plugins``::

    [project.entry-points.megatron_ep_plugins]
    my_ep = "my_package.ep_plugin"

Each hook's docstring is its specification. Hook implementations may accept a subset of a hook's
arguments (pluggy passes them by name). ``tryfirst=True`` / ``trylast=True`` on a ``hookimpl``
order implementations as pluggy documents; for :func:`ep_register_backends` that order is also the
tie-break between backends of equal priority (earlier wins).

Plugins must keep module import cheap: no ``deep_ep``/``megatron`` import at module level; do the
heavy import in :attr:`BackendSpec.factory` (and, guarded, in the probe).

This module is the contract layer: it imports only the records (:mod:`~megatron_ep_plugins.spec`)
and the settings (:mod:`~megatron_ep_plugins.config`), never anything above it. The prose version,
with the ``EPBackend`` methods and a worked example, is ``docs/backend-contract.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings
    from .spec import BackendSpec, Candidate, Choice, EnvVar, EPBackend

PROJECT_NAME = "megatron_ep_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def ep_register_backends() -> Sequence["BackendSpec"]:
    """Register the dispatch/combine backends this plugin provides.

    :returns: a sequence of :class:`~megatron_ep_plugins.spec.BackendSpec` (may be empty, e.g.
        when the plugin decides at import time that it has nothing to offer; prefer registering
        and reporting unavailability through the probe, so users see *why*).

    Example::

        @hookimpl
        def ep_register_backends():
            return [BackendSpec(name="my-ep", priority=150, factory=_factory, probe=_probe,
                                settings=(EnvVar("MCORE_EP_MY_EP_NUM_SMS", "", "SMs per dispatch",
                                                 parse=Integer(0, 1024)),),
                                capabilities=Capabilities(devices=("cuda",), internode=True))]

    Rules the plugin manager enforces:

    * every item must be a ``BackendSpec`` (anything else: the plugin is recorded as failed);
    * a name or alias may be registered by one plugin only, and a variable (``settings``) declared
      by one provider only: a second claim is a conflict naming both plugins, shown by
      ``megatron-ep list``; ``install()``/``explain()`` raise
      :class:`~megatron_ep_plugins.errors.DuplicateBackendError` until it is resolved;
    * ``provider`` (and each variable's ``scope``/``provider``) is overwritten by the manager;
    * if this hook raises, the plugin is recorded as failed with its error and the other plugins'
      backends remain usable.

    This hook is called once per discovery (at install, ``megatron-ep list`` etc.), never on the
    dispatch path. It must not import the backend library: put that in ``factory``/``probe``.
    """


@hookspec
def ep_register_settings() -> Sequence["EnvVar"]:
    """Declare ``MCORE_EP_*`` variables this plugin reads that belong to no backend.

    For plugins without a backend, e.g. a site policy (:func:`ep_select_backend`) with a knob of
    its own; a backend's variables go in its ``BackendSpec(settings=...)``.

    :returns: a sequence of :class:`~megatron_ep_plugins.spec.EnvVar` (scope: the plugin's name).

    Example::

        @hookimpl
        def ep_register_settings():
            return [EnvVar("MCORE_EP_SITE_PREFER", "", "backend this site prefers under auto",
                           parse=Text("a backend name"))]

    Declared variables are listed by ``megatron-ep env``, validated before any selection (a value
    that does not parse is a :class:`~megatron_ep_plugins.errors.ConfigError`), and readable with
    ``megatron_ep_plugins.config.read_str`` & co. Same conflict rule as backend names. If this hook
    raises or returns something else than ``EnvVar`` records, the plugin is recorded as failed.
    """


@hookspec(firstresult=True)
def ep_select_backend(candidates: Sequence["Candidate"], settings: "Settings") -> Optional[str]:
    """Site policy: pick the backend for ``MCORE_EP_BACKEND=auto``.

    :param candidates: every registered, not-disabled backend with its probe's verdict, in
        default preference order (priority descending, then registration order).
    :param settings: the parsed ``MCORE_EP_*`` settings.
    :returns: a backend name or alias to use, or ``None`` to defer to the next implementation
        and finally to the default policy (highest-priority available backend).

    Example (prefer the backend named by a site variable when it is available)::

        @hookimpl
        def ep_select_backend(candidates, settings):
            want = read_str("MCORE_EP_SITE_PREFER", settings.environ)
            return want if any(c.name == want and c.availability for c in candidates) else None

    The first non-``None`` result wins (order: ``tryfirst`` implementations, then the others
    in reverse registration order, then ``trylast``). The policy is *only* consulted under
    ``auto``: a backend the user named in ``MCORE_EP_BACKEND`` or ``install(backend=...)`` is
    never overridden. Returning an unknown name is an
    :class:`~megatron_ep_plugins.errors.UnknownBackendError`; returning an unavailable backend
    is a :class:`~megatron_ep_plugins.errors.BackendUnavailableError` (the policy asked for it
    explicitly, so it is not silently replaced).
    """


@hookspec
def ep_backend_installed(choice: "Choice", backend: "EPBackend") -> None:
    """Called once after ``backend`` was created and patched into Megatron.

    :param choice: the selection record (what was chosen and why, see ``explain()``).
    :param backend: the live backend instance.

    Example::

        @hookimpl
        def ep_backend_installed(choice, backend):
            telemetry.record("ep_backend", choice.name, mode=choice.mode)

    For logging, telemetry and profiler annotations. Must not call dispatch/combine and must not
    run collectives (ranks may not reach this point together). If it raises, ``install()``
    restores Megatron's original objects, installs nothing and raises
    :class:`~megatron_ep_plugins.errors.EPPluginError` naming the plugin and its error.
    """
