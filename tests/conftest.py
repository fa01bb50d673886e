"""Shared fixtures: every async test runs on asyncio and on trio (skipped if trio is missing)."""

from __future__ import annotations

import importlib.util

import pytest

_BACKENDS = ["asyncio"]
if importlib.util.find_spec("trio") is not None:
    _BACKENDS.append("trio")


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run anyio-marked tests once per backend (not the plugin's default)."""
    return str(request.param)
