"""LocalStorage: the ``Storage`` of POSIX files (atomic writes, reads, the lock, cleanup).

Knows nothing of hooks, trees or the header layout: it moves bytes and names, and turns
OSErrors into the package's errors at its boundary.

Every blocking step is a plain sync function; the async functions call them in worker
threads, one thread hop per logical operation. Streaming reads and writes go through aiofiles
on asyncio and through anyio's file API on trio (aiofiles is asyncio-only). The commit
(flush, fsync, rename, directory fsync) is always a single worker-thread call, so a
cancellation can never tear it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import mmap
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import aiofiles.threadpool
import anyio

from .._core._errors import (
    CheckpointCorruptedError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
)
from ._base import (
    LOCK_NAME,
    MAX_SMALL_FILE,
    TEMP_MARKER,
    DirectorySyncError,
    Probe,
    Storage,
    WriteAborted,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from .._core._types import Buffer

__all__ = [
    "LocalAppendFile",
    "LocalReadFile",
    "LocalStorage",
    "PosixDirectoryLock",
    "pid_has_exited",
    "temp_target",
]

_CHUNK_BYTES: Final = 64 * 1024 * 1024
_IOV_MAX: Final = min(os.sysconf("SC_IOV_MAX"), 1024)
_WRITE_BUFFER: Final = 1024 * 1024


def _open_regular(path: str, *, buffering: int) -> tuple[BinaryIO, int]:
    """Open a regular file for reading, never through a symlink; return it and its size.

    Raises:
        FileNotFoundError: there is nothing at ``path``.
        CheckpointNotFoundError: it is a symlink, a directory or another non-file, or a
            directory on its way is not one.
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointNotFoundError(path, "refusing to follow a symlink") from None
        if exc.errno == errno.ENOTDIR:
            raise CheckpointNotFoundError(path, "a directory on its path is a file") from None
        raise
    try:
        # Checked before wrapping: open() on a directory's descriptor raises a bare
        # IsADirectoryError (and would leak the descriptor).
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointNotFoundError(path, "not a regular file")
        file = open(fd, "rb", buffering=buffering)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise
    return file, info.st_size


def _check_aborted(aborted: Callable[[], bool] | None) -> None:
    if aborted is not None and aborted():
        raise WriteAborted("the writer abandoned this write")


def _no_probe(op: str, path: str, /) -> None:
    """The probe of an uninstrumented storage: every operation proceeds."""


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _CheckedFileIO(io.FileIO):
    """A raw file whose writes pass through the probe (the only place buffered writes happen)."""

    # Opened from a descriptor, a FileIO's ``name`` is that number: keep the path for the probe.
    check_path: str = ""
    probe: Probe = _no_probe

    def write(self, data: Buffer, /) -> int:
        self.probe("write", self.check_path)
        return super().write(data)


# -- sync primitives -------------------------------------------------------------------------


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{TEMP_MARKER}{secrets.token_hex(6)}")


def _discard_sync(file: io.BufferedWriter, temp_path: str) -> None:
    # Runs while another error propagates: that error is what the caller must see, and a
    # temp file left behind is removed by the next writer that opens the directory.
    with contextlib.suppress(OSError, ValueError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(temp_path)


def _write_error(path: str, exc: OSError) -> CheckpointWriteError:
    # What the failure means for the directory (which checkpoint is the latest now) is the
    # writer's to say: storage knows files, not checkpoints.
    return CheckpointWriteError(path, f"{exc.strerror or exc} (errno {exc.errno})")


def _read_error(path: str, exc: OSError) -> CheckpointReadError:
    """The error of a file that exists but could not be read: what failed, and what to do."""
    reason = f"{exc.strerror or exc} (errno {exc.errno})"
    if exc.errno in (errno.EACCES, errno.EPERM):
        advice = f"check the file's permissions (`ls -l {path}`)"
    elif exc.errno == errno.EIO:
        advice = "the device failed to read it (see `dmesg`); the file itself may be intact"
    else:
        advice = "the file itself may be intact, but it could not be read"
    return CheckpointReadError(path, f"{reason}; {advice}")


def temp_target(name: str) -> str | None:
    """Return the name a temporary file was being written for, or None if it is not one.

    Temporary files are named ``.<final name>.asyncckpt-tmp-<random>``.
    """
    if not name.startswith("."):
        return None
    target, marker, _random = name[1:].rpartition(TEMP_MARKER)
    return target if marker and target else None


def _lock_error(path: str, directory: str, doing: str, exc: OSError) -> CheckpointWriteError:
    """The error of a lock that could not be taken, though no other writer holds it."""
    code = exc.errno
    reason = f"{exc.strerror or exc} (errno {code})"
    if code == errno.ELOOP:
        advice = "it is a symlink, which is never followed: remove it"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        advice = f"free space on the file system that holds it (`df -h {directory}`), then retry"
    elif code == errno.EROFS:
        advice = (
            f"the file system is read-only: a writer needs {directory} writable (reading "
            "checkpoints, with Saver().restore() or latest_checkpoint(), takes no lock)"
        )
    elif code in (errno.EACCES, errno.EPERM):
        advice = f"check the directory's permissions (`ls -ld {directory}`)"
    elif code in (errno.ENOTDIR, errno.EEXIST):  # makedirs says EEXIST of a file in the way
        advice = f"{_in_the_way(directory)} is not a directory: pass the path of a directory"
    else:
        advice = f"check the file system that holds {directory}"
    return CheckpointWriteError(path, f"cannot {doing}: {reason}; {advice}")


def _in_the_way(directory: str) -> str:
    """The deepest part of ``directory`` that exists: the file where a directory must be."""
    path = os.path.abspath(directory)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def pid_has_exited(holder: str) -> bool:
    """Whether the pid a lock holds (decimal text) names no process on this host (False when
    unsure)."""
    if not holder.isdigit() or int(holder) == 0:
        return False
    try:
        os.kill(int(holder), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: it runs, as another user; or no pid at all
        return False
    return False


# flock locks belong to the open file description, which fork() shares with the child: a
# child forked while the lock is held (a data loader's worker, multiprocessing with "fork")
# would hold the directory after the writer dies, and the next writer's error would name a
# dead pid. So the child closes its copies of our lock descriptors as it starts. The flock
# goes only when every descriptor of the description is closed, so the parent keeps it; the
# child must never LOCK_UN, which would drop it for the parent too. (A process that forks to
# go on writing, as a daemon does, must open the directory after forking.) The guard makes an
# open and its registration, or an unregistration and its close, one step for fork(): a
# child never inherits a lock descriptor it does not know of, nor closes a reused number.
_LOCK_FDS: set[int] = set()
_FORK_GUARD = threading.Lock()


def _close_lock_fds_in_child() -> None:  # pragma: no cover - runs in forked children only
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _FORK_GUARD.release()  # taken by this thread, before the fork


os.register_at_fork(
    before=_FORK_GUARD.acquire,
    after_in_parent=_FORK_GUARD.release,
    after_in_child=_close_lock_fds_in_child,
)


def _open_lock_fd(
    path: str, flags: int = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
) -> int:
    with _FORK_GUARD:
        fd = os.open(path, flags, 0o644)
        _LOCK_FDS.add(fd)
    return fd


def _close_lock_fd(fd: int) -> None:
    with _FORK_GUARD:
        _LOCK_FDS.discard(fd)
        os.close(fd)  # closing the only descriptor drops the flock


# -- readers and recycled files ---------------------------------------------------------------
#
# A manager recycles: the checkpoint retention retires becomes a spare file that the next save
# overwrites in place (remove_files(keep_spare=True), then write_atomic(reuse=...)). A reader
# that opened or mapped it must never see it change underneath. flock decides, on the file
# itself (flock locks belong to the open file description: two descriptors of one process
# conflict as surely as two processes do):
#
#   reader (_open_read_sync)              writer (_retire_as_spare)
#   r1 open(name) -> inode A              w1 open(name) -> inode A
#   r2 flock(LOCK_SH | LOCK_NB)           w2 flock(LOCK_EX | LOCK_NB), or unlink and give up
#   r3 stat(name) is A, or refuse         w3 rename(name -> spare name)
#                                         w4 close (drops LOCK_EX); later: overwrite A
#
# The writer overwrites A only after w2 succeeded, so no reader held LOCK_SH at w2; and while
# it holds LOCK_EX (w2 to w4) every r2 fails, so a reader's lock that succeeds either came
# before w2 (then w2 fails and A is unlinked, never overwritten: the reader keeps it intact)
# or after w4, hence after w3, when the name no longer refers to A (A's inode number cannot
# be reused while the reader's descriptor keeps A alive), and r3 refuses. Every interleaving
# gives the reader its own intact file or CheckpointNotFoundError. A streaming reader keeps
# its lock while the file is open, a mapping while the mapping lives (see open_mmap). Not on
# NFS: Linux emulates flock there with byte-range locks, which one process never conflicts
# with, and which closing any of its descriptors drops (docs/RELIABILITY.md).


def _retired_error(path: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        path,
        "retired by retention while being opened (its writer keeps fewer checkpoints and "
        "reuses the retired files); restore a newer checkpoint (latest_checkpoint(directory) "
        "names the newest)",
    )


def _hold_against_recycling(fd: int, path: str) -> None:
    """Take a shared flock on the checkpoint open at ``fd``, then check that ``path`` still
    names that file: from now on its writer deletes it rather than overwriting it.

    Raises:
        CheckpointNotFoundError: the writer is recycling it, or has (the name is gone or
            names another file).
        CheckpointReadError: the name cannot be looked at any more.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # the writer holds LOCK_EX: it is renaming the file to a spare
        raise _retired_error(path) from None
    except OSError:  # pragma: no cover - ENOLCK, EINVAL: a file system without flock
        pass  # safe all the same: the writer cannot lock either, so it never recycles here
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise _retired_error(path) from None
    except OSError as exc:  # pragma: no cover - the directory became unsearchable meanwhile
        raise _read_error(path, exc) from exc
    opened = os.fstat(fd)
    if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        raise _retired_error(path)


class PosixDirectoryLock:
    """An exclusive, non-blocking lock on a checkpoint directory (flock on a lock file).

    flock locks belong to the open file, so two writers in one process conflict as surely as
    two processes do; the kernel drops the lock when a process dies, and a child forked while
    it is held does not keep it (its copy is closed in the child). Writers that share a
    directory but not their files (the model's and the input pipeline's) use locks of
    different names.

    Args:
        directory: the directory; created if missing when the lock is taken.
        name: the lock file's name in it (``.asyncckpt.lock`` by default).
        probe: sees the lock file's creation (``"open"``) and the pid's write (``"write"``).
    """

    def __init__(
        self, directory: str, name: str = LOCK_NAME, *, probe: Probe | None = None
    ) -> None:
        self.directory = directory
        self.name = name
        self._probe: Probe = probe or _no_probe
        self._fd: int | None = None
        self._pid = 0  # the process that holds _fd (a forked child holds no lock)

    def acquire(self) -> None:
        """Take the lock. On any error nothing is kept: no descriptor, no flock.

        Raises:
            CheckpointLockedError: another writer holds it.
            CheckpointWriteError: the directory or lock file cannot be created or written
                (a full or read-only file system, permissions, a file in the way).
        """
        path = os.path.join(self.directory, self.name)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise _lock_error(self.directory, self.directory, "create the directory", exc) from exc
        try:
            self._probe("open", path)
            fd = _open_lock_fd(path)
        except OSError as exc:
            raise _lock_error(path, self.directory, "create the lock file", exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._locked_error(fd, path) from None
            except OSError as exc:  # pragma: no cover - ENOLCK: a file system without locks
                raise _lock_error(path, self.directory, "lock the lock file", exc) from exc
            try:
                self._probe("write", path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError as exc:
                raise _lock_error(path, self.directory, "write this writer's pid", exc) from exc
        except BaseException:
            _close_lock_fd(fd)
            raise
        self._fd, self._pid = fd, os.getpid()

    def _locked_error(self, fd: int, path: str) -> CheckpointLockedError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:  # pragma: no cover - a failing disk: the lock is held all the same
            holder = ""
        held = "this checkpoint directory"
        if self.name != LOCK_NAME:
            held = f"the lock {self.name} of {held}"
        if pid_has_exited(holder):
            return CheckpointLockedError(
                self.directory,
                f"another process holds {held} (pid {holder}, which has exited: a process it "
                "forked holds the lock still, as fork() shares it; `fuser -v "
                f"{path}` names it); stop it or use another directory",
            )
        return CheckpointLockedError(
            self.directory,
            f"another writer holds {held} (pid {holder or 'unknown'}); stop it or use another "
            "directory",
        )

    @property
    def renew_every(self) -> float | None:
        """None: the kernel holds a flock until it is released, or its holder dies."""
        return None

    def renew(self) -> None:
        """Do nothing: a flock is held until it is released (or its process dies), it has
        no lease to extend."""

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None and self._pid == os.getpid():
            _close_lock_fd(fd)  # in a forked child it was closed at the fork already

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (never in a child forked since it was taken)."""
        return self._fd is not None and self._pid == os.getpid()


# -- async operations ------------------------------------------------------------------------


def _async_wrap(file: Any) -> Any:
    if _on_asyncio():
        return aiofiles.threadpool.wrap(file)
    return anyio.wrap_file(file)


def _skip(views: list[memoryview], count: int) -> list[memoryview]:
    """Drop the first ``count`` bytes of ``views`` (what a short vectored call did)."""
    while views and count >= len(views[0]):
        count -= len(views[0])
        views = views[1:]
    if count:
        views = [views[0][count:], *views[1:]]
    return views


def _batches(pieces: Sequence[Buffer]) -> list[list[memoryview]]:
    """Cut the pieces into bounded batches of at most IOV_MAX views, one pwritev each.

    A batch is small enough that a cancellation waits for little more than one, and large
    enough that the thread hops and syscalls it costs are lost in the copy.
    """
    out: list[list[memoryview]] = []
    batch: list[memoryview] = []
    batch_bytes = 0
    for piece in pieces:
        view = memoryview(piece)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if len(view) <= _CHUNK_BYTES - batch_bytes and len(batch) < _IOV_MAX:
            batch.append(view)  # fits whole: the case of every small array, kept cheap
            batch_bytes += len(view)
            continue
        for start in range(0, len(view), _CHUNK_BYTES):
            chunk = view[start : start + _CHUNK_BYTES]
            if batch and (batch_bytes + len(chunk) > _CHUNK_BYTES or len(batch) == _IOV_MAX):
                out.append(batch)
                batch, batch_bytes = [], 0
            batch.append(chunk)
            batch_bytes += len(chunk)
    if batch:
        out.append(batch)
    return out


@dataclass(slots=True)
class LocalReadFile:
    """An open checkpoint for reading: positional reads through the async file layer, and
    vectored reads straight into arrays for worker threads."""

    path: str
    size: int
    _file: Any
    _limiter: anyio.CapacityLimiter | None
    _fd: int

    def read_into_sync(self, offset: int, views: list[memoryview]) -> int:
        """Fill ``views`` back to back from ``offset`` (from a worker thread); return how many
        bytes were read, fewer only at the end of the file (``CheckpointReadError`` if a read
        fails)."""
        total = 0
        while views:
            try:
                count = os.preadv(self._fd, views[:_IOV_MAX], offset + total)
            except OSError as exc:
                raise _read_error(self.path, exc) from exc
            if not count:
                break
            total += count
            views = _skip(views, count)
        return total

    async def read(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (fewer only at the end of the file).

        Raises:
            CheckpointReadError: the read failed (``__cause__``: the OSError).
        """
        try:
            await self._file.seek(offset)
            data: bytes = await self._file.read(size)
        except OSError as exc:
            raise _read_error(self.path, exc) from exc
        return data

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work on read bytes (checksums) in a worker thread."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


@dataclass(slots=True)
class LocalAppendFile:
    """A new file written front to back (event files), one worker-thread call per write."""

    path: str
    _file: io.BufferedWriter

    def _write_sync(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    async def write(self, data: bytes) -> None:
        """Append ``data`` and hand it to the operating system, in one thread call (whole
        records: shielded, so a cancellation never tears one). No fsync: TensorBoard's
        writer does not either, and its readers tolerate a torn last record."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._write_sync, data)

    async def aclose(self) -> None:
        """Close (idempotent; every write was handed to the operating system already)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._file.close)


class LocalStorage(Storage):
    """The ``Storage`` of a POSIX file system: atomic renames, fsync, flock.

    Args:
        probe: sees every primitive operation first (``asyncckpt.testing.FaultyStorage``
            passes one to inject faults); none by default.
    """

    def __init__(self, *, probe: Probe | None = None) -> None:
        self._probe: Probe = probe or _no_probe

    def __repr__(self) -> str:
        if self._probe is _no_probe:
            return "LocalStorage()"
        # The probe's name, not its repr: a bound method's repr holds its owner's, which
        # may hold this storage's (FaultyStorage), and so on without end.
        name = getattr(self._probe, "__qualname__", type(self._probe).__qualname__)
        return f"LocalStorage(probe={name})"

    def instrumented(self, probe: Probe) -> LocalStorage:
        """Return a LocalStorage whose operations pass ``probe`` (after this one's probe)."""
        if self._probe is _no_probe:
            return LocalStorage(probe=probe)
        outer = self._probe

        def both(op: str, path: str, /) -> None:
            outer(op, path)
            probe(op, path)

        return LocalStorage(probe=both)

    def lock(self, directory: str, name: str = LOCK_NAME) -> PosixDirectoryLock:
        """Return the flock-based lock ``name`` of ``directory`` (not yet taken)."""
        return PosixDirectoryLock(directory, name, probe=self._probe)

    def _fsync_dir(self, directory: str, renamed: str | None = None) -> None:
        # After a rename the fault plan sees the renamed file's path, so a test can pick which
        # commit's directory sync fails; after deletions it sees the directory.
        self._probe("fsync_dir", renamed or directory)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _create_exclusive(self, path: str) -> io.BufferedWriter:
        self._probe("open", path)
        # O_EXCL|O_NOFOLLOW: never write through a planted symlink or into someone else's file.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return self._checked_writer(os.open(path, flags, 0o644), path)

    def _checked_writer(self, fd: int, path: str) -> io.BufferedWriter:
        """Wrap ``fd`` (closed on failure) as a buffered file whose writes pass the probe."""
        try:
            raw = _CheckedFileIO(fd, "wb", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        raw.check_path = path
        raw.probe = self._probe
        return io.BufferedWriter(raw, buffer_size=_WRITE_BUFFER)

    def _open_temp_sync(
        self, final_path: str, reuse: str | None = None
    ) -> tuple[io.BufferedWriter, str]:
        if reuse is not None:
            self._probe("open", reuse)
            try:
                fd = os.open(reuse, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                pass  # gone (another writer's cleanup) or unusable: a new file will do
            else:
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise IsADirectoryError(errno.EISDIR, "a spare file must be a regular file")
                except BaseException:
                    os.close(fd)
                    raise
                return self._checked_writer(fd, reuse), reuse
        temp_path = _temp_name(final_path)
        try:
            return self._create_exclusive(temp_path), temp_path
        except FileNotFoundError:
            # A directory nobody made yet: a rank's shard may be written before rank 0,
            # which holds the directory, has created it.
            os.makedirs(os.path.dirname(final_path) or ".", exist_ok=True)
            return self._create_exclusive(temp_path), temp_path

    def _commit_sync(
        self,
        file: io.BufferedWriter,
        temp_path: str,
        final_path: str,
        size: int | None = None,
        aborted: Callable[[], bool] | None = None,
    ) -> None:
        file.flush()
        if size is not None:
            os.ftruncate(file.fileno(), size)  # a reused file may have been longer
        self._probe("fsync", temp_path)
        os.fsync(file.fileno())
        file.close()
        # An fsync can take long enough for the writer to give up on this file meanwhile.
        _check_aborted(aborted)
        self._probe("rename", final_path)
        os.replace(temp_path, final_path)
        try:
            self._fsync_dir(os.path.dirname(final_path) or ".", final_path)
        except OSError as exc:
            # Not an OSError any more: callers must not discard anything, the rename happened.
            reason = exc.strerror or str(exc)
            raise DirectorySyncError(
                final_path,
                f"{reason} (errno {exc.errno}) while syncing the directory: the file is in place "
                "but a power loss may undo the rename",
            ) from exc

    def write_small_file_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically and durably (the state file).

        Raises:
            DirectorySyncError: the file was replaced, but the directory sync failed.
            CheckpointWriteError: the file could not be written; the old one is untouched.
        """
        try:
            file, temp_path = self._open_temp_sync(path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            file.write(data)
            self._commit_sync(file, temp_path, path)
        except OSError as exc:
            _discard_sync(file, temp_path)
            raise _write_error(path, exc) from exc

    def read_small_file(self, path: str) -> bytes | None:
        """Return the bytes of a small file (the state file), or None when it does not exist.

        Raises:
            CheckpointNotFoundError: ``path`` is a directory or a symlink.
            CheckpointReadError: the file exists but cannot be read (``__cause__``).
        """
        try:
            self._probe("read", path)
            file, size = _open_regular(path, buffering=-1)
            with file:
                # Sized by the file, not the limit: read(n) allocates n bytes up front, and
                # every latest_checkpoint() would otherwise allocate 16 MiB for a file of a few
                # hundred.
                data = file.read(min(size, MAX_SMALL_FILE) + 1)
                if len(data) > size:  # it grew while being read: read on, still bounded
                    data += file.read(MAX_SMALL_FILE + 1 - len(data))
                return data
        except CheckpointNotFoundError:
            raise  # a FileNotFoundError too, but there is something there
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _read_error(path, exc) from exc

    def list_names(self, directory: str) -> list[str]:
        """Return the names in ``directory`` (empty when it does not exist)."""
        try:
            return sorted(os.listdir(directory))
        except FileNotFoundError:
            return []

    def file_info(self, path: str) -> os.stat_result | None:
        """Return the stat of ``path`` without following symlinks, or None when it is missing.

        Raises:
            CheckpointReadError: it cannot be looked at (a directory on its path is not
                searchable, or is a file).
        """
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _read_error(path, exc) from exc

    def remove_files(self, paths: Sequence[str], *, keep_spare: bool = False) -> str | None:
        """Delete checkpoint files (retention, prune); already-missing files are fine.

        With ``keep_spare``, the first file that no reader holds is renamed to a temporary name
        instead, and that name returned: the next save overwrites it in place
        (``self.write_atomic(reuse=...)``). Its pages stay in the page cache and its blocks
        allocated, where a new file would need fresh memory (which these virtual machines
        hand back to the host after about 2 s, and which costs about 2.7 s per GiB to touch
        again) and a delete would free every extent. A file that a reader has open or mapped
        (its shared flock) is deleted instead, and the reader keeps it intact; when every
        file is held, there is no spare (None) and the next save writes a new file.

        Every file is tried, even after one fails, so one stuck file does not keep the others.

        Raises:
            CheckpointWriteError: a file exists but cannot be deleted (the first such file; a
                note lists the others), or the directory cannot be synced afterwards.
        """
        errors: list[CheckpointWriteError] = []
        spare: str | None = None
        for path in paths:
            try:
                if keep_spare and spare is None:
                    spare = self._retire_as_spare(path)
                    if spare is not None:
                        continue
                self._probe("unlink", path)
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                error = CheckpointWriteError(path, f"could not delete: {exc.strerror}")
                error.__cause__ = exc
                errors.append(error)
        if paths:
            directory = os.path.dirname(paths[0]) or "."
            try:
                self._fsync_dir(directory)
            except OSError as exc:
                error = CheckpointWriteError(directory, f"could not sync: {exc.strerror}")
                error.__cause__ = exc
                errors.append(error)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"also failed: {[str(e) for e in errors[1:]]}")
            raise errors[0]
        return spare

    def _retire_as_spare(self, path: str) -> str | None:
        """Rename ``path`` to a temporary name, under an exclusive flock, and return that name;
        None when a reader holds it (or it cannot be locked): it must be deleted instead.

        The protocol, and why a reader never sees the file change, is above
        ``_hold_against_recycling``: the exclusive lock is held across the rename.

        Raises:
            OSError: the file is missing (``FileNotFoundError``), or the rename failed.
        """
        try:
            # Registered like a lock file's descriptor, so that a child forked meanwhile closes
            # its copy: holding LOCK_EX, it would lock readers out of the file once reused.
            fd = _open_lock_fd(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError:  # a symlink (ELOOP), an unreadable file: nothing to reuse, delete it
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: a reader has it open or mapped
                return None
            temp_path = _temp_name(path)
            self._probe("rename", temp_path)
            os.rename(path, temp_path)
            return temp_path
        finally:
            _close_lock_fd(fd)  # after the rename: drops LOCK_EX

    def remove_spare(self, path: str) -> None:
        """Delete a spare file that no save will reuse; one left behind is a temporary file,
        which the next writer's cleanup removes, so a failure here is not an error."""
        with contextlib.suppress(OSError):
            os.unlink(path)

    def remove_temp_files(self, directory: str, owns: Callable[[str], bool]) -> list[str]:
        """Delete temporary files that a crashed or cancelled writer left; return their names.

        Only the temporary files whose final name ``owns`` accepts are touched: several writers
        may share a directory, each with its own lock, and another writer's temporary file may be
        a write in progress. Call only while holding the lock that covers every name ``owns``
        accepts.
        """
        removed = []
        for name in self.list_names(directory):
            target = temp_target(name)
            if target is not None and owns(target):
                # Best effort: a leftover that cannot be removed (not ours, or not a file) must
                # not fail the save that found it; it is never read as a checkpoint anyway.
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(name)
        return removed

    def write_atomic(
        self,
        final_path: str,
        pieces: Sequence[Buffer],
        *,
        late_head: Callable[[], bytes] | None = None,
        reuse: str | None = None,
        aborted: Callable[[], bool] | None = None,
    ) -> None:
        """Write ``pieces`` to ``final_path`` atomically: a temp file, fsync, rename, dir fsync.

        One blocking call, made from one worker thread: the whole write then needs no turn of
        the event loop, however rarely the loop gets one (a step function that never awaits).

        With ``late_head``, the first piece only reserves room: once every other piece is
        written, the bytes ``late_head()`` returns (no longer than that piece) are written
        over its start, so a header can hold checksums computed while the body was written.

        With ``reuse``, a spare file from ``remove_files(keep_spare=True)`` is overwritten in
        place (and cut to length) instead of a new file being created, when it is still there.

        ``aborted()`` is asked between bounded batches and before the rename: once it says
        True, the temp file is removed and ``WriteAborted`` raised. A crash, an abort or an
        error at any instant leaves either the old file or the complete new one.

        Raises:
            WriteAborted: ``aborted()`` said so; nothing was put in place.
            CheckpointWriteError: an OSError (disk full, permission, I/O error); ``__cause__``.
        """
        try:
            file, temp_path = self._open_temp_sync(final_path, reuse)
        except OSError as exc:
            raise _write_error(final_path, exc) from exc
        try:
            offset = 0
            for batch in _batches(pieces):
                _check_aborted(aborted)
                offset = self._write_at(file, temp_path, batch, offset)
            if late_head is not None:
                head = late_head()
                if len(head) > len(memoryview(pieces[0])):
                    raise ValueError(
                        "late_head() returned more bytes than the first piece reserves"
                    )
                self._write_at(file, temp_path, [memoryview(head)], 0)
            _check_aborted(aborted)
            self._commit_sync(file, temp_path, final_path, offset, aborted)
        except BaseException as exc:
            _discard_sync(file, temp_path)
            if isinstance(exc, OSError):
                raise _write_error(final_path, exc) from exc
            raise

    def _write_at(
        self, file: io.BufferedWriter, path: str, views: list[memoryview], offset: int
    ) -> int:
        """Write ``views`` back to back at ``offset`` (one syscall when it can); return the end."""
        self._probe("write", path)
        fd = file.fileno()
        while views:
            written = os.pwritev(fd, views[:_IOV_MAX], offset)
            offset += written
            views = _skip(views, written)  # a short write (signal, quota): go on with the rest
        return offset

    def _open_read_sync(self, path: str) -> tuple[BinaryIO, int]:
        """Open a checkpoint, holding it against recycling for as long as it is open.

        Raises:
            CheckpointNotFoundError: nothing is there, something other than a regular file
                is, or its writer retired it while it was being opened.
            CheckpointReadError: it cannot be opened (``__cause__``: the OSError).
        """
        try:
            self._probe("open", path)
            raw, size = _open_regular(path, buffering=0)
        except CheckpointNotFoundError:
            raise  # a FileNotFoundError too, with a better reason
        except FileNotFoundError:
            raise CheckpointNotFoundError(path, "no such checkpoint") from None
        except OSError as exc:
            raise _read_error(path, exc) from exc
        try:
            _hold_against_recycling(raw.fileno(), path)
        except BaseException:
            raw.close()
            raise
        return raw, size

    @contextlib.asynccontextmanager
    async def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> AsyncIterator[LocalReadFile]:
        """Open a checkpoint for reading (no symlinks, regular files only); while it is open
        the writer deletes the file rather than recycling it.

        Raises:
            CheckpointNotFoundError: there is no regular file at ``path``, or its writer
                retired it while it was being opened.
            CheckpointReadError: it cannot be opened or read (``__cause__``: the OSError).
        """
        file, size = await anyio.to_thread.run_sync(self._open_read_sync, path, limiter=limiter)
        async_file = _async_wrap(file)
        try:
            yield LocalReadFile(path, size, async_file, limiter, file.fileno())
        finally:
            with anyio.CancelScope(shield=True):
                # aiofiles spells it close(), anyio aclose().
                await (async_file.close() if _on_asyncio() else async_file.aclose())

    def open_mmap(self, path: str) -> mmap.mmap:
        """Map a checkpoint read-only; the mapping outlives the descriptor and the file's name,
        and while it lives the writer deletes the file rather than recycling it.

        Raises:
            CheckpointNotFoundError: there is no regular file at ``path``, or its writer
                retired it while it was being opened.
            CheckpointCorruptedError: the file is empty.
            CheckpointReadError: it cannot be opened or mapped (``__cause__``: the OSError).
        """
        file, size = self._open_read_sync(path)
        with file:
            if not size:  # mmap cannot map nothing; report it as the streaming reader does
                raise CheckpointCorruptedError(path, "prelude", "file is only 0 bytes")
            try:
                # The shared flock that keeps the writer from recycling the file outlives this
                # descriptor: CPython's mmap dup()s it (trackfd, the default) and closes the
                # duplicate only when the map is closed or collected, and a flock belongs to the
                # open file description, which the duplicate shares. So the lock lives exactly
                # as long as the mapping (and arrays viewing it keep the mapping alive).
                return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise _read_error(path, exc) from exc

    def read_prefix(self, path: str, size: int) -> bytes:
        """Return the first ``size`` bytes of a regular file (b"" for anything else).

        A sniff for the magic bytes of checkpoints not named like one: a file that cannot be
        read gives b"" too, so that a stranger's unreadable file never stops a directory scan
        (one named like a checkpoint is opened, and its error reported, by the scan itself).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return b""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            return os.pread(fd, size, 0)
        except OSError:
            return b""
        finally:
            os.close(fd)

    def _create_new_sync(self, path: str) -> io.BufferedWriter:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return self._create_exclusive(path)

    async def create_new_file(self, path: str) -> LocalAppendFile:
        """Create ``path`` (and its directory); it must not exist yet.

        Raises:
            OSError: the file exists or cannot be created.
        """
        file = await anyio.to_thread.run_sync(self._create_new_sync, path)
        return LocalAppendFile(path, file)
