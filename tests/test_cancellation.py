"""Cancellation at every await point of a restore, a summary write and a session's final save.

Each test cancels the task that owns the work at the k-th await point or storage call, then
checks that the cancellation propagates (the code after it never runs), that no task is left
running, and that the directory is as good as before: the latest checkpoint restores,
``asyncckpt verify`` passes, and no temporary file is left once the directory is opened again.

Restores are cut at each of their awaits (the open, each positional read, the checksum pass)
by a storage whose streaming reads count their awaits (``CancelAtPoint``); writes are held
with ``FaultyStorage.stall()``, so exactly the chosen storage call is in progress when the
cancellation arrives. Nothing sleeps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from support import (
    SAVE_OPS,
    STATE_FILE_FIRST_CALL,
    WrappedReadFile,
    task_ids,
    temp_files,
    verify_exit,
)

from asyncckpt import (
    CheckpointManager,
    CheckpointSaverHook,
    MonitoredTrainingSession,
    Saver,
    Scaffold,
    SummaryWriter,
    latest_checkpoint,
    summary,
)
from asyncckpt._checkpoint import _file
from asyncckpt._summary._proto import encode_event
from asyncckpt._summary._records import iter_records
from asyncckpt.testing import FakeClock, FaultyStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import TaskStatus

    from asyncckpt._storage import ReadFile
    from asyncckpt.testing import StorageStall

pytestmark = pytest.mark.anyio

WALL = 1_795_210_956.5


def two_reader_state(step: int) -> dict[str, Any]:
    """A state that a restore on two threads splits: "big" for one, "small" and "tail" for
    the other."""
    return {
        "big": np.full(70_000, step, np.float32),
        "small": np.arange(10, dtype=np.int64) * step,
        "tail": np.array([step], np.float64),
        "step": step,
    }


def assert_two_reader_state(tree: Any, step: int) -> None:
    expected = two_reader_state(step)
    assert tree.keys() == expected.keys()
    for key in ("big", "small", "tail"):
        np.testing.assert_array_equal(tree[key], expected[key])
    assert tree["step"] == step


async def restore_latest(directory: Path) -> tuple[int | None, Any]:
    """Open a fresh manager (which removes stray temp files): its latest step and tree."""
    async with CheckpointManager(directory) as manager:
        step = manager.latest_step()
        tree = await manager.restore() if step is not None else None
    return step, tree


async def directory_is_sound(directory: Path, step: int) -> None:
    latest, tree = await restore_latest(directory)
    assert latest == step
    assert_two_reader_state(tree, step)
    assert temp_files(directory) == []
    assert verify_exit(directory) == 0


# -- restore ------------------------------------------------------------------------------------


class CountedReadFile(WrappedReadFile):
    """An open checkpoint whose awaits (positional reads, blocking work) first call ``point``."""

    def __init__(self, file: ReadFile, point: Callable[[str], None]) -> None:
        super().__init__(file)
        self._point = point

    async def before(self, what: str) -> None:
        self._point(what)


class CancelAtPoint(FaultyStorage):
    """Local files whose streaming reads count their awaits in ``points`` (the open, each
    positional read, each thread's pass over its arrays); ``scope`` is cancelled just before
    the k-th one runs."""

    def __init__(self, k: int | None) -> None:
        super().__init__()
        self.k = k
        self.points: list[str] = []
        self.scope = anyio.CancelScope()

    def point(self, name: str) -> None:
        if len(self.points) == self.k:
            self.scope.cancel()
        self.points.append(name)

    @contextlib.asynccontextmanager
    async def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> AsyncIterator[ReadFile]:
        self.point("open")
        async with super().open_for_read(path, limiter=limiter) as file:
            yield CountedReadFile(file, self.point)


def read_on_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restores read on two threads, whatever this machine has (the points depend on it)."""
    monkeypatch.setattr(_file, "_read_threads", lambda: 2)


# The awaits of a streaming restore of two_reader_state(): open, the prelude and header (one
# read), then each thread's read (and check) of its arrays.
_RESTORE_POINTS = ["open", "read", "arrays", "arrays"]


async def _saved(directory: Path, steps: tuple[int, ...] = (1,)) -> None:
    async with CheckpointManager(directory) as manager:
        for step in steps:
            await manager.save(two_reader_state(step), step)


async def test_a_restore_awaits_at_the_points_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _saved(tmp_path)
    points = CancelAtPoint(None)
    read_on_two_threads(monkeypatch)
    assert_two_reader_state(await Saver(storage=points).restore(tmp_path / "model.ckpt-1"), 1)
    assert points.points == _RESTORE_POINTS


@pytest.mark.parametrize("via", ["saver", "manager"])
@pytest.mark.parametrize("into", [False, True], ids=["fresh", "into"])
@pytest.mark.parametrize(
    "k", range(len(_RESTORE_POINTS)), ids=[f"{i}-{p}" for i, p in enumerate(_RESTORE_POINTS)]
)
async def test_cancel_at_each_await_of_a_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, via: str, into: bool
) -> None:
    await _saved(tmp_path, (1, 2))
    points = CancelAtPoint(k)
    progress: list[str] = []
    target = two_reader_state(0) if into else None
    before = task_ids()

    async def owner() -> None:
        with points.scope:
            if via == "saver":
                await Saver(storage=points).restore(tmp_path / "model.ckpt-2", target)
            else:
                async with CheckpointManager(tmp_path, storage=points) as manager:
                    await manager.restore(into=target)
            progress.append("restored")  # must not run: the cancellation propagates
        progress.append("exited")

    read_on_two_threads(monkeypatch)
    with anyio.fail_after(5):
        await owner()
    monkeypatch.undo()
    assert points.points[-1] == _RESTORE_POINTS[k]  # cut exactly there: nothing ran after
    assert points.scope.cancelled_caught
    assert progress == ["exited"]
    assert task_ids() == before
    await directory_is_sound(tmp_path, 2)


@pytest.mark.parametrize("via", ["saver", "manager"])
async def test_cancel_a_mapped_restore_while_the_file_is_opened(
    tmp_path: Path, storage: FaultyStorage, via: str
) -> None:
    # The mapped path is one worker-thread hop; the cancellation waits for the thread and
    # then propagates, leaving no mapping or task behind.
    await _saved(tmp_path, (1, 2))
    scope = anyio.CancelScope()
    progress: list[str] = []
    before = task_ids()

    async def owner(*, task_status: TaskStatus[StorageStall]) -> None:
        with scope:
            stall = storage.stall("open", match="model.ckpt-2")
            task_status.started(stall)
            if via == "saver":
                await Saver(storage=storage).restore(tmp_path / "model.ckpt-2", mmap=True)
            else:
                async with CheckpointManager(tmp_path, storage=storage) as manager:
                    await manager.restore(mmap=True)
            await anyio.lowlevel.checkpoint()
            progress.append("after")  # must not run
        progress.append("exited")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            stall = await tg.start(owner)
            await stall.wait_reached()
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert progress == []  # the held worker thread is waited for, never abandoned
            stall.release()
    assert scope.cancelled_caught
    assert progress == ["exited"]
    assert task_ids() == before
    await directory_is_sound(tmp_path, 2)


# -- SummaryWriter ------------------------------------------------------------------------------


def records(path: str) -> list[bytes]:
    """Every record of an event file, each one's CRCs checked (a torn record fails)."""
    return list(iter_records(Path(path).read_bytes()))


def scalar_event(tag: str, value: float, step: int) -> bytes:
    return encode_event(wall_time=WALL, step=step, values=[summary.scalar(tag, value)])


def header_event() -> bytes:
    return encode_event(wall_time=WALL, file_version="brain.Event:2", source_writer="asyncckpt")


# A writer that adds two events, flushes, adds a third, then is closed by the cancellation:
# creating the file, writing its first record, the flushed two events, the last one at close.
_SUMMARY_OPS = ["open", "write", "write", "write"]
_SUMMARY_CALLS_BEFORE_CLOSE = 3


async def test_a_summary_writer_makes_these_storage_calls(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    async with SummaryWriter(tmp_path, clock=FakeClock(WALL), storage=storage) as w:
        await w.add_scalar("loss", 0.0, 0)
        await w.add_scalar("loss", 1.0, 1)
        await w.flush()
        await w.add_scalar("loss", 2.0, 2)
    assert [op for op, path in storage.calls if "tfevents" in path] == _SUMMARY_OPS


@pytest.mark.parametrize(
    "k", range(len(_SUMMARY_OPS)), ids=[f"{i}-{op}" for i, op in enumerate(_SUMMARY_OPS)]
)
async def test_cancel_a_summary_writers_owner_at_each_storage_call(
    tmp_path: Path, storage: FaultyStorage, k: int
) -> None:
    scope = anyio.CancelScope()
    accepted: list[int] = []
    progress: list[str] = []
    stall = storage.stall(match="tfevents", skip=k)
    paths: list[str] = []
    idle = anyio.Event()
    before = task_ids()

    async def owner() -> None:
        with scope:
            w = SummaryWriter(tmp_path, clock=FakeClock(WALL), storage=storage)
            paths.append(w.path)
            async with w:
                for step in (0, 1):
                    await w.add_scalar("loss", float(step), step)
                    accepted.append(step)
                await w.flush()
                await w.add_scalar("loss", 2.0, 2)
                accepted.append(2)
                progress.append("idle")
                idle.set()
                await anyio.sleep_forever()
            progress.append("after the block")  # must not run
        progress.append("exited")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            if k < _SUMMARY_CALLS_BEFORE_CLOSE:
                op, _path = await stall.wait_reached()
                scope.cancel()
            else:  # the last call is the flush of the close the cancellation starts
                await idle.wait()
                scope.cancel()
                op, _path = await stall.wait_reached()
            assert op == _SUMMARY_OPS[k]
            await anyio.wait_all_tasks_blocked()
            assert "exited" not in progress  # the held write is waited for
            stall.release()
    assert scope.cancelled_caught
    assert progress[-1] == "exited"
    assert "after the block" not in progress
    assert task_ids() == before
    # Every accepted event is on disk, whole, after the file's first record.
    assert records(paths[0]) == [
        header_event(),
        *(scalar_event("loss", float(s), s) for s in accepted),
    ]


# -- MonitoredTrainingSession: the final save of end() --------------------------------------------


def step_fn(state: dict[str, Any]) -> dict[str, float]:
    state["big"] += 1.0
    state["small"] += np.arange(10, dtype=np.int64)
    state["tail"] += 1.0
    state["step"] += 1
    return {"loss": float(state["step"])}


_FINAL_STEP = 3


@pytest.mark.parametrize("grace", [0.0, 120.0], ids=["no-grace", "grace"])
@pytest.mark.parametrize(
    "k", range(len(SAVE_OPS)), ids=[f"{i}-{op}" for i, op in enumerate(SAVE_OPS)]
)
async def test_cancel_during_the_final_save_of_a_closing_session(
    tmp_path: Path, storage: FaultyStorage, k: int, grace: float
) -> None:
    scope = anyio.CancelScope()
    progress: list[str] = []
    before = task_ids()

    async def owner(*, task_status: TaskStatus[StorageStall]) -> None:
        with scope:
            async with MonitoredTrainingSession(
                two_reader_state(0),
                step_fn,
                checkpoint_dir=tmp_path,
                save_checkpoint_steps=1000,  # only the first save and the final one
                save_summaries_steps=None,
                log_step_count_steps=None,
                scaffold=Scaffold(saver=Saver(max_to_keep=1)),
                stop_grace_period_secs=grace,
                storage=storage,
            ) as sess:
                for _ in range(_FINAL_STEP):
                    await sess.run()
                (hook,) = [h for h in sess.hooks if isinstance(h, CheckpointSaverHook)]
                assert hook.manager is not None
                await hook.manager.wait()  # checkpoint 0 is written
                task_status.started(storage.stall(skip=k))  # the k-th call of the final save
                progress.append("closing")
            progress.append("after the block")  # must not run: the cancellation propagates
        progress.append("exited")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            stall = await tg.start(owner)
            op, _path = await stall.wait_reached()
            assert op == SAVE_OPS[k]
            assert progress == ["closing"]  # in end(), saving step 3
            scope.cancel()
            await anyio.wait_all_tasks_blocked()  # the exit waits on the held worker thread
            assert progress == ["closing"]
            stall.release()
    assert scope.cancelled_caught
    assert progress == ["closing", "exited"]
    assert task_ids() == before
    assert temp_files(tmp_path) == []
    # Without a grace period the save is abandoned where it was: until the state file is
    # replaced, 0 stays the latest. With one, the snapshot end() took is written to the end.
    expected = _FINAL_STEP if grace or k >= STATE_FILE_FIRST_CALL else 0
    assert latest_checkpoint(tmp_path) == str(tmp_path / f"model.ckpt-{expected}")
    await directory_is_sound(tmp_path, expected)


# -- opening: a CheckpointManager's enter, a session's start ---------------------------------------


_CANCEL_POINTS = 150


async def _cancel_at_every_turn(open_and_close: Callable[[], Any]) -> int:
    """Cancel ``open_and_close()`` after 0, 1, 2... loop turns of another task (every turn,
    or evenly spaced ones in a long run), up to as many as an uncancelled run lasts; return
    that count. A cancellation may land while a worker
    thread runs or a shielded cleanup does, then takes effect at the next checkpoint (or,
    if none comes, the open simply completes): either way it must not hang."""
    turns = 0
    finished = False

    async def count() -> None:
        nonlocal turns
        while not finished:
            await anyio.lowlevel.checkpoint()
            turns += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(count)
        await open_and_close()
        finished = True
    # A worker thread's hop lasts many turns of a task that only yields, and more on a
    # loaded machine: spread at most _CANCEL_POINTS cancellations over the run, so the test
    # stays linear in the run's length however slow the machine.
    for after in range(0, turns + 2, max(1, turns // _CANCEL_POINTS)):
        await _cancelled_after(after, open_and_close)
    return turns


async def _cancelled_after(turns: int, open_and_close: Callable[[], Any]) -> bool:
    """Run ``open_and_close()`` in a scope cancelled after ``turns`` loop turns; return
    whether the cancellation was caught (False: it finished first)."""
    scope = anyio.CancelScope()

    async def cancel_later() -> None:
        for _ in range(turns):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    with anyio.fail_after(10):  # a hang fails the test instead of the suite
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_later)
            with scope:
                await open_and_close()
            tg.cancel_scope.cancel()
    return scope.cancelled_caught


async def test_cancel_at_each_turn_of_a_managers_enter(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(two_reader_state(1), 1)
    before = task_ids()

    async def open_and_close() -> None:
        async with CheckpointManager(tmp_path):
            pass

    assert await _cancel_at_every_turn(open_and_close) > 0
    assert task_ids() == before
    async with CheckpointManager(tmp_path) as manager:  # the lock was released every time
        assert manager.latest_step() == 1
    assert temp_files(tmp_path) == []


@pytest.mark.slow
async def test_cancel_at_each_turn_of_a_session_start(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        await manager.save({"w": np.zeros(3)}, 1)
    before = task_ids()

    async def open_and_close() -> None:
        async with MonitoredTrainingSession({"w": np.zeros(3)}, lambda state: None,
                                            checkpoint_dir=tmp_path):  # fmt: skip
            pass

    assert await _cancel_at_every_turn(open_and_close) > 0
    assert task_ids() == before
    async with CheckpointManager(tmp_path) as manager:
        assert manager.latest_step() == 1
    assert verify_exit(tmp_path) == 0
