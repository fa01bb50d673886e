"""Coordinator: stop requests and the hooks' background tasks of one session.

Knows nothing of steps, checkpoints or hooks beyond what it is handed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["Coordinator"]


class Coordinator:
    """Stop requests and background tasks for one session (TensorFlow's ``coord``).

    ``request_stop()`` asks the session to stop at its next step boundary and cancels pending
    waits in ``until_stopped``; it never interrupts a step. ``start_soon(fn, *args)`` runs a
    hook's background task in the session's task group: it is cancelled when the session
    closes, and an exception it raises ends the session with that exception.

    ``pending_started()`` / ``pending_finished()`` count background jobs in flight (a
    checkpoint being written): while any is, the session yields to the event loop once per
    step so the jobs progress even when the step function never awaits, and recovery waits
    for them. When none is, a step costs nothing extra.
    """

    def __init__(self) -> None:
        self._stop = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stop_event: anyio.Event | None = None
        self._idle_event: anyio.Event | None = None
        self._stop_scopes: set[anyio.CancelScope] = set()
        self.pending = 0

    def __repr__(self) -> str:
        return f"<Coordinator stop_requested={self._stop} pending={self.pending}>"

    def _attach(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group
        self._stop_event = anyio.Event()
        if self._stop:
            self._stop_event.set()

    def _detach(self) -> None:
        self._task_group = None

    def request_stop(self) -> None:
        """Ask the session to stop at its next step boundary (idempotent, never blocks)."""
        if self._stop:
            return
        self._stop = True
        if self._stop_event is not None:
            self._stop_event.set()
        for scope in self._stop_scopes:
            scope.cancel()

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
        if self._task_group is None:
            raise RuntimeError("start_soon() needs an open session (inside `async with`)")
        self._task_group.start_soon(fn, *args)

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

    def _stop_cancels(self, scope: anyio.CancelScope) -> None:
        """Register ``scope`` to be cancelled by ``request_stop()`` (until forgotten)."""
        if self._stop:
            scope.cancel()
        self._stop_scopes.add(scope)

    def _forget(self, scope: anyio.CancelScope) -> None:
        self._stop_scopes.discard(scope)
