"""Shared fixtures: every async test runs on asyncio and on trio (skipped if trio is missing).

Hypothesis runs are reproducible: derandomized, without an example database or a deadline
(the ``asyncckpt`` profile, loaded here); each test sets only its size and health checks.
``storage`` is a ``FaultyStorage`` over local files for the test to pass as ``storage=``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Iterator

settings.register_profile("asyncckpt", deadline=None, derandomize=True, database=None)
settings.load_profile("asyncckpt")

_BACKENDS = ["asyncio"]
if importlib.util.find_spec("trio") is not None:
    _BACKENDS.append("trio")


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run anyio-marked tests once per backend (not the plugin's default)."""
    return str(request.param)


@pytest.fixture
def storage() -> Iterator[FaultyStorage]:
    """A ``FaultyStorage`` over local files, its block open for the whole test.

    Faults reach only what is given it (``storage=storage``). The block ends at teardown: every
    stall is released, and one that was never released fails the test.
    """
    with FaultyStorage() as faults:
        yield faults


@pytest.fixture(autouse=True)
def _patient_abandonment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled write waits up to 1 s for its thread before abandoning it; tests that hold
    a storage call and release it after a cancellation must not see that wait expire on a
    slow or loaded machine. tests/test_loop.py tests the real abandonment with its own value.
    """
    monkeypatch.setattr("asyncckpt._checkpoint._manager._ABANDON_AFTER_SECS", 30.0)
