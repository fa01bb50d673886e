"""Sharded checkpoints of several ranks, in one process: every rank a CheckpointManager with a
StorageCoordinator over the same directory, as separate processes would have (the ranks of
a real job, spawned, are in tests/test_distributed_processes.py).

Each test checks what every rank sees: which saves are committed, which errors name which
ranks, what each rank restores, and what the directory holds."""

from __future__ import annotations

import errno
import io
import os
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import asyncckpt
from asyncckpt import (
    CheckpointManager,
    CheckpointWriteError,
    Saver,
    StorageCoordinator,
    cli,
)
from asyncckpt._storage._object import ObjectStorage
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable
    from pathlib import Path

pytestmark = pytest.mark.anyio


def rank_state(rank: int, step: int) -> dict[str, Any]:
    """What rank ``rank`` holds at ``step``: a model every rank holds alike, and its own
    optimizer shard."""
    return {
        "model": {"w": np.full(8, float(step))},
        "opt": {"m": np.full(4, step * 10.0 + rank), "rank": rank},
    }


async def run_ranks(world_size: int, rank_main: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run ``rank_main(rank)`` for every rank at once; return their results by rank."""
    results: list[Any] = [None] * world_size

    async def one(rank: int) -> None:
        results[rank] = await rank_main(rank)

    async with anyio.create_task_group() as group:
        for rank in range(world_size):
            group.start_soon(one, rank)
    return results


def manager(
    directory: Path, rank: int, world_size: int, timeout: float = 10.0, **kwargs: Any
) -> CheckpointManager:
    return CheckpointManager(
        directory,
        coordinator=StorageCoordinator(rank, world_size, timeout=timeout),
        replicated=["model"],
        **kwargs,
    )


def data_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("model.ckpt"))


@pytest.mark.parametrize("world_size", [2, 4])
async def test_every_rank_saves_its_shard_and_restores_it(tmp_path: Path, world_size: int) -> None:
    async def save(rank: int) -> list[int]:
        async with manager(tmp_path, rank, world_size, max_to_keep=2) as ckpt:
            for step in (10, 20, 30):
                await ckpt.save(rank_state(rank, step), step)
            await ckpt.wait()
            return ckpt.all_steps() if rank == 0 else [ckpt.statistics().written]

    saved = await run_ranks(world_size, save)
    assert saved[0] == [20, 30]
    assert saved[1:] == [[3]] * (world_size - 1)
    # Retention took step 10's manifest and every one of its shards.
    names = data_files(tmp_path)
    assert [n for n in names if "." not in n.removeprefix("model.ckpt")] == [
        "model.ckpt-20",
        "model.ckpt-30",
    ]
    for step in (20, 30):
        shards = [n for n in names if n.startswith(f"model.ckpt-{step}.rank")]
        assert sorted(s.split(".")[2] for s in shards) == [
            f"rank{r}-of-{world_size}" for r in range(world_size)
        ]
    assert not any(n.startswith("model.ckpt-10") for n in names)

    async def restore(rank: int) -> Any:
        async with manager(tmp_path, rank, world_size) as ckpt:
            assert ckpt.latest_step() == 30
            into = rank_state(rank, 0)
            restored = await ckpt.restore(into=into)
            older = await ckpt.restore(20)
            return restored, into, older

    for rank, (restored, into, older) in enumerate(await run_ranks(world_size, restore)):
        np.testing.assert_array_equal(restored["model"]["w"], np.full(8, 30.0))
        np.testing.assert_array_equal(restored["opt"]["m"], np.full(4, 300.0 + rank))
        assert restored["opt"]["rank"] == rank
        assert into["opt"]["m"] is restored["opt"]["m"]  # filled in place
        assert into["model"]["w"] is restored["model"]["w"]
        np.testing.assert_array_equal(older["opt"]["m"], np.full(4, 200.0 + rank))
        np.testing.assert_array_equal(older["model"]["w"], np.full(8, 20.0))


async def test_replicated_paths_are_written_by_rank_zero_alone(tmp_path: Path) -> None:
    async def save(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 5), 5)

    await run_ranks(2, save)
    shards = {n.split(".")[2]: n for n in data_files(tmp_path) if ".rank" in n}
    paths = {}
    for rank_name, name in shards.items():
        metadata = await Saver().metadata(tmp_path / name)
        paths[rank_name] = sorted(a.path for a in metadata.arrays)
    assert paths == {"rank0-of-2": ["model/w", "opt/m"], "rank1-of-2": ["opt/m"]}


async def test_a_rank_whose_write_fails_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    faults = FaultyStorage()
    faults.fail("write", errno.ENOSPC, match="model.ckpt-2.rank1")

    async def rank_main(rank: int) -> tuple[list[str], int | None]:
        storage = faults if rank == 1 else None
        errors = []
        async with manager(tmp_path, rank, 2, storage=storage) as ckpt:
            await ckpt.save(rank_state(rank, 1), 1)
            await ckpt.save(rank_state(rank, 2), 2)
            with pytest.raises(CheckpointWriteError) as raised:
                await ckpt.wait()
            errors.append(str(raised.value))
            await ckpt.save(rank_state(rank, 3), 3)  # and saving goes on
            await ckpt.wait()
            return errors, ckpt.latest_step()

    with faults:
        (chief_errors, chief_latest), (other_errors, other_latest) = await run_ranks(2, rank_main)
    assert "step 2 was not committed: rank 1 failed" in chief_errors[0]
    assert "No space left on device" in chief_errors[0]
    assert "model.ckpt-1" in chief_errors[0]  # the previous checkpoint is still the latest
    assert "No space left on device" in other_errors[0]
    assert chief_latest == other_latest == 3
    # Step 2 left nothing behind: the chief discarded the shard that rank 0 wrote.
    assert not any(n.startswith("model.ckpt-2") for n in data_files(tmp_path))
    state = asyncckpt.get_checkpoint_state(tmp_path)
    assert state is not None
    assert list(state.names) == [
        "model.ckpt-1",
        "model.ckpt-3",
    ]


async def test_mismatched_steps_are_named_and_nothing_is_committed(tmp_path: Path) -> None:
    async def rank_main(rank: int) -> str:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 7 + rank), 7 + rank)
            with pytest.raises(CheckpointWriteError) as raised:
                await ckpt.wait()
            return str(raised.value)

    chief, other = await run_ranks(2, rank_main)
    # Judged from both reports (a wait for the timeout would say "reported no shard").
    assert "rank 1 saved step 8 where rank 0 saved 7" in chief
    assert "rank 0 saved step 7 where rank 1 saved 8" in other
    assert asyncckpt.latest_checkpoint(tmp_path) is None
    assert not data_files(tmp_path)


async def test_a_missing_rank_is_named_within_the_timeout(tmp_path: Path) -> None:
    async def chief_alone(rank: int) -> str | None:
        if rank == 2:
            return None  # never saves
        async with manager(tmp_path, rank, 3, timeout=0.5) as ckpt:
            await ckpt.save(rank_state(rank, 1), 1)
            with pytest.raises(CheckpointWriteError) as raised:
                await ckpt.wait()
            return str(raised.value)

    chief, other, _absent = await run_ranks(3, chief_alone)
    for error in (chief, other):
        assert error is not None
        assert "rank 2 reported no shard within 0.5 s" in error
    assert asyncckpt.latest_checkpoint(tmp_path) is None


async def test_a_rank_without_its_chief_names_rank_zero(tmp_path: Path) -> None:
    async with manager(tmp_path, 0, 2, timeout=0.3):
        pass  # rank 0 opened the directory once, then went away
    async with manager(tmp_path, 1, 2, timeout=0.3) as ckpt:
        await ckpt.save(rank_state(1, 1), 1)
        with pytest.raises(CheckpointWriteError, match=r"rank 0 gave no verdict within 0\.3 s"):
            await ckpt.wait()


async def test_a_crashed_runs_report_is_never_taken_for_this_runs(tmp_path: Path) -> None:
    # Run 1: rank 1 saves step 1 and reports it; rank 0 dies before its save.
    async def first_run(rank: int) -> None:
        if rank == 0:
            async with manager(tmp_path, 0, 2, timeout=0.3):
                await anyio.sleep(0.5)  # rank 1 reports meanwhile; then rank 0 is gone
            return
        await anyio.sleep(0.1)
        async with manager(tmp_path, 1, 2, timeout=0.3) as ckpt:
            await ckpt.save(rank_state(1, 1), 1)
            with pytest.raises(CheckpointWriteError):
                await ckpt.wait()

    await run_ranks(2, first_run)
    # Run 2: rank 0 saves step 1 while rank 1 does not come back: rank 1's report of run 1
    # must not complete this save.
    async with manager(tmp_path, 0, 2, timeout=0.3) as ckpt:
        await ckpt.save(rank_state(0, 1), 1)
        with pytest.raises(CheckpointWriteError, match="rank 1 reported no shard"):
            await ckpt.wait()
    assert asyncckpt.latest_checkpoint(tmp_path) is None


async def test_another_world_size_restores_only_the_replicated_paths(tmp_path: Path) -> None:
    async def save(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 4), 4)

    await run_ranks(2, save)

    async def restore(rank: int) -> Any:
        async with manager(tmp_path, rank, 3) as ckpt:
            with pytest.raises(ValueError, match=r"saved by 2 rank.*this job has 3") as raised:
                await ckpt.restore(into=rank_state(rank, 0))
            assert "restore(paths=['model'])" in str(raised.value)
            return await ckpt.restore(paths=["model"])

    for restored in await run_ranks(3, restore):
        assert list(restored) == ["model"]
        np.testing.assert_array_equal(restored["model"]["w"], np.full(8, 4.0))


async def test_paths_restore_reads_each_part_from_its_shard(tmp_path: Path) -> None:
    async def save(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 6), 6)

    await run_ranks(2, save)
    async with manager(tmp_path, 1, 2) as ckpt:
        only_opt = await ckpt.restore(paths=["opt/m"])
        only_model = await ckpt.restore(paths=["model/w"])
        metadata = await ckpt.metadata()
    np.testing.assert_array_equal(only_opt["opt"]["m"], np.full(4, 61.0))
    assert list(only_opt) == ["opt"]
    np.testing.assert_array_equal(only_model["model"]["w"], np.full(8, 6.0))
    assert metadata.step == 6
    assert [a.path for a in metadata.arrays] == ["opt/m"]  # rank 1's own shard


async def test_a_sharded_checkpoint_is_not_read_as_an_empty_one(tmp_path: Path) -> None:
    async def save(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 3), 3)

    await run_ranks(2, save)
    with pytest.raises(ValueError, match="sharded over 2 ranks") as raised:
        await Saver().restore(tmp_path / "model.ckpt-3")
    assert "model.ckpt-3.rank0-of-2." in str(raised.value)
    async with CheckpointManager(tmp_path) as plain:
        with pytest.raises(ValueError, match="coordinator="):
            await plain.restore()


def test_arguments_that_cannot_work_with_a_coordinator_are_refused(tmp_path: Path) -> None:
    coordinator = StorageCoordinator(0, 2)
    with pytest.raises(ValueError, match='policy="block"'):
        CheckpointManager(tmp_path, policy="skip", coordinator=coordinator)
    with pytest.raises(ValueError, match='on_corrupt="raise"'):
        CheckpointManager(tmp_path, on_corrupt="fallback", coordinator=coordinator)
    with pytest.raises(ValueError, match="read_only"):
        CheckpointManager(tmp_path, read_only=True, coordinator=coordinator)
    with pytest.raises(ValueError, match="pass coordinator= too"):
        CheckpointManager(tmp_path, replicated=["model"])
    with pytest.raises(TypeError, match="replicated=\\['model'\\]"):
        CheckpointManager(tmp_path, replicated="model", coordinator=coordinator)
    with pytest.raises(TypeError, match="coordinator= takes"):
        CheckpointManager(tmp_path, coordinator=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        StorageCoordinator(2, 2)
    with pytest.raises(ValueError, match="timeout"):
        StorageCoordinator(0, 2, timeout=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        asyncckpt.TorchDistributedCoordinator()


async def test_user_metadata_cannot_pass_for_a_manifest(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="asyncckpt's own"):
            await ckpt.save({"a": np.zeros(2)}, 1, metadata={"asyncckpt.shards": {}})


async def test_a_replicated_path_must_lead_through_mappings(tmp_path: Path) -> None:
    async with manager(tmp_path, 1, 2, timeout=0.3) as ckpt:
        with pytest.raises(TypeError, match="replicated paths must lead through dicts"):
            await ckpt.save([np.zeros(2)], 1)


async def test_the_command_line_shows_shards_and_reports_a_missing_one(tmp_path: Path) -> None:
    async def save(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 9), 9)

    await run_ranks(2, save)
    out = io.StringIO()
    assert cli.main(["ls", str(tmp_path)], out=out) == 0
    listing = out.getvalue()
    assert "model.ckpt-9  (latest)" in listing
    assert "(rank 1's shard of model.ckpt-9)" in listing
    assert "unlisted" not in listing
    (lost,) = [n for n in data_files(tmp_path) if ".rank1-of-2." in n]
    os.unlink(tmp_path / lost)
    out = io.StringIO()
    assert cli.main(["verify", str(tmp_path)], out=out) == 1
    assert (
        f"MISSING  {tmp_path / lost}: rank 1's shard of model.ckpt-9 is missing" in out.getvalue()
    )


async def test_a_rank_that_reported_before_its_chief_began_reports_again(tmp_path: Path) -> None:
    async def first_run(rank: int) -> None:
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 1), 1)

    await run_ranks(2, first_run)

    # The restart: rank 1 saves step 2 while the epoch file is still the first run's.
    async def second_run(rank: int) -> int | None:
        if rank == 0:
            await anyio.sleep(0.5)
        async with manager(tmp_path, rank, 2) as ckpt:
            await ckpt.save(rank_state(rank, 2), 2)
            await ckpt.wait()
            return ckpt.latest_step()

    assert await run_ranks(2, second_run) == [2, 2]
    async with manager(tmp_path, 0, 2, timeout=0.3) as ckpt:
        restored = await ckpt.restore()
    np.testing.assert_array_equal(restored["opt"]["m"], np.full(4, 20.0))


# -- sessions ---------------------------------------------------------------------------------


def counting_step(state: dict[str, Any]) -> dict[str, Any]:
    state["model"]["w"] += 1.0
    state["opt"]["m"] += 10.0
    return {"loss": float(state["model"]["w"][0])}


async def async_counting_step(state: dict[str, Any]) -> dict[str, Any]:
    await anyio.lowlevel.checkpoint()
    return counting_step(state)


async def run_session(
    directory: Path,
    rank: int,
    world_size: int,
    hooks: list[Any],
    step_fn: Callable[..., Any] = counting_step,
    **kwargs: Any,
) -> tuple[int, dict[str, Any]]:
    state = rank_state(rank, 0)
    async with asyncckpt.MonitoredTrainingSession(
        state,
        step_fn,
        checkpoint_dir=directory,
        save_checkpoint_steps=3,
        hooks=hooks,
        coordinator=StorageCoordinator(rank, world_size, timeout=10),
        replicated=["model"],
        **kwargs,
    ) as session:
        while not session.should_stop():
            await session.run()
    return session.global_step, session.state


@pytest.mark.parametrize("step_fn", [counting_step, async_counting_step], ids=["plain", "async"])
async def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(
    tmp_path: Path, step_fn: Callable[..., Any]
) -> None:
    async def rank_main(rank: int) -> tuple[int, dict[str, Any]]:
        # Only rank 1 knows when to stop.
        hooks = [asyncckpt.StopAtStepHook(last_step=7)] if rank == 1 else []
        return await run_session(tmp_path, rank, 2, hooks, step_fn)

    (chief_step, _), (other_step, _) = await run_ranks(2, rank_main)
    assert chief_step == other_step == 7
    # The final save is one committed checkpoint of that step; saves at 0, 3, 6 and 7.
    async with manager(tmp_path, 0, 2, timeout=0.3) as ckpt:
        assert ckpt.all_steps() == [0, 3, 6, 7]
    # The summaries and the step counter are the chief's: one event file.
    events = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")]
    assert len(events) == 1

    # A restart resumes every rank from its own shard of step 7, and stops with the others.
    async def resume(rank: int) -> tuple[int, dict[str, Any]]:
        return await run_session(tmp_path, rank, 2, [asyncckpt.StopAtStepHook(last_step=9)])

    for rank, (step, state) in enumerate(await run_ranks(2, resume)):
        assert step == 9
        np.testing.assert_array_equal(state["model"]["w"], np.full(8, 9.0))
        np.testing.assert_array_equal(state["opt"]["m"], np.full(4, 90.0 + rank))


async def test_a_resumed_run_that_is_done_stops_every_rank_before_a_step(tmp_path: Path) -> None:
    async def first(rank: int) -> tuple[int, dict[str, Any]]:
        return await run_session(tmp_path, rank, 2, [asyncckpt.StopAtStepHook(last_step=4)])

    await run_ranks(2, first)

    async def again(rank: int) -> tuple[int, dict[str, Any]]:
        hooks = [asyncckpt.StopAtStepHook(last_step=4)] if rank == 0 else []
        return await run_session(tmp_path, rank, 2, hooks)

    assert [step for step, _ in await run_ranks(2, again)] == [4, 4]


async def test_a_session_with_a_coordinator_saves_by_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_checkpoint_steps=N"):
        asyncckpt.MonitoredTrainingSession(
            rank_state(0, 0), counting_step, checkpoint_dir=tmp_path,
            coordinator=StorageCoordinator(0, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="is_chief=False contradicts"):
        asyncckpt.MonitoredTrainingSession(
            rank_state(0, 0), counting_step, is_chief=False, checkpoint_dir=tmp_path,
            save_checkpoint_steps=2, coordinator=StorageCoordinator(0, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="save_steps=N"):
        asyncckpt.CheckpointSaverHook(tmp_path, save_secs=5, coordinator=StorageCoordinator(0, 2))


async def test_a_chief_that_lost_its_lease_commits_nothing() -> None:
    url = f"memory://zombie-{os.getpid()}-{time.monotonic_ns()}/ckpt"
    # The zombie's clock is an hour behind: the lease it takes has expired for everyone else,
    # as the lease of a chief cut off by a long network partition has.
    zombie_storage = ObjectStorage(url, clock=lambda: time.time() - 3600)

    async def rank_main(rank: int) -> str:
        storage = zombie_storage if rank == 0 else None
        async with CheckpointManager(
            url, coordinator=StorageCoordinator(rank, 2, timeout=10), replicated=["model"],
            storage=storage,
        ) as ckpt:  # fmt: skip
            await ckpt.save(rank_state(rank, 1), 1)
            await ckpt.wait()
            await new_writer_saved.wait()
            await ckpt.save(rank_state(rank, 5), 5)
            with pytest.raises(CheckpointWriteError) as raised:
                await ckpt.wait()
            if rank == 0:
                assert isinstance(raised.value, asyncckpt.CheckpointLockedError)
            return str(raised.value)

    new_writer_saved = anyio.Event()

    async def new_writer() -> None:
        await anyio.sleep(0.3)
        async with CheckpointManager(url) as other:  # takes the expired lease over
            await other.save({"model": {"w": np.zeros(8)}}, 3)
        new_writer_saved.set()

    async with anyio.create_task_group() as group:
        group.start_soon(new_writer)
        chief, other = await run_ranks(2, rank_main)
    assert "step 5 was not committed: rank 0 could not commit it" in chief
    assert "rank 0 could not commit it" in other
    # The new writer's checkpoint stays the latest: the zombie listed nothing over it.
    assert asyncckpt.latest_checkpoint(url) == f"{url}/model.ckpt-3"


async def test_nested_replicated_paths_are_left_out_and_put_back(tmp_path: Path) -> None:
    def nested(rank: int, step: int) -> dict[str, Any]:
        return {
            "opt": {"shared": {"lr": np.full(2, float(step))}, "own": np.full(3, step + rank)},
            "data": [np.zeros(1)],
        }

    async def save(rank: int) -> None:
        async with CheckpointManager(
            tmp_path, coordinator=StorageCoordinator(rank, 2, timeout=10),
            replicated=["opt/shared", "absent/path"],
        ) as ckpt:  # fmt: skip
            await ckpt.save(nested(rank, 2), 2)

    await run_ranks(2, save)
    async with CheckpointManager(
        tmp_path, coordinator=StorageCoordinator(1, 2, timeout=0.3),
        replicated=["opt/shared", "absent/path"],
    ) as ckpt:  # fmt: skip
        metadata = await ckpt.metadata()
        restored = await ckpt.restore(into=nested(1, 0))
        only = await ckpt.restore(paths=["opt/shared/lr", "opt/own"])
    assert sorted(a.path for a in metadata.arrays) == ["data/0", "opt/own"]
    np.testing.assert_array_equal(restored["opt"]["shared"]["lr"], np.full(2, 2.0))
    np.testing.assert_array_equal(restored["opt"]["own"], np.full(3, 3))
    np.testing.assert_array_equal(only["opt"]["shared"]["lr"], np.full(2, 2.0))
    np.testing.assert_array_equal(only["opt"]["own"], np.full(3, 3))


async def test_a_malformed_manifest_is_a_format_error(tmp_path: Path) -> None:
    saver = Saver()
    await saver.save({"a": np.zeros(2)}, tmp_path / "model.ckpt", 1)
    header = await saver.metadata(tmp_path / "model.ckpt-1")
    assert header.step == 1
    from asyncckpt._checkpoint._shards import Manifest, ShardReport

    for raw in ({"world_size": 2, "shards": ["a"], "replicated": []}, {"world_size": 1}, 7):
        with pytest.raises(asyncckpt.CheckpointFormatError, match="malformed shard manifest"):
            Manifest.from_metadata({"asyncckpt.shards": raw}, "x")
    with pytest.raises(ValueError, match="not a shard report"):
        ShardReport.decode(b"{")


async def test_a_rank_that_fails_its_step_is_named_by_the_others(tmp_path: Path) -> None:
    def failing_step(state: dict[str, Any]) -> None:
        raise RuntimeError("rank 1's step failed")

    async def rank_main(rank: int) -> str:
        state = rank_state(rank, 0)
        try:
            async with asyncckpt.MonitoredTrainingSession(
                state, counting_step if rank == 0 else failing_step, checkpoint_dir=tmp_path,
                save_checkpoint_steps=100,
                coordinator=StorageCoordinator(rank, 2, timeout=0.5), replicated=["model"],
            ) as session:  # fmt: skip
                while not session.should_stop():
                    await session.run()
        except (TimeoutError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    chief, other = await run_ranks(2, rank_main)
    assert chief.startswith("TimeoutError: rank(s) 1 did not reach the end of step 1 within")
    assert other == "RuntimeError: rank 1's step failed"


@pytest.fixture
def one_rank_job() -> Any:
    """torch.distributed with a single rank (gloo, loopback), in this process."""
    dist = pytest.importorskip("torch.distributed")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_one_rank_torch_job_saves_and_restores_sharded(
    tmp_path: Path, one_rank_job: Any
) -> None:
    coordinator = asyncckpt.TorchDistributedCoordinator(timeout=5)
    assert (coordinator.rank, coordinator.world_size) == (0, 1)
    assert "rank 0 of 1" in repr(coordinator)
    for step in (1, 2):
        async with CheckpointManager(
            tmp_path, coordinator=coordinator, replicated=["model"]
        ) as ckpt:  # the second open: a channel of its own in the same store
            await ckpt.save(rank_state(0, step), step)
            await ckpt.wait()
            restored = await ckpt.restore()
        np.testing.assert_array_equal(restored["opt"]["m"], np.full(4, step * 10.0))
    with pytest.raises(ValueError, match="timeout"):
        asyncckpt.TorchDistributedCoordinator(timeout=-1)


async def test_a_chief_that_cannot_list_the_checkpoint_fails_it_everywhere(tmp_path: Path) -> None:
    faults = FaultyStorage()
    # The state file's write of step 2 (its temporary file is ".checkpoint<marker>...").
    faults.fail("write", errno.EIO, match=f"{os.sep}.checkpoint", skip=1)

    async def rank_main(rank: int) -> str:
        async with manager(tmp_path, rank, 2, storage=faults if rank == 0 else None) as ckpt:
            await ckpt.save(rank_state(rank, 1), 1)
            await ckpt.wait()
            await ckpt.save(rank_state(rank, 2), 2)
            with pytest.raises(CheckpointWriteError) as raised:
                await ckpt.wait()
            return str(raised.value)

    with faults:
        chief, other = await run_ranks(2, rank_main)
    for error in (chief, other):
        assert "step 2 was not committed: rank 0 could not commit it" in error
    assert "model.ckpt-1" in chief
    assert asyncckpt.latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-1")
    assert "model.ckpt-2" not in data_files(tmp_path)  # the manifest was not left behind


async def test_each_rank_recycles_its_own_retired_shards(tmp_path: Path) -> None:
    inodes: dict[tuple[int, int], int] = {}

    def shard_inode(rank: int, step: int) -> int:
        (name,) = [n for n in data_files(tmp_path) if f"ckpt-{step}.rank{rank}-of-2." in n]
        return os.stat(tmp_path / name).st_ino

    async def rank_main(rank: int) -> None:
        async with manager(tmp_path, rank, 2, max_to_keep=1) as ckpt:
            for step in (1, 2, 3):
                await ckpt.save(rank_state(rank, step), step)
                await ckpt.wait()
                inodes[rank, step] = shard_inode(rank, step)

    await run_ranks(2, rank_main)
    # Step 2's commit retired step 1; each rank's step 3 overwrote its own step 1 shard (a
    # new file costs fresh page-cache memory on these machines: docs/PERFORMANCE.md).
    for rank in (0, 1):
        assert inodes[rank, 3] == inodes[rank, 1]
        assert inodes[rank, 2] != inodes[rank, 1]
    assert [n for n in data_files(tmp_path) if ".rank" not in n] == ["model.ckpt-3"]
    assert len([n for n in data_files(tmp_path) if ".rank" in n]) == 2
    assert not [n for n in os.listdir(tmp_path) if "asyncckpt-tmp" in n]  # spares removed


async def test_until_stopped_on_ranks_ends_every_rank_after_the_same_step(tmp_path: Path) -> None:
    async def batches() -> AsyncGenerator[int, None]:
        for item in range(100):
            await anyio.lowlevel.checkpoint()
            yield item

    async def rank_main(rank: int) -> tuple[int, list[int]]:
        taken = []
        async with asyncckpt.MonitoredTrainingSession(
            rank_state(rank, 0), counting_step, checkpoint_dir=tmp_path,
            save_checkpoint_steps=100,
            hooks=[asyncckpt.StopAtStepHook(last_step=3)] if rank == 1 else [],
            coordinator=StorageCoordinator(rank, 2, timeout=10), replicated=["model"],
        ) as session, aclosing(batches()) as source:  # fmt: skip  # left unfinished
            async for item in session.until_stopped(source):
                taken.append(item)
                await session.run()
        return session.global_step, taken

    assert await run_ranks(2, rank_main) == [(3, [0, 1, 2]), (3, [0, 1, 2])]
