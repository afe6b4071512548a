"""Shared fixtures: a clean environment and no leftover installation between tests."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (distributed.py, emulators)


@pytest.fixture(autouse=True)
def clean_ep_state(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MCORE_EP_"):
            monkeypatch.delenv(name)
    yield
    import megatron_ep_plugins.api as api
    import megatron_ep_plugins.autoload as autoload
    import megatron_ep_plugins.manager as manager

    api.uninstall()
    autoload.deactivate()
    manager._programmatic.clear()
