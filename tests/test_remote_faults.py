"""Faults at every request of a save, against a real S3 server (issue 16, point 6).

A ``FaultProxy`` (tests/s3_proxy.py) sits on loopback in front of the session's moto server
(the ``s3_url`` fixture); managers reach it through ``storage_options={"endpoint": ...}``,
with short client timeouts and two retries, so that no test waits obstore's defaults (a 30 s
timeout, ten retries, three minutes). Everything that checks a directory afterwards (the
state file, restores, ``asyncckpt verify``, the object listing) goes straight to moto.

- The matrix: the requests of a second save (``max_to_keep=1``: upload, state file, deletion
  of the retired checkpoint) are recorded, for a state that is one PUT and for one that is a
  multipart upload (create, two parts, complete); then every fault kind is injected at each
  of those requests in turn, each on a fresh prefix. The oracle is the proxy's record: the
  new checkpoint must be the latest exactly when the state file's PUT reached the server,
  and whichever is the latest restores intact, nothing else is listed, ``verify`` passes, the
  manager's statistics and error say what happened, and the save ends in bounded time.
- Two writers racing to commit, the second having taken over the first's expired lease:
  exactly one commit wins.
- The kill -9 harness of ``benchmarks/crash.py`` against the S3 server.

The matrix and the race run on asyncio only: the requests are made by the storage's worker
threads, the same on both loops (tests/test_remote.py runs the backend on trio); the killed
trainer runs on both loops in turn.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import io
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import numpy as np
import obstore
import pytest
from obstore.store import S3Store
from s3_proxy import FaultKind, FaultProxy, Request

from asyncckpt import (
    CheckpointLockedError,
    CheckpointManager,
    CheckpointWriteError,
    Saver,
    get_checkpoint_state,
)
from asyncckpt._storage import LOCK_NAME
from asyncckpt._storage._object import ObjectStorage
from asyncckpt.cli import main as cli_main
from benchmarks.crash import check_directory, run_trainer_kills

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from obstore.store import ClientConfig, RetryConfig

    from asyncckpt import CheckpointManagerStatistics

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
BACKENDS = ("asyncio", "trio") if importlib.util.find_spec("trio") is not None else ("asyncio",)

MIB: Final = 1024 * 1024
SIZES: Final = {"single": 64 * 1024, "multipart": 8 * MIB + 64 * 1024}
"""Bytes of the step-2 state: one PUT, or a multipart upload of two parts (the storage's
default ``part_bytes`` is 8 MiB). Step 1 is always the small one."""
TIMEOUT_SECS: Final = 1.0
RETRIES: Final = 2
HANG_GUARD_SECS: Final = 120.0
"""A save with one faulty request must end (a request gives up after at most ``1 + RETRIES``
attempts of ``TIMEOUT_SECS`` and 5 s of retrying; with obstore's defaults a throttled request
alone would retry for minutes): a guard against a hang, not a measure of speed."""


def client_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        # Any client option given makes obstore ignore the environment's AWS_ALLOW_HTTP.
        "allow_http": True,
        "timeout": f"{int(TIMEOUT_SECS * 1000)}ms",
        "connect_timeout": f"{int(TIMEOUT_SECS * 1000)}ms",
        "retry_config": {
            "max_retries": RETRIES,
            "retry_timeout": datetime.timedelta(seconds=5),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=10),
                "max_backoff": datetime.timedelta(milliseconds=100),
                "base": 2,
            },
        },
    }


def state(step: int, size: int = SIZES["single"]) -> dict[str, Any]:
    """A state of ``size`` bytes whose every value is ``step``."""
    return {"w": np.full(size // 4, step, np.float32), "step": step}


def assert_state(tree: Any, step: int) -> None:
    assert tree["step"] == step
    assert tree["w"].dtype == np.float32
    assert tree["w"].size in {size // 4 for size in SIZES.values()}
    assert (tree["w"] == step).all(), f"the checkpoint of step {step} holds other values"


def bucket_and_prefix(directory: str) -> tuple[str, str]:
    bucket, _, prefix = directory.removeprefix("s3://").partition("/")
    return bucket, prefix


def s3_client() -> Any:
    """A boto3 client of the session's S3 server (made once: boto3 clients are costly to
    make, and may be shared by threads)."""
    return _s3_client(os.environ["AWS_ENDPOINT_URL"])


@functools.cache
def _s3_client(endpoint: str) -> Any:
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=endpoint)


def listing(directory: str) -> tuple[list[str], int]:
    """The names of the objects under ``directory`` and its incomplete multipart uploads, as
    the server has them (boto3, not the code under test)."""
    bucket, prefix = bucket_and_prefix(directory)
    client = s3_client()
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/")
    names = sorted(item["Key"].removeprefix(prefix + "/") for item in found)
    return names, len(uploads.get("Uploads", []))


def verify(directory: str) -> tuple[int, str]:
    out = io.StringIO()
    status = cli_main(["verify", directory], out=out)
    return status, out.getvalue()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (worker threads and the proxy progress meanwhile), for 10 s at most:
    a thread's event or the wall clock, which no ``anyio.Event`` can stand for."""
    for _ in range(1000):
        if predicate():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{what} within 10 s")


@pytest.fixture(scope="module")
def proxy(s3_url: str) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the session's S3 server, for this module's tests."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as running:
        yield running


# -- the proxy itself ------------------------------------------------------------------------------


def test_the_proxy_breaks_requests_as_told(proxy: FaultProxy, s3_url: str) -> None:
    # Raw obstore PUTs without retries, so that each fault reaches the caller: the matrix
    # below takes the proxy's record for the truth, and this checks the record.
    bucket, _ = bucket_and_prefix(s3_url)
    prefix = f"proxy-{uuid.uuid4().hex[:8]}"
    client: ClientConfig = {"allow_http": True, "timeout": "500ms"}
    retries: RetryConfig = {"max_retries": 0}
    through = S3Store(bucket, endpoint=proxy.url, client_options=client, retry_config=retries)
    kinds: list[tuple[FaultKind, bool, str]] = [  # the kind, whether the server did it, error
        ("reset", False, "error sending request"),
        ("reset_after", True, "error sending request"),
        ("500", False, "500 Internal Server Error"),
        ("503", False, "SlowDown"),
        ("timeout", False, "error sending request"),
        ("timeout_after", True, "error sending request"),
    ]
    for kind, done, error in kinds:
        key = f"{prefix}/{kind}"
        rule = proxy.inject(kind, method="PUT", path=f"/{key}", skip=1)
        obstore.put(through, key, b"first")  # skipped: it passes
        with pytest.raises(Exception, match=error):
            obstore.put(through, key, b"second")
        proxy.remove(rule)
        assert rule.hits == 1
        body = s3_client().get_object(Bucket=bucket, Key=key)
        assert body["Body"].read() == (b"second" if done else b"first"), kind
        last = proxy.requests_of(f"/{key}")[-1]
        assert (last.what, last.fault) == (f"PUT {kind}", kind)
        assert last.upstream == (200 if done else None), kind
        assert last.status == (int(kind) if kind.isdigit() else None), kind
    # A delay lets the request through once released; the record says what reached whom.
    release = threading.Event()
    rule = proxy.inject("delay", method="PUT", path=f"/{prefix}/delayed", release=release)
    timer = threading.Timer(0.1, release.set)
    timer.start()
    obstore.put(through, f"{prefix}/delayed", b"late")
    timer.join()
    assert rule.hits == 1
    (request,) = proxy.requests_of(f"/{prefix}/delayed")
    assert (request.status, request.upstream, request.fault) == (200, 200, "delay")


# -- the requests of a save ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One request of a save: the ``skip + 1``-th of this method, object and query keys."""

    method: str
    name: str
    query: tuple[str, ...] = ()
    skip: int = 0

    @property
    def what(self) -> str:
        """As ``Request.what`` labels it."""
        return Request(self.method, "", self.query, None, None, None, (f"/{self.name}",)).what

    @property
    def label(self) -> str:
        return self.what + (f" #{self.skip + 1}" if self.skip else "")


_PART = ("partNumber", "uploadId")
SAVE_REQUESTS: Final = {
    # What docs/STORAGE.md ("Costs: requests per save") counts; obstore's delete is S3's
    # DeleteObjects, a POST naming the keys in its body.
    "single": (
        Target("PUT", "model.ckpt-2"),
        Target("PUT", "checkpoint"),
        Target("POST", "model.ckpt-1", ("delete",)),
    ),
    "multipart": (
        Target("POST", "model.ckpt-2", ("uploads",)),
        Target("PUT", "model.ckpt-2", _PART),
        Target("PUT", "model.ckpt-2", _PART, skip=1),  # the parts go up at once: either one
        Target("POST", "model.ckpt-2", ("uploadId",)),
        Target("PUT", "checkpoint"),
        Target("POST", "model.ckpt-1", ("delete",)),
    ),
}
STATE_FILE_PUT: Final = Target("PUT", "checkpoint")


@ASYNCIO_ONLY
@pytest.mark.parametrize("size", SIZES)
async def test_the_requests_of_a_second_save(proxy: FaultProxy, s3_url: str, size: str) -> None:
    # The list the matrix breaks one by one: if a save made another request, the matrix
    # would miss it, and this fails.
    directory = f"{s3_url}/requests-{uuid.uuid4().hex[:8]}"
    _bucket, prefix = bucket_and_prefix(directory)
    options = client_options(proxy.url)
    async with CheckpointManager(directory, max_to_keep=1, storage_options=options) as manager:
        await manager.save(state(1), 1)
        await manager.wait()
        first = len(proxy.requests_of(f"/{prefix}/"))
        await manager.save(state(2, SIZES[size]), 2)
        await manager.wait()
        second = proxy.requests_of(f"/{prefix}/")[first:]
    assert [request.what for request in second] == [t.what for t in SAVE_REQUESTS[size]]
    assert all(request.status == 200 and request.fault is None for request in second)


# -- the fault matrix ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    times: int | None = 1


FAULTS: Final = {
    "reset": Fault("reset"),
    "reset_after": Fault("reset_after"),  # the server did it; the answer is lost
    "500": Fault("500"),
    "503": Fault("503"),
    "throttled": Fault("503", times=None),
    "timeout": Fault("timeout"),
    "timeout_after": Fault("timeout_after"),  # the server did it; the answer comes too late
}


@dataclass(slots=True)
class Case:
    """One fault at one request of a save, and what it left."""

    fault: str
    target: Target
    size: str
    directory: str
    hits: int = 0
    error: CheckpointWriteError | None = None
    statistics: CheckpointManagerStatistics | None = None
    manager_latest: int | None = None
    requests: list[Request] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        """Whether a PUT of the state file reached the server during the faulty save."""
        return any(
            request.what == STATE_FILE_PUT.what and request.upstream == 200
            for request in self.requests
        )

    @property
    def outcome(self) -> str:
        if self.error is None:
            return "saved"
        return "committed, then failed" if self.committed else "failed"


async def run_case(proxy: FaultProxy, case: Case) -> None:
    """Save step 1, then step 2 with ``case.fault`` at ``case.target``; record what happened."""
    _bucket, prefix = bucket_and_prefix(case.directory)
    fault, target = FAULTS[case.fault], case.target
    options = client_options(proxy.url)
    async with CheckpointManager(case.directory, max_to_keep=1, storage_options=options) as manager:
        await manager.save(state(1), 1)
        await manager.wait()
        first = len(proxy.requests_of(f"/{prefix}/"))
        rule = proxy.inject(
            fault.kind,
            method=target.method,
            path=f"/{prefix}/{target.name}",
            query=target.query,
            skip=target.skip,
            times=fault.times,
        )
        try:
            with anyio.fail_after(HANG_GUARD_SECS):
                await manager.save(state(2, SIZES[case.size]), 2)
                await manager.wait()
        except CheckpointWriteError as exc:
            case.error = exc
        finally:
            proxy.remove(rule)
        case.hits = rule.hits
        case.statistics = manager.statistics()
        case.manager_latest = manager.latest_step()
        case.requests = proxy.requests_of(f"/{prefix}/")[first:]


async def check_case(case: Case) -> None:
    """Assert what ``case`` must have left (AssertionError: the first broken promise)."""
    fault = FAULTS[case.fault]
    stats = case.statistics
    assert stats is not None
    # The fault was injected; a throttled request was tried 1 + RETRIES times, no more
    # (the parts of an upload are throttled alike: either may be the one that gives up).
    if fault.times is None:
        alike = sum(1 for target in SAVE_REQUESTS[case.size] if target.what == case.target.what)
        assert 1 + RETRIES <= case.hits <= (1 + RETRIES) * alike, f"hits {case.hits}"
    else:
        assert case.hits == 1, f"hits {case.hits}"
    # The new checkpoint is the latest exactly when the state file's PUT reached the server.
    latest = 2 if case.committed else 1
    found = await anyio.to_thread.run_sync(get_checkpoint_state, case.directory)
    assert found is not None
    assert found.names == (f"model.ckpt-{latest}",), f"state file lists {found.names}"
    # It restores intact, read back by a reader that knows the URL only; so does any other
    # checkpoint object there (unlisted: a retirement that failed). Nothing partial: the
    # state file, whole checkpoints, no lease left.
    names, uploads = await anyio.to_thread.run_sync(listing, case.directory)
    assert f"model.ckpt-{latest}" in names, f"model.ckpt-{latest} is gone: {names} are left"
    assert set(names) <= {"checkpoint", "model.ckpt-1", "model.ckpt-2"}, names
    for step in (latest, 3 - latest):
        if f"model.ckpt-{step}" in names:
            assert_state(await Saver().restore(f"{case.directory}/model.ckpt-{step}"), step)
    status, report = await anyio.to_thread.run_sync(verify, case.directory)
    assert status == 0, f"verify: {report}"
    # A multipart upload is left incomplete only where a create the server did was retried.
    orphan_ok = case.target.query == ("uploads",) and fault.kind.endswith("_after")
    assert uploads <= (1 if orphan_ok else 0), f"{uploads} incomplete multipart uploads"
    # The manager says what happened: its statistics, its latest step, its error's words.
    assert stats.failed == (case.error is not None), f"failed {stats.failed}"
    assert stats.written == (2 if case.error is None else 1), f"written {stats.written}"
    assert case.manager_latest == latest, f"the manager's latest step is {case.manager_latest}"
    if case.error is not None:
        said = "was saved and is the latest" if latest == 2 else "previous checkpoint is still"
        assert said in str(case.error), f"the error says: {case.error}"
    # What obstore promises whatever the request: a 5xx is retried; retries are bounded.
    if case.fault in ("500", "503"):
        assert case.error is None, f"a single {case.fault} was not retried: {case.error}"
    if case.fault == "throttled":
        assert case.error is not None, "a request throttled every time succeeded"


MATRIX: Final = [
    pytest.param(size, target, id=f"{size}-{target.label}")
    for size, targets in SAVE_REQUESTS.items()
    for target in targets
]


@ASYNCIO_ONLY
@pytest.mark.parametrize(("size", "target"), MATRIX)
async def test_a_fault_at_a_request_of_a_save_loses_nothing(
    proxy: FaultProxy, s3_url: str, size: str, target: Target
) -> None:
    # Every fault kind at this request, each on its own prefix, all at once.
    broken: dict[str, str] = {}

    async def run_and_check(case: Case) -> None:
        await run_case(proxy, case)
        try:
            await check_case(case)
        except Exception as exc:  # a failed assertion, or what a restore or verify raised
            reason = exc if isinstance(exc, AssertionError) else repr(exc)
            broken[case.fault] = f"{case.outcome}: {reason}".splitlines()[0]

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for fault in FAULTS:
                directory = f"{s3_url}/fault-{uuid.uuid4().hex[:8]}"
                group.start_soon(run_and_check, Case(fault, target, size, directory))
    assert not broken, f"{target.label}: {broken}"


# -- two writers racing to commit ---------------------------------------------------------------


def lease(directory: str) -> dict[str, Any]:
    """The lease object of ``directory``: its holder (``owner``) and expiry (``expires``)."""
    data = ObjectStorage(directory).read_small_file(f"{directory}/{LOCK_NAME}")
    assert data is not None, "no lease"
    found: dict[str, Any] = json.loads(data)
    return found


LEASE_SECS: Final = 0.3


@ASYNCIO_ONLY
@pytest.mark.parametrize(
    "winner",
    ["taker", "holder"],
)
async def test_of_two_writers_racing_to_commit_exactly_one_wins(
    proxy: FaultProxy, s3_url: str, winner: str
) -> None:
    # The holder's commit hangs in the network (held at the proxy) until its lease has
    # expired; a second writer takes the lease over and saves. Both read the state file at
    # the same version, so whichever PUT lands first wins and the other is refused: the
    # taker's (it commits before the held PUT is let go) or the holder's (let go first).
    # Were the state file written unconditionally, the loser's PUT would replace the
    # winner's: `pytest.raises` and the listing below catch that (AWS_CONDITIONAL_PUT=disabled
    # makes both fail).
    directory = f"{s3_url}/race-{uuid.uuid4().hex[:8]}"
    _bucket, prefix = bucket_and_prefix(directory)
    through_proxy = {"endpoint": proxy.url, "allow_http": True}
    holder = CheckpointManager(
        directory, storage=ObjectStorage(directory, lease_secs=LEASE_SECS, options=through_proxy)
    )
    taker = CheckpointManager(directory, storage=ObjectStorage(directory, lease_secs=LEASE_SECS))
    release = threading.Event()
    gate = proxy.inject(
        "delay", method="PUT", path=f"/{prefix}/checkpoint", skip=1, release=release
    )
    try:
        async with holder:
            await holder.save(state(1), 1)
            await holder.wait()
            await holder.save(state(2), 2)
            await wait_until(gate.hit.is_set, "the holder's commit never reached the proxy")
            held = await anyio.to_thread.run_sync(lease, directory)
            await wait_until(lambda: time.time() > held["expires"], "the lease never expired")
            async with taker:  # takes the expired lease over
                taken = await anyio.to_thread.run_sync(lease, directory)
                assert taken["owner"] != held["owner"]
                assert taker.latest_step() == 1
                if winner == "taker":
                    await taker.save(state(5), 5)
                    await taker.wait()
                    release.set()
                    loser, kept, lost = holder, [1, 5], 2
                else:
                    release.set()
                    await holder.wait()
                    await taker.save(state(5), 5)
                    loser, kept, lost = taker, [1, 2], 5
                with pytest.raises(CheckpointLockedError, match="another writer changed the"):
                    await loser.wait()
                written = 1 if loser is holder else 0
                assert (loser.statistics().written, loser.statistics().failed) == (written, 1)
                # The refused commit read the state file back: the winner's latest.
                assert loser.latest_step() == kept[-1]
                # Idle, each writer renews its lease every LEASE_SECS / 3: the holder learns
                # that its lease was taken over (its refused commit may have told it first).
                await anyio.sleep(LEASE_SECS)
                if winner == "holder":
                    with pytest.raises(CheckpointLockedError, match="lost the lease"):
                        await holder.wait()
                else:
                    with contextlib.suppress(CheckpointLockedError):
                        await holder.wait()  # it may say so once more
                assert isinstance(holder.statistics().last_error, CheckpointLockedError)
                await taker.wait()  # the taker's lease is its own: no error
    finally:
        release.set()
        proxy.remove(gate)
    assert gate.hits == 1
    found = await anyio.to_thread.run_sync(get_checkpoint_state, directory)
    assert found is not None
    assert found.names == tuple(f"model.ckpt-{step}" for step in kept)
    for step in kept:
        assert_state(await Saver().restore(f"{directory}/model.ckpt-{step}"), step)
    names, _uploads = await anyio.to_thread.run_sync(listing, directory)
    if f"model.ckpt-{lost}" in names:
        # Unlisted and whole: a writer that finds its lease taken over deletes nothing (a
        # young unlisted checkpoint is swept by a later writer after a grace period).
        assert loser is holder
        assert_state(await Saver().restore(f"{directory}/model.ckpt-{lost}"), lost)
    assert (await anyio.to_thread.run_sync(verify, directory))[0] == 0


# -- the kill -9 harness against the S3 server --------------------------------------------------


def test_sigkill_of_a_trainer_on_s3_restores_intact_and_loses_about_one_interval(
    s3_url: str,
) -> None:
    # benchmarks/crash.py's plain-step trainer, checkpointing to s3:// (its environment
    # points it at the session's server), killed three times: after every kill the latest
    # checkpoint passes verify, restores, holds one step, never goes back, the next start
    # resumes from it, and a kill costs about one save interval (tests/test_crash.py's
    # bound; the write to S3 takes a few steps more than to local files).
    directory = f"{s3_url}/kills-{uuid.uuid4().hex[:8]}"
    result = run_trainer_kills(3, save_steps=10, backends=BACKENDS, directory=directory)
    assert result.problems == []
    assert len(result.steps_lost) == 3
    assert result.max_lost <= 2 * result.save_steps


@ASYNCIO_ONLY
async def test_the_kill_check_reports_damage_on_s3(s3_url: str) -> None:
    # What makes the harness's checks able to fail on a URL: a checkpoint mixing two steps,
    # then the latest checkpoint gone from under the state file.
    directory = f"{s3_url}/damaged-{uuid.uuid4().hex[:8]}"
    async with CheckpointManager(directory) as manager:
        await manager.save({"a": np.full(3, 4), "b": np.full(2, 5)}, 4)
    latest, temps, problems = await check_directory(directory)
    assert (latest, temps) == (4, 0)
    assert problems == ["checkpoint of step 4 holds steps [4, 5]"]
    bucket, prefix = bucket_and_prefix(directory)
    await anyio.to_thread.run_sync(
        lambda: s3_client().delete_object(Bucket=bucket, Key=f"{prefix}/model.ckpt-4")
    )
    latest, temps, problems = await check_directory(directory)
    assert latest is None
    assert [problem.partition(":")[0] for problem in problems] == [
        "verify failed",
        "latest_checkpoint failed",
    ]
