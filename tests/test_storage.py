"""Storage as users see it: a failing disk at every step of a save, the directory lock, temp files.

Faults are injected with ``asyncckpt.testing.FaultyStorage``. A save touches two files: the
checkpoint (``model.ckpt-2``, written as ``.model.ckpt-2.asyncckpt-tmp-<hex>``) and the state
file (``checkpoint``, written as ``.checkpoint.asyncckpt-tmp-<hex>``), so ``match="model.ckpt-2"``
hits only the checkpoint and ``match="checkpoint"`` only the state file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import anyio.lowlevel
import numpy as np
import pytest
from support import TEMP_MARKER, assert_restores, exists, stepped_state, temp_files

from asyncckpt import (
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    Saver,
    get_checkpoint_state,
    latest_checkpoint,
)
from asyncckpt._checkpoint import prune
from asyncckpt._storage import LocalStorage, temp_target
from asyncckpt.testing import FaultyStorage, StorageOp

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

LOCK_NAME = ".asyncckpt.lock"
ERRNOS = [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS]
SAVE_OPS: list[StorageOp] = ["open", "write", "fsync", "rename", "fsync_dir"]


def checkpoint_files(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if name.startswith("model.ckpt")}


def lock_is_free(directory: Path) -> bool:
    """Whether another process could take the directory lock right now (a fresh flock)."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock if we took it
    return True


@pytest.fixture
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Not under tmp_path, whose name holds the test's name (which may say "checkpoint").
    directory = tmp_path_factory.mktemp("run") / "ckpts"
    # `match="checkpoint"` / `match="model.ckpt-2"` must hit only the files they are meant for.
    assert "checkpoint" not in str(directory)
    assert "model.ckpt" not in str(directory)
    return directory


# -- a failing disk at every storage operation of a save --------------------------------------


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("target", ["model.ckpt-2", "checkpoint"], ids=["ckpt", "state"])
@pytest.mark.parametrize("op", SAVE_OPS)
async def test_failed_save_keeps_the_previous_checkpoint(
    ckpt_dir: Path, storage: FaultyStorage, op: StorageOp, target: str, code: int
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    # A successful save of step 2 would delete step 1.
    saver = Saver(max_to_keep=1, storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    state_before = (ckpt_dir / "checkpoint").read_bytes()
    names_before = sorted(os.listdir(ckpt_dir))

    storage.fail(op, code, match=target)
    with pytest.raises(CheckpointWriteError) as info:
        await saver.save(stepped_state(2), prefix, global_step=2)
    storage.clear()

    exc = info.value
    assert type(exc) is CheckpointWriteError
    assert exc.path == str(ckpt_dir / target)
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == code
    assert os.strerror(code) in str(exc)
    assert temp_files(ckpt_dir) == []
    assert lock_is_free(ckpt_dir)

    if (op, target) == ("fsync_dir", "checkpoint"):
        # Only the directory sync after the state file's rename failed: the rename happened,
        # so readers already see the new checkpoint; only its durability is in doubt, and
        # the error says so. No old checkpoint was deleted, so whichever state file a power
        # loss leaves names files that exist (step 1 stays on disk, no longer listed).
        assert "model.ckpt-2 is listed as the latest checkpoint" in str(exc)
        assert "power loss" in str(exc)
        assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
        await assert_restores(f"{prefix}-2", 2)
        assert checkpoint_files(ckpt_dir) == {"model.ckpt-1", "model.ckpt-2"}
        await assert_restores(f"{prefix}-1", 1)
    else:
        assert "the previous checkpoint is still the latest" in str(exc)
        assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"
        await assert_restores(f"{prefix}-1", 1)
        assert (ckpt_dir / "checkpoint").read_bytes() == state_before
        # Nothing new is left behind: no temp file, no unlisted model.ckpt-2.
        assert sorted(os.listdir(ckpt_dir)) == names_before

    # Once the disk recovers (the rule is gone), the same Saver saves normally (its bookkeeping
    # is intact).
    assert await saver.save(stepped_state(2), prefix, global_step=2) == f"{prefix}-2"
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    assert saver.last_checkpoints(ckpt_dir) == [f"{prefix}-2"]
    await assert_restores(f"{prefix}-2", 2)
    assert "model.ckpt-2" in checkpoint_files(ckpt_dir)
    assert temp_files(ckpt_dir) == []


async def test_write_failure_in_a_large_checkpoint(ckpt_dir: Path, storage: FaultyStorage) -> None:
    """Large arrays go through the async file layer in several writes; a later one fails."""
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver(storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    state_before = (ckpt_dir / "checkpoint").read_bytes()
    big = {"a": np.ones(300_000), "b": np.zeros(300_000)}  # 2.4 MB each, over the buffer

    first_call = len(storage.calls)  # the calls of the failing save only
    storage.fail("write", errno.ENOSPC, match="model.ckpt-2", skip=1)
    with pytest.raises(CheckpointWriteError) as info:
        await saver.save(big, prefix, global_step=2)

    writes = [path for op, path in storage.calls[first_call:] if op == "write"]
    assert len(writes) >= 2
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"
    assert (ckpt_dir / "checkpoint").read_bytes() == state_before
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-1"}
    assert temp_files(ckpt_dir) == []


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
async def test_retention_unlink_failure_reports_the_saved_checkpoint(
    ckpt_dir: Path, storage: FaultyStorage, code: int
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver(max_to_keep=1, storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)

    storage.fail("unlink", code, match="model.ckpt-1")
    with pytest.raises(CheckpointWriteError) as info:
        await saver.save(stepped_state(2), prefix, global_step=2)
    storage.clear()

    # The error names the file that could not be deleted and says the save itself worked.
    exc = info.value
    assert exc.path == f"{prefix}-1"
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == code
    message = str(exc)
    assert "could not delete" in message
    assert "the new checkpoint model.ckpt-2 was saved and is the latest" in message
    assert "deleted by hand" in message
    # The new checkpoint is durable and listed; the old one is unlisted but still on disk.
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    await assert_restores(f"{prefix}-2", 2)
    state = get_checkpoint_state(ckpt_dir)
    assert state is not None
    assert state.names == ("model.ckpt-2",)
    assert saver.last_checkpoints(ckpt_dir) == [f"{prefix}-2"]
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-1", "model.ckpt-2"}
    assert temp_files(ckpt_dir) == []
    assert lock_is_free(ckpt_dir)


async def test_one_undeletable_checkpoint_does_not_keep_the_others(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    for step in (1, 2, 3):
        await Saver(max_to_keep=None).save(stepped_state(step), prefix, global_step=step)

    with FaultyStorage() as faults:
        faults.fail("unlink", errno.EACCES, match="model.ckpt-1")
        with pytest.raises(CheckpointWriteError) as info:
            await Saver(max_to_keep=1, storage=faults).save(stepped_state(4), prefix, global_step=4)

    assert info.value.path == f"{prefix}-1"
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-1", "model.ckpt-4"}
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-4"


async def test_directory_sync_failure_after_deletions(
    ckpt_dir: Path, storage: FaultyStorage
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver(max_to_keep=1, storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)

    # The third directory sync of the save: after the checkpoint, the state file, and then
    # the deletions.
    storage.fail("fsync_dir", errno.EIO, skip=2)
    with pytest.raises(CheckpointWriteError) as info:
        await saver.save(stepped_state(2), prefix, global_step=2)

    assert storage.calls[-1] == ("fsync_dir", str(ckpt_dir))
    assert info.value.path == str(ckpt_dir)
    assert "the new checkpoint model.ckpt-2 was saved and is the latest" in str(info.value)
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-2"}


# -- the directory lock -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "match"),
    [
        ("open", "model.ckpt-2"),
        ("rename", "model.ckpt-2"),
        ("open", "checkpoint"),
        ("unlink", "model.ckpt-1"),
    ],
    ids=["ckpt-open", "ckpt-rename", "state-open", "retention"],
)
async def test_two_savers_cannot_interleave(
    ckpt_dir: Path, storage: FaultyStorage, op: StorageOp, match: str
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    first, second = Saver(max_to_keep=1, storage=storage), Saver(max_to_keep=1)
    await first.save(stepped_state(1), prefix, global_step=1)

    stall = storage.stall(op, match=match)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.save, stepped_state(2), prefix, 2)
        try:
            await stall.wait_reached()
            # The first save is in the middle of this operation, holding the directory.
            with pytest.raises(CheckpointLockedError, match=f"pid {os.getpid()}"):
                await second.save(stepped_state(3), prefix, global_step=3)
            assert not lock_is_free(ckpt_dir)
        finally:
            stall.release()

    # The first save finished as if it had been alone.
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-2"}
    await assert_restores(f"{prefix}-2", 2)
    # Now the second one saves, and applies retention to what the first one wrote.
    await second.save(stepped_state(3), prefix, global_step=3)
    assert checkpoint_files(ckpt_dir) == {"model.ckpt-3"}
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-3"


async def test_checkpoint_manager_holds_the_directory(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver()
    async with CheckpointManager(ckpt_dir) as manager:
        await manager.save(stepped_state(1), 1)
        await manager.wait()
        with pytest.raises(CheckpointWriteError) as info:  # Locked is a WriteError
            await saver.save(stepped_state(2), prefix, global_step=2)
        assert isinstance(info.value, CheckpointLockedError)
        assert info.value.path == str(ckpt_dir)
        assert f"pid {os.getpid()}" in str(info.value)
        assert "use another directory" in str(info.value)
        assert not lock_is_free(ckpt_dir)
        assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"
    # Released on exit: the Saver saves, and continues the manager's list.
    assert lock_is_free(ckpt_dir)
    await saver.save(stepped_state(2), prefix, global_step=2)
    assert saver.last_checkpoints(ckpt_dir) == [f"{prefix}-1", f"{prefix}-2"]


async def test_lock_is_released_after_every_save(ckpt_dir: Path, storage: FaultyStorage) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver(storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    assert lock_is_free(ckpt_dir)
    storage.fail("rename", errno.EIO)
    with pytest.raises(CheckpointWriteError):
        await saver.save(stepped_state(2), prefix, global_step=2)
    storage.clear()
    assert lock_is_free(ckpt_dir)
    with pytest.raises(TypeError):
        await saver.save({"bad": object()}, prefix, global_step=3)
    assert lock_is_free(ckpt_dir)


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
async def test_lock_held_by_another_process(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver()
    await saver.save(stepped_state(1), prefix, global_step=1)
    process = await anyio.open_process(
        [sys.executable, "-c", _HOLD_LOCK, str(ckpt_dir / LOCK_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    async with process:
        assert process.stdout is not None
        with anyio.fail_after(10):
            output = b""
            while b"\n" not in output:
                output += await process.stdout.receive()
        assert output == b"locked\n"

        with pytest.raises(CheckpointLockedError, match=f"pid {process.pid}"):
            await saver.save(stepped_state(2), prefix, global_step=2)
        assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"

        process.kill()  # the kernel drops a dead process's flock
        with anyio.fail_after(10):
            await process.wait()
    await saver.save(stepped_state(2), prefix, global_step=2)
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"


# -- a lock that cannot be taken: a failing disk, a wrong place, a forked child -----------------


@pytest.mark.parametrize(
    ("op", "code", "advice"),
    [
        ("write", errno.ENOSPC, "free space on the file system that holds it (`df -h"),
        ("write", errno.EIO, "check the file system that holds"),
        ("open", errno.EROFS, "the file system is read-only"),
        ("open", errno.EACCES, "check the directory's permissions (`ls -ld"),
    ],
    ids=["pid-ENOSPC", "pid-EIO", "create-EROFS", "create-EACCES"],
)
async def test_a_lock_that_cannot_be_taken_is_explained_and_not_kept(
    ckpt_dir: Path, storage: FaultyStorage, op: StorageOp, code: int, advice: str
) -> None:
    """The lock file is created ("open"), then the holder's pid is written into it
    ("write"): a failure at either leaves no descriptor behind, so no flock either."""
    lock_path = str(ckpt_dir / LOCK_NAME)
    storage.fail(op, code, match=LOCK_NAME)
    with pytest.raises(CheckpointWriteError) as info:
        async with CheckpointManager(ckpt_dir, storage=storage):
            pass  # pragma: no cover - entering fails
    assert (op, lock_path) in storage.calls

    exc = info.value
    assert type(exc) is CheckpointWriteError  # not CheckpointLockedError: nobody holds it
    assert exc.path == lock_path
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == code
    assert f"{os.strerror(code)} (errno {code})" in str(exc)
    assert advice in str(exc)
    assert str(ckpt_dir) in str(exc).removeprefix(lock_path)  # the advice names the directory
    # Nothing kept: another process could take the lock, and so can this one, at once.
    assert lock_is_free(ckpt_dir)
    async with CheckpointManager(ckpt_dir, storage=storage) as manager:
        await manager.save(stepped_state(1), 1)
    await assert_restores(str(ckpt_dir / "model.ckpt-1"), 1)


async def test_a_failing_pid_write_fails_a_bare_save_and_keeps_no_lock(
    ckpt_dir: Path, storage: FaultyStorage
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    saver = Saver(storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    storage.fail("write", errno.ENOSPC, match=LOCK_NAME)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        await saver.save(stepped_state(2), prefix, global_step=2)
    assert lock_is_free(ckpt_dir)
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"
    assert await saver.save(stepped_state(2), prefix, global_step=2) == f"{prefix}-2"


@pytest.mark.parametrize("where", ["file", "under-a-file"])
async def test_a_directory_that_is_a_file_cannot_be_locked(tmp_path: Path, where: str) -> None:
    (tmp_path / "notes").write_bytes(b"not a directory")
    directory = tmp_path / "notes" if where == "file" else tmp_path / "notes" / "ckpts"
    with pytest.raises(CheckpointWriteError) as info:
        async with CheckpointManager(directory):
            pass  # pragma: no cover - entering fails
    exc = info.value
    assert type(exc) is CheckpointWriteError
    assert exc.path == str(directory)
    assert isinstance(exc.__cause__, OSError)
    assert f"{tmp_path / 'notes'} is not a directory" in str(exc)
    assert "pass the path of a directory" in str(exc)
    assert (tmp_path / "notes").read_bytes() == b"not a directory"


@pytest.mark.parametrize("holder", ["exited", "running", "no pid", "not a pid"])
async def test_a_locked_error_says_whether_the_holder_has_exited(
    ckpt_dir: Path, holder: str
) -> None:
    os.makedirs(ckpt_dir)
    lock_path = str(ckpt_dir / LOCK_NAME)
    pid_text = {"running": str(os.getpid()), "no pid": "", "not a pid": "9" * 30}.get(holder, "")
    if holder == "exited":
        with anyio.fail_after(10):
            done = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
        pid_text = done.stdout.decode().strip()
    # What a writer's forked child leaves when the writer is killed (a child forked by code
    # that skips Python's fork handlers, such as a C library's fork()): the dead writer's pid
    # in the file, the flock held by another open file (here: this test's own).
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, pid_text.encode())
        with pytest.raises(CheckpointLockedError) as info:
            async with CheckpointManager(ckpt_dir):
                pass  # pragma: no cover - entering fails
    finally:
        os.close(fd)
    message = str(info.value)
    if holder == "exited":
        assert f"pid {pid_text}, which has exited" in message
        assert "a process it forked holds the lock still" in message
        assert f"`fuser -v {lock_path}`" in message
    else:
        assert f"another writer holds this checkpoint directory (pid {pid_text or 'unknown'})" in (
            message
        )
    async with CheckpointManager(ckpt_dir):
        pass


# The writer opens a manager, forks a child (a data loader's worker, say) that waits, and
# prints the child's pid once the child runs; then it waits to be killed.
_FORK_WHILE_HOLDING = """
import os, sys, time
import anyio
from asyncckpt import CheckpointManager

async def main():
    async with CheckpointManager(sys.argv[1]):
        ready, running = os.pipe()
        child = os.fork()
        if child == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)  # holds no pipe of the test
            os.write(running, b"x")
            time.sleep(60)
            os._exit(0)
        assert os.read(ready, 1) == b"x"
        print(child, flush=True)
        sys.stdin.read()

anyio.run(main)
"""


@pytest.mark.slow
def test_a_forked_child_does_not_keep_a_killed_writers_lock(ckpt_dir: Path) -> None:
    argv = [sys.executable, "-W", "ignore", "-c", _FORK_WHILE_HOLDING, str(ckpt_dir)]
    child: int | None = None
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as writer:
        try:
            assert writer.stdout is not None
            readable, _, _ = select.select([writer.stdout], [], [], 30)
            assert readable, "the writer printed nothing within 30 s"
            child = int(writer.stdout.readline())
            # The child dropped its copy of the lock, and the writer still holds it.
            assert not lock_is_free(ckpt_dir)

            writer.kill()
            writer.wait(timeout=10)
            os.kill(child, 0)  # the child outlives the writer...
            assert lock_is_free(ckpt_dir)  # ...without its lock

            async def open_and_save() -> None:
                async with CheckpointManager(ckpt_dir) as manager:
                    await manager.save(stepped_state(1), 1)

            anyio.run(open_and_save)
        finally:
            if writer.poll() is None:  # pragma: no cover - only when the test fails
                writer.kill()
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
    assert latest_checkpoint(ckpt_dir) == str(ckpt_dir / "model.ckpt-1")


# -- read errors ------------------------------------------------------------------------------


def assert_read_error(exc: CheckpointReadError, path: str, code: int) -> None:
    """``exc`` names ``path``, says what failed and what to do, and chains the OSError."""
    assert type(exc) is CheckpointReadError
    assert exc.path == path
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == code
    assert f"{os.strerror(code)} (errno {code})" in str(exc)
    if code == errno.EACCES:
        assert f"check the file's permissions (`ls -l {path}`)" in str(exc)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_an_unreadable_checkpoint_raises_a_read_error(
    ckpt_dir: Path, storage: FaultyStorage, use_mmap: bool, code: int
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)
    storage.fail("open", code, match="model.ckpt-1")
    with pytest.raises(CheckpointReadError) as info:
        await Saver(storage=storage).restore(f"{prefix}-1", mmap=use_mmap)
    assert_read_error(info.value, f"{prefix}-1", code)
    await assert_restores(f"{prefix}-1", 1)


async def test_a_manager_restore_of_an_unreadable_checkpoint(
    ckpt_dir: Path, storage: FaultyStorage
) -> None:
    async with CheckpointManager(ckpt_dir, storage=storage) as manager:
        for step in (1, 2):
            await manager.save(stepped_state(step), step)
        await manager.wait()
        newest = str(ckpt_dir / "model.ckpt-2")
        storage.fail("open", errno.EACCES, match="model.ckpt-2", times=None)
        with pytest.raises(CheckpointReadError) as info:
            await manager.restore()
        assert_read_error(info.value, newest, errno.EACCES)
        # An unreadable checkpoint is one "fallback" skips, as a corrupted one.
        tree = await manager.restore(on_corrupt="fallback")
        assert tree["step"] == 1


async def test_an_unreadable_state_file_raises_a_read_error(
    ckpt_dir: Path, storage: FaultyStorage
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)
    state_path = str(ckpt_dir / "checkpoint")
    storage.fail("read", errno.EACCES, match=state_path, times=None)
    with pytest.raises(CheckpointReadError) as info:
        latest_checkpoint(ckpt_dir, storage=storage)
    assert_read_error(info.value, state_path, errno.EACCES)
    with pytest.raises(CheckpointReadError):
        get_checkpoint_state(ckpt_dir, storage=storage)
    with pytest.raises(CheckpointReadError):
        async with CheckpointManager(ckpt_dir, storage=storage):
            pass  # pragma: no cover - entering fails
    assert lock_is_free(ckpt_dir)
    storage.clear()
    assert latest_checkpoint(ckpt_dir, storage=storage) == f"{prefix}-1"


async def test_an_io_error_in_the_middle_of_a_read_raises_a_read_error(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)

    # A disk that fails a read once the file is open cannot be had on demand: the arrays'
    # vectored reads are made to fail as a bad sector would.
    def bad_sector(fd: int, buffers: object, offset: int, /) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", bad_sector)
    with pytest.raises(CheckpointReadError) as info:
        await Saver().restore(f"{prefix}-1")
    assert_read_error(info.value, f"{prefix}-1", errno.EIO)
    monkeypatch.undo()
    await assert_restores(f"{prefix}-1", 1)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/mem is Linux's")
async def test_a_real_io_error_while_reading_raises_a_read_error() -> None:
    # A regular file whose first bytes cannot be read: this process's memory at address 0.
    with pytest.raises(CheckpointReadError) as info:
        await Saver().restore("/proc/self/mem")
    assert_read_error(info.value, "/proc/self/mem", errno.EIO)
    # A directory scan's sniff of the magic bytes finds none there, and goes on.
    assert LocalStorage().read_prefix("/proc/self/mem", 8) == b""


# Sysfs attributes: regular files of 4096 bytes that no one can map (ENODEV).
_SYSFS_FILES = ["/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state"]
_UNMAPPABLE = next((path for path in _SYSFS_FILES if os.path.isfile(path)), None)


@pytest.mark.skipif(_UNMAPPABLE is None, reason=f"none of {_SYSFS_FILES} is on this machine")
async def test_a_file_that_cannot_be_mapped_raises_a_read_error() -> None:
    assert _UNMAPPABLE is not None
    with pytest.raises(CheckpointReadError) as info:
        await Saver().restore(_UNMAPPABLE, mmap=True)
    assert_read_error(info.value, _UNMAPPABLE, errno.ENODEV)


def test_a_path_that_cannot_be_looked_at_raises_a_read_error(ckpt_dir: Path) -> None:
    os.makedirs(ckpt_dir)
    path = str(ckpt_dir / ("x" * 300))  # longer than any name a directory can hold
    with pytest.raises(CheckpointReadError) as info:
        LocalStorage().file_info(path)
    assert_read_error(info.value, path, errno.ENAMETOOLONG)
    assert "it could not be read" in str(info.value)


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads any file whatever its mode; the FaultyStorage tests above cover EACCES",
)
@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_a_checkpoint_without_read_permission(ckpt_dir: Path, use_mmap: bool) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)
    os.chmod(f"{prefix}-1", 0)
    try:
        with pytest.raises(CheckpointReadError) as info:
            await Saver().restore(f"{prefix}-1", mmap=use_mmap)
        assert_read_error(info.value, f"{prefix}-1", errno.EACCES)
        os.chmod(ckpt_dir / "checkpoint", 0)
        with pytest.raises(CheckpointReadError) as state_info:
            latest_checkpoint(ckpt_dir)
        assert_read_error(state_info.value, str(ckpt_dir / "checkpoint"), errno.EACCES)
    finally:
        os.chmod(f"{prefix}-1", 0o644)
        os.chmod(ckpt_dir / "checkpoint", 0o644)
    await assert_restores(f"{prefix}-1", 1)


# -- temporary files and symlinks -------------------------------------------------------------

LEFTOVERS = [".model.ckpt-3.asyncckpt-tmp-abc", ".checkpoint.asyncckpt-tmp-def"]
NOT_OURS = ["notes.txt", ".hidden", "model.ckpt-3.asyncckpt-tmp-abc", ".model.ckpt-3.tmp"]


def _plant(directory: Path, names: list[str]) -> None:
    for name in names:
        (directory / name).write_bytes(b"partial")


async def test_next_save_removes_leftover_temp_files(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)
    _plant(ckpt_dir, LEFTOVERS + NOT_OURS)

    await Saver().save(stepped_state(2), prefix, global_step=2)  # a restarted writer

    assert temp_files(ckpt_dir) == ["model.ckpt-3.asyncckpt-tmp-abc"]  # no leading dot
    for name in NOT_OURS:
        assert (ckpt_dir / name).read_bytes() == b"partial"
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"


async def test_checkpoint_manager_removes_leftover_temp_files_on_open(ckpt_dir: Path) -> None:
    os.makedirs(ckpt_dir)
    _plant(ckpt_dir, LEFTOVERS + NOT_OURS)
    async with CheckpointManager(ckpt_dir):
        assert sorted(temp_files(ckpt_dir)) == ["model.ckpt-3.asyncckpt-tmp-abc"]
        for name in NOT_OURS:
            assert (ckpt_dir / name).exists()


async def test_leftover_that_cannot_be_removed_does_not_fail_the_save(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    (ckpt_dir / ".model.ckpt-9.asyncckpt-tmp-dir").mkdir(parents=True)
    await Saver().save(stepped_state(1), prefix, global_step=1)
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"


@pytest.mark.parametrize("dangling", [False, True], ids=["to-file", "dangling"])
@pytest.mark.parametrize("target", ["model.ckpt-2", "checkpoint"], ids=["ckpt", "state"])
async def test_symlink_planted_at_the_temp_name_is_not_followed(
    ckpt_dir: Path, tmp_path: Path, target: str, dangling: bool
) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_bytes(b"precious")

    class PlantSymlink(FaultyStorage):
        """An attacker wins the race: a symlink appears at the temp name just before open."""

        armed = False

        def check(self, op: str, path: str) -> None:
            super().check(op, path)
            if self.armed and op == "open" and TEMP_MARKER in path and target in path:
                os.symlink(victim, path)

    storage = PlantSymlink()
    saver = Saver(storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    state_before = (ckpt_dir / "checkpoint").read_bytes()

    storage.armed = True
    with storage, pytest.raises(CheckpointWriteError) as info:
        await saver.save(stepped_state(2), prefix, global_step=2)
    storage.armed = False

    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EEXIST
    if dangling:
        assert not exists(victim)
    else:
        assert victim.read_bytes() == b"precious"
    assert (ckpt_dir / "checkpoint").read_bytes() == state_before
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-1"
    # The next save removes the planted link (never what it points to) and succeeds.
    await saver.save(stepped_state(2), prefix, global_step=2)
    assert temp_files(ckpt_dir) == []
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    assert victim.exists() != dangling
    if not dangling:
        assert victim.read_bytes() == b"precious"


async def test_symlink_planted_at_the_lock_is_not_followed(ckpt_dir: Path, tmp_path: Path) -> None:
    os.makedirs(ckpt_dir)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    os.symlink(victim, ckpt_dir / LOCK_NAME)

    with pytest.raises(CheckpointWriteError) as info:
        await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=1)
    assert not isinstance(info.value, CheckpointLockedError)
    assert info.value.path == str(ckpt_dir / LOCK_NAME)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ELOOP
    assert "symlink, which is never followed: remove it" in str(info.value)
    with pytest.raises(CheckpointWriteError):
        async with CheckpointManager(ckpt_dir):
            pass  # pragma: no cover - entering fails
    assert victim.read_bytes() == b"precious"  # not truncated, no pid written into it
    assert checkpoint_files(ckpt_dir) == set()


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_restore_refuses_a_symlink(ckpt_dir: Path, use_mmap: bool) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    await Saver().save(stepped_state(1), prefix, global_step=1)
    os.symlink(ckpt_dir / "model.ckpt-1", ckpt_dir / "model.ckpt-5")

    with pytest.raises(CheckpointNotFoundError, match="symlink") as info:
        await Saver().restore(f"{prefix}-5", mmap=use_mmap)
    assert info.value.path == f"{prefix}-5"
    await assert_restores(f"{prefix}-1", 1)


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_restore_of_a_missing_path_or_a_directory(ckpt_dir: Path, use_mmap: bool) -> None:
    (ckpt_dir / "model.ckpt-2").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match="not a regular file"):
        await Saver().restore(ckpt_dir / "model.ckpt-2", mmap=use_mmap)
    with pytest.raises(FileNotFoundError) as info:  # a CheckpointNotFoundError
        await Saver().restore(ckpt_dir / "model.ckpt-3", mmap=use_mmap)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert info.value.path == str(ckpt_dir / "model.ckpt-3")


# -- writers that share a directory, each with its own state file ------------------------------


def input_manager(directory: Path, storage: FaultyStorage | None = None) -> CheckpointManager:
    """A manager beside the model's, as the input pipeline hook's: its own names."""
    return CheckpointManager(
        directory, basename="input.ckpt", latest_filename="checkpoint_input", storage=storage
    )


def test_temp_target_recovers_the_name_being_written() -> None:
    assert temp_target(".model.ckpt-3.asyncckpt-tmp-ab12") == "model.ckpt-3"
    assert temp_target(".checkpoint_input.asyncckpt-tmp-0") == "checkpoint_input"
    for name in ["model.ckpt-3.asyncckpt-tmp-abc", ".model.ckpt-3.tmp", ".asyncckpt-tmp-x"]:
        assert temp_target(name) is None


async def test_two_managers_with_their_own_state_files_share_a_directory(ckpt_dir: Path) -> None:
    async with CheckpointManager(ckpt_dir) as model, input_manager(ckpt_dir) as data:
        for step in (1, 2, 3):
            await model.save(stepped_state(step), step)
            await data.save({"position": step * 10}, step)
        await model.wait()
        await data.wait()
        assert (model.all_steps(), data.all_steps()) == ([1, 2, 3], [1, 2, 3])
        assert not lock_is_free(ckpt_dir)
    model_state = get_checkpoint_state(ckpt_dir)
    input_state = get_checkpoint_state(ckpt_dir, "checkpoint_input")
    assert model_state is not None
    assert input_state is not None
    assert model_state.names == ("model.ckpt-1", "model.ckpt-2", "model.ckpt-3")
    assert input_state.names == ("input.ckpt-1", "input.ckpt-2", "input.ckpt-3")
    assert sorted(name for name in os.listdir(ckpt_dir) if name.startswith(".asyncckpt")) == [
        ".asyncckpt.checkpoint_input.lock",
        ".asyncckpt.lock",
    ]
    async with input_manager(ckpt_dir) as data:
        assert await data.restore() == {"position": 30}


async def test_opening_a_manager_leaves_the_other_writers_temp_file_alone(ckpt_dir: Path) -> None:
    with FaultyStorage() as faults:
        # The input's write of step 1 is held with its temporary file on disk...
        stall = faults.stall("fsync", match="input.ckpt-1")
        async with input_manager(ckpt_dir, faults) as data:
            await data.save({"position": 10}, 1)
            await stall.wait_reached()
            (in_flight,) = temp_files(ckpt_dir)
            assert in_flight.startswith(".input.ckpt-1.")
            # ... when the model's manager opens the directory and cleans up its leftovers.
            _plant(ckpt_dir, [".model.ckpt-7.asyncckpt-tmp-old", ".checkpoint.asyncckpt-tmp-old"])
            async with CheckpointManager(ckpt_dir) as model:
                assert temp_files(ckpt_dir) == [in_flight]
                await model.save(stepped_state(1), 1)
            stall.release()
            await data.wait()
    assert temp_files(ckpt_dir) == []
    assert latest_checkpoint(ckpt_dir) == str(ckpt_dir / "model.ckpt-1")
    assert latest_checkpoint(ckpt_dir, "checkpoint_input") == str(ckpt_dir / "input.ckpt-1")


async def test_a_manager_removes_its_own_leftovers_only(ckpt_dir: Path) -> None:
    os.makedirs(ckpt_dir)
    ours = [".input.ckpt-3.asyncckpt-tmp-a", ".checkpoint_input.asyncckpt-tmp-b"]
    theirs = [
        ".model.ckpt-3.asyncckpt-tmp-c",
        ".checkpoint.asyncckpt-tmp-d",
        ".input.ckpt-extra-3.asyncckpt-tmp-e",  # another basename that merely starts alike
    ]
    _plant(ckpt_dir, ours + theirs)
    async with input_manager(ckpt_dir):
        assert sorted(temp_files(ckpt_dir)) == sorted(theirs)


async def test_the_same_state_file_still_conflicts(ckpt_dir: Path) -> None:
    async with input_manager(ckpt_dir):
        with pytest.raises(CheckpointLockedError) as info:
            async with CheckpointManager(
                ckpt_dir, basename="other.ckpt", latest_filename="checkpoint_input"
            ):
                pass  # pragma: no cover - entering fails
        assert info.value.path == str(ckpt_dir)
        lock = ".asyncckpt.checkpoint_input.lock"
        assert f"{lock} of this checkpoint directory (pid {os.getpid()})" in str(info.value)
        with pytest.raises(CheckpointLockedError):
            await Saver(latest_filename="checkpoint_input").save({"a": 1}, str(ckpt_dir / "x"), 1)
        # The model's state file has a lock of its own: a bare Saver saves beside the manager.
        await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=1)
    assert latest_checkpoint(ckpt_dir) == str(ckpt_dir / "model.ckpt-1")


async def test_a_bare_saver_removes_leftovers_of_its_prefix_and_state_file_only(
    ckpt_dir: Path,
) -> None:
    os.makedirs(ckpt_dir)
    ours = [
        ".model.ckpt-3.asyncckpt-tmp-a",
        ".checkpoint.asyncckpt-tmp-b",
        ".model.ckpt.asyncckpt-tmp-c",
    ]
    theirs = [".input.ckpt-3.asyncckpt-tmp-d", ".checkpoint_input.asyncckpt-tmp-e"]
    _plant(ckpt_dir, ours + theirs)
    await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=1)
    assert sorted(temp_files(ckpt_dir)) == sorted(theirs)


def test_prune_removes_only_the_leftovers_of_what_its_state_file_lists(ckpt_dir: Path) -> None:
    async def build() -> None:
        async with (
            CheckpointManager(ckpt_dir) as model,
            input_manager(ckpt_dir) as data,
        ):
            for step in (1, 2, 3):
                await model.save(stepped_state(step), step)
                await data.save({"position": step}, step)

    anyio.run(build)
    theirs = [".input.ckpt-4.asyncckpt-tmp-a", ".checkpoint_input.asyncckpt-tmp-b"]
    _plant(ckpt_dir, [".model.ckpt-4.asyncckpt-tmp-c", ".checkpoint.asyncckpt-tmp-d", *theirs])
    (ckpt_dir / "model.ckpt-1").unlink()  # the state file names a missing file: rebuilt
    kept, deleted = prune(LocalStorage(), str(ckpt_dir), keep=1)
    assert (kept, deleted) == (["model.ckpt-3"], ["model.ckpt-2"])
    assert sorted(temp_files(ckpt_dir)) == sorted(theirs)
    input_state = get_checkpoint_state(ckpt_dir, "checkpoint_input")
    assert input_state is not None
    assert input_state.names == ("input.ckpt-1", "input.ckpt-2", "input.ckpt-3")
    assert all((ckpt_dir / name).exists() for name in input_state.names)
