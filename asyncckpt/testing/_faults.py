"""FaultyStorage and StorageStall: storage faults and stalls on demand, for tests.

A ``Storage`` that wraps another one; knows nothing of checkpoints beyond the storage
operations it sees.
"""

from __future__ import annotations

import errno as errno_codes
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Self

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._storage import LOCK_NAME, LocalStorage, Probe, Storage

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Sequence
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from .._core._types import Buffer
    from .._storage import AppendFile, DirectoryLock, ReadFile

__all__ = ["FaultyStorage", "StorageOp", "StorageStall"]

StorageOp = Literal["open", "write", "fsync", "rename", "fsync_dir", "unlink", "read"]
_OPS: Final = ("open", "write", "fsync", "rename", "fsync_dir", "unlink", "read")
_STALL_LIMIT_SECS: Final = 10.0


@dataclass(slots=True)
class _Rule:
    op: str
    errno: int
    match: str | None
    skip: int
    times: int | None


def _check_op(op: str | None, *, allow_any: bool = False) -> None:
    if (op is None and not allow_any) or (op is not None and op not in _OPS):
        raise ValueError(f"op must be one of {_OPS}{' or None' if allow_any else ''}, not {op!r}")


def _on_event_loop_thread() -> bool:
    try:
        anyio.lowlevel.current_token()  # works only in a thread that runs an event loop
    except RuntimeError:
        return False
    return True


class StorageStall:
    """Hold the worker thread making one storage call until the test calls ``release()``.

    Made by ``FaultyStorage.stall()``, not directly. asyncckpt makes its storage calls in
    worker threads, so holding one stalls exactly that call, as a slow disk would, while the
    event loop keeps running: the test can check what the code does while a write is busy
    (backpressure, a full queue, a cancellation mid-write), then let it finish.

    The held call is in ``FaultyStorage.calls`` as soon as it is reached. Once released it
    proceeds, and a matching ``FaultyStorage.fail()`` rule still applies to it. If the test
    never releases it, the held thread gives up after ``limit_secs`` by raising RuntimeError
    (so the code under test fails instead of hanging), and the ``FaultyStorage`` block
    raises RuntimeError again when it ends. Ending the block releases every stall.

    Example::

        with FaultyStorage() as faults:
            stall = faults.stall("fsync", match="model.ckpt-1")
            async with CheckpointManager(
                directory, max_pending=1, policy="skip", storage=faults
            ) as manager:
                await manager.save(state, 1)
                await stall.wait_reached()  # checkpoint 1 is being written, held in fsync
                assert await manager.save(state, 2) is True  # waits in the queue
                assert await manager.save(state, 3) is False  # skipped: the queue is full
                stall.release()
    """

    def __init__(self, op: str | None, match: str | None, skip: int, limit_secs: float) -> None:
        self._op, self._match, self._skip, self._limit_secs = op, match, skip, limit_secs
        self._to_skip = skip
        self._cond = threading.Condition()
        self._call: tuple[str, str] | None = None
        self._released = False
        self._closed = False  # the FaultyStorage block ended
        self._expired = False  # the held thread gave up waiting for release()
        self._refused: str | None = None  # the matching call ran on the event loop thread

    @property
    def call(self) -> tuple[str, str] | None:
        """The ``(op, path)`` of the call that was reached, or None while none has been."""
        with self._cond:
            return self._call

    def release(self) -> None:
        """Let the held call proceed; a call reached later is not held. Idempotent."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    async def wait_reached(self) -> tuple[str, str]:
        """Wait until a worker thread reaches the matching call (held unless released).

        Returns:
            The ``(op, path)`` of the call.

        Raises:
            TimeoutError: no matching call was made within ``limit_secs``.
            RuntimeError: the ``FaultyStorage`` block ended before one was made, or the
                matching call ran on the event loop thread (it cannot be held).
        """
        call = self.call
        if call is not None:
            await anyio.lowlevel.checkpoint()
            return call
        # Waiting in a thread keeps the event loop free; abandoned on cancel, the thread still
        # returns within limit_secs (or as soon as the call comes or the block ends).
        return await anyio.to_thread.run_sync(self._wait_reached_sync, abandon_on_cancel=True)

    def __repr__(self) -> str:
        return (
            f"StorageStall(op={self._op!r}, match={self._match!r}, skip={self._skip}, "
            f"call={self.call!r})"
        )

    # -- called by FaultyStorage ------------------------------------------------------------------

    def _ready(self, op: str, path: str) -> bool:
        """Count a matching call against ``skip``; return True if this call is to be held."""
        with self._cond:
            if self._call is not None or self._closed or self._refused is not None:
                return False
            if (self._op is not None and op != self._op) or (
                self._match is not None and self._match not in path
            ):
                return False
            if self._to_skip:
                self._to_skip -= 1
                return False
            return True

    def _reach(self, op: str, path: str) -> None:
        with self._cond:
            self._call = (op, path)
            self._cond.notify_all()

    def _refuse(self, message: str) -> RuntimeError:
        with self._cond:
            self._refused = message
            self._cond.notify_all()
        return RuntimeError(message)

    def _hold(self) -> None:
        with self._cond:
            if self._cond.wait_for(lambda: self._released or self._closed, self._limit_secs):
                return
            self._expired = True
            message = self._never_released()
        raise RuntimeError(message)

    def _wait_reached_sync(self) -> tuple[str, str]:
        with self._cond:
            self._cond.wait_for(
                lambda: self._call is not None or self._closed or self._refused is not None,
                self._limit_secs,
            )
            if self._call is not None:
                return self._call
            if self._refused is not None:
                raise RuntimeError(self._refused)
            if self._closed:
                raise RuntimeError(f"the FaultyStorage block ended before {self!r} was reached")
        raise TimeoutError(f"no storage call reached {self!r} within {self._limit_secs} s")

    def _close(self) -> str | None:
        """Release the held thread for good; return the error if it had given up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return self._never_released() if self._expired else None

    def _never_released(self) -> str:
        return (
            f"{self!r}: the test never released the held call within {self._limit_secs} s "
            "(call release() once the test has checked what it wanted)"
        )


class FaultyStorage(Storage):
    """A ``Storage`` that injects OSErrors into the operations of the one it wraps.

    Pass it as ``storage=`` to a ``Saver``, ``CheckpointManager``, ``SummaryWriter``, hook or
    session; it wraps local files unless given another ``Storage``. Use it as a ``with``
    block: leaving it releases every stall (see ``stall()``).

    Operations: ``"open"`` (creating a temp file or the lock file, or opening one to read),
    ``"write"`` (of a temp file, or the holder's pid into the lock file: give ``match=`` to
    fail only one of them), ``"fsync"`` (of a temp file), ``"rename"`` (the atomic replace,
    seen with the final path), ``"fsync_dir"`` (after a rename it is seen with the renamed
    file's path, so ``match`` picks which commit fails; after deletions, with the
    directory's), ``"unlink"`` (retention and pruning) and ``"read"`` (the state file). Every
    operation is recorded in ``calls`` as ``(op, path)``, so a test can also fail the k-th
    one it observed.
    ``stall()`` holds one call until the test releases it.

    Example::

        with FaultyStorage() as faults:
            saver = Saver(storage=faults)
            faults.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
            with pytest.raises(CheckpointWriteError):
                await saver.save(state, prefix, global_step=2)

    ``calls_on_event_loop`` lists the operations that ran on a thread running an event loop
    (asyncckpt's async APIs make none: each goes through a worker thread).

    Args:
        storage: the storage to wrap (local files by default).
    """

    def __init__(self, storage: Storage | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.calls_on_event_loop: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []
        self._stalls: list[StorageStall] = []
        self._lock = threading.Lock()
        self._inner = (storage or LocalStorage()).instrumented(self.check)
        self.supports_mmap = self._inner.supports_mmap
        self.writes_in_place = self._inner.writes_in_place

    def __repr__(self) -> str:
        return f"FaultyStorage({self._inner!r}, calls={len(self.calls)})"

    def fail(
        self,
        op: StorageOp,
        errno: int = errno_codes.EIO,
        *,
        match: str | None = None,
        skip: int = 0,
        times: int | None = 1,
    ) -> None:
        """Make ``op`` fail with ``errno``.

        Args:
            op: which operation.
            errno: the error number (``errno.ENOSPC``, ``EIO``, ``EACCES``, ``EROFS``...).
            match: only paths containing this text (a temp file's name contains its target's).
            skip: let this many matching calls succeed first.
            times: how many calls fail (None: all of them).
        """
        _check_op(op)
        with self._lock:
            self._rules.append(_Rule(op, errno, match, skip, times))

    def stall(
        self,
        op: StorageOp | None = None,
        *,
        match: str | None = None,
        skip: int = 0,
        limit_secs: float = _STALL_LIMIT_SECS,
    ) -> StorageStall:
        """Hold the next matching storage call in its worker thread until the test releases it.

        Several stalls may be armed at once; each holds one call, and a call is held by at
        most one of them (the earliest made). A call made on the event loop thread (the
        state file read of a sync API such as ``latest_checkpoint()``) cannot be held: it
        raises RuntimeError.

        Args:
            op: which operation (None: any).
            match: only paths containing this text (a temp file's name contains its target's).
            skip: let this many matching calls through first.
            limit_secs: how long the held thread waits for ``release()``, and
                ``wait_reached()`` for the call, before either fails.

        Returns:
            The ``StorageStall``: ``await stall.wait_reached()``, check, ``stall.release()``.

        Raises:
            ValueError: an unknown ``op``, a negative ``skip`` or a non-positive limit.
            TypeError: ``skip`` is not an int.
        """
        _check_op(op, allow_any=True)
        if isinstance(skip, bool) or not isinstance(skip, int):
            raise TypeError(f"skip must be an int, not {type(skip).__name__}")
        if skip < 0:
            raise ValueError(f"skip must be >= 0, not {skip}")
        if not (limit_secs > 0 and math.isfinite(limit_secs)):
            raise ValueError(f"limit_secs must be a positive number of seconds, not {limit_secs}")
        stall = StorageStall(op, match, skip, limit_secs)
        with self._lock:
            self._stalls.append(stall)
        return stall

    def clear(self) -> None:
        """Remove every ``fail()`` rule (recorded calls and stalls are kept)."""
        with self._lock:
            self._rules.clear()

    def check(self, op: str, path: str, /) -> None:
        """Record ``op`` on ``path``, hold it if a stall asks, then raise what a rule asks for."""
        on_loop = _on_event_loop_thread()
        with self._lock:
            self.calls.append((op, path))
            if on_loop:
                self.calls_on_event_loop.append((op, path))
            stall = self._stall_for(op, path)
            error = self._error_for(op, path)
        if stall is not None:
            stall._hold()
        if error is not None:
            raise error

    def _stall_for(self, op: str, path: str) -> StorageStall | None:
        held = None
        for stall in self._stalls:
            # Every armed stall counts the call against its skip; the first ready one takes it.
            if stall._ready(op, path) and held is None:
                held = stall
        if held is None:
            return None
        if _on_event_loop_thread():
            raise held._refuse(
                f"{held!r} cannot hold {op!r} on {path!r}: that call runs on the event loop "
                "thread, and holding it would block the loop"
            )
        held._reach(op, path)
        return held

    def _error_for(self, op: str, path: str) -> OSError | None:
        for rule in self._rules:
            if rule.op != op or (rule.match is not None and rule.match not in path):
                continue
            if rule.skip:
                rule.skip -= 1
                continue
            if rule.times is not None:
                if rule.times == 0:
                    continue
                rule.times -= 1
            return OSError(rule.errno, os.strerror(rule.errno), path)
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            stalls = list(self._stalls)
        # Never leave a worker thread waiting; a stall that gave up fails the test here too,
        # in case the code under test swallowed the error its held call raised.
        errors = [error for stall in stalls if (error := stall._close()) is not None]
        if errors and exc_type is None:
            raise RuntimeError(errors[0])

    # -- the Storage interface: every operation goes to the wrapped storage, through check() --

    def instrumented(self, probe: Probe) -> Storage:
        """Return a storage whose operations pass this one's faults, then ``probe``."""
        return self._inner.instrumented(probe)

    def read_small_file(self, path: str) -> bytes | None:
        """See ``Storage.read_small_file``."""
        return self._inner.read_small_file(path)

    def write_small_file_atomic(self, path: str, data: bytes) -> None:
        """See ``Storage.write_small_file_atomic``."""
        self._inner.write_small_file_atomic(path, data)

    def list_names(self, directory: str) -> list[str]:
        """See ``Storage.list_names``."""
        return self._inner.list_names(directory)

    def file_info(self, path: str) -> os.stat_result | None:
        """See ``Storage.file_info``."""
        return self._inner.file_info(path)

    def read_prefix(self, path: str, size: int) -> bytes:
        """See ``Storage.read_prefix``."""
        return self._inner.read_prefix(path, size)

    def remove_files(self, paths: Sequence[str], *, keep_spare: bool = False) -> str | None:
        """See ``Storage.remove_files``."""
        return self._inner.remove_files(paths, keep_spare=keep_spare)

    def remove_spare(self, path: str) -> None:
        """See ``Storage.remove_spare``."""
        self._inner.remove_spare(path)

    def remove_temp_files(self, directory: str, owns: Callable[[str], bool]) -> list[str]:
        """See ``Storage.remove_temp_files``."""
        return self._inner.remove_temp_files(directory, owns)

    def lock(self, directory: str, name: str = LOCK_NAME) -> DirectoryLock:
        """See ``Storage.lock``."""
        return self._inner.lock(directory, name)

    def write_atomic(
        self,
        final_path: str,
        pieces: Sequence[Buffer],
        *,
        late_head: Callable[[], bytes] | None = None,
        reuse: str | None = None,
        aborted: Callable[[], bool] | None = None,
    ) -> None:
        """See ``Storage.write_atomic``."""
        self._inner.write_atomic(
            final_path, pieces, late_head=late_head, reuse=reuse, aborted=aborted
        )

    def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> AbstractAsyncContextManager[ReadFile]:
        """See ``Storage.open_for_read``."""
        return self._inner.open_for_read(path, limiter=limiter)

    def open_mmap(self, path: str) -> mmap.mmap:
        """See ``Storage.open_mmap``."""
        return self._inner.open_mmap(path)

    async def create_new_file(self, path: str) -> AppendFile:
        """See ``Storage.create_new_file``."""
        return await self._inner.create_new_file(path)
