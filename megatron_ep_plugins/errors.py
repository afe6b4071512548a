"""The exceptions the package raises; each message says what was wrong and what would be right."""

from __future__ import annotations

__all__ = [
    "BackendInitError",
    "BackendUnavailableError",
    "ConfigError",
    "DuplicateBackendError",
    "EPPluginError",
    "InvalidInputError",
    "NoBackendAvailableError",
    "PatchError",
    "RankMismatchError",
    "RankTimeoutError",
    "UnknownBackendError",
]


class EPPluginError(RuntimeError):
    """Base class of every error raised by megatron_ep_plugins."""


class ConfigError(EPPluginError, ValueError):
    """An ``MCORE_EP_*`` environment variable (or an argument) has an invalid value."""


class DuplicateBackendError(EPPluginError):
    """Two providers claim one name: an entry-point (plugin) name, a backend name or alias, or a variable."""


class UnknownBackendError(EPPluginError, LookupError):
    """A backend was named that no loaded plugin registers."""


class BackendUnavailableError(EPPluginError):
    """The backend the user named is not available here (its probe said no)."""


class NoBackendAvailableError(EPPluginError):
    """``auto`` found no available backend (or every available one failed to initialise)."""


class BackendInitError(EPPluginError):
    """A backend's factory raised while it was being created."""


class PatchError(EPPluginError):
    """Megatron does not have the slot (module, name, signature) the patch table expects."""


class RankMismatchError(EPPluginError):
    """Ranks of one process group selected different backends or parameters."""


class RankTimeoutError(RankMismatchError):
    """Some ranks of a group did not reach the agreement check in time; the message names them."""


class InvalidInputError(EPPluginError, ValueError):
    """A dispatch/combine argument has a wrong dtype, shape or value."""
