"""CheckpointSaverHook: TensorFlow's pinned behaviours as call sequences, listeners, failures.

Listener calls are recorded with ``RecordingListener`` and asserted as sequences. Saves and
listener calls run in the background, so where the interleaving of two kinds of call depends
on how fast a worker thread writes, a test asserts the sequence of each kind (every
``before_save``, every ``after_save``) and the order constraints that hold whatever the
timing; where a test needs an exact interleaving, the step function awaits the event it
depends on. Time moves only with ``FakeClock``; a slow disk is ``FaultyStorage.stall()``.
"""

from __future__ import annotations

import copy
import errno
import os
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from support import all_tasks_blocked, checkpoint_files, make_state, step_fn, until

from asyncckpt import (
    CheckpointSaverHook,
    CheckpointSaverListener,
    CheckpointWriteError,
    ChiefSessionCreator,
    MonitoredSession,
    Saver,
    Scaffold,
    SessionRunHook,
    StopAtStepHook,
    get_checkpoint_state,
    latest_checkpoint,
)
from asyncckpt.testing import FakeClock, RecordingHook, RecordingListener

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from asyncckpt import CheckpointManager, SaveOutcome
    from asyncckpt._hooks._base import CoordinatorLike, SessionLike
    from asyncckpt.testing import FaultyStorage

pytestmark = pytest.mark.anyio

Log = list[tuple[str, str, int | None]]


# -- helpers ----------------------------------------------------------------------------------


def session(
    directory: Path,
    hooks: Sequence[SessionRunHook],
    fn: Callable[..., Any] = step_fn,
    state: dict[str, Any] | None = None,
) -> MonitoredSession:
    creator = ChiefSessionCreator(
        make_state() if state is None else state, fn, checkpoint_dir=directory
    )
    return MonitoredSession(creator, hooks=hooks)


def steps_of(calls: Sequence[tuple[str, int | None]], method: str) -> list[int | None]:
    """The steps of every ``method`` call, in order."""
    return [step for name, step in calls if name == method]


def manager_of(hook: CheckpointSaverHook) -> CheckpointManager:
    manager = hook.manager
    assert manager is not None
    return manager


async def run_steps(sess: MonitoredSession, n: int) -> None:
    with anyio.fail_after(5):
        for _ in range(n):
            await sess.run()


async def restored(path: str | os.PathLike[str]) -> dict[str, Any]:
    tree = await Saver().restore(path)
    assert isinstance(tree, dict)
    return tree


def ckpt(directory: Path, step: int) -> str:
    return str(directory / f"model.ckpt-{step}")


class AsyncRecordingListener(RecordingListener):
    """The same record, from ``async def`` callbacks that really yield to the loop."""

    async def begin(self) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        super().begin()

    async def before_save(self, session: SessionLike, global_step_value: int) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        super().before_save(session, global_step_value)

    async def after_save(self, session: SessionLike, global_step_value: int) -> bool:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        return super().after_save(session, global_step_value)

    async def end(self, session: SessionLike, global_step_value: int) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        super().end(session, global_step_value)


def assert_saves(calls: Sequence[tuple[str, int | None]], steps: list[int], end: int) -> None:
    """A listener's calls: exactly these saves, each before_save ahead of its after_save,
    then one ``end`` after everything."""
    assert calls[0] == ("begin", None)
    assert steps_of(calls, "begin") == [None]
    assert steps_of(calls, "before_save") == steps
    assert steps_of(calls, "after_save") == steps
    assert calls[-1] == ("end", end)
    assert steps_of(calls, "end") == [end]
    for step in steps:
        assert calls.index(("before_save", step)) < calls.index(("after_save", step))


# -- TensorFlow's pinned sequences (TF_SEMANTICS 45, 48, 50, 52, 53) ------------------------------


@pytest.mark.parametrize("listener_type", [RecordingListener, AsyncRecordingListener])
async def test_save_steps_1_over_two_steps_saves_0_1_2_once_each(
    tmp_path: Path, listener_type: type[RecordingListener]
) -> None:
    # TF 52: {begin: 1, before_save: 3, after_save: 3, end: 1}; end() does not re-save 2.
    first, second = listener_type("a"), listener_type("b")
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[first, second])
    recorder = RecordingHook()
    async with session(tmp_path, [hook, recorder]) as sess:
        await run_steps(sess, 2)
    assert_saves(first.calls, [0, 1, 2], end=2)
    assert first.calls == second.calls  # both listeners, the same sequence
    assert recorder.calls == [
        ("begin", None),
        ("after_create_session", 0),
        ("before_run", 0),
        ("after_run", 1),
        ("before_run", 1),
        ("after_run", 2),
        ("end", 2),
    ]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)
    assert (await restored(ckpt(tmp_path, 2)))["step"] == 2


@pytest.mark.parametrize(
    ("n_steps", "saves"),
    [
        (4, [0, 2, 4]),  # the last step was saved by the timer: no final save (TF 50, 52)
        (5, [0, 2, 4, 5]),  # the last step was not saved: end() saves it (TF 50, 53)
        (1, [0, 1]),
    ],
)
async def test_save_steps_2_saves_at_start_then_every_two_then_the_unsaved_last(
    tmp_path: Path, n_steps: int, saves: list[int]
) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])
    async with session(tmp_path, [hook]) as sess:
        await run_steps(sess, n_steps)
    assert_saves(listener.calls, saves, end=n_steps)
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, n_steps)


async def test_checkpoint_at_step_0_before_the_first_step(tmp_path: Path) -> None:
    # TF 45: saved at 0 by after_create_session; still 0 after one step; 2 after two.
    hook = CheckpointSaverHook(tmp_path, save_steps=2)
    latest: list[str | None] = []
    async with session(tmp_path, [hook]) as sess:
        for _ in range(3):
            await manager_of(hook).wait()
            latest.append(latest_checkpoint(tmp_path))
            await run_steps(sess, 1)
    assert latest == [ckpt(tmp_path, 0), ckpt(tmp_path, 0), ckpt(tmp_path, 2)]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 3)  # end() saved the unsaved last step


@pytest.mark.parametrize(
    ("times", "saves", "end_time"),
    [
        # TF 48 (save_secs=2), with the initial save at t=0: 0.5 no, 2.5 yes, 2.6 and 2.7
        # no, 10 yes; the last step (6) was saved, so end() does not save again.
        ([0.0, 0.5, 2.5, 2.6, 2.7, 10.0], [0, 3, 6], 10.0),
        # TF 53: two steps at t0, neither saved; end() saves the last one.
        ([0.0, 0.0], [0, 2], 0.0),
        # TF 53, periodic: saves at 3.0 and 6.5, none at 7.0, so end() (at 7.5) saves 7.
        ([0.5, 0.5, 3.0, 3.5, 4.0, 6.5, 7.0], [0, 3, 6, 7], 7.5),
    ],
    ids=["tf48", "tf53-end", "tf53-periodic"],
)
async def test_save_secs_with_a_fake_clock(
    tmp_path: Path, times: list[float], saves: list[int], end_time: float
) -> None:
    clock = FakeClock()
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_secs=2, listeners=[listener], clock=clock)
    async with session(tmp_path, [hook]) as sess:
        for t in times:
            clock.advance(t - clock())
            await run_steps(sess, 1)
        clock.advance(end_time - clock())
    assert_saves(listener.calls, saves, end=len(times))


async def test_intervals_are_relative_to_the_last_save_not_aligned(tmp_path: Path) -> None:
    # TF 38: after a save at step 3 (time), the next step-based trigger counts from there.
    clock = FakeClock()
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_secs=5, listeners=[listener], clock=clock)
    async with session(tmp_path, [hook]) as sess:
        await run_steps(sess, 2)
        clock.advance(5)
        await run_steps(sess, 1)  # step 3: saved
        clock.advance(4.9)
        await run_steps(sess, 1)  # step 4: 4.9 s since the save at 3, not saved
        clock.advance(0.1)
        await run_steps(sess, 1)  # step 5: 5 s since the save at 3, saved
    assert_saves(listener.calls, [0, 3, 5], end=5)


# -- stop requests from after_save (TF 51, 54) ----------------------------------------------------


class EventListener(RecordingListener):
    """Records, and sets ``delivered[step]`` once its ``after_save(step)`` has returned."""

    def __init__(self, name: str = "listener", *, stop_at: int | None = None) -> None:
        super().__init__(name, stop_at=stop_at)
        self.delivered: dict[int, anyio.Event] = {}

    def event(self, step: int) -> anyio.Event:
        return self.delivered.setdefault(step, anyio.Event())

    def after_save(self, session: SessionLike, global_step_value: int) -> bool:
        stop = super().after_save(session, global_step_value)
        self.event(global_step_value).set()
        return stop


async def test_listener_true_from_after_save_stops_the_loop(tmp_path: Path) -> None:
    # TF 54: True from after_save at step 3 -> should_stop() after that. Here the save is
    # written in the background, so the step after it waits until after_save(3) returned:
    # the stop then lands at the next step boundary, deterministically.
    stopper = EventListener("stopper", stop_at=3)
    other = RecordingListener("other")
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[stopper, other])
    recorder = RecordingHook()

    async def step(state: dict[str, Any]) -> dict[str, float]:
        if state["step"] == 3:
            await stopper.event(3).wait()
        return step_fn(state)

    should_stop = []
    async with session(tmp_path, [hook, recorder], step) as sess:
        with anyio.fail_after(5):
            while not sess.should_stop():
                await sess.run()
                should_stop.append((sess.global_step, sess.should_stop()))
    assert should_stop == [(1, False), (2, False), (3, False), (4, True)]
    # The stopping listener and the other one both saw every save; the final save (4) in
    # end() returned True too, which is ignored; end() ran once, for the hook and listeners.
    assert_saves(stopper.calls, [0, 1, 2, 3, 4], end=4)
    assert_saves(other.calls, [0, 1, 2, 3, 4], end=4)
    assert steps_of(recorder.calls, "end") == [4]
    assert recorder.calls[-2:] == [("after_run", 4), ("end", 4)]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 4)


async def test_every_listener_is_called_when_the_first_returns_true(tmp_path: Path) -> None:
    log: Log = []
    listeners = [
        RecordingListener("first", log=log, stop_at=0),
        RecordingListener("second", log=log),
        RecordingListener("third", log=log, stop_at=0),
    ]
    hook = CheckpointSaverHook(tmp_path, save_steps=100, listeners=listeners)
    async with session(tmp_path, [hook]) as sess:
        await run_steps(sess, 1)
        with anyio.fail_after(5):
            while not sess.should_stop():  # the stop lands once after_save(0) has run
                await anyio.lowlevel.checkpoint()
        with pytest.raises(RuntimeError, match="Run called even after should_stop requested"):
            await sess.run()
    after_save_0 = [entry for entry in log if entry[1:] == ("after_save", 0)]
    assert after_save_0 == [
        ("first", "after_save", 0),
        ("second", "after_save", 0),
        ("third", "after_save", 0),
    ]
    for listener in listeners:
        assert_saves(listener.calls, [0, 1], end=1)


async def test_true_from_the_final_save_is_ignored(tmp_path: Path) -> None:
    # TF 50: end() ignores the stop request of its own save. The input runs out at step 3,
    # so nothing else asked to stop: the session ends normally, without an error, and the
    # hooks' end() after the checkpoint hook's (which waited for after_save(3)) see no stop.
    class StopProbe(SessionRunHook):
        def __init__(self) -> None:
            self.coord: CoordinatorLike | None = None
            self.at_end: list[bool] = []

        def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
            self.coord = coord

        def end(self, session: SessionLike) -> None:
            assert self.coord is not None
            self.at_end.append(self.coord.should_stop())

    listener = RecordingListener(stop_at=3)
    hook = CheckpointSaverHook(tmp_path, save_steps=100, listeners=[listener])
    probe = StopProbe()
    items = iter(range(3))

    def step(state: dict[str, Any]) -> dict[str, float]:
        next(items)
        return step_fn(state)

    async with session(tmp_path, [hook, probe], step) as sess:
        with anyio.fail_after(5):
            while True:
                await sess.run()
    assert_saves(listener.calls, [0, 3], end=3)
    assert probe.at_end == [False]


# -- the loop never waits for listeners; end() waits for everything -----------------------------


class BlockingListener(RecordingListener):
    """``after_save`` (async) waits for ``release`` before it records anything."""

    def __init__(self, name: str = "blocking", *, log: Log | None = None) -> None:
        super().__init__(name, log=log)
        self.release = anyio.Event()

    async def after_save(self, session: SessionLike, global_step_value: int) -> bool:  # type: ignore[override]
        await self.release.wait()
        return super().after_save(session, global_step_value)


async def test_a_slow_after_save_never_blocks_the_loop_under_skip(tmp_path: Path) -> None:
    log: Log = []
    listener = BlockingListener(log=log)
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener], policy="skip")
    recorder = RecordingHook("hook", log=log)
    checked_before_release: list[bool] = []

    async def release_later() -> None:
        await anyio.wait_all_tasks_blocked()  # the session's exit is waiting in end()
        checked_before_release.append(("hook", "end", 20) not in log)
        listener.release.set()

    async with anyio.create_task_group() as tg, session(tmp_path, [hook, recorder]) as sess:
        await run_steps(sess, 20)  # 20 triggers while after_save(0) is still blocked
        assert steps_of(listener.calls, "after_save") == []
        assert steps_of(listener.calls, "before_save")[:21] == list(range(21))
        # The backlog is bounded: one save being delivered, one written and waiting, at
        # most max_pending snapshots queued; the other triggers were dropped and counted.
        stats = manager_of(hook).statistics()
        assert stats.skipped >= 20 - 2
        tg.start_soon(release_later)
    assert checked_before_release == [True]
    # Released: the after_save of every save taken, in order, then the listener's end,
    # then the hooks' end; the last step was saved by end() if its trigger was dropped.
    delivered = steps_of(listener.calls, "after_save")
    assert delivered[0] == 0
    assert delivered[-1] == 20
    assert delivered == sorted({step for step in delivered if step is not None})
    assert len(delivered) <= 4  # 0, two more taken while it was blocked, and the last
    assert log[-2:] == [("blocking", "end", 20), ("hook", "end", 20)]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 20)


async def test_a_slow_after_save_holds_the_loop_under_block(tmp_path: Path) -> None:
    # The queue of after_save calls is bounded, and under "block" a full one holds the
    # loop: after_save(0) blocked, 1 written and waiting, 2 queued; step 3's save waits.
    listener = BlockingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener])
    async with session(tmp_path, [hook]) as sess:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_steps, sess, 6)
            await until(lambda: sess.global_step == 3 and manager_of(hook).all_steps() == [0, 1])
            await all_tasks_blocked()
            assert sess.global_step == 3  # held, not just slow
            assert steps_of(listener.calls, "before_save") == [0, 1, 2, 3]
            assert manager_of(hook).all_steps() == [0, 1]
            listener.release.set()
        assert sess.global_step == 6
    assert_saves(listener.calls, list(range(7)), end=6)


async def test_retention_waits_for_after_save(tmp_path: Path) -> None:
    # max_to_keep=1 with a listener slower than the saves: each after_save finds its own
    # checkpoint whole, however many saves came after it; retention catches up at the end.
    found: list[tuple[int, int]] = []
    release = anyio.Event()

    class SlowReader(CheckpointSaverListener):
        async def after_save(self, session: SessionLike, global_step_value: int) -> None:
            await release.wait()
            tree = await restored(ckpt(tmp_path, global_step_value))
            found.append((global_step_value, int(tree["step"])))

    hook = CheckpointSaverHook(
        tmp_path, save_steps=1, saver=Saver(max_to_keep=1), listeners=[SlowReader()],
        policy="replace",
    )  # fmt: skip
    async with session(tmp_path, [hook]) as sess:
        await run_steps(sess, 10)
        # The first written save is being delivered and the next one waits: both stay
        # listed and on disk, beyond max_to_keep; the newest snapshot waits in the
        # queue, replaced by newer ones.
        await until(lambda: len(manager_of(hook).all_steps()) == 2)
        kept = manager_of(hook).all_steps()
        assert manager_of(hook).statistics().replaced > 0
        assert set(checkpoint_files(tmp_path)) == {f"model.ckpt-{step}" for step in kept}
        release.set()
    assert [step for step, _ in found] == sorted({step for step, _ in found})
    assert all(step == saved for step, saved in found)
    assert found[-1][0] == 10
    on_disk = checkpoint_files(tmp_path)
    assert on_disk == ["model.ckpt-10"]
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert state.paths() == [ckpt(tmp_path, 10)]


async def test_after_save_sees_its_checkpoint_durable_and_listed(tmp_path: Path) -> None:
    seen: list[tuple[int, str | None, bool, int]] = []
    delivered = {step: anyio.Event() for step in (0, 2, 4)}

    class Checking(CheckpointSaverListener):
        async def after_save(self, session: SessionLike, global_step_value: int) -> None:
            path = ckpt(tmp_path, global_step_value)
            state = get_checkpoint_state(tmp_path)
            assert state is not None
            tree = await restored(path)  # readable and its checksums hold
            seen.append(
                (
                    global_step_value,
                    latest_checkpoint(tmp_path),
                    path in state.paths(),
                    tree["step"],
                )
            )
            delivered[global_step_value].set()

    async def step(state: dict[str, Any]) -> dict[str, float]:
        # The step after a save waits for its after_save, so no newer save exists yet.
        if state["step"] in delivered:
            await delivered[state["step"]].wait()
        return step_fn(state)

    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[Checking()])
    async with session(tmp_path, [hook], step) as sess:
        await run_steps(sess, 4)
    assert seen == [(step, ckpt(tmp_path, step), True, step) for step in (0, 2, 4)]


async def test_before_save_sees_the_state_that_is_saved(tmp_path: Path) -> None:
    # TF 51: before_save runs before the snapshot, so what it sees (and sets) is saved.
    seen: dict[int, dict[str, Any]] = {}

    class Marking(CheckpointSaverListener):
        def before_save(self, session: SessionLike, global_step_value: int) -> None:
            state = session.state
            assert isinstance(state, dict)
            state["saved_at"] = global_step_value
            seen[global_step_value] = copy.deepcopy(state)

    hook = CheckpointSaverHook(
        tmp_path, save_steps=2, saver=Saver(max_to_keep=None), listeners=[Marking()]
    )
    state = make_state()
    state["saved_at"] = -1
    async with session(tmp_path, [hook], state=state) as sess:
        await run_steps(sess, 5)
    assert sorted(seen) == [0, 2, 4, 5]
    for step, expected in seen.items():
        tree = await restored(ckpt(tmp_path, step))
        assert tree["saved_at"] == step
        assert tree["step"] == expected["step"] == step
        np.testing.assert_array_equal(tree["w"], expected["w"])


# -- failures -------------------------------------------------------------------------------------


async def test_a_failed_background_write_is_raised_at_the_next_step_boundary(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener], storage=storage)
    recorder = RecordingHook()
    settled = anyio.Event()

    def on_settled(outcome: SaveOutcome) -> None:
        if outcome.step == 2:
            settled.set()

    async def step(state: dict[str, Any]) -> dict[str, float]:
        if state["step"] == 2:
            await settled.wait()  # checkpoint 2 has failed by the end of this step
        return step_fn(state)

    async def train() -> None:
        async with session(tmp_path, [hook, recorder], step) as sess:
            manager_of(hook).add_done_callback(on_settled)
            await run_steps(sess, 2)
            try:
                await run_steps(sess, 1)
            finally:
                assert sess.global_step == 3  # raised by the run() of step 3

    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    with pytest.raises(CheckpointWriteError) as caught:
        await train()
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    # The error ended the session: no end() for hooks or listeners, no after_save(2).
    assert steps_of(recorder.calls, "end") == []
    assert steps_of(listener.calls, "before_save") == [0, 2]
    assert steps_of(listener.calls, "after_save") == [0]
    assert steps_of(listener.calls, "end") == []
    # The previous checkpoint stays the latest, and restores.
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 0)
    assert (await restored(ckpt(tmp_path, 0)))["step"] == 0
    assert "model.ckpt-2" not in os.listdir(tmp_path)


async def test_on_write_error_log_keeps_training_and_retries(
    tmp_path: Path, storage: FaultyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(
        tmp_path, save_steps=2, listeners=[listener], on_write_error="log", storage=storage
    )
    recorder = RecordingHook()

    async def step(state: dict[str, Any]) -> dict[str, float]:
        await anyio.lowlevel.checkpoint()  # lets the writer finish between steps
        return step_fn(state)

    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    async with session(tmp_path, [hook, recorder], step) as sess:
        await run_steps(sess, 5)
    # The failed save was logged, training went on, and later saves and end() happened.
    assert [r.levelname for r in caplog.records if "model.ckpt-2" in r.getMessage()] == ["ERROR"]
    assert steps_of(recorder.calls, "end") == [5]
    assert steps_of(listener.calls, "before_save") == [0, 2, 4, 5]
    assert steps_of(listener.calls, "after_save") == [0, 4, 5]
    assert steps_of(listener.calls, "end") == [5]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 5)
    assert "model.ckpt-2" not in os.listdir(tmp_path)


def test_on_write_error_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_write_error"):
        CheckpointSaverHook(tmp_path, save_steps=1, on_write_error="ignore")  # type: ignore[arg-type]


async def test_a_failed_final_save_fails_the_exit(tmp_path: Path, storage: FaultyStorage) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=100, listeners=[listener], storage=storage)

    async def train() -> None:
        async with session(tmp_path, [hook]) as sess:
            await run_steps(sess, 3)

    storage.fail("write", errno.EIO, match="model.ckpt-3")
    with pytest.raises(CheckpointWriteError, match=r"model\.ckpt-3"):
        await train()
    assert steps_of(listener.calls, "after_save") == [0]
    assert steps_of(listener.calls, "end") == []
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 0)


@pytest.mark.parametrize("final", [False, True], ids=["periodic-save", "final-save"])
async def test_a_listener_raising_in_after_save_ends_the_session_with_it(
    tmp_path: Path, final: bool
) -> None:
    # after_save runs in a background task; its error still ends the session as itself,
    # whether it comes while the loop runs or while end() waits for the final save.
    boom = LookupError("listener failed")
    fail_at = 3 if final else 2

    class Failing(RecordingListener):
        async def after_save(self, session: SessionLike, global_step_value: int) -> bool:  # type: ignore[override]
            await anyio.lowlevel.checkpoint()
            if global_step_value == fail_at:
                raise boom
            return super().after_save(session, global_step_value)

    listener = Failing()
    recorder = RecordingHook()
    hook = CheckpointSaverHook(tmp_path, save_steps=100 if final else 1, listeners=[listener])

    async def train() -> None:
        async with session(tmp_path, [hook, recorder, StopAtStepHook(last_step=3)]) as sess:
            while not sess.should_stop():  # a periodic failure ends it at some step
                await sess.run()

    before = {task.id for task in anyio.get_running_tasks()}
    with anyio.fail_after(5), pytest.raises(LookupError) as caught:
        await train()
    assert caught.value is boom  # itself, never an ExceptionGroup
    assert steps_of(recorder.calls, "end") == []
    assert steps_of(listener.calls, "end") == []
    assert {task.id for task in anyio.get_running_tasks()} == before


# -- validation, retention, policies ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "exactly one of save_steps= or save_secs="),
        ({"save_steps": 1, "save_secs": 1.0}, ValueError, "exactly one of save_steps="),
        (
            {"save_steps": 1, "saver": Saver(), "scaffold": Scaffold()},
            ValueError,
            "saver= or scaffold=, not both",
        ),
        ({"save_steps": 0}, ValueError, "every_steps must be a positive int"),
        ({"save_secs": -1.0}, ValueError, "every_secs must be >= 0"),
        ({"save_steps": 1, "max_pending": -1}, ValueError, "max_pending must be >= 0"),
        ({"save_steps": 1, "policy": "drop"}, ValueError, "policy must be one of"),
        ({"save_steps": 1, "checkpoint_basename": "a/b"}, ValueError, "inside the directory"),
        ({"save_steps": 1, "listeners": [RecordingHook()]}, TypeError, "listeners must be"),
        (
            {"save_steps": 1, "listeners": RecordingListener()},
            TypeError,
            r"listeners must be a list: pass listeners=\[listener\]",
        ),
    ],
)
async def test_constructor_validates_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    directory = tmp_path / "ckpt"
    with pytest.raises(error, match=message):
        CheckpointSaverHook(directory, **kwargs)
    assert not directory.exists()  # nothing touched before the session starts


@pytest.mark.parametrize("via", ["saver", "scaffold"])
async def test_retention_comes_from_the_saver(tmp_path: Path, via: str) -> None:
    saver = Saver(max_to_keep=2)
    kwargs: dict[str, Any] = (
        {"saver": saver} if via == "saver" else {"scaffold": Scaffold(saver=saver)}
    )
    hook = CheckpointSaverHook(tmp_path, save_steps=1, **kwargs)
    async with session(tmp_path, [hook]) as sess:
        await run_steps(sess, 5)
    on_disk = checkpoint_files(tmp_path)
    assert on_disk == ["model.ckpt-4", "model.ckpt-5"]
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert state.paths() == [ckpt(tmp_path, 4), ckpt(tmp_path, 5)]


async def test_skip_policy_never_drops_the_final_save(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(
        tmp_path, save_steps=1, listeners=[listener], policy="skip", storage=storage
    )
    stall = storage.stall("fsync", match="model.ckpt-0")

    async def release_when_blocked() -> None:
        await anyio.wait_all_tasks_blocked()
        stall.release()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, session(tmp_path, [hook]) as sess:
            await stall.wait_reached()  # 0 is being written
            await run_steps(sess, 2)  # 1 waits in the queue, 2 is skipped
            assert manager_of(hook).statistics().skipped == 1
            tg.start_soon(release_when_blocked)
    # A skipped trigger saw before_save only; end() saved step 2 all the same.
    assert steps_of(listener.calls, "before_save") == [0, 1, 2, 2]
    assert steps_of(listener.calls, "after_save") == [0, 1, 2]
    assert listener.calls[-1] == ("end", 2)
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)


async def test_a_hook_serves_a_second_session(tmp_path: Path) -> None:
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])
    state = make_state()
    for _ in range(2):
        async with session(tmp_path, [hook], state=state) as sess:
            await run_steps(sess, 3)
    split = listener.calls.index(("end", 3)) + 1
    first, second = listener.calls[:split], listener.calls[split:]
    assert_saves(first, [0, 2, 3], end=3)
    # The second session restored 3, saved it at its start, then 5, then 6 at the end.
    assert_saves(second, [3, 5, 6], end=6)
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 6)


async def test_stop_at_step_hook_and_the_final_save(tmp_path: Path) -> None:
    # The usual pairing: StopAtStepHook ends the loop, end() saves the last step once.
    listener = RecordingListener()
    hook = CheckpointSaverHook(tmp_path, save_steps=4, listeners=[listener])
    async with session(tmp_path, [hook, StopAtStepHook(last_step=10)]) as sess:
        with anyio.fail_after(5):
            while not sess.should_stop():
                await sess.run()
    assert_saves(listener.calls, [0, 4, 8, 10], end=10)


async def test_a_full_disk_at_start_fails_clearly_and_leaves_no_empty_event_file(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # TensorFlow's hook logs each checkpoint to an event file in its directory; a disk
    # too full for that file fails the start with a CheckpointWriteError saying so.
    storage.fail("write", errno.ENOSPC, match="tfevents", times=None)
    hook = CheckpointSaverHook(tmp_path, save_steps=1, storage=storage)
    with pytest.raises(CheckpointWriteError, match="writing the event file") as caught:
        async with session(tmp_path, [hook]):
            pass  # pragma: no cover
    assert isinstance(caught.value.__cause__, OSError)
    assert [name for name in os.listdir(tmp_path) if name.startswith("events.out")] == []
