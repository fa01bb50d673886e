"""CheckpointManager in a service: buffers made off the loop, state + one snapshot, a label
that matches the contents, write errors that keep the service alive, timings, read-only
readers beside a writer."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from support import all_tasks_blocked, checkpoint_files

from asyncckpt import CheckpointManager, CheckpointNotFoundError, CheckpointWriteError
from asyncckpt._checkpoint._snapshot import SnapshotPool, make_buffers
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def service_state() -> dict[str, Any]:
    return {
        "version": 0,
        "table": np.zeros((64, 1024), np.float32),  # 256 KiB
        "counters": [np.zeros(8, np.int64) for _ in range(10)],
    }


def state_bytes(state: dict[str, Any]) -> int:
    return int(state["table"].nbytes + sum(c.nbytes for c in state["counters"]))


def apply_update(state: dict[str, Any]) -> None:
    """One request's change: every array moves with the version, so a torn or mislabelled
    snapshot shows."""
    state["version"] += 1
    state["table"] += 1
    for counter in state["counters"]:
        counter += 1


def assert_consistent(tree: Any, step: int) -> None:
    assert tree["version"] == step
    np.testing.assert_array_equal(tree["table"], np.full((64, 1024), step, np.float32))
    for counter in tree["counters"]:
        np.testing.assert_array_equal(counter, np.full(8, step, np.int64))


async def updating(state: dict[str, Any], stop: anyio.Event) -> None:
    """A request handler that keeps changing the state, yielding between updates."""
    while not stop.is_set():
        apply_update(state)
        await anyio.lowlevel.checkpoint()


# -- buffers made off the loop ---------------------------------------------------------------


@pytest.mark.parametrize("max_pending", [0, 1, 2])
async def test_reserve_makes_every_buffer_set_so_saves_allocate_nothing(
    tmp_path: Path, max_pending: int
) -> None:
    state = service_state()
    async with CheckpointManager(tmp_path, max_pending=max_pending) as manager:
        await manager.reserve(state)
        reserved = manager.statistics()
        assert reserved.bytes_allocated == (max_pending + 1) * state_bytes(state)
        await manager.reserve(state)  # warm already: nothing more
        assert manager.statistics().bytes_allocated == reserved.bytes_allocated
        for _ in range(5):
            apply_update(state)
            assert await manager.save(state, lambda: state["version"])
        await manager.wait()
        stats = manager.statistics()
        restored = await manager.restore()
    assert stats.bytes_allocated == reserved.bytes_allocated
    assert stats.written == 5
    assert_consistent(restored, 5)


async def test_a_callable_step_makes_missing_buffers_while_the_loop_serves(
    tmp_path: Path,
) -> None:
    # No reserve: the first save finds no buffers. They are made in a worker thread while
    # other tasks run (the "handler" below keeps updating), and the snapshot is labelled at
    # the instant it is taken: contents and step agree whatever ran meanwhile.
    state = service_state()
    stop = anyio.Event()
    async with CheckpointManager(tmp_path, max_pending=0) as manager:
        async with anyio.create_task_group() as tg:
            tg.start_soon(updating, state, stop)
            await anyio.lowlevel.checkpoint()
            version_at_call = state["version"]
            assert await manager.save(state, lambda: state["version"])
            version_after = state["version"]
            stop.set()
        await manager.wait()
        (step,) = manager.all_steps()
        restored = await manager.restore()
        stats = manager.statistics()
    assert version_after > version_at_call  # the loop served while the buffers were made
    assert version_at_call < step <= version_after
    assert_consistent(restored, step)
    assert stats.bytes_allocated == state_bytes(state)


def test_buffers_made_while_a_set_came_back_are_kept_beside_it() -> None:
    # A save with a callable step found no free set (one is being written) and made its
    # buffers in a thread; the write finished meanwhile and gave its warm set back. Both
    # sets stay: merging would drop the warm one and cost a fresh set every such save.
    pool = SnapshotPool(max_free_sets=3)
    tree = {"a": np.ones(1000), "b": [np.zeros(10)]}
    writing = pool.take(tree)
    missing: list[Any] = []
    assert pool.take_warm(tree, missing) is None
    assert len(missing) == 2
    assert pool.free_sets == 0  # the attempt left no empty set behind to be taken next
    writing.release()
    made = make_buffers(missing)
    pool.count_made(made)
    pool.stock(made)
    assert pool.free_sets == 2
    first, second = pool.take_warm(tree, []), pool.take_warm(tree, [])
    assert first is not None
    assert second is not None
    assert pool.buffers_allocated == 4  # two sets of two: nothing dropped, nothing remade


async def test_an_int_step_is_the_state_at_the_call_even_when_the_save_waits(
    tmp_path: Path,
) -> None:
    # Under "block" with the queue full, an int step snapshots at the call and waits with
    # it: other tasks change the state meanwhile, and the checkpoint holds the called state.
    state = service_state()
    stop = anyio.Event()
    with FaultyStorage() as faults:
        stall = faults.stall("fsync", match="model.ckpt-1")
        async with CheckpointManager(tmp_path, max_pending=0, storage=faults) as manager:
            apply_update(state)
            await manager.save(state, 1)
            await stall.wait_reached()  # 1 is being written: the queue is full
            apply_update(state)
            async with anyio.create_task_group() as tg:
                tg.start_soon(updating, state, stop)

                async def release_soon() -> None:
                    await anyio.sleep(0.05)
                    stall.release()

                tg.start_soon(release_soon)
                assert await manager.save(state, 2)  # state at the call: version 2
                stop.set()
            assert state["version"] > 2
            await manager.wait()
            restored = await manager.restore(step=2)
    assert_consistent(restored, 2)


async def test_a_callable_step_under_block_waits_for_room_then_labels_the_snapshot(
    tmp_path: Path,
) -> None:
    # max_pending=0 with a callable: nothing is taken while the write runs (one snapshot
    # in memory at most), then the snapshot and its label come from the same instant.
    state = service_state()
    with FaultyStorage() as faults:
        stall = faults.stall("fsync", match="model.ckpt-1")
        async with CheckpointManager(tmp_path, max_pending=0, storage=faults) as manager:
            await manager.reserve(state)
            apply_update(state)
            await manager.save(state, lambda: state["version"])
            await stall.wait_reached()
            async with anyio.create_task_group() as tg:
                saved = anyio.Event()

                async def save_second() -> None:
                    await manager.save(state, lambda: state["version"])
                    saved.set()

                tg.start_soon(save_second)
                await all_tasks_blocked()
                assert not saved.is_set()
                for _ in range(3):  # the service goes on while the save waits
                    apply_update(state)
                stall.release()
            await manager.wait()
            stats = manager.statistics()
            assert manager.all_steps() == [1, 4]
            restored = await manager.restore()
    assert_consistent(restored, 4)
    assert stats.bytes_allocated == state_bytes(state)  # one snapshot, ever


async def test_max_pending_zero_skips_while_a_write_runs(tmp_path: Path) -> None:
    state = service_state()
    with FaultyStorage() as faults:
        stall = faults.stall("fsync", match="model.ckpt-1")
        async with CheckpointManager(
            tmp_path, max_pending=0, policy="skip", storage=faults
        ) as manager:
            assert await manager.save(state, 1)
            await stall.wait_reached()
            assert not await manager.save(state, lambda: 2)
            assert not await manager.save(state, 3)
            assert manager.statistics().skipped == 2
            stall.release()
            await manager.wait()
            assert await manager.save(state, 4)
        assert manager.all_steps() == [1, 4]


async def test_a_step_callable_that_returns_no_int_is_refused(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="global_step must be an int, not str"):
            await manager.save(service_state(), lambda: "7")  # type: ignore[arg-type,return-value]
        assert manager.statistics().pending == 0


# -- write errors, logging, timings -----------------------------------------------------------


async def test_on_write_error_log_keeps_saving_and_logs_each_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = service_state()
    caplog.set_level(logging.INFO, logger="asyncckpt")
    with FaultyStorage() as faults:
        async with CheckpointManager(tmp_path, on_write_error="log", storage=faults) as manager:
            apply_update(state)
            await manager.save(state, 1)
            await manager.wait()
            faults.fail("write", errno.ENOSPC, match="model.ckpt-2")
            apply_update(state)
            assert await manager.save(state, 2)
            await manager.wait()  # logged, not raised
            failed = manager.statistics()
            assert manager.latest_step() == 1
            apply_update(state)
            assert await manager.save(state, 3)  # the service goes on saving
            await manager.wait()
            stats = manager.statistics()
    assert (failed.failed, failed.written) == (1, 1)
    assert isinstance(failed.last_error, CheckpointWriteError)
    assert (stats.failed, stats.written, stats.latest_step) == (1, 2, 3)
    assert checkpoint_files(tmp_path) == ["model.ckpt-1", "model.ckpt-3"]
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "asyncckpt"]
    messages = [message for _level, message in records]
    assert any(m.startswith("saving checkpoint for step 2 into ") for m in messages)
    errors = [m for level, m in records if level == "ERROR"]
    assert len(errors) == 1
    assert "model.ckpt-2" in errors[0]
    assert "the previous checkpoint is still the latest (model.ckpt-1)" in errors[0]
    durable = [m for m in messages if " is durable (" in m]
    assert [os.path.basename(m.split()[1]) for m in durable] == ["model.ckpt-1", "model.ckpt-3"]


async def test_on_write_error_raise_logs_a_warning_and_raises_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultyStorage() as faults:
        async with CheckpointManager(tmp_path, storage=faults) as manager:
            faults.fail("fsync", errno.EIO, match="model.ckpt-1")
            await manager.save(service_state(), 1)
            with pytest.raises(CheckpointWriteError, match=r"model\.ckpt-1") as raised:
                await manager.wait()
            await manager.wait()  # raised once
    assert isinstance(raised.value.__cause__, OSError)
    warnings = [r for r in caplog.records if r.name == "asyncckpt" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "raised by the next save(), wait() or close" in warnings[0].getMessage()


async def test_statistics_time_the_stall_and_the_write(tmp_path: Path) -> None:
    state = service_state()
    async with CheckpointManager(tmp_path) as manager:
        fresh = manager.statistics()
        assert (fresh.last_stall_secs, fresh.last_write_secs) == (None, None)
        assert (fresh.max_stall_secs, fresh.latest_durable_time) == (0.0, None)
        before = time.time()
        await manager.save(state, 1)
        saved = manager.statistics()
        await manager.wait()
        after = time.time()
        stats = manager.statistics()
    assert saved.last_stall_secs is not None
    assert 0 < saved.last_stall_secs <= saved.max_stall_secs
    assert stats.last_write_secs is not None
    assert 0 < stats.last_write_secs < after - before + 1e-3
    assert stats.latest_durable_time is not None
    assert before <= stats.latest_durable_time <= after


# -- read-only managers -----------------------------------------------------------------------


async def test_a_read_only_manager_sees_what_a_writer_saves(tmp_path: Path) -> None:
    state = service_state()
    async with (
        CheckpointManager(tmp_path, max_to_keep=2) as writer,
        CheckpointManager(tmp_path, read_only=True) as reader,
    ):
        assert reader.latest_step() is None
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint has been saved"):
            await reader.restore()
        for step in (1, 2, 3):
            apply_update(state)
            await writer.save(state, step)
            await writer.wait()
            assert_consistent(await reader.restore(), step)  # the latest, read afresh
            assert reader.latest_step() == step
        assert (await reader.metadata()).step == 3
        with pytest.raises(RuntimeError, match="read-only"):
            await reader.save(state, 4)
        with pytest.raises(RuntimeError, match="read-only"):
            await reader.reserve(state)
        apply_update(state)
        await writer.save(state, 4)
        await writer.wait()
        assert reader.all_steps() == [2, 3]  # seen once read again
        await reader.reload()
        assert reader.all_steps() == [3, 4]
        assert_consistent(await reader.restore(step=3), 3)


async def test_a_read_only_manager_takes_no_lock_and_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    async with CheckpointManager(missing, read_only=True) as reader:
        assert reader.latest_step() is None
        # A writer can open the directory while the reader holds it open.
        async with CheckpointManager(missing) as writer:
            await writer.save(service_state(), 1)
        await reader.reload()
        assert reader.latest_step() == 1
    assert sorted(os.listdir(missing)) == [".asyncckpt.lock", "checkpoint", "model.ckpt-1"]


@contextlib.contextmanager
def read_only_mount(directory: Path) -> Iterator[None]:
    """A tmpfs at ``directory``, remounted read-only while the block runs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(directory)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], timeout=30, check=False)


def remount(directory: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], timeout=30, check=True)


async def test_a_read_only_manager_restores_from_a_read_only_file_system(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ro"
    state = service_state()
    apply_update(state)
    with read_only_mount(directory):
        async with CheckpointManager(directory) as writer:
            await writer.save(state, 1)
        remount(directory, "ro")
        with pytest.raises(CheckpointWriteError, match="read-only"):
            async with CheckpointManager(directory):
                pass
        async with CheckpointManager(directory, read_only=True) as reader:
            assert_consistent(await reader.restore(), 1)
            assert_consistent(await reader.restore(mmap=True), 1)


async def test_a_read_only_manager_in_another_process_follows_the_writer(
    tmp_path: Path,
) -> None:
    # An evaluator beside a trainer: a separate process opens the directory read-only,
    # waits for step 3 and reports what it restored.
    state = service_state()
    async with await anyio.open_process(
        [sys.executable, "-c", _EVALUATOR, str(tmp_path)]
    ) as reader:
        async with CheckpointManager(tmp_path, max_to_keep=1) as writer:
            for step in (1, 2, 3):
                apply_update(state)
                await writer.save(state, step)
                await writer.wait()
                await anyio.sleep(0.05)
        with anyio.fail_after(60):
            assert reader.stdout is not None
            out = b"".join([chunk async for chunk in reader.stdout]).decode()
            assert await reader.wait() == 0
    assert out.split() == ["3", "3", "3.0"]


_EVALUATOR = """
import sys, time
import anyio
import asyncckpt

async def main(directory):
    async with asyncckpt.CheckpointManager(directory, read_only=True) as reader:
        deadline = time.monotonic() + 30
        while reader.latest_step() != 3:
            if time.monotonic() > deadline:
                raise SystemExit(f"never saw step 3: {reader.all_steps()}")
            await anyio.sleep(0.01)
            await reader.reload()
        tree = await reader.restore()
        print(reader.latest_step(), tree["version"], float(tree["table"].mean()))

anyio.run(main, sys.argv[1])
"""


async def test_several_read_only_managers_share_a_directory_with_its_writer(
    tmp_path: Path,
) -> None:
    state = service_state()
    async with CheckpointManager(tmp_path) as writer:
        apply_update(state)
        await writer.save(state, 1)
        await writer.wait()
        async with (
            CheckpointManager(tmp_path, read_only=True) as first,
            CheckpointManager(tmp_path, read_only=True) as second,
        ):
            assert first.latest_step() == second.latest_step() == 1
            assert_consistent(await first.restore(mmap=True), 1)
            assert_consistent(await second.restore(), 1)
