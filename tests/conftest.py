"""Shared fixtures: every async test runs on asyncio and on trio (skipped if trio is missing).

Hypothesis runs are reproducible: derandomized, without an example database or a deadline
(the ``asyncckpt`` profile, loaded here); each test sets only its size and health checks.
``storage`` is a ``FaultyStorage`` over local files for the test to pass as ``storage=``.
``s3_url`` is a bucket on a local S3 server (moto's, on 127.0.0.1), started once per session.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from asyncckpt.testing import FaultyStorage, local_s3

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


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """A fresh bucket on a local S3 server: ``s3://asyncckpt-test-<random>``.

    The server is moto's (``ThreadedMotoServer`` on 127.0.0.1, a free port), started once for
    the session and stopped at its end. For that time the standard variables point every
    client of the process (and of its subprocesses) at it: ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` ("testing"), ``AWS_REGION``
    (us-east-1) and ``AWS_ALLOW_HTTP``, so a URL alone reaches the bucket. Tests share the
    bucket: each writes under its own prefix.
    """
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    with local_s3() as s3:
        yield s3.url
