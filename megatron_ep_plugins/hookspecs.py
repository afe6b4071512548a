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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings
    from .selection import Choice
    from .spec import BackendSpec, Candidate, EPBackend

PROJECT_NAME = "megatron_ep_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def ep_register_backends() -> Sequence["BackendSpec"]:
    """Register the dispatch/combine backends this plugin provides.

    :returns: a sequence of :class:`~megatron_ep_plugins.spec.BackendSpec` (may be empty, e.g.
        when the plugin decides at import time that it has nothing to offer; prefer registering
        and reporting unavailability through the probe, so users see *why*).

    Rules the plugin manager enforces:

    * every item must be a ``BackendSpec`` (anything else: the plugin is recorded as failed);
    * a name or alias may be registered by one plugin only: a second registration is a
      :class:`~megatron_ep_plugins.errors.DuplicateBackendError` naming both plugins;
    * ``provider`` is overwritten with the registering plugin's name;
    * if this hook raises, the plugin is recorded as failed with its error and the other plugins'
      backends remain usable.

    This hook is called once per discovery (at install, ``megatron-ep list`` etc.), never on the
    dispatch path. It must not import the backend library: put that in ``factory``/``probe``.
    """


@hookspec(firstresult=True)
def ep_select_backend(candidates: Sequence["Candidate"], settings: "Settings") -> Optional[str]:
    """Site policy: pick the backend for ``MCORE_EP_BACKEND=auto``.

    :param candidates: every registered, not-disabled backend with its probe's verdict, in
        default preference order (priority descending, then registration order).
    :param settings: the parsed ``MCORE_EP_*`` settings.
    :returns: a backend name or alias to use, or ``None`` to defer to the next implementation
        and finally to the default policy (highest-priority available backend).

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

    For logging, telemetry and profiler annotations. Must not call dispatch/combine and must not
    run collectives (ranks may not reach this point together). Exceptions propagate.
    """
