"""Real faults of a real file system: a full disk and a read-only one, on a small tmpfs.

No fault is injected: each test mounts a 1 MiB tmpfs under ``tmp_path`` (root only; skipped,
with the reason, where mounting fails), fills it or remounts it read-only, and checks what
users see: a ``CheckpointWriteError`` that says what happened and what to do, never a raw
``OSError``; nothing held or left behind; the previous checkpoint still the latest and
restorable; and a writer that works again once the disk does.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pytest
from support import assert_restores, stepped_state, temp_files

from asyncckpt import (
    CheckpointLockedError,
    CheckpointManager,
    CheckpointWriteError,
    Saver,
    latest_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

TMPFS_BYTES: Final = 1024 * 1024


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path / "tmpfs"``, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount(8) or umount(8) on this machine")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        # A descriptor left open (a leaked lock) makes the mount busy: detach it anyway, so
        # that the failure is the test's assertion, not a mount left behind.
        if _run("umount", str(mount_point)).returncode != 0:
            _run("umount", "-l", str(mount_point))  # pragma: no cover - only when a test fails


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full; return the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        chunk = bytes(64 * 1024)
        while True:
            try:
                file.write(chunk)  # unbuffered: a short write, then ENOSPC, at the end
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler


def remount_read_only(mount_point: Path) -> None:
    result = _run("mount", "-o", "remount,ro", str(mount_point))
    assert result.returncode == 0, result.stderr


def assert_says(exc: CheckpointWriteError, code: int, *advice: str) -> None:
    """``exc`` is a plain write error that gives the system's reason and ``advice``."""
    assert type(exc) is CheckpointWriteError  # not CheckpointLockedError: nobody holds it
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == code
    message = str(exc)
    assert f"{os.strerror(code)} (errno {code})" in message
    for text in advice:
        assert text in message


def larger_state(step: int) -> dict[str, Any]:
    return {**stepped_state(step), "big": np.full(64 * 1024, step, dtype=np.float64)}


async def test_a_full_disk_at_open_fails_clearly_and_keeps_no_lock(tmpfs: Path) -> None:
    directory = tmpfs / "ckpts"
    filler = fill(tmpfs)
    with pytest.raises(CheckpointWriteError) as info:
        async with CheckpointManager(directory):
            pass  # pragma: no cover - entering fails
    assert_says(info.value, errno.ENOSPC, "write this writer's pid", f"`df -h {directory}`")
    assert info.value.path == str(directory / ".asyncckpt.lock")

    filler.unlink()
    # The same process opens the directory at once: the failed open kept no descriptor.
    async with CheckpointManager(directory) as manager:
        await manager.save(stepped_state(1), 1)
    await assert_restores(str(directory / "model.ckpt-1"), 1)


async def test_a_save_on_a_full_disk_fails_and_keeps_the_previous_checkpoint(
    tmpfs: Path,
) -> None:
    directory = tmpfs / "ckpts"
    first, third = str(directory / "model.ckpt-1"), str(directory / "model.ckpt-3")
    async with CheckpointManager(directory) as manager:
        await manager.save(stepped_state(1), 1)
        await manager.wait()
        state_file = (directory / "checkpoint").read_bytes()

        filler = fill(tmpfs)
        await manager.save(larger_state(2), 2)
        with pytest.raises(CheckpointWriteError) as info:
            await manager.wait()
        assert_says(info.value, errno.ENOSPC, "the previous checkpoint is still the latest")
        assert info.value.path == str(directory / "model.ckpt-2")
        assert latest_checkpoint(directory) == first
        assert (directory / "checkpoint").read_bytes() == state_file
        assert temp_files(directory) == []
        await assert_restores(first, 1)
        assert manager.all_steps() == [1]

        filler.unlink()
        await manager.save(larger_state(3), 3)
        await manager.wait()
    assert latest_checkpoint(directory) == third
    assert manager.all_steps() == [1, 3]
    await assert_restores(third, 3)
    await assert_restores(first, 1)


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
async def test_a_read_only_file_system_refuses_writers_and_serves_readers(
    tmpfs: Path, exists: bool
) -> None:
    directory = tmpfs / "ckpts" if exists else tmpfs / "new"
    latest = str(tmpfs / "ckpts" / "model.ckpt-1")
    async with CheckpointManager(tmpfs / "ckpts") as manager:
        await manager.save(stepped_state(1), 1)
    remount_read_only(tmpfs)

    with pytest.raises(CheckpointWriteError) as info:
        async with CheckpointManager(directory):
            pass  # pragma: no cover - entering fails
    assert not isinstance(info.value, CheckpointLockedError)
    doing = "create the lock file" if exists else "create the directory"
    assert_says(info.value, errno.EROFS, doing, f"a writer needs {directory} writable")
    with pytest.raises(CheckpointWriteError) as saver_info:
        await Saver().save(stepped_state(2), str(directory / "model.ckpt"), global_step=2)
    assert_says(saver_info.value, errno.EROFS, "the file system is read-only")

    # Reading takes no lock: the checkpoint is there for every reader.
    assert latest_checkpoint(tmpfs / "ckpts") == latest
    await assert_restores(latest, 1)
    tree = await Saver().restore(latest, mmap=True)
    assert tree["step"] == 1
