"""CheckpointInputPipelineHook: a resumed run continues its input with no gap and no repeat.

Every run pulls its items inside the step function and logs ``(step, items)``. A run may end
normally, crash mid-run (an exception: no final save), be preempted and recover, or be
SIGKILLed in a subprocess at a random instant. Whatever happened, the items each run
consumed, cut at the step the next run resumed from, put end to end, must be exactly the
data order: that is the contract. Time moves only with ``FakeClock``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import pytest

from asyncckpt import (
    CheckpointSaverHook,
    CheckpointSaverListener,
    CheckpointWriteError,
    ChiefSessionCreator,
    MonitoredSession,
    MonitoredTrainingSession,
    PreemptedError,
    SessionRunHook,
    StopAtStepHook,
    get_checkpoint_state,
    latest_checkpoint,
)
from asyncckpt._hooks._input import CheckpointInputPipelineHook, input_pipeline_listeners
from asyncckpt._hooks._iterators import (
    AsyncCountingIterator,
    BatchIterator,
    ResumableIterator,
    SequenceIterator,
    ShuffledIterator,
)
from asyncckpt.testing import FakeClock, FaultyStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

    from asyncckpt._hooks._base import SessionLike

pytestmark = pytest.mark.anyio

DATA = list(range(23))  # not a multiple of the batch: batches straddle epochs
BATCH = 2
SEED = 17

Consumed = list[tuple[int, list[int]]]


def make_iterator() -> BatchIterator[int]:
    return BatchIterator(ShuffledIterator(DATA, seed=SEED, num_epochs=None), BATCH)


def data_order(steps: int) -> list[list[int]]:
    """The batches of the first ``steps`` steps of an uninterrupted run."""
    iterator = make_iterator()
    return [next(iterator) for _ in range(steps)]


@dataclass
class RunLog:
    """What one session did: the step it resumed at and the items of each step it ran."""

    start: int
    consumed: Consumed = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def stitch(runs: Sequence[RunLog]) -> list[list[int]]:
    """Concatenate what every run consumed, each cut at the step the next one resumed from.

    Also checks that each run's steps follow on from the step it resumed at, one by one (a
    recovery inside a run starts a new segment at the step it restored).
    """
    segments: list[RunLog] = []
    for run in runs:
        segment = RunLog(run.start)
        for step, items in run.consumed:
            if segment.consumed and step <= segment.consumed[-1][0]:
                segments.append(segment)  # a recovery went back: it restored step - 1
                segment = RunLog(step - 1)
            segment.consumed.append((step, items))
        segments.append(segment)
    stitched: list[list[int]] = []
    for index, segment in enumerate(segments):
        steps = [step for step, _ in segment.consumed]
        assert steps == list(range(segment.start + 1, segment.start + 1 + len(steps)))
        end = segments[index + 1].start if index + 1 < len(segments) else None
        stitched += [items for step, items in segment.consumed if end is None or step <= end]
    return stitched


class Crash(Exception):
    """The run dies mid-way: no end(), no final save."""


Order = Literal["model-first", "input-first"]


async def train(
    directory: Path,
    *,
    last_step: int | None = None,
    crash_at: int | None = None,
    preempt_at: int | None = None,
    model_steps: int = 3,
    input_steps: int | None = None,
    order: Order = "model-first",
    iterator: ResumableIterator[list[int]] | None = None,
    storage: FaultyStorage | None = None,
) -> RunLog:
    """Run one session over ``directory``: the model saves every ``model_steps`` steps and
    the input follows it (or saves every ``input_steps`` steps on its own); every hook and
    the session creator use ``storage``."""
    items = make_iterator() if iterator is None else iterator
    preempted = False
    log: Consumed = []

    def step_fn(state: dict[str, int]) -> None:
        nonlocal preempted
        step = state["step"] + 1
        if step == crash_at:
            raise Crash(f"crash at step {step}")
        batch = next(items)
        if step == preempt_at and not preempted:
            preempted = True
            raise PreemptedError(f"preempted at step {step}")
        log.append((step, batch))
        state["step"] = step

    input_hook = CheckpointInputPipelineHook(
        items, directory, save_steps=input_steps, storage=storage
    )
    listeners = [] if input_steps is not None else [input_hook.saver_listener()]
    model_hook = CheckpointSaverHook(
        directory, save_steps=model_steps, listeners=listeners, storage=storage
    )
    hooks: list[SessionRunHook] = (
        [model_hook, input_hook] if order == "model-first" else [input_hook, model_hook]
    )
    if last_step is not None:
        hooks.append(StopAtStepHook(last_step=last_step))
    creator = ChiefSessionCreator({"step": 0}, step_fn, checkpoint_dir=directory, storage=storage)
    run = RunLog(0)
    run.consumed = log
    with anyio.fail_after(5):
        try:
            async with MonitoredSession(creator, hooks) as sess:
                run.start = sess.global_step
                if input_steps is None:  # following the model's saves: always its step
                    assert input_hook.restored_step in (None, run.start)
                while not sess.should_stop():
                    await sess.run()
        except Crash:
            pass
    return run


def input_steps(directory: Path) -> list[int]:
    state = get_checkpoint_state(directory, "checkpoint_input")
    return [] if state is None else [int(name.rsplit("-", 1)[1]) for name in state.names]


def model_step(directory: Path) -> int | None:
    path = latest_checkpoint(directory)
    return None if path is None else int(path.rsplit("-", 1)[1])


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncckpt" and r.levelno == logging.WARNING
    ]


# -- the contract: no gap, no repeat -----------------------------------------------------------


async def test_a_resumed_run_continues_the_input(tmp_path: Path) -> None:
    first = await train(tmp_path, last_step=7)
    assert input_steps(tmp_path) == [0, 3, 6, 7]  # with each model save, and the last step
    second = await train(tmp_path, last_step=15)
    assert second.start == 7
    assert stitch([first, second]) == data_order(15)


@pytest.mark.parametrize(
    "seed", [seed if seed < 3 else pytest.param(seed, marks=pytest.mark.slow) for seed in range(16)]
)
async def test_random_stops_crashes_and_preemptions_never_lose_or_repeat_an_item(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    runs: list[RunLog] = []
    step = 0
    total = 30
    order: Order = "model-first" if seed % 2 else "input-first"
    while step < total:
        stop = min(total, step + rng.randint(1, 9))
        how = rng.choice(["stop", "crash", "preempt"])
        if how == "stop":
            run = await train(tmp_path, last_step=stop, order=order)
        elif how == "crash":
            run = await train(tmp_path, crash_at=stop, order=order)
        else:
            run = await train(tmp_path, preempt_at=stop, last_step=stop + 2, order=order)
        runs.append(run)
        step = run.consumed[-1][0] if run.consumed else step
    runs.append(await train(tmp_path, last_step=total + 4, order=order))
    stitched = stitch(runs)
    assert len(stitched) == total + 4
    assert stitched == data_order(total + 4)


async def test_a_preempted_step_is_retried_with_the_restored_input(tmp_path: Path) -> None:
    run = await train(tmp_path, preempt_at=5, last_step=8)
    # Preempted at 5: recovery restored step 3 (model and input), then ran 4..8 again.
    assert [step for step, _ in run.consumed] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert stitch([run]) == data_order(8)


async def test_the_input_is_durable_before_the_models_snapshot_of_its_step(
    tmp_path: Path,
) -> None:
    seen: list[tuple[int, list[int]]] = []

    class Check(CheckpointSaverListener):
        def before_save(self, session: SessionLike, global_step_value: int) -> None:
            seen.append((global_step_value, input_steps(tmp_path)))

    items = make_iterator()
    input_hook = CheckpointInputPipelineHook(items, tmp_path)
    model_hook = CheckpointSaverHook(
        tmp_path, save_steps=2, listeners=[input_hook.saver_listener(), Check()]
    )

    def step_fn(state: dict[str, int]) -> None:
        next(items)

    creator = ChiefSessionCreator({}, step_fn, checkpoint_dir=tmp_path)
    hooks = [model_hook, input_hook, StopAtStepHook(last_step=5)]
    with anyio.fail_after(5):
        async with MonitoredSession(creator, hooks) as sess:
            while not sess.should_stop():
                await sess.run()
    # At each model save (but the first, made when the session starts and the input hook
    # has not run yet), the input checkpoint of that step is already listed.
    assert seen[0] == (0, [])
    for step, listed in seen[1:]:
        assert listed[-1] == step
    assert [step for step, _ in seen] == [0, 2, 4, 5]


async def test_a_failed_input_write_keeps_the_model_from_saving_that_step(tmp_path: Path) -> None:
    with FaultyStorage() as faults:
        faults.fail("rename", errno.ENOSPC, match="input.ckpt-6")
        with pytest.raises(CheckpointWriteError, match=r"input\.ckpt-6"):
            await train(tmp_path, last_step=9, storage=faults)
    assert (model_step(tmp_path), input_steps(tmp_path)) == (3, [0, 3])
    first = RunLog(0, [(step, items) for step, items in enumerate(data_order(5), 1)])
    second = await train(tmp_path, last_step=10)
    assert second.start == 3
    assert stitch([first, second]) == data_order(10)


async def test_a_lost_model_write_resumes_from_the_input_of_the_models_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultyStorage() as faults:
        faults.fail("rename", errno.EIO, match="model.ckpt-6")
        # The failure surfaces a step or more after the save (the write runs in the
        # background), or as a note on the crash at step 8: either way model 6 is lost.
        with contextlib.suppress(CheckpointWriteError):
            await train(tmp_path, crash_at=8, storage=faults)
    assert (model_step(tmp_path), input_steps(tmp_path)) == (3, [0, 3, 6])
    caplog.clear()  # the failed write was logged when it happened
    second = await train(tmp_path, last_step=10)
    assert second.start == 3
    assert warnings_of(caplog) == []  # input.ckpt-3 exists: the newer 6 is not taken
    assert stitch([RunLog(0, list(enumerate(data_order(3), 1))), second]) == data_order(10)


@pytest.mark.parametrize("order", ["model-first", "input-first"])
async def test_the_last_step_is_saved_once_whatever_the_hook_order(
    tmp_path: Path, order: Order
) -> None:
    await train(tmp_path, last_step=5, order=order)
    assert (model_step(tmp_path), input_steps(tmp_path)) == (5, [0, 3, 5])


async def test_items_fed_through_until_stopped_resume_too(tmp_path: Path) -> None:
    async def run(last_step: int) -> RunLog:
        items = make_iterator()
        input_hook = CheckpointInputPipelineHook(items, tmp_path)
        model_hook = CheckpointSaverHook(
            tmp_path, save_steps=2, listeners=[input_hook.saver_listener()]
        )
        run = RunLog(0)

        def step_fn(state: dict[str, int], batch: list[int]) -> None:
            state["step"] += 1
            run.consumed.append((state["step"], batch))

        creator = ChiefSessionCreator({"step": 0}, step_fn, checkpoint_dir=tmp_path)
        hooks = [model_hook, input_hook, StopAtStepHook(last_step=last_step)]
        with anyio.fail_after(5):
            async with MonitoredSession(creator, hooks) as sess:
                run.start = sess.global_step
                # The item of step N + 1 is taken after step N's after_run saved the input.
                async for batch in sess.until_stopped(items):
                    await sess.run(feed_dict={"batch": batch})
        return run

    runs = [await run(5), await run(9)]
    assert runs[1].start == 5
    assert stitch(runs) == data_order(9)


async def test_an_async_source_resumes_in_an_async_step(tmp_path: Path) -> None:
    async def records() -> AsyncIterator[int]:
        for record in DATA:
            await anyio.lowlevel.checkpoint()
            yield record

    async def run(last_step: int) -> RunLog:
        items = AsyncCountingIterator(records, num_epochs=None)
        input_hook = CheckpointInputPipelineHook({"records": items}, tmp_path)
        model_hook = CheckpointSaverHook(
            tmp_path, save_steps=4, listeners=[input_hook.saver_listener()]
        )
        run = RunLog(0)

        async def step_fn(state: dict[str, int]) -> None:
            state["step"] += 1
            run.consumed.append((state["step"], [await anext(items)]))

        creator = ChiefSessionCreator({"step": 0}, step_fn, checkpoint_dir=tmp_path)
        hooks = [model_hook, input_hook, StopAtStepHook(last_step=last_step)]
        with anyio.fail_after(5):
            async with MonitoredSession(creator, hooks) as sess:
                run.start = sess.global_step
                while not sess.should_stop():
                    await sess.run()
        await items.aclose()
        return run

    runs = [await run(10), await run(30)]
    assert stitch(runs) == [[record] for record in DATA + DATA[:7]]


async def test_several_iterators_are_restored_each_from_its_own_state(tmp_path: Path) -> None:
    async def run(last_step: int) -> list[tuple[int, int]]:
        a = SequenceIterator(list(range(100)))
        b = ShuffledIterator(list(range(100)), seed=1)
        input_hook = CheckpointInputPipelineHook({"a": a, "b": b}, tmp_path, save_steps=2)
        taken: list[tuple[int, int]] = []

        def step_fn(state: dict[str, int]) -> None:
            taken.append((next(a), next(b)))
            next(b)  # b runs twice as fast

        creator = ChiefSessionCreator({}, step_fn, checkpoint_dir=tmp_path)
        model_hook = CheckpointSaverHook(tmp_path, save_steps=2)
        hooks = [model_hook, input_hook, StopAtStepHook(last_step=last_step)]
        with anyio.fail_after(5):
            async with MonitoredSession(creator, hooks) as sess:
                while not sess.should_stop():
                    await sess.run()
        return taken

    first, second = await run(4), await run(8)
    b_order = list(ShuffledIterator(list(range(100)), seed=1))
    assert first + second == [(step, b_order[2 * step]) for step in range(8)]


async def test_the_same_hooks_serve_one_session_after_another(tmp_path: Path) -> None:
    items = make_iterator()
    input_hook = CheckpointInputPipelineHook(items, tmp_path)
    model_hook = CheckpointSaverHook(
        tmp_path, save_steps=3, listeners=[input_hook.saver_listener()]
    )
    runs: list[RunLog] = []

    def step_fn(state: dict[str, int]) -> None:
        state["step"] += 1
        runs[-1].consumed.append((state["step"], next(items)))

    for last_step in (4, 9):
        creator = ChiefSessionCreator({"step": 0}, step_fn, checkpoint_dir=tmp_path)
        hooks = [model_hook, input_hook, StopAtStepHook(last_step=last_step)]
        async with MonitoredSession(creator, hooks) as sess:
            runs.append(RunLog(sess.global_step))
            assert input_hook.restored_step == (None if last_step == 4 else 4)
            while not sess.should_stop():
                await sess.run()
    assert input_steps(tmp_path) == [0, 3, 4, 7, 9]
    assert stitch(runs) == data_order(9)


# -- which input checkpoint is restored, and what is reported ----------------------------------


async def test_a_fresh_start_saves_an_initial_input_checkpoint_and_a_resume_does_not(
    tmp_path: Path,
) -> None:
    await train(tmp_path, last_step=4)
    assert input_steps(tmp_path) == [0, 3, 4]
    items = make_iterator()
    input_hook = CheckpointInputPipelineHook(items, tmp_path, save_steps=100)
    creator = ChiefSessionCreator({"step": 0}, lambda state: None, checkpoint_dir=tmp_path)
    async with MonitoredSession(creator, [input_hook]) as sess:
        manager = input_hook.manager
        assert manager is not None
        await manager.wait()
        assert (manager.statistics().written, input_hook.restored_step) == (0, 4)
        assert sess.global_step == 4
    assert next(items) == data_order(5)[4]


async def test_a_mismatch_between_model_and_input_steps_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The input on a schedule of its own: the crash leaves the model at 6, the input at 4.
    first = await train(tmp_path, crash_at=8, model_steps=3, input_steps=4)
    assert (model_step(tmp_path), input_steps(tmp_path)) == (6, [0, 4])
    second = await train(tmp_path, last_step=10, model_steps=3, input_steps=4)
    assert warnings_of(caplog) == [
        "No input checkpoint of step 6 (the model's) is listed in "
        f"{tmp_path / 'checkpoint_input'} (it lists steps [0, 4]); restoring step 4 instead: "
        "the input repeats the items of steps 5 to 6."
    ]
    # Steps 7 and 8 of the second run get the items of steps 5 and 6 again.
    assert [items for step, items in second.consumed[:2]] == [
        items for step, items in first.consumed[4:6]
    ]


async def test_an_input_ahead_of_the_model_is_reported_as_skipping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await train(tmp_path, crash_at=6, model_steps=4, input_steps=5)
    assert (model_step(tmp_path), input_steps(tmp_path)) == (4, [0, 5])
    await train(tmp_path, last_step=6, model_steps=4, input_steps=5)
    (warning,) = warnings_of(caplog)
    assert warning.endswith("restoring step 5 instead: the input skips the items of steps 5 to 5.")


async def test_a_model_without_input_checkpoints_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    creator = ChiefSessionCreator({"step": 0}, lambda state: None, checkpoint_dir=tmp_path)
    async with MonitoredSession(creator, [CheckpointSaverHook(tmp_path, save_steps=1)]) as sess:
        for _ in range(3):
            await sess.run()
    run = await train(tmp_path, last_step=4)
    assert run.start == 3
    assert warnings_of(caplog) == [
        f"No input checkpoint is listed in {tmp_path / 'checkpoint_input'}, but the model "
        "resumes at step 3: the input starts from its beginning."
    ]
    assert input_steps(tmp_path) == [3, 4]


async def test_the_input_of_the_restored_models_step_is_preferred(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await train(tmp_path, last_step=9)
    assert input_steps(tmp_path) == [0, 3, 6, 9]
    items = make_iterator()
    input_hook = CheckpointInputPipelineHook(items, tmp_path, save_steps=100)
    creator = ChiefSessionCreator(
        {"step": 0},
        lambda state: None,
        checkpoint_filename_with_path=str(tmp_path / "model.ckpt-3"),
    )
    async with MonitoredSession(creator, [input_hook]) as sess:
        assert (sess.global_step, input_hook.restored_step) == (3, 3)
    assert warnings_of(caplog) == []
    assert next(items) == data_order(4)[3]


# -- schedules ----------------------------------------------------------------------------------


async def test_its_own_step_schedule_starts_at_the_resumed_step(tmp_path: Path) -> None:
    await train(tmp_path, last_step=5, model_steps=2, input_steps=2)
    assert input_steps(tmp_path) == [0, 2, 4, 5]
    await train(tmp_path, last_step=10, model_steps=2, input_steps=2)
    assert input_steps(tmp_path) == [4, 5, 7, 9, 10]  # 5 + 2, 5 + 4, then the last step


async def test_its_own_seconds_schedule_uses_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    items = make_iterator()
    input_hook = CheckpointInputPipelineHook(items, tmp_path, save_secs=10, clock=clock)

    def step_fn(state: dict[str, int]) -> None:
        next(items)
        clock.advance(4)

    creator = ChiefSessionCreator({}, step_fn, checkpoint_dir=tmp_path)
    with anyio.fail_after(5):
        async with MonitoredSession(creator, [input_hook, StopAtStepHook(last_step=7)]) as sess:
            while not sess.should_stop():
                await sess.run()
    assert input_steps(tmp_path) == [0, 3, 6, 7]


async def test_workers_sharing_a_directory_each_resume_their_own_input(tmp_path: Path) -> None:
    async def worker(task_id: int) -> list[int]:
        items = SequenceIterator(list(range(task_id * 100, task_id * 100 + 50)))
        hook = CheckpointInputPipelineHook(
            items, tmp_path, save_steps=2, task_type="worker", task_id=task_id
        )
        assert (hook.checkpoint_prefix, hook.latest_filename) == (
            f"input_worker_{task_id}",
            f"checkpoint_input_worker_{task_id}",
        )
        taken: list[int] = []

        def step_fn(state: dict[str, int]) -> None:
            taken.append(next(items))

        # Workers keep no model checkpoint: each counts its steps from its own input.
        creator = ChiefSessionCreator({}, step_fn)
        async with MonitoredSession(creator, [hook]) as sess:
            await sess.run()
            await anyio.lowlevel.checkpoint()  # let the other worker run meanwhile
            await sess.run()
            await sess.run()
        return taken

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, 0)
        tg.start_soon(worker, 1)
    assert sorted(n for n in os.listdir(tmp_path) if ".ckpt-" in n) == [
        "input_worker_0.ckpt-0",
        "input_worker_0.ckpt-2",
        "input_worker_0.ckpt-3",
        "input_worker_1.ckpt-0",
        "input_worker_1.ckpt-2",
        "input_worker_1.ckpt-3",
    ]
    # Without a model checkpoint the session starts at step 0 again: the input of step 0
    # is preferred (a warning-free, exact match), so each worker starts over.
    assert await worker(1) == [100, 101, 102]


def test_input_pipeline_listeners_picks_the_hooks_without_a_schedule(tmp_path: Path) -> None:
    following = CheckpointInputPipelineHook(make_iterator(), tmp_path)
    scheduled = CheckpointInputPipelineHook(
        make_iterator(), tmp_path, save_steps=3, checkpoint_prefix="other"
    )
    hooks = [StopAtStepHook(last_step=3), scheduled, following]
    assert input_pipeline_listeners(hooks) == [following.saver_listener()]
    assert following.saver_listener() is following.saver_listener()


async def test_monitored_training_session_with_an_explicit_model_hook(tmp_path: Path) -> None:
    async def run(last_step: int) -> RunLog:
        items = make_iterator()
        input_hook = CheckpointInputPipelineHook(items, tmp_path)
        model_hook = CheckpointSaverHook(
            tmp_path, save_steps=3, listeners=input_pipeline_listeners([input_hook])
        )
        run = RunLog(0)

        def step_fn(state: dict[str, int]) -> None:
            state["step"] += 1
            run.consumed.append((state["step"], next(items)))

        async with MonitoredTrainingSession(
            {"step": 0},
            step_fn,
            checkpoint_dir=tmp_path,
            save_checkpoint_secs=None,
            save_summaries_steps=None,
            log_step_count_steps=None,
            hooks=[model_hook, input_hook, StopAtStepHook(last_step=last_step)],
        ) as sess:
            run.start = sess.global_step
            while not sess.should_stop():
                await sess.run()
        return run

    runs = [await run(4), await run(11)]
    assert stitch(runs) == data_order(11)


@pytest.mark.parametrize("where", ["hooks", "chief_only_hooks"])
async def test_monitored_training_session_saves_the_input_with_each_checkpoint(
    tmp_path: Path, where: str
) -> None:
    async def run(last_step: int) -> RunLog:
        items = make_iterator()
        input_hook = CheckpointInputPipelineHook(items, tmp_path)
        run = RunLog(0)

        def step_fn(state: dict[str, int]) -> None:
            state["step"] += 1
            run.consumed.append((state["step"], next(items)))

        hooks: dict[str, list[SessionRunHook]] = {where: [input_hook]}
        async with MonitoredTrainingSession(
            {"step": 0},
            step_fn,
            checkpoint_dir=tmp_path,
            save_checkpoint_steps=3,
            save_summaries_steps=None,
            log_step_count_steps=None,
            hooks=[StopAtStepHook(last_step=last_step), *hooks.get("hooks", [])],
            chief_only_hooks=hooks.get("chief_only_hooks"),
        ) as sess:
            run.start = sess.global_step
            while not sess.should_stop():
                await sess.run()
        return run

    runs = [await run(7), await run(12)]
    assert runs[1].start == 7
    assert stitch(runs) == data_order(12)
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert [int(name.rsplit("-", 1)[1]) for name in state.names] == input_steps(tmp_path)


# -- wrong use ------------------------------------------------------------------------------------


def unchecked(value: object) -> Any:
    """A wrong argument, passed on purpose."""
    return value


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"save_steps": 2, "save_secs": 5}, ValueError, "pass at most one of save_steps="),
        ({"save_steps": 0}, ValueError, "every_steps must be a positive int"),
        ({"task_type": "worker"}, ValueError, "pass both task_type= and task_id="),
        ({"task_id": 1}, ValueError, "pass both task_type= and task_id="),
        ({"task_type": "", "task_id": 1}, ValueError, "task_type must be a worker kind"),
        ({"task_type": "w", "task_id": -1}, ValueError, "task_id must be >= 0"),
        ({"task_type": "a/b", "task_id": 1}, ValueError, "names must stay inside"),
        ({"checkpoint_prefix": "model"}, ValueError, "must differ from the model's"),
        ({"latest_filename": "checkpoint"}, ValueError, "must differ from the model's"),
        ({"latest_filename": "a/b"}, ValueError, "without a directory"),
        ({"max_to_keep": -1}, ValueError, "max_to_keep must be >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CheckpointInputPipelineHook(make_iterator(), tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("iterators", "error", "message"),
    [
        ([], ValueError, "iterators is empty"),
        ({}, ValueError, "iterators is empty"),
        (iter([1]), TypeError, "not list_iterator"),
        ([object()], TypeError, "iterator '0' (object) has no state_dict()"),
        ({1: SequenceIterator([1])}, TypeError, "iterator names must be str, not 1"),
    ],
)
def test_iterators_without_state_are_refused(
    tmp_path: Path, iterators: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        CheckpointInputPipelineHook(unchecked(iterators), tmp_path)


def test_saver_listener_needs_a_hook_without_schedule(tmp_path: Path) -> None:
    hook = CheckpointInputPipelineHook(make_iterator(), tmp_path, save_steps=2)
    with pytest.raises(ValueError, match="saves on its own schedule"):
        hook.saver_listener()


async def test_a_hook_with_nothing_to_follow_fails_at_begin(tmp_path: Path) -> None:
    hook = CheckpointInputPipelineHook(make_iterator(), tmp_path)
    creator = ChiefSessionCreator({}, lambda state: None, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="has no schedule: pass save_steps= or save_secs="):
        async with MonitoredSession(creator, [hook]):
            pass  # pragma: no cover - entering fails


async def test_a_listener_no_model_hook_calls_fails_when_the_session_starts(
    tmp_path: Path,
) -> None:
    hook = CheckpointInputPipelineHook(make_iterator(), tmp_path)
    hook.saver_listener()  # but not handed to any CheckpointSaverHook
    creator = ChiefSessionCreator({}, lambda state: None, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"pass listeners=\[hook.saver_listener\(\)\]"):
        async with MonitoredSession(creator, [hook]):
            pass  # pragma: no cover - entering fails
    assert not any("ckpt" in name for name in os.listdir(tmp_path))


async def test_a_checkpoint_of_other_iterators_is_refused(tmp_path: Path) -> None:
    async def start(iterators: dict[str, ResumableIterator[int]]) -> None:
        hook = CheckpointInputPipelineHook(iterators, tmp_path, save_steps=5)
        creator = ChiefSessionCreator({}, lambda state: None)
        async with MonitoredSession(creator, [hook]):
            pass

    await start({"a": SequenceIterator([1, 2]), "b": SequenceIterator([3])})
    with pytest.raises(ValueError, match=r"iterators \['a', 'b'\], but this hook has \['a'\]"):
        await start({"a": SequenceIterator([1, 2])})
    with pytest.raises(
        ValueError, match="for data of 1 items but this SequenceIterator has 2"
    ) as info:
        await start({"a": SequenceIterator([1, 2]), "b": SequenceIterator([3, 4])})
    assert f"while restoring iterator 'b' from {tmp_path}/input.ckpt-0" in info.value.__notes__


def test_repr_shows_the_schedule(tmp_path: Path) -> None:
    hook = CheckpointInputPipelineHook(make_iterator(), tmp_path)
    assert repr(hook) == (
        f"CheckpointInputPipelineHook({str(tmp_path)!r}, input.ckpt, no schedule, iterators=['0'])"
    )
    hook.saver_listener()
    assert "following the model's saves" in repr(hook)
    assert "save_secs=5" in repr(
        CheckpointInputPipelineHook(make_iterator(), tmp_path, save_secs=5)
    )


# -- a process killed at a random instant ---------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    import anyio
    from asyncckpt import CheckpointSaverHook, ChiefSessionCreator, MonitoredSession
    from asyncckpt import StopAtStepHook
    from asyncckpt._hooks._input import CheckpointInputPipelineHook
    from asyncckpt._hooks._iterators import BatchIterator, ShuffledIterator

    directory, log_path, backend, last_step = sys.argv[1:]

    async def main() -> None:
        items = BatchIterator(ShuffledIterator(list(range(23)), seed=17, num_epochs=None), 2)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def step_fn(state):
            batch = next(items)
            state["step"] += 1
            # Written before the step's checkpoint can be taken: a SIGKILL loses nothing
            # the kernel has (only a power loss would).
            os.write(log, f"{state['step']} {' '.join(map(str, batch))}\\n".encode())

        input_hook = CheckpointInputPipelineHook(items, directory)
        model_hook = CheckpointSaverHook(
            directory, save_steps=1, listeners=[input_hook.saver_listener()]
        )
        hooks = [model_hook, input_hook, StopAtStepHook(last_step=int(last_step))]
        creator = ChiefSessionCreator({"step": 0}, step_fn, checkpoint_dir=directory)
        async with MonitoredSession(creator, hooks) as sess:
            os.write(log, f"start {sess.global_step}\\n".encode())
            while not sess.should_stop():
                await sess.run()
                print(sess.global_step, flush=True)

    anyio.run(main, backend=backend)
    """
)


KILLS = 8


def read_runs(log_path: Path) -> list[RunLog]:
    runs: list[RunLog] = []
    for line in log_path.read_text().splitlines():
        word, *rest = line.split()
        if word == "start":
            runs.append(RunLog(int(rest[0])))
        elif len(rest) == BATCH:  # a line torn by the kill has fewer numbers, or none
            runs[-1].consumed.append((int(word), [int(item) for item in rest]))
    return runs


@pytest.mark.slow
async def test_sigkill_at_random_instants_never_loses_or_repeats_an_item(
    tmp_path: Path, anyio_backend: str
) -> None:
    rng = random.Random(anyio_backend)
    log_path = tmp_path / "consumed.log"
    command = [sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(log_path), anyio_backend]
    step = 0
    for _ in range(KILLS):
        # Killed once it reports a random later step: by then the next step runs, and the
        # saves of this one (input, then model, in the background) are at any instant.
        target = step + rng.randint(1, 8)
        process = await anyio.open_process([*command, "1000"], stdout=subprocess.PIPE)
        async with process:
            assert process.stdout is not None
            output = b""
            with anyio.fail_after(20):
                while step < target:
                    output += await process.stdout.receive()
                    lines = output.split(b"\n")
                    output = lines.pop()
                    step = max([step, *map(int, lines)])
                process.send_signal(signal.SIGKILL)
                assert await process.wait() == -signal.SIGKILL
    with anyio.fail_after(20):
        final = await anyio.run_process([*command, str(step + 5)])
    assert final.returncode == 0
    runs = read_runs(log_path)
    assert len(runs) == KILLS + 1
    assert runs[-1].consumed[-1][0] == step + 5
    assert stitch(runs) == data_order(step + 5)
