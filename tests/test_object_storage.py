"""ObjectStorage, method by method, on ``memory://`` and on a real S3 server (moto's, local).

Every test that takes ``directory`` runs on both stores: a fresh prefix of a ``memory://``
store, and of the session's S3 bucket (``s3_url`` in conftest.py). Races between writers are
made deterministic with probes: the loser's probe runs the winner's whole operation just
before the loser's own request.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest

from asyncckpt import (
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriteError,
    Saver,
)
from asyncckpt._storage import (
    LOCK_NAME,
    DirectoryLock,
    LocalStorage,
    WriteAborted,
    is_url,
    resolve_storage,
    url_root,
)
from asyncckpt._storage._object import ObjectStorage
from asyncckpt.summary import SummaryWriter
from asyncckpt.testing import FakeClock, FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

MIB = 1024 * 1024
S3_PART = 5 * MIB  # the smallest part S3 takes

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "s3"])
def root(request: pytest.FixtureRequest) -> str:
    """A store root: a fresh memory:// store, or the session's S3 bucket."""
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:8]}"
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture
def directory(root: str) -> str:
    """A fresh prefix under ``root``."""
    return f"{root}/run-{uuid.uuid4().hex[:8]}"


def storage_of(url: str, **kwargs: Any) -> ObjectStorage:
    return ObjectStorage(url_root(url), **kwargs)


def part_bytes(url: str) -> int:
    return S3_PART if url.startswith("s3://") else MIB


class Recorder:
    """A probe that records every (op, path) and can run a callback before one of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.before: dict[str, Callable[[], None]] = {}

    def __call__(self, op: str, path: str, /) -> None:
        self.calls.append((op, path))
        action = self.before.pop(op, None)
        if action is not None:
            action()

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def held(lock: DirectoryLock) -> bool:
    """Whether ``lock`` is held now (a call, so that checks before and after an action are
    not narrowed away)."""
    return lock.held


def pattern(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


async def read_all(storage: ObjectStorage, path: str) -> bytes:
    async with storage.open_for_read(path) as file:
        return await file.read(0, file.size)


# -- checkpoint objects: write_atomic and reads --------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_round_trip(directory: str, anyio_backend: str) -> None:
    storage = storage_of(directory)
    path = os.path.join(directory, "model.ckpt-1")
    data = pattern(100_000)
    pieces: list[Any] = [data[:10], memoryview(data)[10:60_000], np.frombuffer(data[60_000:], "u1")]
    await anyio.to_thread.run_sync(lambda: storage.write_atomic(path, pieces))

    info = storage.file_info(path)
    assert info is not None
    assert stat.S_ISREG(info.st_mode)
    assert info.st_size == len(data)
    assert abs(info.st_mtime - time.time()) < 120
    assert storage.read_prefix(path, 8) == data[:8]
    assert storage.list_names(directory) == ["model.ckpt-1"]

    async with storage.open_for_read(path) as file:
        assert file.path == path
        assert file.size == len(data)
        assert await file.read(5, 10) == data[5:15]
        assert await file.read(99_990, 100) == data[99_990:]  # short at the end
        assert await file.read(len(data), 10) == b""
        first, second = bytearray(3000), bytearray(5000)
        count = await file.run_sync(
            file.read_into_sync, 1000, [memoryview(first), memoryview(second)]
        )
        assert count == 8000
        assert bytes(first + second) == data[1000:9000]
        tail = bytearray(100)
        assert file.read_into_sync(len(data) - 40, [memoryview(tail)]) == 40
        assert bytes(tail[:40]) == data[-40:]
        assert file.read_into_sync(len(data), [memoryview(tail)]) == 0


async def test_an_empty_object_round_trips(directory: str, anyio_backend: str) -> None:
    storage = storage_of(directory)
    path = os.path.join(directory, "empty")
    storage.write_atomic(path, [b""])
    assert await read_all(storage, path) == b""
    assert storage.read_prefix(path, 8) == b""


@pytest.mark.slow
async def test_a_large_write_is_a_multipart_upload(directory: str, anyio_backend: str) -> None:
    part = part_bytes(directory)
    probe = Recorder()
    storage = storage_of(directory, part_bytes=part, max_concurrency=2).instrumented(probe)
    path = os.path.join(directory, "model.ckpt-2")
    data = pattern(20 * MIB + 12345, seed=2)
    view = memoryview(data)
    pieces = [view[:100], view[100 : 3 * MIB], view[3 * MIB :]]  # the last spans parts

    await anyio.to_thread.run_sync(lambda: storage.write_atomic(path, pieces))

    writes = probe.ops().count("write")
    assert writes >= len(data) // part  # one per part-sized stretch
    assert probe.ops()[-1] == "rename"  # asked before the upload completes
    assert storage.read_prefix(path, 1 << 30) == data
    async with storage.open_for_read(path) as file:
        out = bytearray(len(data))
        assert file.read_into_sync(0, [memoryview(out)]) == len(data)  # streamed: > 16 MiB
    assert out == data


async def test_late_head_fills_the_first_piece_first(directory: str, anyio_backend: str) -> None:
    probe = Recorder()
    storage = storage_of(directory, part_bytes=part_bytes(directory)).instrumented(probe)
    path = os.path.join(directory, "model.ckpt-3")

    def head() -> bytes:
        probe.calls.append(("late_head", path))
        return b"HEAD"

    storage.write_atomic(path, [bytes(16), b"body"], late_head=head)
    assert probe.ops() == ["late_head", "write", "rename"]
    assert await read_all(storage, path) == b"HEAD" + bytes(12) + b"body"

    with pytest.raises(ValueError, match="more bytes than the first piece"):
        storage.write_atomic(path, [bytes(2), b"body"], late_head=lambda: b"HEAD")


async def test_an_aborted_multipart_upload_leaves_nothing(
    directory: str, anyio_backend: str
) -> None:
    part = part_bytes(directory)
    storage = storage_of(directory, part_bytes=part, max_concurrency=2)
    path = os.path.join(directory, "model.ckpt-4")
    asked: list[bool] = []

    def aborted() -> bool:
        asked.append(True)
        return len(asked) > 3  # three parts in, then the writer gives up

    data = memoryview(bytes(6 * part))
    with pytest.raises(WriteAborted):
        await anyio.to_thread.run_sync(lambda: storage.write_atomic(path, [data], aborted=aborted))
    assert storage.file_info(path) is None
    assert storage.list_names(directory) == []
    if directory.startswith("s3://"):
        boto3 = pytest.importorskip("boto3")
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        bucket, prefix = directory.removeprefix("s3://").split("/", 1)
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        assert uploads.get("Uploads", []) == []  # obstore aborted it


async def test_an_aborted_small_write_leaves_the_old_object(
    directory: str, anyio_backend: str
) -> None:
    storage = storage_of(directory)
    path = os.path.join(directory, "model.ckpt-5")
    storage.write_atomic(path, [b"old"])
    with pytest.raises(WriteAborted):
        storage.write_atomic(path, [b"new"], aborted=lambda: True)
    assert await read_all(storage, path) == b"old"


async def test_a_failed_upload_is_a_write_error(directory: str, anyio_backend: str) -> None:
    with FaultyStorage(storage_of(directory, part_bytes=part_bytes(directory))) as faults:
        path = os.path.join(directory, "model.ckpt-6")
        faults.fail("write", errno.ENOSPC, match="model.ckpt-6", skip=1)
        data = memoryview(bytes(3 * part_bytes(directory)))
        with pytest.raises(CheckpointWriteError, match="errno 28") as info:
            await anyio.to_thread.run_sync(lambda: faults.write_atomic(path, [data]))
        assert isinstance(info.value.__cause__, OSError)
        assert faults.file_info(path) is None
        faults.fail("rename", errno.EIO, match="model.ckpt-6")
        with pytest.raises(CheckpointWriteError, match=path):
            faults.write_atomic(path, [b"small"])
        assert faults.file_info(path) is None
        assert ("rename", path) in faults.calls


# -- pinned reads -----------------------------------------------------------------------------


async def test_an_object_replaced_while_open_is_never_read(
    directory: str, anyio_backend: str
) -> None:
    storage, other = storage_of(directory), storage_of(directory)
    path = os.path.join(directory, "model.ckpt-7")
    storage.write_atomic(path, [b"A" * 1000])
    async with storage.open_for_read(path) as file:
        assert await file.read(0, 10) == b"A" * 10
        other.write_atomic(path, [b"B" * 1000])  # another writer saves this step again
        with pytest.raises(CheckpointNotFoundError, match="replaced while being read"):
            await file.read(10, 10)
        view = memoryview(bytearray(10))
        with pytest.raises(CheckpointNotFoundError, match="replaced while being read"):
            file.read_into_sync(0, [view])
        assert bytes(view) == bytes(10)  # not one byte of the new version
    async with storage.open_for_read(path) as file:  # opened again: the new version
        assert await file.read(0, 3) == b"BBB"
        other.remove_files([path])
        with pytest.raises(CheckpointNotFoundError, match="deleted while being read"):
            await file.read(0, 3)


# -- missing things, paths ----------------------------------------------------------------------


async def test_missing_paths(directory: str, anyio_backend: str) -> None:
    storage = storage_of(directory)
    path = os.path.join(directory, "model.ckpt-8")
    assert storage.read_small_file(path) is None
    assert storage.file_info(path) is None
    assert storage.read_prefix(path, 8) == b""
    assert storage.list_names(directory) == []
    assert storage.remove_files([path]) is None  # missing is fine
    storage.remove_spare(path)
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint"):
        async with storage.open_for_read(path):
            pass


async def test_prefixes_are_directories(directory: str, anyio_backend: str) -> None:
    storage = storage_of(directory)
    storage.write_atomic(os.path.join(directory, "b"), [b"x"])
    storage.write_atomic(os.path.join(directory, "a", "deep", "c"), [b"x"])
    assert storage.list_names(directory) == ["a", "b"]
    info = storage.file_info(os.path.join(directory, "a"))
    assert info is not None
    assert stat.S_ISDIR(info.st_mode)
    assert storage.list_names(os.path.dirname(directory)) != []
    assert storage.list_names(os.path.join(directory, "nothing")) == []


def test_paths_must_be_under_the_root() -> None:
    storage = ObjectStorage("memory://paths")
    assert storage.key("memory://paths/run/model.ckpt-1") == "run/model.ckpt-1"
    assert storage.key("memory://paths") == ""
    assert storage.key("MEMORY://paths/run/") == "run"
    with pytest.raises(ValueError, match="not under memory://paths"):
        storage.key("memory://other/run")
    with pytest.raises(ValueError, match="not under"):
        storage.file_info("/tmp/run/model.ckpt-1")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.key("memory://paths/run/../x")
    with pytest.raises(ValueError, match="empty"):
        storage.key("memory://paths/run//x")


def test_mmap_is_refused() -> None:
    storage = ObjectStorage("memory://mmap")
    assert not storage.supports_mmap
    assert not FaultyStorage(storage).supports_mmap
    with pytest.raises(ValueError, match=r"mmap=True needs a local checkpoint.*mmap=False"):
        storage.open_mmap("memory://mmap/run/model.ckpt-1")


def test_removing(directory: str) -> None:
    storage = storage_of(directory)
    paths = [os.path.join(directory, f"model.ckpt-{step}") for step in range(3)]
    for path in paths:
        storage.write_atomic(path, [b"x"])
    assert storage.remove_files(paths[:2], keep_spare=True) is None  # no spares
    assert storage.list_names(directory) == ["model.ckpt-2"]
    storage.remove_spare(paths[2])
    assert storage.list_names(directory) == []
    assert storage.remove_temp_files(directory, lambda name: True) == []


def test_a_failed_delete_is_a_write_error_and_the_others_are_tried(directory: str) -> None:
    with FaultyStorage(storage_of(directory)) as faults:
        paths = [os.path.join(directory, f"model.ckpt-{step}") for step in range(3)]
        for path in paths:
            faults.write_atomic(path, [b"x"])
        faults.fail("unlink", errno.EACCES, match="model.ckpt-0")
        with pytest.raises(CheckpointWriteError, match="could not delete"):
            faults.remove_files(paths)
        assert faults.list_names(directory) == ["model.ckpt-0"]


# -- the state file ----------------------------------------------------------------------------


def test_state_file_writes_are_version_matched(directory: str) -> None:
    path = os.path.join(directory, "checkpoint")
    first, second = storage_of(directory), storage_of(directory)
    assert first.read_small_file(path) is None
    assert second.read_small_file(path) is None
    first.write_small_file_atomic(path, b"one")  # create-only: it saw none
    with pytest.raises(CheckpointLockedError, match="another writer changed the state file"):
        second.write_small_file_atomic(path, b"two")  # create-only too: refused
    assert first.read_small_file(path) == b"one"
    first.write_small_file_atomic(path, b"three")  # matched to what it wrote
    assert second.read_small_file(path) == b"three"
    second.write_small_file_atomic(path, b"four")  # matched to what it read
    with pytest.raises(CheckpointLockedError):
        first.write_small_file_atomic(path, b"five")  # stale: second wrote meanwhile
    assert second.read_small_file(path) == b"four"


def test_of_two_racing_state_file_writers_exactly_one_wins(directory: str) -> None:
    path = os.path.join(directory, "checkpoint")
    seed = storage_of(directory)
    seed.read_small_file(path)
    seed.write_small_file_atomic(path, b"v0")
    probe = Recorder()
    loser, winner = storage_of(directory).instrumented(probe), storage_of(directory)
    assert loser.read_small_file(path) == b"v0"
    assert winner.read_small_file(path) == b"v0"
    # The winner commits between the loser's read and the loser's PUT.
    probe.before["write"] = lambda: winner.write_small_file_atomic(path, b"winner")
    with pytest.raises(CheckpointLockedError):
        loser.write_small_file_atomic(path, b"loser")
    assert seed.read_small_file(path) == b"winner"


def test_a_failed_state_file_write_is_a_write_error(directory: str) -> None:
    with FaultyStorage(storage_of(directory)) as faults:
        path = os.path.join(directory, "checkpoint")
        faults.fail("write", errno.EIO, match="checkpoint")
        with pytest.raises(CheckpointWriteError, match=r"checkpoint: .*errno 5") as info:
            faults.write_small_file_atomic(path, b"x")
        assert not isinstance(info.value, CheckpointLockedError)
        assert faults.read_small_file(path) is None
        assert [op for op, _ in faults.calls] == ["write", "read"]


# -- the lease ---------------------------------------------------------------------------------


def test_a_second_writer_is_locked_out_until_release(directory: str) -> None:
    first, second = storage_of(directory).lock(directory), storage_of(directory).lock(directory)
    first.acquire()
    assert held(first)
    with pytest.raises(
        CheckpointLockedError, match=r"or wait until .* for the lease to expire"
    ) as info:
        second.acquire()
    assert first.owner in str(info.value)
    assert not held(second)
    first.renew()
    lease = json.loads(storage_of(directory).read_small_file(first.path) or b"")
    assert lease["owner"] == first.owner
    assert lease["expires"] > time.time() + 30
    first.release()
    first.release()  # idempotent
    assert not held(first)
    assert storage_of(directory).file_info(os.path.join(directory, LOCK_NAME)) is None
    second.acquire()
    second.release()


def test_a_stale_lease_is_taken_over(directory: str) -> None:
    past = time.time() - 3600
    stale = storage_of(directory, clock=lambda: past).lock(directory)
    stale.acquire()  # expired an hour ago, as if its writer had died
    taker = storage_of(directory).lock(directory)
    taker.acquire()
    with pytest.raises(CheckpointLockedError, match="lost the lease"):
        stale.renew()
    assert not held(stale)
    stale.release()  # not ours any more: left alone
    with pytest.raises(CheckpointLockedError):
        storage_of(directory).lock(directory).acquire()
    taker.release()
    with pytest.raises(RuntimeError, match="not held"):
        taker.renew()


def test_of_two_writers_taking_over_a_stale_lease_exactly_one_wins(directory: str) -> None:
    past = time.time() - 3600
    storage_of(directory, clock=lambda: past).lock(directory, "lease").acquire()
    probe = Recorder()
    loser = storage_of(directory).instrumented(probe).lock(directory, "lease")
    winner = storage_of(directory).lock(directory, "lease")
    # The loser creates (refused: the stale lease is there), reads it, sees it expired; the
    # winner takes it over just before the loser's version-matched PUT.
    probe.before["read"] = lambda: probe.before.update(write=winner.acquire)
    with pytest.raises(CheckpointLockedError, match="at the same time"):
        loser.acquire()
    assert held(winner)
    assert not held(loser)
    assert probe.ops() == ["write", "read", "write"]
    winner.release()


def test_writes_keep_the_lease_alive(directory: str) -> None:
    clock = FakeClock(time.time())
    storage = storage_of(directory, clock=clock, lease_secs=60)
    lock = storage.lock(directory)
    lock.acquire()
    first = lock.expires
    assert first is not None
    clock.advance(20)  # within the first half: a write leaves it alone
    storage.write_atomic(os.path.join(directory, "model.ckpt-1"), [b"x"])
    assert lock.expires == first
    clock.advance(20)  # past the half: the next write renews it first
    storage.write_small_file_atomic(os.path.join(directory, "checkpoint"), b"state")
    assert lock.expires == clock() + 60
    lock.release()


def test_a_writer_whose_lease_was_taken_over_writes_nothing(directory: str) -> None:
    clock = FakeClock(time.time() - 3600)
    storage = storage_of(directory, clock=clock)
    lock = storage.lock(directory)
    lock.acquire()
    storage_of(directory).lock(directory).acquire()  # expired: another writer takes over
    clock.advance(31)
    path = os.path.join(directory, "checkpoint")
    with pytest.raises(CheckpointLockedError, match="lost the lease"):
        storage.write_small_file_atomic(path, b"late")
    assert storage.read_small_file(path) is None
    assert not held(lock)


def test_without_conditional_puts(s3_url: str) -> None:
    """A store that refuses conditional PUTs: the state file is written unconditionally (a
    racing writer's commit is lost, as documented); the lease still refuses a live holder."""
    directory = f"{s3_url}/unconditional-{uuid.uuid4().hex[:8]}"

    def unconditional() -> ObjectStorage:
        return ObjectStorage(s3_url, options={"conditional_put": "disabled"})

    path = os.path.join(directory, "checkpoint")
    first, second = unconditional(), unconditional()
    first.read_small_file(path)
    second.read_small_file(path)
    first.write_small_file_atomic(path, b"one")
    second.write_small_file_atomic(path, b"two")  # not refused: the store cannot
    assert first.read_small_file(path) == b"two"

    lock = unconditional().lock(directory)
    lock.acquire()
    with pytest.raises(CheckpointLockedError, match="another writer holds"):
        unconditional().lock(directory).acquire()
    lock.renew()
    lock.release()
    assert first.file_info(lock.path) is None
    past = time.time() - 3600
    stale = ObjectStorage(s3_url, options={"conditional_put": "disabled"}, clock=lambda: past)
    stale.lock(directory).acquire()
    taker = unconditional().lock(directory)
    taker.acquire()  # expired: taken over
    taker.release()


def test_the_lock_of_a_named_state_file(directory: str) -> None:
    lock = storage_of(directory).lock(directory, ".checkpoint_input.lock")
    lock.acquire()
    with pytest.raises(CheckpointLockedError, match=r"the lock \.checkpoint_input\.lock of"):
        storage_of(directory).lock(directory, ".checkpoint_input.lock").acquire()
    storage_of(directory).lock(directory).acquire()  # the model's lock is another
    lock.release()


def test_a_lease_that_cannot_be_written_is_a_write_error(directory: str) -> None:
    with FaultyStorage(storage_of(directory)) as faults:
        faults.fail("write", errno.EACCES, match=LOCK_NAME)
        lock = faults.lock(directory)
        with pytest.raises(CheckpointWriteError, match="cannot take the lease") as info:
            lock.acquire()
        assert not isinstance(info.value, CheckpointLockedError)
        assert not held(lock)


# -- event files -------------------------------------------------------------------------------


async def test_an_event_file_is_a_sequence_of_objects(directory: str, anyio_backend: str) -> None:
    storage = storage_of(directory)
    path = os.path.join(directory, "events.out.tfevents.0000000001.host.1.000001")
    file = await storage.create_new_file(path)
    records = [b"first", b"second", b"third"]
    for record in records:
        await file.write(record)
    await file.write(b"")  # nothing to put
    await file.aclose()
    await file.aclose()  # idempotent
    names = storage.list_names(directory)
    base = os.path.basename(path)
    assert names == [base, f"{base}.0000000001", f"{base}.0000000002"]
    assert names == sorted(names)
    assert all("tfevents" in name for name in names)
    contents = [await read_all(storage, os.path.join(directory, name)) for name in names]
    assert contents == records
    with pytest.raises(ValueError, match="closed"):
        await file.write(b"late")
    with pytest.raises(FileExistsError):
        await storage.create_new_file(path)


async def test_a_failed_event_write_is_an_os_error(directory: str, anyio_backend: str) -> None:
    with FaultyStorage(storage_of(directory)) as faults:
        path = os.path.join(directory, "events.out.tfevents.0000000001.host")
        file = await faults.create_new_file(path)
        faults.fail("write", errno.ENOSPC)
        with pytest.raises(OSError, match="No space") as info:
            await file.write(b"record")
        assert info.value.errno == errno.ENOSPC
        await file.write(b"record")  # the next one goes through
        assert faults.list_names(directory) == [os.path.basename(path)]


@pytest.mark.tensorboard
async def test_tensorboard_reads_the_sequence_in_order(tmp_path: Path, anyio_backend: str) -> None:
    """TensorBoard's loader, given the objects as files, reads every event, in order."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    root = f"memory://tb-{uuid.uuid4().hex[:8]}"
    logdir = f"{root}/logs"
    storage = ObjectStorage(root)
    async with SummaryWriter(logdir, storage=storage) as writer:
        for step in range(12):
            await writer.add_scalar("loss", 1.0 / (step + 1), step)
            await writer.flush()  # one object per flush
    names = storage.list_names(logdir)
    assert len(names) == 13  # the first (file_version) and one per flush
    for name in names:
        data = await read_all(storage, os.path.join(logdir, name))
        (tmp_path / name).write_bytes(data)
    loaded = accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    loaded.Reload()
    assert [event.step for event in loaded.Tensors("loss")] == list(range(12))


# -- instrumented ------------------------------------------------------------------------------


async def test_faulty_storage_sees_every_request(directory: str, anyio_backend: str) -> None:
    with FaultyStorage(storage_of(directory)) as faults:
        path = os.path.join(directory, "model.ckpt-9")
        faults.write_atomic(path, [b"data"])
        faults.file_info(path)
        async with faults.open_for_read(path) as file:
            await file.read(0, 4)
        faults.remove_files([path])
        assert faults.calls == [
            ("write", path),
            ("rename", path),
            ("open", path),
            ("open", path),
            ("read", path),
            ("unlink", path),
        ]
    assert "probe=" in repr(storage_of(directory).instrumented(Recorder()))


# -- through the layers above --------------------------------------------------------------------


async def test_saver_and_manager_round_trip(directory: str, anyio_backend: str) -> None:
    state = {"w": np.arange(1000, dtype=np.float32), "step": 3}
    saver = Saver(storage=storage_of(directory))
    path = await saver.save(state, os.path.join(directory, "model.ckpt"), global_step=3)
    assert path == os.path.join(directory, "model.ckpt-3")
    restored = await saver.restore(path)
    np.testing.assert_array_equal(restored["w"], state["w"])
    async with CheckpointManager(
        os.path.join(directory, "managed"), storage=storage_of(directory)
    ) as manager:
        await manager.save(state, 1)
        await manager.wait()
        assert manager.latest_step() == 1
        np.testing.assert_array_equal((await manager.restore())["w"], state["w"])


# -- the resolver and the constructor ----------------------------------------------------------


def test_is_url() -> None:
    assert is_url("s3://bucket/run")
    assert is_url("memory://x")
    assert not is_url("/tmp/run")
    assert not is_url("run")
    assert not is_url("C:\\run")
    assert url_root("s3://bucket/a/b") == "s3://bucket"
    assert url_root("memory://name") == "memory://name"
    with pytest.raises(ValueError, match="names no bucket"):
        url_root("s3:///run")


def test_resolve_storage(tmp_path: Path) -> None:
    given = LocalStorage()
    assert resolve_storage("s3://bucket/run", given) is given
    with pytest.raises(ValueError, match="not both"):
        resolve_storage("memory://x/run", given, {"a": 1})
    assert isinstance(resolve_storage(tmp_path), LocalStorage)
    with pytest.raises(ValueError, match="local path"):
        resolve_storage(tmp_path, None, {"endpoint": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match=r"s3://, gs://, az://, memory://"):
        resolve_storage("ftp://host/run")
    found = resolve_storage("memory://resolved/run")
    assert isinstance(found, ObjectStorage)
    assert found.root == "memory://resolved"
    # One memory store per name per process: URLs alone reach the same objects.
    found.write_atomic("memory://resolved/run/x", [b"shared"])
    assert resolve_storage("memory://resolved/other").read_prefix("memory://resolved/run/x", 6) == (
        b"shared"
    )
    assert resolve_storage("memory://another").file_info("memory://another/run/x") is None
    remote = resolve_storage("s3://some-bucket/run", None, {"endpoint": "http://127.0.0.1:1"})
    assert isinstance(remote, ObjectStorage)
    assert remote.root == "s3://some-bucket"


def test_resolve_storage_without_obstore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "asyncckpt._storage._object")
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ImportError, match=r"s3:// needs the remote extra: pip install"):
        resolve_storage("s3://bucket/run")
    assert isinstance(resolve_storage("/tmp/run"), LocalStorage)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not file://"):
        ObjectStorage("file:///tmp")
    with pytest.raises(ValueError, match="takes no options"):
        ObjectStorage("memory://x", options={"endpoint": "x"})
    with pytest.raises(ValueError, match="at least 5 MiB"):
        ObjectStorage("s3://bucket", part_bytes=MIB)
    with pytest.raises(ValueError, match="lease_secs"):
        ObjectStorage("memory://x", lease_secs=0)
    with pytest.raises(TypeError, match="max_concurrency"):
        ObjectStorage("memory://x", max_concurrency=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'no_such_key' is not valid"):
        ObjectStorage("s3://bucket", options={"no_such_key": 1})
    assert repr(ObjectStorage("memory://x")) == "ObjectStorage('memory://x')"


def test_options_override_the_environment(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {
        "endpoint": os.environ["AWS_ENDPOINT_URL"],
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "region": "us-east-1",
        "allow_http": True,  # a client option, told apart from the store's
    }
    for name in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name)
    storage = resolve_storage(f"{s3_url}/options", None, options)
    path = f"{s3_url}/options/x-{uuid.uuid4().hex[:8]}"
    storage.write_atomic(path, [b"through options"])
    assert storage.read_prefix(path, 100) == b"through options"
