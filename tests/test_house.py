"""What the house promises every layer: one background-writer lifecycle that closes inside any
cancel scope, errors that keep their cause at every public boundary, no storage call on the
event loop's thread, and no thread that outlives its owner."""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from support import make_state, step_fn

from asyncckpt import (
    CheckpointManager,
    CheckpointSaverHook,
    CheckpointWriteError,
    MonitoredTrainingSession,
    Saver,
    StopAtStepHook,
    SummaryWriter,
    stop_on_signals,
)
from asyncckpt._core._util import usable_cores
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

pytestmark = pytest.mark.anyio


# -- one lifecycle: aclose() inside the caller's own cancel scopes -------------------------


async def test_manager_aclose_inside_fail_after(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(make_state(), 1)
        with anyio.fail_after(5):
            await manager.aclose()
        assert manager.latest_step() == 1
    async with CheckpointManager(tmp_path) as again:  # the lock was released
        assert again.all_steps() == [1]


async def test_summary_writer_aclose_inside_fail_after_and_move_on_after(tmp_path: Path) -> None:
    async with SummaryWriter(tmp_path / "a") as writer:
        await writer.add_scalar("loss", 1.0, step=1)
        with anyio.fail_after(5):
            await writer.aclose()
        with anyio.move_on_after(5):
            await writer.aclose()  # idempotent
    async with SummaryWriter(tmp_path / "b") as writer:
        await writer.add_scalar("loss", 1.0, step=1)
        with anyio.move_on_after(5):
            await writer.close()
    for logdir in ("a", "b"):
        (event_file,) = (tmp_path / logdir).iterdir()
        assert b"loss" in event_file.read_bytes()


@pytest.mark.parametrize("kind", ["manager", "summary"])
async def test_a_writer_is_entered_once(tmp_path: Path, kind: str) -> None:
    owner: CheckpointManager | SummaryWriter = (
        CheckpointManager(tmp_path) if kind == "manager" else SummaryWriter(tmp_path)
    )
    async with owner:
        with pytest.raises(RuntimeError, match="entered only once"):
            await owner.__aenter__()


@pytest.mark.slow
async def test_a_cancelled_manager_enter_never_hangs_nor_keeps_the_lock(tmp_path: Path) -> None:
    # Cancellations landing anywhere in __aenter__ (the lock in a worker thread, the
    # writer's start) must neither hang the exit nor leak the lock.
    for attempt in range(40):
        with anyio.fail_after(5), anyio.move_on_after(attempt * 0.0001):
            async with CheckpointManager(tmp_path):
                pass
    with anyio.fail_after(5):
        async with CheckpointManager(tmp_path) as manager:
            await manager.save(make_state(), 1)


# -- errors keep their cause at every public boundary --------------------------------------


def _failing_fsync(faults: FaultyStorage) -> None:
    faults.fail("fsync", errno.ENOSPC, match="model.ckpt-1", times=None)


def _assert_caused_by_enospc(error: BaseException) -> None:
    assert isinstance(error, CheckpointWriteError)
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.ENOSPC


async def _raised(call: Callable[[], Awaitable[Any]]) -> BaseException:
    with anyio.fail_after(5), pytest.raises(CheckpointWriteError) as caught:
        await call()
    return caught.value


async def test_saver_save_keeps_the_cause(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        _failing_fsync(faults)
        saver = Saver(storage=faults)
        error = await _raised(lambda: saver.save(make_state(), tmp_path / "model.ckpt", 1))
    _assert_caused_by_enospc(error)


async def test_manager_wait_and_exit_keep_the_cause(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        _failing_fsync(faults)

        async def wait() -> None:
            async with CheckpointManager(tmp_path, storage=faults) as manager:
                await manager.save(make_state(), 1)
                await manager.wait()

        async def leave() -> None:
            async with CheckpointManager(tmp_path, storage=faults) as manager:
                await manager.save(make_state(), 1)

        _assert_caused_by_enospc(await _raised(wait))
        _assert_caused_by_enospc(await _raised(leave))


async def test_a_session_keeps_the_cause(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        faults.fail("fsync", errno.ENOSPC, match="model.ckpt-0", times=None)

        async def train() -> None:
            async with MonitoredTrainingSession(
                make_state(),
                step_fn,
                checkpoint_dir=tmp_path,
                save_checkpoint_steps=1,
                save_summaries_steps=None,
                log_step_count_steps=None,
                hooks=[StopAtStepHook(last_step=3)],
                storage=faults,
            ) as sess:
                while not sess.should_stop():
                    await sess.run()

        error = await _raised(train)
    assert isinstance(error.__cause__, OSError)
    assert error.__cause__.errno == errno.ENOSPC


async def test_stop_on_signals_keeps_the_cause(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        _failing_fsync(faults)

        async def save_under_signals() -> None:
            async with (
                CheckpointManager(tmp_path, storage=faults) as manager,
                stop_on_signals(_NothingToStop()),
            ):
                await manager.save(make_state(), 1)
                await manager.wait()

        _assert_caused_by_enospc(await _raised(save_under_signals))


class _NothingToStop:
    def request_stop(self) -> None:
        """A signal would stop nothing here: only the block's error is under test."""


# -- no storage call on the event loop's thread --------------------------------------------


async def test_no_storage_call_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    state = {"w": np.arange(8.0), "step": 0}
    with FaultyStorage() as faults:
        saver = Saver(max_to_keep=1, storage=faults)
        for step in (1, 2):
            await saver.save(state, tmp_path / "saver" / "model.ckpt", step)
        await saver.restore(tmp_path / "saver" / "model.ckpt-2")
        async with CheckpointManager(tmp_path / "manager", max_to_keep=1, storage=faults) as m:
            for step in (1, 2, 3):
                await m.save(state, step)
            await m.restore(into=state)
        async with SummaryWriter(tmp_path / "logs", storage=faults) as writer:
            await writer.add_scalar("loss", 0.5, step=1)
            await writer.flush()
        for _ in range(2):  # the second run restores
            async with MonitoredTrainingSession(
                make_state(),
                step_fn,
                checkpoint_dir=tmp_path / "session",
                save_checkpoint_steps=2,
                save_summaries_steps=1,
                hooks=[StopAtStepHook(num_steps=4)],
                storage=faults,
            ) as sess:
                while not sess.should_stop():
                    await sess.run()
    ops = {op for op, _path in faults.calls}
    assert {"open", "write", "fsync", "rename", "fsync_dir", "read", "unlink"} <= ops
    assert faults.calls_on_event_loop == []


# -- no thread outlives its owner ----------------------------------------------------------


@pytest.mark.slow
async def test_the_copy_threads_stop_with_their_manager(tmp_path: Path) -> None:
    large = {"w": np.ones(32 * 1024 * 1024 // 8)}  # above the parallel-copy threshold

    def copy_threads() -> int:
        return sum(t.name.startswith("asyncckpt-copy") for t in threading.enumerate())

    before = copy_threads()
    async with CheckpointManager(tmp_path) as manager:
        await manager.save(large, 1)
        await manager.wait()
        if usable_cores() > 1:
            assert copy_threads() > before  # the large copy used them
    assert copy_threads() == before


async def test_a_hook_given_a_saver_uses_its_storage(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        hook = CheckpointSaverHook(tmp_path, save_steps=1, saver=Saver(storage=faults))
        async with MonitoredTrainingSession(
            make_state(),
            step_fn,
            hooks=[hook, StopAtStepHook(last_step=1)],
            save_summaries_steps=None,
            log_step_count_steps=None,
        ) as sess:
            while not sess.should_stop():
                await sess.run()
    assert any(path.endswith("model.ckpt-1") for op, path in faults.calls if op == "rename")
