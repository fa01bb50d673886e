"""CheckpointSaverHook: periodic background saves with awaited listeners.

Owns the save schedule and the listener calls; the CheckpointManager below it owns the
snapshots, the queue and the files.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import anyio
import anyio.lowlevel

from .._checkpoint import STATE_FILENAME, CheckpointManager, Policy, SaveOutcome
from .._core._sync import Broadcast
from .._core._util import call_maybe_async
from .._summary import SessionLog
from ._base import (
    CheckpointSaverListener,
    CoordinatorLike,
    SessionLike,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    open_in_session,
)
from ._summary import summary_writer_for
from ._timer import SecondOrStepTimer

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

    from .._checkpoint import Saver, ShardCoordinator
    from .._core._errors import CheckpointError
    from .._storage import Storage
    from .._summary import SummaryWriter

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")

__all__ = ["CheckpointSaverHook"]


class _HasSaver(Protocol):
    @property
    def saver(self) -> Saver | None: ...


class CheckpointSaverHook(SessionRunHook):
    """Save checkpoints every N steps or seconds, in the background (TensorFlow's hook).

    Saves the state at the starting step in ``after_create_session`` (also after every
    recovery); then whenever its timer triggers after a step; and in ``end()`` the last step,
    unless it was just saved. Around each save, every listener's ``before_save`` is awaited
    before the snapshot, and, once the checkpoint is durable and listed, every listener's
    ``after_save`` is awaited in order by a background task: the loop never waits for it.
    If any returns True (the others are still called), the session stops at its next step
    boundary; a True from the final save is ignored. The loop waits only for the snapshot
    (and, under the ``"block"`` policy, for room in the queue). Under ``"skip"``, a save
    dropped because the queue was full got its ``before_save`` calls but gets no
    ``after_save``; the final save in ``end()`` waits for room instead, so it is never
    dropped. A hook may serve several sessions in turn: ``begin()`` starts it afresh.

    Slow listeners: while one checkpoint is being delivered to them and another waits, the
    writer takes no new snapshot, so the policy applies to new saves (at most
    ``max_pending + 2`` saves in flight); and retention keeps every checkpoint whose
    ``after_save`` is pending or running, listed, until the next save after it returned.

    A failed write is raised from the next step's ``after_run`` (so ``end()`` is not called
    and the session ends with the error); the previous checkpoint stays the latest. With
    ``on_write_error="log"`` it is logged instead (once, on the ``asyncckpt`` logger) and
    training goes on; the next save tries again.

    Args:
        checkpoint_dir: where checkpoints go.
        save_secs: save every this many seconds (exactly one of ``save_secs``/``save_steps``).
        save_steps: save every this many steps.
        saver: a ``Saver`` whose ``max_to_keep``, ``keep_checkpoint_every_n_hours`` and
            ``latest_filename`` (the state file) apply.
        checkpoint_basename: files are ``<checkpoint_basename>-<step>``.
        scaffold: where to find the saver instead (not together with ``saver``).
        listeners: ``CheckpointSaverListener`` instances, called in order.
        max_pending: snapshots that may wait while another is written.
        policy: ``"block"``, ``"skip"`` or ``"replace"`` when they are all waiting.
        stop_grace_period_secs: on an exceptional exit, how long taken snapshots are still
            written.
        on_write_error: ``"raise"`` (end the session at the next step boundary) or
            ``"log"`` (log and keep training).
        clock: the monotonic clock of the timer (inject a fake in tests).
        storage: where checkpoints (and the event file logging them) live; local files by
            default.
        coordinator: save one shard per rank of a job with several processes (see
            ``CheckpointManager``; docs/DISTRIBUTED.md): every rank runs this hook, rank 0
            alone logs checkpoints to the event file. Needs ``save_steps`` (a schedule in
            seconds would trigger at another step on each rank).
        replicated: with ``coordinator``, the tree paths rank 0 alone saves.

    Raises:
        ValueError: not exactly one of ``save_steps`` / ``save_secs``; both ``saver`` and
            ``scaffold``; an unknown ``on_write_error``.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        save_secs: float | None = None,
        save_steps: int | None = None,
        saver: Saver | None = None,
        checkpoint_basename: str = "model.ckpt",
        scaffold: _HasSaver | None = None,
        listeners: Sequence[CheckpointSaverListener] | None = None,
        *,
        max_pending: int = 1,
        policy: Policy = "block",
        stop_grace_period_secs: float = 120.0,
        on_write_error: Literal["raise", "log"] = "raise",
        clock: Callable[[], float] = time.monotonic,
        storage: Storage | None = None,
        coordinator: ShardCoordinator | None = None,
        replicated: Sequence[str] = (),
    ) -> None:
        if (save_secs is None) == (save_steps is None):
            raise ValueError("pass exactly one of save_steps= or save_secs=")
        if coordinator is not None and save_secs is not None:
            raise ValueError(
                "with coordinator=, save by steps (save_steps=N): save_secs= would trigger "
                "at a different step on each rank, and a checkpoint needs every rank's shard "
                "of the same step"
            )
        if on_write_error not in ("raise", "log"):
            raise ValueError(f'on_write_error must be "raise" or "log", not {on_write_error!r}')
        if saver is not None and scaffold is not None:
            raise ValueError("pass saver= or scaffold=, not both")
        if isinstance(listeners, CheckpointSaverListener):
            raise TypeError("listeners must be a list: pass listeners=[listener]")
        listeners = list(listeners or ())
        for listener in listeners:
            if not isinstance(listener, CheckpointSaverListener):
                raise TypeError(
                    f"listeners must be CheckpointSaverListener instances: {listener!r}"
                )
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock)
        saver = saver if saver is not None else getattr(scaffold, "saver", None)
        self._manager_args: dict[str, Any] = {
            "directory": os.fspath(checkpoint_dir),
            "max_to_keep": saver.max_to_keep if saver is not None else 5,
            "keep_checkpoint_every_n_hours": (
                saver.keep_checkpoint_every_n_hours if saver is not None else None
            ),
            "basename": checkpoint_basename,
            "max_pending": max_pending,
            "policy": policy,
            "stop_grace_period_secs": stop_grace_period_secs,
            "latest_filename": saver.latest_filename if saver is not None else STATE_FILENAME,
            "storage": storage if storage is not None or saver is None else saver.storage,
            "on_write_error": on_write_error,
            "coordinator": coordinator,
            "replicated": replicated,
        }
        # Fail on bad arguments now, not when the session starts.
        CheckpointManager(**self._manager_args)
        self.checkpoint_dir = self._manager_args["directory"]
        self._listeners = tuple(listeners)
        self._manager: CheckpointManager | None = None
        self._summary_writer: SummaryWriter | None = None
        self._coord: CoordinatorLike | None = None
        self._session: SessionLike | None = None
        self._closing: anyio.Event | None = None
        self._outcomes: deque[SaveOutcome] = deque()
        self._outcome_arrived = Broadcast()
        self._delivering = False
        self._failure: CheckpointError | None = None
        self._final_step: int | None = None
        self._saved_step: int | None = None

    def __repr__(self) -> str:
        return (
            f"CheckpointSaverHook({self.checkpoint_dir!r}, timer={self._timer!r}, "
            f"listeners={len(self._listeners)})"
        )

    @property
    def manager(self) -> CheckpointManager | None:
        """The CheckpointManager writing the checkpoints, while the session is open."""
        return self._manager

    async def begin(self) -> None:
        """Forget any earlier session (a hook may serve several in turn), then call every
        listener's ``begin()``."""
        self._manager = self._coord = self._session = None
        self._closing = None
        self._outcome_arrived = Broadcast()
        self._outcomes.clear()
        self._delivering = False
        self._failure = None
        self._final_step = self._saved_step = None
        self._timer.reset()
        for listener in self._listeners:
            await call_maybe_async(listener.begin)

    async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Open the manager (first time only), then save the starting step.

        When the session starts from a restored step (> 0) that is already the directory's
        latest checkpoint, that checkpoint is not written again, but the listeners still get
        their ``before_save`` and ``after_save`` for it (a deviation from TensorFlow, which
        rewrites it: see docs/DESIGN_NOTES.md).
        """
        manager = await self.open_manager(session, coord)
        step = session.global_step
        if step > 0 and manager.latest_step() == step:
            # The restart save of a checkpoint that is the latest already: the listeners
            # hear of it as of any save, in order, from the delivery task; nothing is written.
            for listener in self._listeners:
                await call_maybe_async(listener.before_save, session, step)
            self._saved_step = step
            coord.pending_started()
            manager.announce(step)
        else:
            await self.save(session, step)

    async def open_manager(self, session: SessionLike, coord: CoordinatorLike) -> CheckpointManager:
        """Open the manager (first time only) and start the timer at the session's step.

        The first half of ``after_create_session``, for hooks built on this one (the input
        pipeline hook restores through the manager before it decides whether to save); the
        second half is ``save(session, session.global_step)``.
        """
        self._coord = coord
        self._session = session
        if self._manager is None:
            self._closing = anyio.Event()
            manager = CheckpointManager(**self._manager_args)
            manager.add_done_callback(self._settled, acknowledge=True)
            # The manager first: a directory that cannot hold checkpoints (read-only, full)
            # fails here with a CheckpointWriteError about the checkpoints themselves.
            self._manager = await open_in_session(coord, manager, until=self._closing)
            # TensorFlow's hook logs each checkpoint to its directory's event file (the
            # chief's alone: one event file per directory, as summaries are the chief's).
            coordinator = self._manager_args["coordinator"]
            if coordinator is None or coordinator.rank == 0:
                self._summary_writer = await summary_writer_for(
                    coord, self.checkpoint_dir, self._manager_args["storage"]
                )
            coord.start_soon(self._deliver_outcomes)
        assert self._manager is not None
        self._timer.update_last_triggered_step(session.global_step)
        return self._manager

    def after_run(
        self, run_context: SessionRunContext, run_values: SessionRunValues
    ) -> Coroutine[Any, Any, None] | None:
        """Save if the timer triggers; raise a failed background write. Costs no await
        (no coroutine at all) on steps that do not save."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        session = run_context.session
        step = session.global_step
        if not self._timer.should_trigger_for_step(step):
            return None
        self._timer.update_last_triggered_step(step)
        return self.save(session, step)

    async def end(self, session: SessionLike) -> None:
        """Save the last step unless it was saved, wait for every write and listener, then
        call every listener's ``end``."""
        manager = self._manager
        step = session.global_step
        if manager is not None:
            # Compared with the last save accepted, not the last trigger: a trigger that the
            # "skip" policy dropped did not save its step.
            if step != self._saved_step:
                if manager.policy == "skip":
                    await manager.wait()  # make room: the final save is never dropped
                self._final_step = step
                self._timer.update_last_triggered_step(step)
                await self.save(session, step)
            await manager.wait()
            while self._outcomes or self._delivering:
                await self._outcome_arrived.changed()
        for listener in self._listeners:
            await call_maybe_async(listener.end, session, step)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._closing is not None:
            self._closing.set()

    async def save(self, session: SessionLike, step: int) -> None:
        """Save ``session``'s state as checkpoint ``step`` now: the listeners' ``before_save``,
        the snapshot, then the write in the background (for hooks built on this one).

        Raises:
            RuntimeError: the manager is not open (call ``open_manager`` first).
        """
        if self._manager is None or self._coord is None:
            raise RuntimeError("call open_manager() (or after_create_session()) before save()")
        for listener in self._listeners:
            await call_maybe_async(listener.before_save, session, step)
        # A callable step: nothing changes the state while the loop waits here, so the save
        # may wait for room first and make missing buffers off the loop, and holds no
        # snapshot beyond max_pending while it waits.
        if await self._manager.save(session.state, lambda: step):
            self._saved_step = step
            self._coord.pending_started()

    def _settled(self, outcome: SaveOutcome) -> None:
        # Runs on the loop inside the writer task: only record, never await. A logged
        # error was logged by the manager.
        if outcome.error is not None and self._manager_args["on_write_error"] == "raise":
            self._failure = outcome.error
        self._outcomes.append(outcome)
        self._wake()

    def _wake(self) -> None:
        self._outcome_arrived.notify()

    async def _deliver_outcomes(self) -> None:
        # One task calls the listeners, so after_save calls keep the order of the saves and a
        # slow listener delays only later listener calls, never the step loop.
        assert self._coord is not None
        while True:
            if not self._outcomes:
                await self._outcome_arrived.changed()
                continue
            # Woken in the instant the session was cancelled (trio runs the wakeups of one
            # batch in any order): the summary writer may be closed already, and listeners
            # must not hear of saves after the session's end; stop here instead.
            await anyio.lowlevel.checkpoint_if_cancelled()
            outcome = self._outcomes.popleft()
            self._delivering = True
            if outcome.written and self._summary_writer is not None:
                await self._summary_writer.add_session_log(
                    SessionLog.CHECKPOINT, outcome.step, checkpoint_path=outcome.path
                )
            if outcome.written and self._listeners:
                # A listener's error (or a cancellation) ends this task, and the session with
                # it: stay "delivering" and wake no one, so an end() waiting for the listeners
                # does not go on to call their end() as if all went well; the session's task
                # group cancels it and raises the error instead.
                await self._after_save(outcome.step)
            self._delivering = False
            assert self._manager is not None
            self._manager.acknowledge(outcome)
            self._coord.pending_finished()
            self._wake()

    async def _after_save(self, step: int) -> None:
        assert self._session is not None
        assert self._coord is not None
        stop = False
        for listener in self._listeners:
            if await call_maybe_async(listener.after_save, self._session, step):
                stop = True
        if stop and step != self._final_step:
            self._coord.request_stop()
