"""Coordinator: stop requests and the hooks' background tasks of one session.

Knows nothing of steps, checkpoints or hooks beyond what it is handed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Hashable, Iterator

__all__ = ["Coordinator"]


class Coordinator:
    """Stop requests and background tasks for one session (TensorFlow's ``coord``).

    ``request_stop()`` asks the session to stop at its next step boundary and cancels pending
    waits in ``until_stopped``; it never interrupts a step. ``start_soon(fn, *args)`` runs a
    hook's background task in the session's task group: it is cancelled when the session
    closes, and an exception it raises ends the session with that exception.

    ``pending_started()`` / ``pending_finished()`` count background jobs in flight (a
    checkpoint being written): while any is, the session gives the event loop a few turns
    after each step so the jobs progress even when the step function never awaits, and
    recovery waits for them. When none is, a step costs nothing extra.

    ``request_stop_soon()`` is the signal handler's half of a stop (see ``stop_on_signals``):
    it only marks the stop as requested, so ``should_stop()`` is True from the next step
    boundary on, and leaves waking the waiters to a ``request_stop()`` that the handler
    schedules on the event loop.

    ``shared`` holds what the hooks of one session share (their summary writers, one per
    directory); it is emptied when the session closes. The session drives ``attach()`` /
    ``detach()`` around its task group, and ``cancelled_on_stop()`` around its waits.
    """

    def __init__(self) -> None:
        # Two flags, so that a signal handler can set the first without doing the second's
        # work: ``_stop`` (a stop was requested: all ``should_stop()`` reads, so a step pays
        # one attribute load for it) and ``_stop_announced`` (``request_stop()`` has set the
        # stop event and cancelled the waits: what makes it idempotent).
        self._stop = False
        self._stop_announced = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stop_event: anyio.Event | None = None
        self._idle_event: anyio.Event | None = None
        self._stop_scopes: set[anyio.CancelScope] = set()
        self.pending = 0
        self.shared: dict[Hashable, Any] = {}

    def __repr__(self) -> str:
        return f"<Coordinator stop_requested={self._stop} pending={self.pending}>"

    def attach(self, task_group: anyio.abc.TaskGroup) -> None:
        """Run background tasks in ``task_group`` (the session's, while it is open)."""
        self._task_group = task_group
        self._stop_event = anyio.Event()
        if self._stop:
            self._stop_event.set()

    def detach(self) -> None:
        """Refuse background tasks from now on and forget the shared resources."""
        self._task_group = None
        self.shared.clear()

    def request_stop(self) -> None:
        """Ask the session to stop at its next step boundary (idempotent, never blocks)."""
        if self._stop_announced:
            return
        self._stop = self._stop_announced = True
        if self._stop_event is not None:
            self._stop_event.set()
        for scope in self._stop_scopes:
            scope.cancel()

    def request_stop_soon(self) -> None:
        """Mark a stop as requested, and nothing more: safe in a signal handler.

        A Python signal handler runs between two bytecodes of whatever the main thread is
        doing, a step function or the event loop itself, so it must not touch an event or a
        cancel scope; it assigns one bool, which ``should_stop()`` reads. The caller must
        also arrange for ``request_stop()`` to run soon on the event loop's thread (it wakes
        ``wait_for_stop()`` and cancels the waits of ``cancelled_on_stop()``).
        """
        self._stop = True

    def should_stop(self) -> bool:
        """Whether a stop was requested."""
        return self._stop

    async def wait_for_stop(self) -> None:
        """Wait until a stop is requested."""
        if self._stop:
            return
        if self._stop_event is None:
            raise RuntimeError("the coordinator is not attached to an open session")
        await self._stop_event.wait()

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a background task owned by the session.

        Raises:
            RuntimeError: the session is not open.
        """
        self._open_task_group("start_soon").start_soon(fn, *args)

    async def start(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run ``fn(*args, task_status=...)`` as a background task owned by the session, and
        return the value it passes to ``task_status.started()`` (anyio's ``TaskGroup.start``).

        Raises:
            RuntimeError: the session is not open.
        """
        return await self._open_task_group("start").start(fn, *args)

    def _open_task_group(self, method: str) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise RuntimeError(f"{method}() needs an open session (inside `async with`)")
        return self._task_group

    def pending_started(self) -> None:
        """Count one background job in flight (see the class docstring)."""
        self.pending += 1

    def pending_finished(self) -> None:
        """Count one background job done."""
        self.pending -= 1
        if not self.pending and self._idle_event is not None:
            self._idle_event.set()
            self._idle_event = None

    async def wait_pending(self) -> None:
        """Wait until no background job is in flight."""
        while self.pending:
            if self._idle_event is None:
                self._idle_event = anyio.Event()
            await self._idle_event.wait()

    @contextmanager
    def cancelled_on_stop(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ``request_stop()`` cancels (at once if a stop was requested)."""
        with anyio.CancelScope() as scope:
            if self._stop:
                scope.cancel()
            self._stop_scopes.add(scope)
            try:
                yield scope
            finally:
                self._stop_scopes.discard(scope)
