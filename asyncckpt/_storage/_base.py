"""The ``Storage`` interface: every operation the layers above need, and nothing else.

Knows nothing of trees, headers or hooks. A backend implements it (``LocalStorage`` for
POSIX files, ``ObjectStorage`` for object stores, whose paths are URLs); a wrapper
(``asyncckpt.testing.FaultyStorage``) forwards to one.

Two kinds of method:

* plain methods block (a disk, a network) and are called from worker threads only, one
  thread hop per logical operation (``anyio.to_thread.run_sync(storage.list_names, d)``; a
  whole checkpoint write, ``write_atomic``, is one); the synchronous public API
  (``latest_checkpoint``, the command line) calls them directly;
* ``async`` methods stream reads and event files and make their own hops.

Every error leaves as the package's own: ``CheckpointWriteError`` (its ``__cause__`` the
``OSError``) when writing or locking, ``CheckpointNotFoundError`` for what is not there, and
``CheckpointReadError`` (its ``__cause__`` the ``OSError``) for what is there but cannot be
read. Only ``list_names`` and ``create_new_file`` still raise a raw ``OSError``.

Readers and recycled files: a manager keeps the checkpoint retention retires as a spare that
its next save overwrites in place (``remove_files(keep_spare=True)``, then
``write_atomic(reuse=...)``). A backend must make sure that a file open for reading
(``open_for_read``, until the block ends) or mapped (``open_mmap``, until the mapping is
closed or collected), by this process or another, is never made that spare: it is deleted
instead, and the reader keeps its contents. A reader that opens a file while it is being made
a spare gets ``CheckpointNotFoundError``, never the bytes of another step.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Final, Protocol

from .._core._errors import CheckpointWriteError

if TYPE_CHECKING:
    import contextlib
    import mmap
    import os
    from collections.abc import Callable, Sequence

    import anyio

    from .._core._types import Buffer

__all__ = [
    "LOCK_NAME",
    "MAX_SMALL_FILE",
    "TEMP_MARKER",
    "AppendFile",
    "DirectoryLock",
    "DirectorySyncError",
    "Probe",
    "ReadFile",
    "Storage",
    "WriteAborted",
]

TEMP_MARKER: Final = ".asyncckpt-tmp-"
"""Part of every temporary file's name: ``.<final name>.asyncckpt-tmp-<random>``."""
LOCK_NAME: Final = ".asyncckpt.lock"
"""The lock file of the writers of the default state file."""
MAX_SMALL_FILE: Final = 16 * 1024 * 1024
"""The largest state file read; a larger one is refused, never allocated."""


class DirectorySyncError(CheckpointWriteError):
    """A file was put in place, but its durability is in doubt (the directory sync failed).

    Readers already see the new file, so callers must not discard anything. The checkpoint
    layer turns this into a plain ``CheckpointWriteError`` that says what the directory holds.
    """


class WriteAborted(Exception):
    """A blocking write stopped because its caller abandoned it (``aborted()`` said True).

    Nothing was put in place; the temporary file is gone. Never reaches users: the
    checkpoint layer raises the cancellation that caused it.
    """


class ReadFile(Protocol):
    """An open checkpoint: positional reads, and vectored reads into arrays from threads."""

    @property
    def path(self) -> str:
        """Where the file is (for error messages)."""

    @property
    def size(self) -> int:
        """Its size in bytes when it was opened."""

    def read_into_sync(self, offset: int, views: list[memoryview]) -> int:
        """Fill ``views`` back to back from ``offset`` (from a worker thread); return how many
        bytes were read, fewer only at the end of the file (``CheckpointReadError`` if a read
        fails)."""

    async def read(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (fewer only at the end of the file;
        ``CheckpointReadError`` if the read fails)."""

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work on this file (its reads, their checksums) in a worker thread."""


class AppendFile(Protocol):
    """A new file written front to back (an event file)."""

    @property
    def path(self) -> str:
        """Where the file is."""

    async def write(self, data: bytes) -> None:
        """Append ``data`` and hand it to the storage: readers see it once this returns.
        One worker-thread call (or one request); a cancellation never tears it."""

    async def aclose(self) -> None:
        """Close (idempotent)."""


class Probe(Protocol):
    """Sees each primitive operation of a storage before it happens (fault injection).

    It may raise an ``OSError`` to make the operation fail exactly as the device would, or
    block (in the worker thread making the call) to stall it.
    """

    def __call__(self, op: str, path: str, /) -> None:
        """Observe ``op`` on ``path``; raise to fail it."""


class DirectoryLock(Protocol):
    """An exclusive, non-blocking lock of one state file's writers on a directory.

    A lock may be a lease that expires unless renewed (``ObjectStorage``): its holder calls
    ``renew()`` well within the lease; a lock the operating system holds until it is
    released (``LocalStorage``'s flock) makes ``renew()`` a no-op.
    """

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""

    @property
    def renew_every(self) -> float | None:
        """How often a holder that writes nothing must call ``renew()`` (None: never)."""

    def acquire(self) -> None:
        """Take the lock (blocking call). A failed call holds nothing.

        Raises:
            CheckpointLockedError: another writer holds it.
            CheckpointWriteError: the lock cannot be created or taken (a full or read-only
                file system, permissions, a file where the directory should be).
        """

    def renew(self) -> None:
        """Extend the lock's lease from now (blocking call); a no-op for a lock that never
        expires.

        Raises:
            CheckpointLockedError: the lease was lost: it expired and another writer took it
                over (this object no longer holds it).
            CheckpointWriteError: it could not be renewed (a network error); it is still
                held until it expires.
            RuntimeError: a lease that is not held (never taken, or released).
        """

    def release(self) -> None:
        """Release the lock (idempotent, blocking call)."""


class Storage(abc.ABC):
    """Where checkpoints, state files and event files live (see the module docstring)."""

    supports_mmap: bool = True
    """Whether ``open_mmap`` can map a checkpoint (False for object stores: the readers
    that would map, the command line's among them, read ranges instead)."""

    writes_in_place: bool = False
    """Whether ``write_atomic`` writes under the final name (an object store, which has no
    rename): a writer that crashed then leaves an unlisted checkpoint rather than a
    temporary file, and the next writer sweeps it (``CheckpointDirectory.hold``). Such a
    store is reached over a network, where a write reported failed may have been applied
    (its answer lost): a failed state-file write is read back before anything is
    discarded. A local file's failed write never landed."""

    @abc.abstractmethod
    def instrumented(self, probe: Probe) -> Storage:
        """Return a storage over the same place whose primitive operations pass ``probe``."""

    # -- small files and names ----------------------------------------------------------------

    @abc.abstractmethod
    def read_small_file(self, path: str) -> bytes | None:
        """Return the bytes of a small file (a state file), or None when it does not exist.

        Raises:
            CheckpointNotFoundError: ``path`` is not a regular file.
            CheckpointReadError: it exists but cannot be read.
        """

    @abc.abstractmethod
    def write_small_file_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically and durably (a state file).

        Raises:
            DirectorySyncError: the file was replaced, but its durability is in doubt.
            CheckpointWriteError: it could not be written; the old one is untouched.
        """

    @abc.abstractmethod
    def list_names(self, directory: str) -> list[str]:
        """Return the sorted names in ``directory`` (empty when it does not exist)."""

    @abc.abstractmethod
    def file_info(self, path: str) -> os.stat_result | None:
        """Return the stat of ``path`` (links not followed), or None when it is missing.

        Raises:
            CheckpointReadError: it cannot be looked at.
        """

    @abc.abstractmethod
    def read_prefix(self, path: str, size: int) -> bytes:
        """Return the first ``size`` bytes of a regular file (b"" for anything else, a file
        that cannot be read included: it is a sniff, and never fails a directory scan)."""

    # -- removing -----------------------------------------------------------------------------

    @abc.abstractmethod
    def remove_files(self, paths: Sequence[str], *, keep_spare: bool = False) -> str | None:
        """Delete checkpoint files; missing ones are fine. With ``keep_spare`` the first one
        that no reader holds is kept under a temporary name, returned (None when every one is
        held), for ``write_atomic(reuse=...)``.

        A file that ``open_for_read`` or ``open_mmap`` holds, in any process, must not become
        the spare (it is deleted: the reader keeps its inode, intact); and making a file the
        spare must be atomic against those readers' opens (``LocalStorage``: an exclusive
        ``flock`` held across the rename, against their shared one).

        Raises:
            CheckpointWriteError: a file could not be deleted (every file is still tried).
        """

    @abc.abstractmethod
    def remove_spare(self, path: str) -> None:
        """Delete a spare file that no save will reuse (a failure is no error: it is a
        temporary file, which the next writer's cleanup removes)."""

    @abc.abstractmethod
    def remove_temp_files(self, directory: str, owns: Callable[[str], bool]) -> list[str]:
        """Delete temporary files whose final name ``owns`` accepts; return their names.

        Call only while holding the lock that covers every name ``owns`` accepts.
        """

    @abc.abstractmethod
    def lock(self, directory: str, name: str = LOCK_NAME) -> DirectoryLock:
        """Return the (not yet taken) lock ``name`` of ``directory``."""

    # -- checkpoint files ---------------------------------------------------------------------

    @abc.abstractmethod
    def write_atomic(
        self,
        final_path: str,
        pieces: Sequence[Buffer],
        *,
        late_head: Callable[[], bytes] | None = None,
        reuse: str | None = None,
        aborted: Callable[[], bool] | None = None,
    ) -> None:
        """Write ``pieces`` to ``final_path`` atomically (blocking: one worker-thread call
        for the whole write). A crash, an abort or an error at any instant leaves the old
        file or the complete new one, never a partial file there.

        With ``late_head``, the first piece only reserves room that the bytes it returns
        (computed while the rest was written) fill last. With ``reuse``, a spare file from
        ``remove_files(keep_spare=True)`` is overwritten in place when it is still there.
        ``aborted()`` is asked between bounded batches and before the file is put in place.

        Raises:
            WriteAborted: ``aborted()`` said True; nothing was put in place.
            DirectorySyncError: the file is in place, but its durability is in doubt.
            CheckpointWriteError: an OSError (disk full, permission, I/O error).
        """

    @abc.abstractmethod
    def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> contextlib.AbstractAsyncContextManager[ReadFile]:
        """Open a checkpoint for positional reads (``async with``).

        Until the block ends, every byte read is the file's as it was opened: the file
        cannot become a spare of ``remove_files(keep_spare=True)`` (see the module docstring).

        Raises:
            CheckpointNotFoundError: there is no regular file at ``path``, or its writer
                was making it a spare while it was opened.
            CheckpointReadError: it cannot be opened.
        """

    @abc.abstractmethod
    def open_mmap(self, path: str) -> mmap.mmap:
        """Map a checkpoint read-only (blocking call).

        For as long as the mapping lives (until it is closed or collected, which arrays that
        view it delay), its bytes stay the file's as it was opened: the file cannot become a
        spare of ``remove_files(keep_spare=True)`` (see the module docstring).

        Raises:
            CheckpointNotFoundError: there is no regular file at ``path``, or its writer
                was making it a spare while it was opened.
            CheckpointCorruptedError: the file is empty.
            CheckpointReadError: it cannot be opened or mapped.
        """

    # -- event files --------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_new_file(self, path: str) -> AppendFile:
        """Create ``path`` (and its directory) for appending; it must not exist yet.

        Raises:
            OSError: the file exists or cannot be created.
        """
