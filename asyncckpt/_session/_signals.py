"""stop_on_signals: turn SIGTERM / SIGINT into a stop request, so a preempted job saves its
last step and exits 0."""

from __future__ import annotations

import signal
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import anyio

from .._core._util import raise_single_exception

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["stop_on_signals"]


class _Stoppable(Protocol):
    def request_stop(self) -> None: ...


@asynccontextmanager
async def stop_on_signals(session: _Stoppable, *signals: signal.Signals) -> AsyncIterator[None]:
    """While the block runs, a signal (SIGTERM and SIGINT by default) requests a stop.

    The loop then ends at its next step boundary, the session's ``end()`` saves the last
    step, and the program exits normally::

        async with MonitoredTrainingSession(...) as sess, stop_on_signals(sess):
            while not sess.should_stop():
                await sess.run()

    Must run in the main thread (where Python receives signals).
    """
    watched = signals or (signal.SIGTERM, signal.SIGINT)
    with anyio.open_signal_receiver(*watched) as received:

        async def watch() -> None:
            async for _signum in received:
                session.request_stop()

        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(watch)
                try:
                    yield
                finally:
                    task_group.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The block's own exception comes back wrapped by the task group: unwrap it.
            raise_single_exception(group)
