"""CheckpointManager: snapshots, queue policies, write errors, lifecycle and cancellation.

Stalls are deterministic: ``FaultyStorage.stall()`` holds the worker thread doing the chosen
storage call, so exactly that call stalls, as on a slow disk, while the event loop keeps
running. Nothing here sleeps for real.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from support import (
    CKPT_FILE,
    SAVE_OPS,
    STATE_FILE_FIRST_CALL,
    all_tasks_blocked,
    checkpoint_files,
    task_ids,
    temp_files,
    until,
    verify_exit,
    written_steps,
)

from asyncckpt import (
    CheckpointCorruptedError,
    CheckpointLockedError,
    CheckpointManager,
    CheckpointManagerStatistics,
    CheckpointNotFoundError,
    CheckpointWriteError,
    Saver,
    latest_checkpoint,
)

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import TaskStatus

    from asyncckpt import SaveOutcome
    from asyncckpt.testing import FaultyStorage, StorageStall

pytestmark = pytest.mark.anyio


def mixed_state(step: int) -> dict[str, Any]:
    """A state of every kind of leaf: arrays of two dtypes, an int, a str, a nested dict with a
    NumPy scalar and a list."""
    return {
        "weights": np.full((4, 8), step, np.float32),
        "counts": np.arange(6, dtype=np.int64) * step,
        "step": step,
        "name": f"state-{step}",
        "nested": {"bias": np.float64(step / 2), "tags": ["a", step]},
    }


def assert_mixed_state(tree: Any, step: int) -> None:
    expected = mixed_state(step)
    assert tree.keys() == expected.keys()
    np.testing.assert_array_equal(tree["weights"], expected["weights"])
    assert tree["weights"].dtype == np.float32
    np.testing.assert_array_equal(tree["counts"], expected["counts"])
    assert tree["step"] == step
    assert tree["name"] == f"state-{step}"
    assert tree["nested"]["bias"] == step / 2
    assert tree["nested"]["tags"] == ["a", step]


def file_size(path: Path) -> int:
    return os.path.getsize(path)


async def restore_latest(directory: Path) -> tuple[int | None, Any]:
    """Open a fresh manager on ``directory``: its latest step and restored tree."""
    async with CheckpointManager(directory) as manager:
        step = manager.latest_step()
        tree = await manager.restore() if step is not None else None
    return step, tree


# -- basics -------------------------------------------------------------------------------------


async def test_save_snapshots_then_mutation_does_not_change_what_is_written(
    tmp_path: Path,
) -> None:
    state = mixed_state(1)
    async with CheckpointManager(tmp_path) as manager:
        assert await manager.save(state, 1) is True
        # The writer has not run yet: save() returned after the copy, so this must not leak in.
        state["weights"][:] = -7
        state["counts"] += 1000
        state["step"] = 99
        state["nested"]["tags"].append("late")
        await manager.wait()
        assert manager.latest_step() == 1
        assert_mixed_state(await manager.restore(), 1)
    assert os.listdir(tmp_path).count("model.ckpt-1") == 1


async def test_latest_all_steps_and_restore_by_step(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=3) as manager:
        assert manager.latest_step() is None
        assert manager.all_steps() == []
        for step in (10, 20, 30, 40):
            await manager.save(mixed_state(step), step)
            await manager.wait()
            assert manager.latest_step() == step
        assert manager.all_steps() == [20, 30, 40]
        assert_mixed_state(await manager.restore(), 40)
        assert_mixed_state(await manager.restore(step=20), 20)
        with pytest.raises(CheckpointNotFoundError):
            await manager.restore(step=10)  # fell out of max_to_keep
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == [
        "model.ckpt-20",
        "model.ckpt-30",
        "model.ckpt-40",
    ]


async def test_restore_into_fills_arrays_in_place(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(mixed_state(3), 3)
        live = mixed_state(0)
        weights, counts = live["weights"], live["counts"]
        restored = await manager.restore(into=live)
    assert restored["weights"] is weights
    assert restored["counts"] is counts
    assert_mixed_state(restored, 3)
    np.testing.assert_array_equal(weights, np.full((4, 8), 3, np.float32))


async def test_restore_with_nothing_saved_raises_not_found(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        with pytest.raises(CheckpointNotFoundError) as caught:
            await manager.restore()
    assert isinstance(caught.value, FileNotFoundError)  # a builtin base users may catch


async def test_second_manager_continues_latest_step_and_retention(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=3) as first:
        for step in (1, 2, 3):
            await first.save(mixed_state(step), step)
    async with CheckpointManager(tmp_path, max_to_keep=3) as second:
        assert second.latest_step() == 3
        assert second.all_steps() == [1, 2, 3]
        assert_mixed_state(await second.restore(), 3)
        for step in (4, 5):
            await second.save(mixed_state(step), step)
        await second.wait()
        assert second.all_steps() == [3, 4, 5]
    on_disk = sorted(int(n.split("-")[1]) for n in os.listdir(tmp_path) if CKPT_FILE.match(n))
    assert on_disk == [3, 4, 5]


async def test_statistics_after_saves(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=None, max_pending=2) as manager:
        empty = manager.statistics()
        assert isinstance(empty, CheckpointManagerStatistics)
        assert (empty.pending, empty.max_pending, empty.written, empty.bytes_written) == (
            0,
            2,
            0,
            0,
        )
        assert empty.latest_step is None
        for step in (1, 2, 3):
            await manager.save(mixed_state(step), step)
            await manager.wait()
            assert manager.statistics().latest_step == step
        stats = manager.statistics()
    sizes = sum(file_size(tmp_path / f"model.ckpt-{step}") for step in (1, 2, 3))
    assert stats.written == 3
    assert stats.bytes_written == sizes
    assert stats.latest_step == 3
    assert (stats.pending, stats.skipped, stats.replaced, stats.failed) == (0, 0, 0, 0)
    assert stats.last_error is None


@pytest.mark.parametrize("wait_between", [True, False], ids=["sequential", "pipelined"])
async def test_repeated_saves_reuse_snapshot_buffers(tmp_path: Path, wait_between: bool) -> None:
    state = mixed_state(1)
    async with CheckpointManager(tmp_path, max_to_keep=2, max_pending=2) as manager:
        await manager.save(state, 0)
        await manager.wait()
        warm = manager.statistics()
        assert warm.buffers_allocated > 0
        for step in range(1, 12):
            state["weights"] += 1
            await manager.save(state, step)
            if wait_between:
                await manager.wait()
        await manager.wait()
        after = manager.statistics()
        restored = await manager.restore()
    np.testing.assert_array_equal(restored["weights"], np.full((4, 8), 12, np.float32))
    # One buffer set per snapshot in flight at most: the writer's, max_pending waiting, and
    # the one an int step takes at the call while it waits for room.
    limit = warm.buffers_allocated * (1 if wait_between else 2 + manager.max_pending)
    assert after.buffers_allocated <= limit
    if wait_between:
        assert after.bytes_allocated == warm.bytes_allocated


# -- queue policies under a stalled writer ---------------------------------------------------------


async def test_block_policy_waits_until_the_writer_moves_on(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-1")
    done: list[list[int]] = []

    async def third(manager: CheckpointManager) -> None:
        assert await manager.save(mixed_state(3), 3) is True
        done.append(written_steps(storage))

    async with CheckpointManager(
        tmp_path, max_pending=1, policy="block", storage=storage
    ) as manager:
        assert await manager.save(mixed_state(1), 1) is True
        await stall.wait_reached()  # checkpoint 1 is being written, held in fsync
        assert await manager.save(mixed_state(2), 2) is True  # room for one waiting snapshot
        assert manager.statistics().pending == 2
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(third, manager)
                await anyio.wait_all_tasks_blocked()
                assert done == []  # blocked: the queue is full
                assert manager.statistics().pending == 2
                stall.release()
        assert len(done) == 1
        assert done[0][:1] == [1]  # it got in only after checkpoint 1 was written
        await manager.wait()
        assert manager.statistics().skipped == manager.statistics().replaced == 0
    assert written_steps(storage) == [1, 2, 3]


async def test_skip_policy_drops_and_counts(tmp_path: Path, storage: FaultyStorage) -> None:
    stall = storage.stall("fsync", match="model.ckpt-1")
    async with CheckpointManager(
        tmp_path, max_pending=1, policy="skip", storage=storage
    ) as manager:
        assert await manager.save(mixed_state(1), 1) is True
        await stall.wait_reached()
        assert await manager.save(mixed_state(2), 2) is True
        assert await manager.save(mixed_state(3), 3) is False
        stats = manager.statistics()
        assert (stats.pending, stats.skipped, stats.written) == (2, 1, 0)
        stall.release()
        await manager.wait()
        assert manager.latest_step() == 2
        assert manager.all_steps() == [1, 2]
        assert manager.statistics().skipped == 1
        assert_mixed_state(await manager.restore(), 2)
    assert written_steps(storage) == [1, 2]


async def test_replace_policy_swaps_the_waiting_snapshot(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-1")
    async with CheckpointManager(
        tmp_path, max_pending=1, policy="replace", storage=storage
    ) as manager:
        assert await manager.save(mixed_state(1), 1) is True
        await stall.wait_reached()
        assert await manager.save(mixed_state(2), 2) is True
        assert await manager.save(mixed_state(3), 3) is True
        stats = manager.statistics()
        assert (stats.pending, stats.replaced, stats.skipped) == (2, 1, 0)
        stall.release()
        await manager.wait()
        assert manager.all_steps() == [1, 3]
        assert manager.statistics().replaced == 1
        assert manager.statistics().written == 2
        assert_mixed_state(await manager.restore(), 3)
    assert written_steps(storage) == [1, 3]


# -- write errors ----------------------------------------------------------------------------------


def assert_enospc(error: BaseException) -> None:
    assert type(error) is CheckpointWriteError  # the error itself, never an ExceptionGroup
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.ENOSPC
    assert "model.ckpt-2" in str(error)


async def test_write_error_raised_once_by_next_save(tmp_path: Path, storage: FaultyStorage) -> None:
    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    async with CheckpointManager(tmp_path, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.wait()
        await manager.save(mixed_state(2), 2)
        await until(lambda: manager.statistics().failed == 1)
        with pytest.raises(CheckpointWriteError) as caught:
            await manager.save(mixed_state(3), 3)
        assert_enospc(caught.value)
        stats = manager.statistics()
        assert stats.last_error is caught.value
        assert (stats.failed, stats.written, stats.pending) == (1, 1, 0)
        assert manager.latest_step() == 1
        # Already reported: restore does not re-raise.
        assert_mixed_state(await manager.restore(), 1)
        # The failed save did not take a snapshot; the next one works (the fault was one-shot).
        assert await manager.save(mixed_state(4), 4) is True
        await manager.wait()
        assert manager.latest_step() == 4
        assert manager.all_steps() == [1, 4]
    assert written_steps(storage) == [1, 4]
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("boundary", ["wait", "restore"])
async def test_write_error_raised_once_by_wait_or_restore(
    tmp_path: Path, storage: FaultyStorage, boundary: str
) -> None:
    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    async with CheckpointManager(tmp_path, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.save(mixed_state(2), 2)
        with pytest.raises(CheckpointWriteError) as caught:
            await (manager.wait() if boundary == "wait" else manager.restore())
        assert_enospc(caught.value)
        await manager.wait()  # reported once only
        assert manager.latest_step() == 1
        assert manager.statistics().failed == 1
        assert_mixed_state(await manager.restore(), 1)
        await manager.save(mixed_state(3), 3)
    assert (await restore_latest(tmp_path))[0] == 3


async def test_write_error_raised_once_by_exit(tmp_path: Path, storage: FaultyStorage) -> None:
    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    manager = CheckpointManager(tmp_path, storage=storage)

    async def body() -> None:
        async with manager:
            await manager.save(mixed_state(1), 1)
            await manager.save(mixed_state(2), 2)

    with pytest.raises(CheckpointWriteError) as caught:
        await body()
    assert_enospc(caught.value)
    await manager.aclose()  # already closed and reported: nothing more
    assert manager.latest_step() == 1
    assert manager.statistics().last_error is caught.value
    step, tree = await restore_latest(tmp_path)
    assert step == 1
    assert_mixed_state(tree, 1)
    assert temp_files(tmp_path) == []
    assert verify_exit(tmp_path) == 0


async def test_body_exception_wins_and_notes_the_write_error(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    storage.fail("fsync", errno.EIO, match="model.ckpt-1")
    boom = ValueError("boom")

    async def body() -> None:
        async with CheckpointManager(tmp_path, storage=storage) as manager:
            await manager.save(mixed_state(1), 1)
            raise boom

    with pytest.raises(ValueError, match="boom") as caught:
        await body()
    assert caught.value is boom
    assert any("checkpoint write" in note for note in getattr(boom, "__notes__", []))


async def test_state_file_write_error_keeps_previous_latest(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    async with CheckpointManager(tmp_path, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.wait()
        storage.fail("rename", errno.EACCES, match=f"{os.sep}checkpoint")
        await manager.save(mixed_state(2), 2)
        with pytest.raises(CheckpointWriteError):
            await manager.wait()
        assert manager.latest_step() == 1
        assert manager.all_steps() == [1]
        assert_mixed_state(await manager.restore(), 1)
    step, _tree = await restore_latest(tmp_path)
    assert step == 1


async def test_failed_deletion_after_the_commit_keeps_the_new_checkpoint_latest(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # A manager retires the surplus checkpoint by renaming it to a spare temporary name.
    storage.fail("rename", errno.EACCES, match=".model.ckpt-1.asyncckpt-tmp-")
    async with CheckpointManager(tmp_path, max_to_keep=1, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.wait()
        await manager.save(mixed_state(2), 2)
        with pytest.raises(CheckpointWriteError, match=r"model\.ckpt-1") as caught:
            await manager.wait()
        assert type(caught.value) is CheckpointWriteError
        # The state file already lists checkpoint 2: the manager must agree with it.
        assert manager.latest_step() == manager.statistics().latest_step == 2
        assert manager.all_steps() == [2]
        assert_mixed_state(await manager.restore(), 2)
    assert (await restore_latest(tmp_path))[0] == 2


# -- lifecycle -------------------------------------------------------------------------------------


async def test_enter_twice_raises(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    async with manager:
        with pytest.raises(RuntimeError, match="entered only once"):
            await manager.__aenter__()
        await manager.save(mixed_state(1), 1)  # still usable
    with pytest.raises(RuntimeError, match="entered only once"):
        async with manager:
            pass
    assert (await restore_latest(tmp_path))[0] == 1


async def test_a_locked_directory_fails_the_enter_and_nothing_else(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as first:
        second = CheckpointManager(tmp_path)
        with pytest.raises(CheckpointLockedError, match="another writer holds"):
            await second.__aenter__()
        with pytest.raises(RuntimeError, match="async with"):
            await second.save(mixed_state(1), 1)
        await second.aclose()  # nothing to stop
        await first.save(mixed_state(1), 1)
    assert first.all_steps() == [1]


async def test_save_and_wait_outside_the_block_raise(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(RuntimeError, match="async with"):
        await manager.save(mixed_state(1), 1)
    with pytest.raises(RuntimeError, match="async with"):
        await manager.wait()
    async with manager:
        await manager.save(mixed_state(1), 1)
    with pytest.raises(RuntimeError, match="closed"):
        await manager.save(mixed_state(2), 2)
    with pytest.raises(RuntimeError, match="closed"):
        await manager.wait()
    assert manager.all_steps() == [1]


async def test_aclose_is_idempotent_and_writes_everything(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, max_pending=2)
    async with manager:
        await manager.save(mixed_state(1), 1)
        await manager.save(mixed_state(2), 2)
        await manager.aclose()
        assert manager.latest_step() == 2
        await manager.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await manager.save(mixed_state(3), 3)
    await manager.aclose()
    assert manager.all_steps() == [1, 2]


async def test_aclose_from_another_task_and_under_a_deadline(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_pending=2) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.save(mixed_state(2), 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.aclose)  # e.g. a shutdown handler's task
        assert manager.all_steps() == [1, 2]
        with anyio.fail_after(5):  # the documented way to bound any await
            await manager.aclose()
        # aclose() released the directory: another writer may open it before the block ends.
        assert (await restore_latest(tmp_path))[0] == 2


async def test_aclose_raises_a_write_error_once(tmp_path: Path, storage: FaultyStorage) -> None:
    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    async with CheckpointManager(tmp_path, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.save(mixed_state(2), 2)
        with anyio.fail_after(5), pytest.raises(CheckpointWriteError) as caught:
            await manager.aclose()
        assert_enospc(caught.value)
        await manager.aclose()
    assert manager.latest_step() == 1


async def test_exit_leaves_no_task_and_releases_the_directory(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    before = task_ids()
    async with CheckpointManager(tmp_path, max_pending=2, storage=storage) as manager:
        assert task_ids() > before  # the writer runs
        await manager.save(mixed_state(1), 1)
        await manager.save(mixed_state(2), 2)
        assert manager.statistics().pending == 2  # nothing written yet: exit must drain
    assert task_ids() == before
    listing, calls = sorted(os.listdir(tmp_path)), len(storage.calls)
    await anyio.wait_all_tasks_blocked()
    assert sorted(os.listdir(tmp_path)) == listing
    assert len(storage.calls) == calls  # no storage call after the exit
    assert written_steps(storage) == [1, 2]
    # The directory lock was released: another manager can open it at once.
    step, tree = await restore_latest(tmp_path)
    assert step == 2
    assert_mixed_state(tree, 2)


async def test_body_exception_still_writes_taken_snapshots(tmp_path: Path) -> None:
    boom = KeyError("boom")
    manager = CheckpointManager(tmp_path, max_pending=2)

    async def body() -> None:
        async with manager:
            await manager.save(mixed_state(1), 1)
            await manager.save(mixed_state(2), 2)
            raise boom

    with pytest.raises(KeyError) as caught:
        await body()
    assert caught.value is boom
    assert not getattr(boom, "__notes__", None)
    assert manager.all_steps() == [1, 2]
    assert (await restore_latest(tmp_path))[0] == 2


async def test_zero_grace_abandons_a_stalled_write(tmp_path: Path, storage: FaultyStorage) -> None:
    stall = storage.stall("open", match="model.ckpt-2")
    go = anyio.Event()
    exited: list[str] = []

    async def body() -> None:
        async with CheckpointManager(
            tmp_path, stop_grace_period_secs=0, storage=storage
        ) as manager:
            await manager.save(mixed_state(1), 1)
            await manager.wait()
            await manager.save(mixed_state(2), 2)
            await go.wait()
            raise LookupError("body failed")

    async def owner() -> None:
        with pytest.raises(LookupError, match="body failed"):
            await body()
        exited.append("exit")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            await stall.wait_reached()  # checkpoint 2 is held in a worker thread
            go.set()
            await anyio.wait_all_tasks_blocked()
            assert exited == []  # the exit waits for the worker thread, never abandons it
            stall.release()
    assert exited == ["exit"]
    assert "model.ckpt-2" not in os.listdir(tmp_path)
    assert temp_files(tmp_path) == []
    step, tree = await restore_latest(tmp_path)
    assert step == 1
    assert_mixed_state(tree, 1)
    assert verify_exit(tmp_path) == 0


# -- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_exit", [False, True], ids=["in-the-block", "during-a-normal-exit"])
async def test_owner_cancellation_writes_taken_snapshots_then_propagates(
    tmp_path: Path, storage: FaultyStorage, in_exit: bool
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-1")
    scope = anyio.CancelScope()
    progress: list[str] = []

    async def owner() -> None:
        with scope:
            async with CheckpointManager(tmp_path, max_pending=2, storage=storage) as manager:
                await manager.save(mixed_state(1), 1)
                await manager.save(mixed_state(2), 2)
                progress.append("saved")
                if not in_exit:
                    await anyio.sleep_forever()
            progress.append("after the block")  # must not run: the cancellation propagates
        progress.append("exited")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            await stall.wait_reached()
            await anyio.wait_all_tasks_blocked()
            assert progress == ["saved"]  # in the block, or in the exit waiting for checkpoint 1
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert progress == ["saved"]  # cancelled, but taken snapshots are still written
            stall.release()
    assert progress == ["saved", "exited"]
    assert scope.cancelled_caught
    assert written_steps(storage) == [1, 2]
    assert (await restore_latest(tmp_path))[0] == 2


async def test_cancelled_blocked_save_leaves_nothing_queued(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-1")
    async with CheckpointManager(
        tmp_path, max_pending=1, policy="block", storage=storage
    ) as manager:
        await manager.save(mixed_state(1), 1)
        await stall.wait_reached()
        await manager.save(mixed_state(2), 2)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(manager.save, mixed_state(3), 3)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        assert manager.statistics().pending == 2
        stall.release()
        await manager.wait()
        stats = manager.statistics()
        assert (stats.written, stats.skipped, stats.replaced, stats.pending) == (2, 0, 0, 0)
        assert manager.all_steps() == [1, 2]
    assert written_steps(storage) == [1, 2]


async def test_save_commits_file_then_state_file_then_deletes(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=1, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        await manager.wait()
        first = len(storage.calls)
        await manager.save(mixed_state(2), 2)
        await manager.wait()
    calls = storage.calls[first:]
    assert [op for op, _path in calls] == SAVE_OPS
    assert ".model.ckpt-2" in calls[0][1]
    renames = [os.path.basename(path) for op, path in calls if op == "rename"]
    assert renames[:2] == ["model.ckpt-2", "checkpoint"]
    assert renames[2].startswith(".model.ckpt-1.asyncckpt-tmp-")  # kept as the next save's file


@pytest.mark.parametrize(
    "k", range(len(SAVE_OPS)), ids=[f"{i}-{op}" for i, op in enumerate(SAVE_OPS)]
)
async def test_cancel_at_each_storage_call_leaves_a_restorable_directory(
    tmp_path: Path, storage: FaultyStorage, k: int
) -> None:
    scope = anyio.CancelScope()

    async def owner(*, task_status: TaskStatus[StorageStall]) -> None:
        with scope:
            async with CheckpointManager(
                tmp_path, max_to_keep=1, stop_grace_period_secs=0, storage=storage
            ) as manager:
                await manager.save(mixed_state(1), 1)
                await manager.wait()
                task_status.started(storage.stall(skip=k))  # the k-th call of the next save
                await manager.save(mixed_state(2), 2)
                await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            stall = await tg.start(owner)
            op, _path = await stall.wait_reached()
            assert op == SAVE_OPS[k]
            scope.cancel()
            await anyio.wait_all_tasks_blocked()  # the exit waits on the held worker thread
            stall.release()
    assert scope.cancelled_caught
    assert temp_files(tmp_path) == []
    step, tree = await restore_latest(tmp_path)
    # Until the state file is replaced, checkpoint 1 stays the latest; after, it is 2.
    expected = 1 if k < STATE_FILE_FIRST_CALL else 2
    assert step == expected
    assert_mixed_state(tree, expected)
    assert verify_exit(tmp_path) == 0


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_pending": -1}, ValueError, "max_pending must be >= 0"),
        ({"max_pending": 0, "policy": "replace"}, ValueError, "max_pending=0 lets none wait"),
        ({"on_write_error": "ignore"}, ValueError, "on_write_error must be one of"),
        ({"max_pending": -3}, ValueError, "max_pending must be >= 0"),
        ({"max_pending": True}, TypeError, "max_pending must be an int, not bool"),
        ({"max_pending": 1.5}, TypeError, "max_pending must be an int, not float"),
        ({"policy": "drop"}, ValueError, r"policy must be one of \('block', 'skip', 'replace'\)"),
        ({"stop_grace_period_secs": -1}, ValueError, "stop_grace_period_secs must be >= 0"),
        ({"stop_grace_period_secs": float("nan")}, ValueError, "stop_grace_period_secs"),
        ({"max_to_keep": -1}, ValueError, "max_to_keep must be >= 0"),
        ({"basename": "../escape"}, ValueError, "must stay inside the directory"),
    ],
)
async def test_constructor_validates_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CheckpointManager(tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []  # validation happens before touching the directory


async def test_unsupported_leaf_names_its_path_and_manager_keeps_working(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        bad = mixed_state(1)
        bad["nested"]["handle"] = object()
        with pytest.raises(TypeError, match=r"cannot save object at nested/handle"):
            await manager.save(bad, 1)
        with pytest.raises(TypeError, match="step must be an int"):
            await manager.save(mixed_state(1), "1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"must be in \[0, 2\*\*63\), not -1"):
            await manager.save(mixed_state(1), -1)
        assert manager.statistics().pending == 0
        assert await manager.save(mixed_state(2), 2) is True
        await manager.wait()
        assert manager.all_steps() == [2]
        assert_mixed_state(await manager.restore(), 2)


def test_manager_is_created_outside_an_event_loop(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)  # e.g. built in sync setup code, used later

    async def use() -> list[int]:
        async with manager:
            await manager.save(mixed_state(1), 1)
        return manager.all_steps()

    assert anyio.run(use) == [1]


async def test_latest_filename_names_the_managers_own_state_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, basename="input.ckpt", latest_filename="checkpoint_input")
    assert manager.latest_filename == "checkpoint_input"
    async with manager:
        await manager.save(mixed_state(1), 1)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path, "checkpoint_input") == str(tmp_path / "input.ckpt-1")
    async with CheckpointManager(
        tmp_path, basename="input.ckpt", latest_filename="checkpoint_input"
    ) as reopened:
        assert (reopened.latest_step(), reopened.all_steps()) == (1, [1])
        assert_mixed_state(await reopened.restore(), 1)
    async with CheckpointManager(tmp_path) as model:  # the default state file lists nothing
        assert model.latest_step() is None


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_a_bad_latest_filename_fails_at_construction(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="latest_filename"):
        CheckpointManager(tmp_path, latest_filename=name)


# -- retired checkpoint files ----------------------------------------------------------------------


async def test_a_manager_overwrites_the_checkpoint_file_it_retired(tmp_path: Path) -> None:
    # Reusing the retired file keeps its page-cache pages and disk blocks (docs/DESIGN_NOTES.md).
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await manager.save({"w": np.zeros(100_000)}, 1)
        await manager.wait()
        first_inode = os.stat(tmp_path / "model.ckpt-1").st_ino
        await manager.save({"w": np.ones(100_000)}, 2)
        await manager.wait()
        assert [name.split(".asyncckpt-tmp-")[0] for name in temp_files(tmp_path)] == [
            ".model.ckpt-1"
        ]
        await manager.save({"w": np.full(10, 3.0)}, 3)  # far shorter than the retired file
        await manager.wait()
        assert os.stat(tmp_path / "model.ckpt-3").st_ino == first_inode
        assert manager.all_steps() == [3]
    assert temp_files(tmp_path) == []  # the spare retired by step 3's save went at close
    assert verify_exit(tmp_path) == 0
    step, tree = await restore_latest(tmp_path)
    assert step == 3
    np.testing.assert_array_equal(tree["w"], np.full(10, 3.0))


async def test_a_bare_saver_deletes_what_retention_drops(tmp_path: Path) -> None:
    # Without a manager no lock is held between saves: a kept spare could be anyone's.
    saver = Saver(max_to_keep=1)
    await saver.save({"w": np.zeros(10)}, str(tmp_path / "model.ckpt"), global_step=1)
    await saver.save({"w": np.ones(10)}, str(tmp_path / "model.ckpt"), global_step=2)
    assert sorted(os.listdir(tmp_path)) == [".asyncckpt.lock", "checkpoint", "model.ckpt-2"]


# -- pins and acknowledged outcomes ------------------------------------------------------------


async def test_a_pinned_checkpoint_outlives_retention_until_unpinned(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await manager.save({"w": np.zeros(4)}, 1)
        await manager.wait()
        manager.pin(1)
        manager.pin(1)  # pins are counted
        await manager.save({"w": np.ones(4)}, 2)
        await manager.wait()
        assert manager.all_steps() == [1, 2]  # deferred, still listed, still on disk
        assert checkpoint_files(tmp_path) == ["model.ckpt-1", "model.ckpt-2"]
        manager.unpin(1)
        await manager.save({"w": np.ones(4)}, 3)
        await manager.wait()
        assert manager.all_steps() == [1, 3]
        manager.unpin(1)
        await manager.save({"w": np.ones(4)}, 4)
        await manager.wait()
        assert manager.all_steps() == [4]  # the first save after the last unpin retires it
        assert checkpoint_files(tmp_path) == ["model.ckpt-4"]
        manager.pin(4)
        await manager.save({"w": np.ones(4)}, 5)
        await manager.wait()
        manager.unpin(4)
    # The close retires what was unpinned since the last save.
    assert checkpoint_files(tmp_path) == ["model.ckpt-5"]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-5")
    assert verify_exit(tmp_path) == 0


async def test_pins_still_held_at_close_stay_listed_for_the_next_writer(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await manager.save({"w": np.zeros(4)}, 1)
        await manager.wait()
        manager.pin(1)
        await manager.save({"w": np.ones(4)}, 2)
    assert checkpoint_files(tmp_path) == ["model.ckpt-1", "model.ckpt-2"]
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        assert manager.all_steps() == [1, 2]
        await manager.save({"w": np.ones(4)}, 3)
    assert checkpoint_files(tmp_path) == ["model.ckpt-3"]


async def test_unacknowledged_outcomes_hold_the_writer_and_the_policy_applies(
    tmp_path: Path,
) -> None:
    outcomes: list[SaveOutcome] = []
    async with CheckpointManager(tmp_path, max_to_keep=1, policy="skip") as manager:
        manager.add_done_callback(outcomes.append, acknowledge=True)
        for step in range(1, 4):
            assert await manager.save({"w": np.full(4, step)}, step)
            await until(lambda: len(outcomes) == min(step, 2))  # noqa: B023
        # 1 and 2 await acknowledgement: 3 waits in the queue, 4 finds no room.
        await all_tasks_blocked()
        assert [o.step for o in outcomes] == [1, 2]
        assert manager.statistics().pending == 1
        assert not await manager.save({"w": np.full(4, 4)}, 4)
        assert manager.statistics().skipped == 1
        # Retention waits for them: both listed and on disk despite max_to_keep=1.
        assert manager.all_steps() == [1, 2]
        manager.acknowledge(outcomes[0])
        await until(lambda: len(outcomes) == 3)
        assert manager.all_steps() == [2, 3]
        manager.acknowledge(outcomes[0])  # twice is a no-op
        assert manager.all_steps() == [2, 3]
    # The close writes every taken snapshot whatever is acknowledged; the pins of 2 and 3
    # were never released, so they stay listed for the next writer.
    assert [o.step for o in outcomes] == [1, 2, 3]
    assert all(o.written for o in outcomes)
    assert checkpoint_files(tmp_path) == ["model.ckpt-2", "model.ckpt-3"]


async def test_announce_reports_a_kept_checkpoint_again(tmp_path: Path) -> None:
    outcomes: list[SaveOutcome] = []
    async with CheckpointManager(tmp_path) as manager:
        manager.add_done_callback(outcomes.append, acknowledge=True)
        with pytest.raises(ValueError, match="only one done callback"):
            manager.add_done_callback(outcomes.append, acknowledge=True)
        with pytest.raises(CheckpointNotFoundError, match=r"step 7 is not among the kept"):
            manager.announce(7)
        await manager.save({"w": np.zeros(4)}, 7)
        await manager.wait()
        manager.announce(7)
        assert [(o.step, o.written, o.path) for o in outcomes] == [
            (7, True, str(tmp_path / "model.ckpt-7"))
        ] * 2
        for outcome in outcomes:
            manager.acknowledge(outcome)


async def test_a_failed_first_save_says_there_is_no_checkpoint_to_fall_back_on(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-1")
    async with CheckpointManager(tmp_path, storage=storage) as manager:
        await manager.save(mixed_state(1), 1)
        with pytest.raises(CheckpointWriteError) as first:
            await manager.wait()
        await manager.save(mixed_state(2), 2)
        storage.fail("fsync", errno.ENOSPC, match="model.ckpt-3")
        await manager.save(mixed_state(3), 3)
        with pytest.raises(CheckpointWriteError) as later:
            await manager.wait()
    assert "no earlier checkpoint exists here to restore" in str(first.value)
    assert "still the latest" not in str(first.value)
    assert "the previous checkpoint is still the latest (model.ckpt-2)" in str(later.value)


async def test_metadata_describes_a_checkpoint_without_reading_its_arrays(
    tmp_path: Path,
) -> None:
    state = {"w": np.zeros((3, 4), np.float32), "nested": {"b": np.arange(5)}, "step": 7}
    async with CheckpointManager(tmp_path) as manager:
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint has been saved"):
            await manager.metadata()
        await manager.save(state, 7, metadata={"lr": 0.1, "note": "warm"})
        await manager.wait()
        await manager.save(state, 9)
        await manager.wait()
        # Array data damaged: a restore fails, the header (its own checksum) still reads.
        data = bytearray((tmp_path / "model.ckpt-7").read_bytes())
        data[-1] ^= 0xFF
        (tmp_path / "model.ckpt-7").write_bytes(bytes(data))
        meta = await manager.metadata(step=7)
        latest = await manager.metadata()
        with pytest.raises(CheckpointCorruptedError):
            await manager.restore(step=7)
    assert (meta.step, meta.metadata, meta.path) == (
        7,
        {"lr": 0.1, "note": "warm"},
        str(tmp_path / "model.ckpt-7"),
    )
    assert meta.size == file_size(tmp_path / "model.ckpt-7")
    assert [(a.path, a.dtype, a.shape) for a in meta.arrays] == [
        ("w", "float32", (3, 4)),
        ("nested/b", str(np.arange(5).dtype), (5,)),
    ]
    assert meta.arrays[0].nbytes == 48
    assert latest.step == 9
    assert latest.metadata == {}
    saver_meta = await Saver().metadata(tmp_path / "model.ckpt-7")
    assert saver_meta == meta
