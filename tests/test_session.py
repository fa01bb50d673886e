"""MonitoredSession and MonitoredTrainingSession: arguments, lifecycle, resume, recovery, stops,
cancellation and SIGTERM.

Lifecycles are asserted as call sequences (``RecordingHook``). Nothing sleeps: a slow disk is
``FaultyStorage.stall()``, a step in progress is a step awaiting an ``anyio.Event``, and
``anyio.wait_all_tasks_blocked()`` says when everything else has run. The SIGTERM tests run a
small training script in a subprocess (slow-marked).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
import textwrap
from contextlib import aclosing
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from support import (
    SAVE_OPS,
    STATE_FILE_FIRST_CALL,
    all_tasks_blocked,
    checkpoint_files,
    make_state,
    signal_when_ready,
    step_fn,
    task_ids,
    temp_files,
    verify_exit,
    written_steps,
)

from asyncckpt import (
    CheckpointLockedError,
    CheckpointSaverHook,
    ChiefSessionCreator,
    MonitoredSession,
    MonitoredTrainingSession,
    OutOfRangeError,
    PreemptedError,
    Saver,
    Scaffold,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
    get_checkpoint_state,
    latest_checkpoint,
)
from asyncckpt.testing import FaultyStorage, RecordingHook, StorageStall

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
    from pathlib import Path

    from anyio.abc import TaskStatus

    from asyncckpt import CheckpointManager
    from asyncckpt._hooks._base import CoordinatorLike, SessionLike

pytestmark = pytest.mark.anyio


# -- helpers ----------------------------------------------------------------------------------


def training_session(
    directory: Path | None,
    state: dict[str, Any] | None = None,
    fn: Callable[..., Any] = step_fn,
    **kwargs: Any,
) -> MonitoredTrainingSession:
    return MonitoredTrainingSession(
        make_state() if state is None else state, fn, checkpoint_dir=directory, **kwargs
    )


def checkpoint_hook(sess: MonitoredSession) -> CheckpointSaverHook:
    (hook,) = [h for h in sess.hooks if isinstance(h, CheckpointSaverHook)]
    return hook


def manager_of(sess: MonitoredSession) -> CheckpointManager:
    manager = checkpoint_hook(sess).manager
    assert manager is not None
    return manager


async def run_steps(sess: MonitoredSession, n: int) -> None:
    with anyio.fail_after(5):
        for _ in range(n):
            await sess.run()


async def restored(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    tree = await Saver().restore(path)
    assert isinstance(tree, dict)
    return tree


def ckpt(directory: Path, step: int) -> str:
    return str(directory / f"model.ckpt-{step}")


def steps_of(calls: Sequence[tuple[str, int | None]], method: str) -> list[int | None]:
    """The steps of every ``method`` call, in order."""
    return [step for name, step in calls if name == method]


def lifecycle(n_steps: int, start: int = 0, *, end: bool = True) -> list[tuple[str, int | None]]:
    """A RecordingHook's calls for a session that runs ``n_steps`` from ``start``."""
    calls: list[tuple[str, int | None]] = [("begin", None), ("after_create_session", start)]
    for step in range(start, start + n_steps):
        calls += [("before_run", step), ("after_run", step + 1)]
    if end:
        calls.append(("end", start + n_steps))
    return calls


# -- MonitoredTrainingSession arguments (TF_SEMANTICS 28-32) --------------------------------------


async def test_default_hooks_in_tensorflow_order(tmp_path: Path) -> None:
    # TF 29: chief_only_hooks + StepCounterHook + SummarySaverHook + CheckpointSaverHook + hooks.
    chief_only, user = RecordingHook("chief"), RecordingHook("user")
    sess = training_session(tmp_path, hooks=[user], chief_only_hooks=[chief_only])
    hooks = sess.hooks
    assert [type(hook) for hook in hooks] == [
        RecordingHook,
        StepCounterHook,
        SummarySaverHook,
        CheckpointSaverHook,
        RecordingHook,
    ]
    assert hooks[0] is chief_only
    assert hooks[-1] is user
    async with sess:
        assert sess.hooks == hooks  # frozen
        await run_steps(sess, 3)
    assert chief_only.calls == user.calls == lifecycle(3)


async def test_checkpoints_default_to_every_600_secs(tmp_path: Path) -> None:
    sess = training_session(tmp_path)
    assert "every_secs=600" in repr(checkpoint_hook(sess))
    async with sess:
        await run_steps(sess, 5)
    # Time-based: far from 600 s, only the initial save and the final one in end().
    assert checkpoint_files(tmp_path) == ["model.ckpt-0", "model.ckpt-5"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"save_checkpoint_secs": None},
        {"save_checkpoint_steps": None},
        {"save_checkpoint_secs": None, "save_checkpoint_steps": None},
        {"save_checkpoint_steps": 0},
    ],
)
async def test_none_turns_checkpoints_off(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    sess = training_session(tmp_path, **kwargs)
    assert not [h for h in sess.hooks if isinstance(h, CheckpointSaverHook)]
    async with sess:
        await run_steps(sess, 3)
    # Only the summaries' event file: no checkpoint, no state file.
    assert [name for name in os.listdir(tmp_path) if "tfevents" not in name] == []


async def test_save_checkpoint_steps_or_secs_replace_the_default(tmp_path: Path) -> None:
    async with training_session(tmp_path / "steps", save_checkpoint_steps=2) as sess:
        await run_steps(sess, 5)
    assert checkpoint_files(tmp_path / "steps") == [f"model.ckpt-{s}" for s in (0, 2, 4, 5)]
    sess = training_session(tmp_path / "secs", save_checkpoint_secs=30)
    assert "every_secs=30" in repr(checkpoint_hook(sess))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"save_checkpoint_steps": 10, "save_checkpoint_secs": 60},
            "save_checkpoint_steps= or save_checkpoint_secs=, not both",
        ),
        (
            {"save_summaries_steps": 10, "save_summaries_secs": 60},
            "save_summaries_steps= or save_summaries_secs=, not both",
        ),
    ],
)
async def test_both_steps_and_secs_is_a_value_error(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    # TF 32: TensorFlow's docstring and code disagree; asyncckpt refuses, before any I/O.
    with pytest.raises(ValueError, match=message):
        training_session(tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []


async def test_without_checkpoint_dir_nothing_is_saved(tmp_path: Path) -> None:
    sess = training_session(None, log_step_count_steps=None)
    assert sess.hooks == ()
    async with sess:
        await run_steps(sess, 2)
        assert sess.global_step == 2


async def test_log_step_count_steps_none_drops_the_step_counter(tmp_path: Path) -> None:
    for value in (None, 0):
        sess = training_session(tmp_path, log_step_count_steps=value)
        assert [type(h) for h in sess.hooks] == [SummarySaverHook, CheckpointSaverHook]


async def test_non_chief_runs_only_user_hooks_and_never_saves(tmp_path: Path) -> None:
    # TF 30: chief_only_hooks and the default hooks are dropped off the chief.
    chief_only, user = RecordingHook("chief"), RecordingHook("user")
    sess = training_session(
        tmp_path,
        is_chief=False,
        hooks=[user],
        chief_only_hooks=[chief_only],
        save_checkpoint_steps=1,
    )
    assert sess.hooks == (user,)
    async with sess:
        await run_steps(sess, 3)
    assert chief_only.calls == []
    assert user.calls == lifecycle(3)
    assert os.listdir(tmp_path) == []


# -- creation: resume, init_fn, creators -----------------------------------------------------------


async def test_resume_restores_state_in_place_and_saves_at_once(tmp_path: Path) -> None:
    scaffold = Scaffold(saver=Saver(max_to_keep=2))
    async with training_session(tmp_path, save_checkpoint_steps=2, scaffold=scaffold) as sess:
        await run_steps(sess, 3)
    assert checkpoint_files(tmp_path) == ["model.ckpt-2", "model.ckpt-3"]

    weights = np.full(4, -1.0)
    state = {"w": weights, "step": -1}
    recorder = RecordingHook()
    sess = training_session(
        tmp_path, state, save_checkpoint_steps=2, scaffold=scaffold, hooks=[recorder]
    )
    async with sess:
        assert sess.global_step == 3
        assert sess.state is state
        assert state["w"] is weights  # the same array, filled
        np.testing.assert_array_equal(weights, np.full(4, 3.0))
        assert state["step"] == 3
        # TF 44 saves at the restored step as soon as it starts; it is the latest already,
        # so it is announced to listeners, not rewritten (docs/DESIGN_NOTES.md).
        manager = manager_of(sess)
        await manager.wait()
        assert (manager.statistics().written, manager.latest_step()) == (0, 3)
        await run_steps(sess, 3)
    assert recorder.calls == lifecycle(3, start=3)
    # Retention continues from the state file: 5, then 6; only two are kept.
    assert checkpoint_files(tmp_path) == ["model.ckpt-5", "model.ckpt-6"]
    assert (await restored(latest_checkpoint(tmp_path)))["step"] == 6


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_init_fn_runs_on_a_fresh_start_only(tmp_path: Path, kind: str) -> None:
    calls: list[tuple[Scaffold, int]] = []

    def init(scaffold: Scaffold, session: SessionLike) -> None:
        calls.append((scaffold, session.global_step))
        state = session.state
        assert isinstance(state, dict)
        state["w"][:] = 10.0

    async def async_init(scaffold: Scaffold, session: SessionLike) -> None:
        await anyio.lowlevel.checkpoint()
        init(scaffold, session)

    scaffold = Scaffold(init_fn=init if kind == "plain" else async_init)
    recorder = RecordingHook()
    state = make_state()
    async with training_session(tmp_path, state, scaffold=scaffold, hooks=[recorder]) as sess:
        assert calls == [(scaffold, 0)]
        assert recorder.calls == [("begin", None), ("after_create_session", 0)]
        np.testing.assert_array_equal(state["w"], np.full(4, 10.0))  # before the first step
        await run_steps(sess, 2)
    async with training_session(tmp_path, scaffold=scaffold) as sess:
        assert sess.global_step == 2
        assert calls == [(scaffold, 0)]  # restored, not initialized
        np.testing.assert_array_equal(sess.state["w"], np.full(4, 12.0))


async def test_checkpoint_filename_with_path_restores_exactly_that_one(tmp_path: Path) -> None:
    scaffold = Scaffold(saver=Saver(max_to_keep=None))
    async with training_session(tmp_path, save_checkpoint_steps=2, scaffold=scaffold) as sess:
        await run_steps(sess, 5)
    creator = ChiefSessionCreator(
        make_state(), step_fn, checkpoint_filename_with_path=ckpt(tmp_path, 2)
    )
    async with MonitoredSession(creator) as sess:
        assert sess.global_step == 2
        assert sess.state["step"] == 2


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda d: ChiefSessionCreator({}, "step"),  # type: ignore[arg-type]
            TypeError,
            "step_fn must be callable",
        ),
        (
            lambda d: ChiefSessionCreator(
                {}, step_fn, checkpoint_dir=d, checkpoint_filename_with_path=d / "x"
            ),
            ValueError,
            "checkpoint_dir= or checkpoint_filename_with_path=, not both",
        ),
        (
            lambda d: Scaffold(init_fn="init"),  # type: ignore[arg-type]
            TypeError,
            "init_fn must be callable",
        ),
        (lambda d: MonitoredSession(), ValueError, "pass a session_creator"),
        (
            lambda d: MonitoredSession(
                ChiefSessionCreator({}, step_fn),
                hooks=[object()],  # type: ignore[list-item]
            ),
            TypeError,
            "hooks must be SessionRunHook instances",
        ),
        (
            lambda d: MonitoredSession(ChiefSessionCreator({}, step_fn), None, -1),
            ValueError,
            "stop_grace_period_secs must be >= 0",
        ),
        (
            lambda d: MonitoredTrainingSession(
                {},
                step_fn,
                checkpoint_dir=d,
                hooks=[print],  # type: ignore[list-item]
            ),
            TypeError,
            "hooks must be SessionRunHook instances",
        ),
    ],
)
async def test_constructors_validate_their_arguments(
    tmp_path: Path, make: Callable[[Path], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make(tmp_path)
    assert os.listdir(tmp_path) == []


async def test_a_second_writer_on_the_same_directory_fails_as_itself(tmp_path: Path) -> None:
    before = task_ids()
    async with training_session(tmp_path) as first:
        with pytest.raises(CheckpointLockedError, match="another writer holds"):
            async with training_session(tmp_path):
                pass  # pragma: no cover
        await run_steps(first, 1)  # the first session is unaffected
    assert task_ids() == before
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 1)


async def test_entering_twice_is_a_runtime_error(tmp_path: Path) -> None:
    sess = training_session(tmp_path)
    async with sess:
        with pytest.raises(RuntimeError, match="entered only once"):
            await sess.__aenter__()
        await run_steps(sess, 1)
    with pytest.raises(RuntimeError, match="entered only once"):
        async with sess:
            pass
    await sess.close()  # closing again is harmless


# -- the lifecycle: end of input, errors, stop requests (TF_SEMANTICS 6-10, 18) -------------------


def _sync_stop_iteration(state: dict[str, Any]) -> None:
    if state["step"] == 2:
        raise StopIteration
    step_fn(state)


def _out_of_range(state: dict[str, Any]) -> None:
    if state["step"] == 2:
        raise OutOfRangeError("input exhausted")
    step_fn(state)


async def _stop_async_iteration(state: dict[str, Any]) -> None:
    if state["step"] == 2:
        raise StopAsyncIteration
    step_fn(state)


async def _async_next_on_exhausted(state: dict[str, Any]) -> None:
    if state["step"] == 2:
        next(iter(()))  # PEP 479: RuntimeError('coroutine raised StopIteration')
    step_fn(state)


@pytest.mark.parametrize(
    "fn",
    [_sync_stop_iteration, _out_of_range, _stop_async_iteration, _async_next_on_exhausted],
    ids=["StopIteration", "OutOfRangeError", "StopAsyncIteration", "async-next"],
)
async def test_end_of_input_ends_normally(tmp_path: Path, fn: Callable[..., Any]) -> None:
    # TF 8: no after_run for the step that raised; end() runs (and saves the last step);
    # the block ends without an exception.
    recorder = RecordingHook()
    async with training_session(tmp_path, fn=fn, hooks=[recorder]) as sess:
        with anyio.fail_after(5):
            while True:
                await sess.run()
    assert recorder.calls == [*lifecycle(2, end=False), ("before_run", 2), ("end", 2)]
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)


class _FetchOnce(SessionRunHook):
    """Fetch ``fetches`` on every step and keep what came back."""

    def __init__(self, fetches: Any) -> None:
        self.fetches = fetches
        self.results: list[Any] = []

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        return SessionRunArgs(self.fetches)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.results.append(run_values.results)


@pytest.mark.parametrize("returns", ["none", "dict", "mapping"])
async def test_what_the_step_returns_is_what_run_and_the_hooks_get(returns: str) -> None:
    # None is no outputs; any mapping is the outputs. Each run returns a dict of its own.
    def fn(state: dict[str, Any]) -> Any:
        state["step"] += 1
        outputs = {"loss": float(state["step"])}
        if returns == "none":
            return None
        return MappingProxyType(outputs) if returns == "mapping" else outputs

    hook = _FetchOnce("global_step")
    creator = ChiefSessionCreator({"step": 0}, fn)
    async with MonitoredSession(creator, hooks=[hook]) as sess:
        first = await sess.run()
        first["mutated"] = True
        second = await sess.run()
        fetched = await sess.run(["global_step", "loss"] if returns != "none" else "global_step")
    assert type(second) is dict
    assert second == ({} if returns == "none" else {"loss": 2.0})
    assert fetched == (3 if returns == "none" else [3, 3.0])
    assert hook.results == [1, 2, 3]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_step_returning_no_mapping_is_a_type_error(is_async: bool) -> None:
    def fn(state: dict[str, Any]) -> Any:
        return [1.0]

    async def async_fn(state: dict[str, Any]) -> Any:
        return [1.0]

    recorder = RecordingHook()
    creator = ChiefSessionCreator({}, async_fn if is_async else fn)
    with pytest.raises(TypeError, match="step_fn must return a mapping of named outputs"):
        async with MonitoredSession(creator, hooks=[recorder]) as sess:
            await sess.run()
    assert recorder.calls == [
        ("begin", None),
        ("after_create_session", 0),
        ("before_run", 0),
    ]


async def test_other_step_errors_propagate_as_themselves_without_end(tmp_path: Path) -> None:
    # TF 9: neither after_run nor end(); no final save; the error is itself, not a group.
    boom = KeyError("boom")

    def fn(state: dict[str, Any]) -> None:
        if state["step"] == 2:
            raise boom
        step_fn(state)

    recorder = RecordingHook()

    async def train() -> None:
        async with training_session(tmp_path, fn=fn, hooks=[recorder]) as sess:
            await run_steps(sess, 3)

    before = task_ids()
    with pytest.raises(KeyError) as caught:
        await train()
    assert caught.value is boom
    assert recorder.calls == [*lifecycle(2, end=False), ("before_run", 2)]
    assert checkpoint_files(tmp_path) == ["model.ckpt-0"]  # no final save of step 2
    assert task_ids() == before


class FailingHook(SessionRunHook):
    def __init__(self, method: str) -> None:
        self.method = method
        self.error = ValueError(f"{method} failed")

    def _maybe_fail(self, method: str) -> None:
        if method == self.method:
            raise self.error

    def begin(self) -> None:
        self._maybe_fail("begin")

    def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        self._maybe_fail("after_create_session")

    async def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        await anyio.lowlevel.checkpoint()
        self._maybe_fail("after_run")

    def end(self, session: SessionLike) -> None:
        self._maybe_fail("end")


@pytest.mark.parametrize("method", ["begin", "after_create_session", "after_run", "end"])
async def test_a_hook_error_surfaces_as_itself_and_leaves_no_task(
    tmp_path: Path, method: str, storage: FaultyStorage
) -> None:
    failing = FailingHook(method)
    recorder = RecordingHook()

    async def train() -> None:
        async with training_session(
            tmp_path, hooks=[failing, recorder], save_checkpoint_steps=1, storage=storage
        ) as sess:
            await run_steps(sess, 2)

    before = task_ids()
    with anyio.fail_after(5), pytest.raises(ValueError, match=f"{method} failed") as caught:
        await train()
    assert caught.value is failing.error
    assert task_ids() == before
    assert steps_of(recorder.calls, "end") == []
    calls = len(storage.calls)
    await anyio.wait_all_tasks_blocked()
    assert len(storage.calls) == calls  # nothing writes after the exit
    if method != "begin":
        # Whatever was saved is whole: the latest checkpoint restores and verifies.
        assert verify_exit(tmp_path) == 0
        await restored(latest_checkpoint(tmp_path))


async def test_request_stop_lets_every_after_run_finish_then_run_refuses(tmp_path: Path) -> None:
    # TF 6, 18: the stop lands after every hook's after_run of that step.
    first = RecordingHook("first", stop_at=2)
    second = RecordingHook("second")
    async with training_session(tmp_path, hooks=[first, second]) as sess:
        with anyio.fail_after(5):
            while not sess.should_stop():
                await sess.run()
        assert sess.global_step == 2
        with pytest.raises(RuntimeError, match="Run called even after should_stop requested"):
            await sess.run()
    assert first.calls == second.calls == lifecycle(2)


async def test_no_task_is_left_and_nothing_writes_after_exit(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    before = task_ids()
    async with training_session(tmp_path, save_checkpoint_steps=1, storage=storage) as sess:
        assert task_ids() > before  # the checkpoint writer and listener delivery run
        await run_steps(sess, 5)
    assert task_ids() == before
    calls, listing = len(storage.calls), sorted(os.listdir(tmp_path))
    await anyio.wait_all_tasks_blocked()
    assert (len(storage.calls), sorted(os.listdir(tmp_path))) == (calls, listing)
    assert written_steps(storage) == [0, 1, 2, 3, 4, 5]


# -- recovery (TF_SEMANTICS 3, 24) --------------------------------------------------------------


async def test_preemption_restores_the_latest_checkpoint_and_retries_the_run(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-2")
    failed: list[int] = []

    def fn(state: dict[str, Any]) -> dict[str, float]:
        outputs = step_fn(state)  # the state is changed, then the step fails
        if state["step"] == 4 and not failed:
            failed.append(state["step"])
            raise PreemptedError("the worker was preempted")
        return outputs

    weights = np.zeros(4)
    state = {"w": weights, "step": 0}
    chief, user = RecordingHook("chief"), RecordingHook("user")
    results: list[int] = []

    async def train() -> None:
        async with training_session(
            tmp_path,
            state,
            fn,
            save_checkpoint_steps=2,
            chief_only_hooks=[chief],
            hooks=[user],
            storage=storage,
        ) as sess:
            with anyio.fail_after(5):
                results.extend([await sess.run("global_step") for _ in range(5)])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(train)
            await stall.wait_reached()
            await anyio.wait_all_tasks_blocked()
            # Step 4 failed while checkpoint 2 was still being written: recovery waits for it.
            assert failed == [4]
            assert user.calls[-1] == ("before_run", 3)
            stall.release()
    failed_attempt = [*lifecycle(3, end=False), ("before_run", 3)]
    retried = [("after_create_session", 2), ("before_run", 2), ("after_run", 3)]
    assert user.calls == [
        *failed_attempt,
        *retried,
        ("before_run", 3),
        ("after_run", 4),
        ("end", 4),
    ]
    assert chief.calls == user.calls  # after_create_session again on every hook
    assert results == [1, 2, 3, 3, 4]  # the failed run returned its retry's result
    assert state["w"] is weights  # restored in place
    np.testing.assert_array_equal(weights, np.full(4, 4.0))
    # The restored step 2 is the latest checkpoint already: the hook announces it to its
    # listeners after recovery (TF 44) without writing it again, then saves 4 at the end.
    assert written_steps(storage) == [0, 2, 4]


async def test_custom_recoverable_errors(tmp_path: Path) -> None:
    raised: list[BaseException] = []
    plan: list[BaseException] = [ConnectionResetError("reset"), PreemptedError("preempted")]

    def fn(state: dict[str, Any]) -> dict[str, float]:
        if state["step"] == 1 and plan:
            raised.append(plan.pop(0))
            raise raised[-1]
        return step_fn(state)

    recorder = RecordingHook()

    async def train() -> None:
        async with training_session(
            tmp_path,
            fn=fn,
            hooks=[recorder],
            save_checkpoint_steps=1,
            recoverable_errors=(ConnectionError,),
        ) as sess:
            await run_steps(sess, 3)

    with pytest.raises(PreemptedError, match="preempted"):
        await train()
    # ConnectionResetError was recovered from (after_create_session again, run retried);
    # PreemptedError is not in recoverable_errors here: it propagates and end() is skipped.
    assert recorder.calls == [
        *lifecycle(1, end=False),
        ("before_run", 1),
        ("after_create_session", 1),
        ("before_run", 1),
    ]


# -- stops: until_stopped, stop requests never interrupt a step -----------------------------------


async def test_until_stopped_over_a_sync_iterable_takes_no_item_after_the_stop(
    tmp_path: Path,
) -> None:
    recorder = RecordingHook()
    items = iter(range(10))

    def fn(state: dict[str, Any], x: int) -> dict[str, int]:
        step_fn(state)
        return {"x": x}

    seen = []
    async with training_session(tmp_path, fn=fn, hooks=[recorder]) as sess:
        async for item in sess.until_stopped(items):
            seen.append(await sess.run("x", feed_dict={"x": item}))
            if item == 3:
                sess.request_stop()
    assert seen == [0, 1, 2, 3]
    assert next(items) == 4  # the item after the stop is still there for a resumed run
    assert recorder.calls == lifecycle(4)


async def test_until_stopped_ends_when_the_input_runs_out(tmp_path: Path) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            await anyio.lowlevel.checkpoint()
            yield i

    for source in (range(3), numbers()):
        async with training_session(tmp_path / type(source).__name__) as sess:
            seen = [item async for item in sess.until_stopped(source)]
            assert seen == [0, 1, 2]
            assert not sess.should_stop()


async def test_a_stop_cancels_a_pending_wait_for_the_next_item(tmp_path: Path) -> None:
    never = anyio.Event()
    source_log: list[str] = []

    async def source() -> AsyncIterator[int]:
        yield 1
        yield 2
        try:
            await never.wait()  # no third item, ever
        except anyio.get_cancelled_exc_class():
            source_log.append("wait cancelled")
            raise
        yield 3  # pragma: no cover

    recorder = RecordingHook()

    def fn(state: dict[str, Any], x: int) -> None:
        step_fn(state)

    async def stop_when_blocked(sess: MonitoredSession) -> None:
        await anyio.wait_all_tasks_blocked()
        sess.request_stop()

    with anyio.fail_after(5):
        async with (
            anyio.create_task_group() as tg,
            training_session(tmp_path, fn=fn, hooks=[recorder]) as sess,
        ):
            tg.start_soon(stop_when_blocked, sess)
            async for item in sess.until_stopped(source()):
                await sess.run(feed_dict={"x": item})
    assert source_log == ["wait cancelled"]
    assert recorder.calls == lifecycle(2)
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)


async def test_a_stop_never_interrupts_a_step_in_progress(tmp_path: Path) -> None:
    gate = anyio.Event()
    recorder = RecordingHook()
    done: list[int] = []

    async def fn(state: dict[str, Any], x: int) -> dict[str, int]:
        if x == 2:
            await gate.wait()  # the step is in progress when the stop is requested
        step_fn(state)
        done.append(x)
        return {"x": x}

    async def stop_during_step_2(sess: MonitoredSession) -> None:
        await anyio.wait_all_tasks_blocked()
        sess.request_stop()
        await anyio.wait_all_tasks_blocked()
        assert done == [1]  # still waiting: not cancelled
        gate.set()

    async def numbers() -> AsyncGenerator[int, None]:
        for i in range(1, 100):
            yield i

    results = []
    with anyio.fail_after(5):
        async with (
            anyio.create_task_group() as tg,
            training_session(tmp_path, fn=fn, hooks=[recorder]) as sess,
            aclosing(numbers()) as source,  # left unfinished: close it
        ):
            tg.start_soon(stop_during_step_2, sess)
            results.extend(
                [await sess.run("x", feed_dict={"x": x}) async for x in sess.until_stopped(source)]
            )
    assert done == results == [1, 2]
    assert recorder.calls == lifecycle(2)  # after_run of step 2 ran; end() saved it
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)


async def test_stop_at_step_hook_on_a_resumed_finished_run_runs_nothing(tmp_path: Path) -> None:
    async with training_session(tmp_path, hooks=[StopAtStepHook(last_step=3)]) as sess:
        while not sess.should_stop():
            await sess.run()
    recorder = RecordingHook()
    async with training_session(tmp_path, hooks=[StopAtStepHook(last_step=3), recorder]) as sess:
        assert sess.should_stop()
    assert recorder.calls == lifecycle(0, start=3)


# -- cancellation from outside ---------------------------------------------------------------------


async def test_cancellation_writes_taken_snapshots_no_final_save_then_propagates(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    stall = storage.stall("write", match="model.ckpt-1")
    scope = anyio.CancelScope()
    recorder = RecordingHook()
    progress: list[object] = []

    async def owner() -> None:
        with scope:
            async with training_session(
                tmp_path, hooks=[recorder], save_checkpoint_steps=1, storage=storage
            ) as sess:
                while True:
                    await sess.run()
                    progress.append(sess.global_step)
            progress.append("after the block")  # must not run: the cancellation propagates
        progress.append("exited")

    before = task_ids()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            await stall.wait_reached()
            await all_tasks_blocked()
            # 1 is being written, 2 waits in the queue, step 3's save waits for room.
            assert progress == [1, 2]
            scope.cancel()
            await all_tasks_blocked()
            assert progress == [1, 2]  # cancelled, but the taken snapshots are still written
            stall.release()
    assert progress == [1, 2, "exited"]
    assert scope.cancelled_caught
    assert steps_of(recorder.calls, "end") == []
    assert written_steps(storage) == [0, 1, 2]  # no save of the half-done step 3
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 2)
    assert (await restored(ckpt(tmp_path, 2)))["step"] == 2
    assert verify_exit(tmp_path) == 0
    assert task_ids() == before


@pytest.mark.parametrize("grace", [0.0, 120.0], ids=["no-grace", "grace"])
@pytest.mark.parametrize(
    "k", range(len(SAVE_OPS)), ids=[f"{i}-{op}" for i, op in enumerate(SAVE_OPS)]
)
async def test_cancellation_at_each_storage_call_of_a_save_leaves_a_restorable_directory(
    tmp_path: Path, storage: FaultyStorage, k: int, grace: float
) -> None:
    scope = anyio.CancelScope()

    async def owner(*, task_status: TaskStatus[StorageStall]) -> None:
        with scope:
            async with training_session(
                tmp_path,
                save_checkpoint_steps=1,
                scaffold=Scaffold(saver=Saver(max_to_keep=1)),
                stop_grace_period_secs=grace,
                storage=storage,
            ) as sess:
                await manager_of(sess).wait()  # checkpoint 0 is written
                task_status.started(storage.stall(skip=k))  # the k-th call of the next save
                await sess.run()
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
    # Without a grace period the save is abandoned where it was: until the state file is
    # replaced, 0 stays the latest. With one, the taken snapshot is written to the end.
    expected = 1 if grace or k >= STATE_FILE_FIRST_CALL else 0
    assert latest_checkpoint(tmp_path) == ckpt(tmp_path, expected)
    assert (await restored(latest_checkpoint(tmp_path)))["step"] == expected
    assert verify_exit(tmp_path) == 0


# -- SIGTERM ---------------------------------------------------------------------------------------

_SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys

    import anyio
    import numpy as np

    import asyncckpt


    async def step(state):
        state["w"] += 1.0
        state["step"] += 1
        await anyio.sleep(0.001)  # a real trainer awaits its data here
        return {"step": state["step"]}


    async def main(directory):
        state = {"w": np.zeros(8), "step": 0}
        async with (
            asyncckpt.MonitoredTrainingSession(
                state,
                step,
                checkpoint_dir=directory,
                save_checkpoint_steps=1_000_000,
                log_step_count_steps=None,
            ) as sess,
            asyncckpt.stop_on_signals(sess),
        ):
            while not sess.should_stop():
                await sess.run()
                if sess.global_step == 1:
                    print("ready", flush=True)
        print(f"exit {sess.global_step}", flush=True)


    anyio.run(main, sys.argv[1], backend=sys.argv[2])
    """
)

_BACKENDS = ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") else [])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("backend", "signum"),
    [(backend, signal.SIGTERM) for backend in _BACKENDS] + [("asyncio", signal.SIGINT)],
    ids=lambda value: getattr(value, "name", value),
)
def test_a_signal_saves_the_last_step_and_exits_0(
    tmp_path: Path, backend: str, signum: signal.Signals
) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SIGTERM_SCRIPT)
    directory = tmp_path / "ckpt"
    stdout = signal_when_ready(
        [sys.executable, str(script), str(directory), backend], "ready", signum
    )
    match = re.fullmatch(r"exit (\d+)\n", stdout)
    assert match, stdout
    last_step = int(match.group(1))
    assert last_step >= 1
    assert latest_checkpoint(directory) == str(directory / f"model.ckpt-{last_step}")
    state = anyio.run(restored, latest_checkpoint(directory))
    assert state["step"] == last_step
    np.testing.assert_array_equal(state["w"], np.full(8, float(last_step)))
    checkpoint_state = get_checkpoint_state(directory)
    assert checkpoint_state is not None
    assert checkpoint_state.names == ("model.ckpt-0", f"model.ckpt-{last_step}")
