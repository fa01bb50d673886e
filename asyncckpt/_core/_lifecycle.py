"""BackgroundTask: the lifecycle every background writer shares (CheckpointManager,
SummaryWriter).

Owns the writer task's cancel scope and its place in the owner's task group; knows nothing
of what the writer writes.

The lifecycle, in the owner's ``async with``::

    __aenter__:  task.claim()                           # a second entry is a RuntimeError
                 await task.open(stack, serve)          # the group joins the owner's stack
    aclose():    await task.stop(drain, grace)          # any task, any cancel scope
    __aexit__:   await task.stop(drain, grace)          # idempotent
                 await task.exit(stack)                 # only here: scopes exit in order

* ``serve()`` runs in a scope shielded from the owner's cancellation: a writer must finish
  what it accepted, and only ``stop()`` cancels it, once the grace period for ``drain()``
  is over. It is spawned with ``start_soon``, never ``start()``: a cancellation of the owner
  during ``start()`` makes anyio cancel the child and wait for it, shielded, which a
  shielded child would never notice (the owner hung forever). ``open()`` thus has no await
  between spawning the writer and the owner's stack taking it, and the owner must call
  ``stop()`` on every path once ``open()`` returned.
* ``stop()`` is bounded cleanup of our own: the drain is shielded with a deadline, and the
  wait for the cancelled writer is shielded (it waits for one worker-thread call at most). It
  may run inside a caller's ``anyio.fail_after``: it exits no scope that it did not enter.
* ``exit()`` leaves the task group; a writer's single error surfaces as itself, its cause
  kept, never as an ExceptionGroup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ._util import raise_single_exception

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AsyncExitStack

__all__ = ["BackgroundTask"]


class BackgroundTask:
    """One writer task owned by an async context manager (see the module docstring).

    Args:
        owner: the owner's class name, for error messages.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._claimed = False
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<BackgroundTask of {self._owner} {self.state}>"

    @property
    def state(self) -> str:
        """``"new"``, ``"running"``, ``"stopping"`` or ``"done"`` (the writer returned)."""
        if self._done is None:
            return "new"
        if self._done.is_set():
            return "done"
        return "stopping" if self._stopped else "running"

    @property
    def alive(self) -> bool:
        """Whether the writer task is running (being stopped or not)."""
        return self._done is not None and not self._done.is_set()

    def claim(self) -> None:
        """Mark the owner entered.

        Raises:
            RuntimeError: it was entered before.
        """
        if self._claimed:
            raise RuntimeError(f"a {self._owner} can be entered only once; create a new one")
        self._claimed = True

    async def open(self, stack: AsyncExitStack, serve: Callable[[], Awaitable[Any]]) -> None:
        """Enter a task group on ``stack`` and spawn ``serve()`` in it, shielded."""
        # Made here, not in __init__: a cancel scope needs a running event loop.
        self._scope = anyio.CancelScope(shield=True)
        self._done = anyio.Event()
        task_group = await stack.enter_async_context(anyio.create_task_group())
        task_group.start_soon(self._run, serve)

    async def _run(self, serve: Callable[[], Awaitable[Any]]) -> None:
        assert self._scope is not None
        assert self._done is not None
        try:
            # Shielded at once, before any await: the owner may already be cancelled, and
            # what it accepted until then must still be written (stop() ends this scope).
            with self._scope:
                await serve()
        finally:
            self._done.set()

    async def stop(self, drain: Callable[[], Awaitable[Any]], grace: float) -> None:
        """Run ``drain()`` (shielded, for up to ``grace`` seconds), then cancel the writer
        and wait until it has returned (idempotent)."""
        if self._stopped or self._scope is None or self._done is None:
            return
        self._stopped = True
        # Only this bounded drain of our own writes is shielded, never the caller's code.
        with anyio.move_on_after(grace, shield=True):
            await drain()
        self._scope.cancel()  # only a writer that outlived the grace period notices
        with anyio.CancelScope(shield=True):
            await self._done.wait()

    async def wait_done(self) -> None:
        """Wait until the writer has returned (by itself or cancelled)."""
        if self._done is not None:
            await self._done.wait()

    @staticmethod
    async def exit(stack: AsyncExitStack) -> None:
        """Leave the task group (and whatever else ``stack`` holds), raising a single error
        as itself with its cause."""
        try:
            await stack.aclose()
        except BaseExceptionGroup as group:
            raise_single_exception(group)
