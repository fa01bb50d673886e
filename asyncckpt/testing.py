"""Test kit for code that uses asyncckpt: storage fault injection and stalls (more with hooks).

``FaultyStorage`` makes chosen storage operations fail with an OSError, exactly as a full
disk, a read-only file system or a failing device would, so that tests can check what a
user sees (``CheckpointWriteError``, the previous checkpoint intact) without a real fault.
It can also hold one storage call in its worker thread, as a slow disk would, until the test
releases it (``FaultyStorage.stall()``, a ``StorageStall``), to test backpressure and
cancellation mid-write without a single real sleep.
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

from . import _storage
from ._hooks._base import (
    CheckpointSaverListener,
    CoordinatorLike,
    SessionLike,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "FakeClock",
    "FaultyStorage",
    "RecordingHook",
    "RecordingListener",
    "StorageOp",
    "StorageStall",
]

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
            async with CheckpointManager(directory, max_pending=1, policy="skip") as manager:
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


class FaultyStorage:
    """Inject OSErrors into asyncckpt's storage operations while the context is active.

    Operations: ``"open"`` (creating a temp file or opening one to read), ``"write"`` (of a
    temp file), ``"fsync"`` (of a temp file), ``"rename"`` (the atomic replace, seen with the
    final path), ``"fsync_dir"`` (after a rename it is seen with the renamed file's path, so
    ``match`` picks which commit fails; after deletions, with the directory's), ``"unlink"``
    (retention and pruning) and ``"read"`` (the state file). Every operation is recorded in
    ``calls`` as ``(op, path)``, so a test can also fail the k-th one it observed.
    ``stall()`` holds one call until the test releases it.

    Example::

        with FaultyStorage() as faults:
            faults.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
            with pytest.raises(CheckpointWriteError):
                await saver.save(state, prefix, global_step=2)
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []
        self._stalls: list[StorageStall] = []
        self._lock = threading.Lock()
        self._previous: _storage.FaultPlan | None = None

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

    def check(self, op: str, path: str) -> None:
        """Record ``op`` on ``path``, hold it if a stall asks, then raise what a rule asks for."""
        with self._lock:
            self.calls.append((op, path))
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
        self._previous = _storage.install_faults(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _storage.install_faults(self._previous)
        with self._lock:
            stalls = list(self._stalls)
        # Never leave a worker thread waiting; a stall that gave up fails the test here too,
        # in case the code under test swallowed the error its held call raised.
        errors = [error for stall in stalls if (error := stall._close()) is not None]
        if errors and exc_type is None:
            raise RuntimeError(errors[0])


class FakeClock:
    """A clock for timers and hooks that moves only when told: ``clock()``, ``advance(s)``.

    Pass it as ``clock=`` to ``SecondOrStepTimer``, ``CheckpointSaverHook``,
    ``StepCounterHook`` or ``LoggingTensorHook`` (monotonic seconds), or to ``Saver``
    (wall-clock seconds) to test time-based schedules without sleeping.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock({self.now})"


Call = tuple[str, "int | None"]
SharedLog = list[tuple[str, str, "int | None"]]


class _Recorder:
    """``calls`` of one object, mirrored as ``(name, method, step)`` into a shared log."""

    def __init__(self, name: str, log: SharedLog | None, stop_at: int | None) -> None:
        self.name = name
        self.calls: list[Call] = []
        self._log = log
        self._stop_at = stop_at

    def _record(self, method: str, step: int | None) -> None:
        self.calls.append((method, step))
        if self._log is not None:
            self._log.append((self.name, method, step))

    def _stop_due(self, step: int) -> bool:
        return self._stop_at is not None and step >= self._stop_at


class RecordingHook(_Recorder, SessionRunHook):
    """A hook that records every call as ``(method, global_step)`` in ``calls``.

    ``before_run`` records the step before the run, ``after_run`` the step after it. With
    ``log`` (a list shared by several hooks and listeners), each call is also appended there
    as ``(name, method, step)``, so a test can assert the interleaving. ``fetches`` and
    ``feed_dict`` are requested on every step; ``stop_at`` requests a stop in ``after_run``
    once the global step reaches it.
    """

    def __init__(
        self,
        name: str = "hook",
        *,
        log: SharedLog | None = None,
        fetches: object = None,
        feed_dict: dict[str, object] | None = None,
        stop_at: int | None = None,
    ) -> None:
        super().__init__(name, log, stop_at)
        self.results: list[object] = []
        self._args = (
            SessionRunArgs(fetches, feed_dict) if fetches is not None or feed_dict else None
        )

    def begin(self) -> None:
        """Record ``("begin", None)``."""
        self._record("begin", None)

    def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Record ``("after_create_session", step)``."""
        self._record("after_create_session", session.global_step)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Record ``("before_run", step before the run)``."""
        self._record("before_run", run_context.session.global_step)
        return self._args

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Record ``("after_run", step after the run)`` and keep ``run_values.results``."""
        step = run_context.session.global_step
        self._record("after_run", step)
        self.results.append(run_values.results)
        if self._stop_due(step):
            run_context.request_stop()

    def end(self, session: SessionLike) -> None:
        """Record ``("end", step)``."""
        self._record("end", session.global_step)


class RecordingListener(_Recorder, CheckpointSaverListener):
    """A listener that records ``(method, step)`` in ``calls`` (``begin`` with None).

    ``stop_at``: ``after_save`` returns True from that step on. ``log`` as for
    ``RecordingHook``.
    """

    def __init__(
        self,
        name: str = "listener",
        *,
        log: SharedLog | None = None,
        stop_at: int | None = None,
    ) -> None:
        super().__init__(name, log, stop_at)

    def begin(self) -> None:
        """Record ``("begin", None)``."""
        self._record("begin", None)

    def before_save(self, session: SessionLike, global_step_value: int) -> None:
        """Record ``("before_save", step)``."""
        self._record("before_save", global_step_value)

    def after_save(self, session: SessionLike, global_step_value: int) -> bool:
        """Record ``("after_save", step)``; True once ``stop_at`` is reached."""
        self._record("after_save", global_step_value)
        return self._stop_due(global_step_value)

    def end(self, session: SessionLike, global_step_value: int) -> None:
        """Record ``("end", step)``."""
        self._record("end", global_step_value)
