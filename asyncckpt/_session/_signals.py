"""stop_on_signals: turn SIGTERM / SIGINT into a stop request, so a preempted job saves its
last step and exits 0.

Why Python-level handlers, not ``anyio.open_signal_receiver``: a receiver hears of a signal
only when the event loop gets a turn, and the commonest step function (a plain ``def``, or an
``async def`` that never awaits) gives it none between steps. On asyncio the signal then waited
until the loop ended on its own; on trio it was still unconsumed when the receiver closed, and
trio re-raised it (exit 143, no final save). A handler installed with ``signal.signal`` runs
between two bytecodes of the main thread, in the middle of a step if need be, so the very next
``should_stop()`` sees the stop, and no step pays anything for it: no yield per step, no task.

What a handler may do there is little: it interrupts arbitrary code, the event loop's own
included, so it must not set an event, cancel a scope or touch a task. It does two signal-safe
things:

1. ``Coordinator.request_stop_soon()`` (when the session has a ``Coordinator``, as a
   ``MonitoredSession`` does): one bool assignment, which ``should_stop()`` reads;
2. it schedules ``session.request_stop()`` on the event loop with the one call each backend
   documents as safe from a signal handler or another thread: asyncio's
   ``loop.call_soon_threadsafe`` (what ``asyncio.Runner``'s own SIGINT handler calls), trio's
   ``TrioToken.run_sync_soon``. That call does the rest (wakes ``wait_for_stop()``, cancels
   the waits of ``until_stopped``) at the loop's next turn, or, if the loop never turned,
   when the block exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import traceback
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from ._coordinator import Coordinator

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import FrameType
    from typing import Any, TypeAlias

    # What ``signal.signal`` returns and takes.
    _Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

__all__ = ["stop_on_signals"]

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stoppable(Protocol):
    def request_stop(self) -> None: ...


def _loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """Return the running event loop's signal-safe "call this soon on the loop" function."""
    # Under trio, trio is imported already; importing nothing else keeps it optional (and
    # avoids depending on sniffio, which anyio no longer requires).
    if "trio" in sys.modules:
        import trio

        try:
            return trio.lowlevel.current_trio_token().run_sync_soon
        except RuntimeError:  # trio is imported, but this is not a trio run
            pass
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        raise RuntimeError(
            "stop_on_signals() needs a running asyncio or trio event loop "
            "(use it inside anyio.run(), asyncio.run() or trio.run())"
        ) from None


class _Relay:
    """The signal handler, and the stop request it hands over to the event loop.

    A second signal while a stop is pending (the impatient second Ctrl-C) is still a stop
    request, not a forced exit: the final save the first signal asked for is what a preempted
    job needs, and quitting at once remains available (SIGKILL, or SIGQUIT, which is not
    watched by default). So the handler schedules one ``request_stop()`` at most.
    """

    def __init__(
        self,
        session: _Stoppable,
        schedule: Callable[[Callable[[], object]], object],
        coordinator: Coordinator | None,
    ) -> None:
        self._session = session
        self._schedule = schedule
        self._mark = coordinator.request_stop_soon if coordinator is not None else None
        self._signalled = False
        self._delivered = False
        self.failure: BaseException | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: signal-safe work only (see the module docstring)."""
        if self._mark is not None:
            self._mark()
        if self._signalled:
            return
        # Set before scheduling: a signal interrupting this very handler then schedules
        # nothing more (and were two scheduled, ``deliver`` runs once).
        self._signalled = True
        self._schedule(self.deliver)

    def deliver(self) -> None:
        """Request the stop, on the event loop's thread, once."""
        if self._delivered:
            return
        self._delivered = True
        try:
            self._session.request_stop()
        except BaseException as exc:
            # Raised here, it would go to asyncio's exception handler (logged, lost) or crash
            # trio's run loop: keep it for the block's exit to raise.
            self.failure = exc

    def close(self) -> BaseException | None:
        """Deliver a stop still in flight; return what ``request_stop()`` raised, if it did.

        A step function that never yields may have left the loop no turn since the signal;
        the scheduled callback, if it still runs after the block, then does nothing.
        """
        if self._signalled:
            self.deliver()
        self._delivered = True
        return self.failure


def _coordinator_of(session: _Stoppable) -> Coordinator | None:
    if isinstance(session, Coordinator):
        return session
    coordinator = getattr(session, "coordinator", None)  # a MonitoredSession's, public
    return coordinator if isinstance(coordinator, Coordinator) else None


@asynccontextmanager
async def stop_on_signals(session: _Stoppable, *signals: signal.Signals) -> AsyncIterator[None]:
    """While the block runs, a signal (SIGTERM and SIGINT by default) requests a stop.

    The loop then ends at its next step boundary, the session's ``end()`` saves the last
    step, and the program exits normally::

        async with MonitoredTrainingSession(...) as sess, stop_on_signals(sess):
            while not sess.should_stop():
                await sess.run()

    This holds for every step function, including a plain ``def`` that never lets the event
    loop run: for a ``MonitoredSession`` (or a ``Coordinator``) the next ``should_stop()`` is
    True even if the loop has not turned since the signal. Any other object with
    ``request_stop()`` is asked to stop at the loop's next turn (or when the block exits).

    The block replaces the Python-level handlers of the watched signals (asyncio's and trio's
    own SIGINT handlers included: a SIGINT inside the block is a stop request, not a
    ``KeyboardInterrupt``), and restores the previous ones on every way out. A second signal
    while the stop is pending is the same stop request. No task runs for it.

    Args:
        session: what to stop: a ``MonitoredSession``, or anything with ``request_stop()``.
        *signals: the signals to watch (default: SIGTERM and SIGINT).

    Raises:
        RuntimeError: not in the main thread (Python delivers signals only there), or no
            asyncio or trio event loop is running.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "stop_on_signals() must run in the main thread: Python runs signal handlers "
            "only there (run the event loop in the main thread)"
        )
    watched = tuple(dict.fromkeys(signals or _DEFAULT_SIGNALS))
    relay = _Relay(session, _loop_scheduler(), _coordinator_of(session))
    previous: dict[signal.Signals, _Handler] = {}
    try:
        for signum in watched:
            previous[signum] = signal.signal(signum, relay.handle)
        yield
    except BaseException as exc:
        failure = _restore(previous, relay)
        if failure is not None:
            # The block's own exception (perhaps a cancellation) is what leaves; the failed
            # stop request is told in full beside it, not swallowed.
            exc.add_note(
                "while stop_on_signals() also failed to request a stop:\n"
                + "".join(traceback.format_exception(failure))
            )
        raise
    failure = _restore(previous, relay)
    if failure is not None:
        raise failure


def _restore(previous: dict[signal.Signals, _Handler], relay: _Relay) -> BaseException | None:
    # Handlers first: from here on a signal goes where it went before the block.
    for signum, handler in previous.items():
        # None: the previous handler was not installed from Python, so it cannot be put
        # back; the default action is the nearest.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    return relay.close()
