"""The hook protocol and the standard hooks, driven through real sessions on both backends.

Lifecycles are asserted as sequences of calls (``RecordingHook``), following TF_SEMANTICS
1A-1C and 1K. Time comes from ``FakeClock``s that the step functions advance, so rates and
"(x sec)" figures are exact and nothing sleeps.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from asyncckpt import (
    ChiefSessionCreator,
    Coordinator,
    FinalOpsHook,
    LoggingTensorHook,
    MonitoredSession,
    MonitoredTrainingSession,
    NanLossDuringTrainingError,
    NanTensorHook,
    OutOfRangeError,
    PreemptedError,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    StepCounterHook,
    StepSession,
    StopAtStepHook,
    latest_checkpoint,
)
from asyncckpt.testing import FakeClock, RecordingHook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    from asyncckpt._hooks._base import CoordinatorLike, SessionLike

pytestmark = pytest.mark.anyio

Log = list[tuple[str, str, int | None]]

# -- helpers ---------------------------------------------------------------------------------------


def new_state() -> dict[str, Any]:
    return {"w": np.zeros(2)}


def counting_step(state: dict[str, Any], **feeds: Any) -> dict[str, Any]:
    """One step: ``loss`` is the global step this step completes (also after a restore)."""
    state["w"] += 1
    return {"loss": float(state["w"][0])}


def timed_step(clock: FakeClock, secs: Callable[[int], float]) -> Callable[..., Any]:
    """A counting step that advances ``clock`` by ``secs(step)`` while it runs."""

    def step(state: dict[str, Any]) -> dict[str, Any]:
        outputs = counting_step(state)
        clock.advance(secs(int(outputs["loss"])))
        return outputs

    return step


def monitored(
    hooks: Sequence[SessionRunHook],
    step_fn: Callable[..., Any] = counting_step,
    *,
    state: Any = None,
    checkpoint_dir: Path | None = None,
) -> MonitoredSession:
    creator = ChiefSessionCreator(
        new_state() if state is None else state, step_fn, checkpoint_dir=checkpoint_dir
    )
    return MonitoredSession(creator, hooks=hooks)


async def run_until_stopped(sess: MonitoredSession, limit: int = 1000) -> int:
    """The user's loop; returns how many runs it made (and never loops forever)."""
    runs = 0
    while not sess.should_stop():
        assert runs < limit, "the session never stopped"
        await sess.run()
        runs += 1
    return runs


def steps(first: int, last: int) -> list[tuple[str, int | None]]:
    """The calls of a ``RecordingHook`` for the steps that end at ``first`` .. ``last``."""
    calls: list[tuple[str, int | None]] = []
    for step in range(first, last + 1):
        calls += [("before_run", step - 1), ("after_run", step)]
    return calls


def start(step: int = 0) -> list[tuple[str, int | None]]:
    return [("begin", None), ("after_create_session", step)]


async def train_to(directory: Path, last_step: int) -> None:
    """Leave a checkpoint of ``last_step`` in ``directory``, as a training job would."""
    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        checkpoint_dir=directory,
        save_checkpoint_steps=10_000,
        log_step_count_steps=None,
        hooks=[StopAtStepHook(last_step=last_step)],
    ) as sess:
        await run_until_stopped(sess)
    latest = latest_checkpoint(directory)
    assert latest is not None
    assert latest.endswith(f"-{last_step}")


class AsyncRecordingHook(SessionRunHook):
    """Every method ``async def``, each suspending before it records into a shared log."""

    def __init__(self, name: str, log: Log, *, fetches: Any = None) -> None:
        self.name = name
        self.log = log
        self.fetches = fetches
        self.results: list[Any] = []

    async def _record(self, method: str, step: int | None) -> None:
        await anyio.lowlevel.checkpoint()
        self.log.append((self.name, method, step))

    async def begin(self) -> None:
        await self._record("begin", None)

    async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        await self._record("after_create_session", session.global_step)

    async def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        await self._record("before_run", run_context.session.global_step)
        return None if self.fetches is None else SessionRunArgs(self.fetches)

    async def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        await self._record("after_run", run_context.session.global_step)
        self.results.append(run_values.results)

    async def end(self, session: SessionLike) -> None:
        await self._record("end", session.global_step)


class AfterRunOnly(SessionRunHook):
    """Overrides only ``after_run``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.calls.append(("after_run", run_context.session.global_step))


class EndOnly(SessionRunHook):
    """Overrides only ``end``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def end(self, session: SessionLike) -> None:
        self.calls.append(("end", session.global_step))


class OverridesNothing(SessionRunHook):
    pass


class FailingHook(SessionRunHook):
    """Raises ``error`` from ``method`` when the global step (as the hook sees it) is ``at``."""

    def __init__(self, method: str, at: int, error: BaseException) -> None:
        self.method, self.at, self.error = method, at, error

    def before_run(self, run_context: SessionRunContext) -> None:
        if self.method == "before_run" and run_context.session.global_step == self.at:
            raise self.error

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if self.method == "after_run" and run_context.session.global_step == self.at:
            raise self.error


class ContextSpy(SessionRunHook):
    """Keeps what each method was handed: contexts, sessions, stop flags."""

    def __init__(self) -> None:
        self.contexts: list[SessionRunContext] = []
        self.sessions: list[SessionLike] = []
        self.stop_seen: list[tuple[int, bool]] = []

    def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        self.sessions.append(session)

    def before_run(self, run_context: SessionRunContext) -> None:
        self.contexts.append(run_context)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.contexts.append(run_context)
        self.stop_seen.append((run_context.session.global_step, run_context.stop_requested))

    def end(self, session: SessionLike) -> None:
        self.sessions.append(session)


@pytest.fixture
def base_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace ``SessionRunHook``'s own five methods by spies that record every call."""
    calls: list[str] = []

    def spy(method: str) -> Callable[..., None]:
        def record(self: SessionRunHook, *args: Any) -> None:
            calls.append(f"{type(self).__name__}.{method}")

        return record

    for method in ("begin", "after_create_session", "before_run", "after_run", "end"):
        monkeypatch.setattr(SessionRunHook, method, spy(method))
    return calls


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="asyncckpt"):
        yield caplog


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncckpt" and r.levelno == level]


# -- the lifecycle sequence (TF 1-4) ---------------------------------------------------------------


async def test_lifecycle_sequence_of_a_plain_hook() -> None:
    hook = RecordingHook(stop_at=3)
    async with monitored([hook]) as sess:
        assert await run_until_stopped(sess) == 3
    assert hook.calls == [*start(), *steps(1, 3), ("end", 3)]


async def test_lifecycle_sequence_of_an_async_hook_interleaved_with_a_plain_one() -> None:
    log: Log = []
    hooks: list[SessionRunHook] = [
        AsyncRecordingHook("async", log),
        RecordingHook("plain", log=log, stop_at=2),
    ]
    async with monitored(hooks) as sess:
        assert await run_until_stopped(sess) == 2
    assert log == [
        ("async", "begin", None),
        ("plain", "begin", None),
        ("async", "after_create_session", 0),
        ("plain", "after_create_session", 0),
        ("async", "before_run", 0),
        ("plain", "before_run", 0),
        ("async", "after_run", 1),
        ("plain", "after_run", 1),
        ("async", "before_run", 1),
        ("plain", "before_run", 1),
        ("async", "after_run", 2),
        ("plain", "after_run", 2),
        ("async", "end", 2),
        ("plain", "end", 2),
    ]


async def test_an_async_before_run_gets_its_fetches() -> None:
    log: Log = []
    hook = AsyncRecordingHook("async", log, fetches={"l": "loss", "g": "global_step"})
    async with monitored([hook, StopAtStepHook(last_step=2)]) as sess:
        await run_until_stopped(sess)
    assert hook.results == [{"l": 1.0, "g": 1}, {"l": 2.0, "g": 2}]


async def test_methods_a_hook_does_not_override_are_never_called(base_calls: list[str]) -> None:
    after_run_only, end_only, nothing = AfterRunOnly(), EndOnly(), OverridesNothing()
    async with monitored([after_run_only, end_only, nothing, StopAtStepHook(last_step=3)]) as sess:
        await run_until_stopped(sess)
    assert after_run_only.calls == [("after_run", 1), ("after_run", 2), ("after_run", 3)]
    assert end_only.calls == [("end", 3)]
    assert base_calls == []  # SessionRunHook's own methods: not once, for any hook


async def test_a_sync_step_under_sync_hooks_never_yields_to_the_event_loop() -> None:
    """Nothing is awaited that need not be: a plain method returning None costs no
    scheduling (a background task cannot run in between such steps)."""
    ran: list[str] = []

    async def background() -> None:
        ran.append("background")

    hooks = [RecordingHook(), AfterRunOnly(), LoggingTensorHook(["loss"], every_n_iter=1)]
    async with monitored(hooks) as sess:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(background)
            for _ in range(5):
                await sess.run("loss")
            assert ran == []
        assert ran == ["background"]


async def test_after_create_session_can_stop_before_any_step() -> None:
    class StopAtOnce(SessionRunHook):
        def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
            coord.request_stop()

    hook = RecordingHook()
    async with monitored([StopAtOnce(), hook]) as sess:
        assert await run_until_stopped(sess) == 0
    assert hook.calls == [*start(), ("end", 0)]


async def test_hooks_get_the_raw_session_and_one_shared_context_per_run() -> None:
    spies = [ContextSpy(), ContextSpy()]
    async with monitored(spies) as sess:
        await sess.run("loss", feed_dict={"batch": 1})
        await sess.run()
    first, second = spies
    # One context per run, shared by every hook: before_run and after_run of both hooks.
    assert len({id(c) for c in first.contexts}) == 2
    assert first.contexts == second.contexts
    assert first.contexts[0] is first.contexts[1]
    assert first.contexts[0].original_args == SessionRunArgs("loss", {"batch": 1})
    assert first.contexts[2].original_args == SessionRunArgs(None, None)
    # The raw session: the one after_create_session and end got, with the live state.
    raw = first.sessions[0]
    assert first.sessions == [raw, raw]
    assert all(c.session is raw for c in first.contexts)
    assert raw.global_step == 2
    assert raw.state["w"].tolist() == [2.0, 2.0]


async def test_a_hook_running_the_raw_session_runs_a_step_no_hook_sees() -> None:
    class ExtraStep(SessionRunHook):
        def __init__(self) -> None:
            self.got: list[Any] = []

        async def after_run(
            self, run_context: SessionRunContext, run_values: SessionRunValues
        ) -> None:
            if run_context.session.global_step == 1:
                self.got.append(await run_context.session.run(["loss", "global_step"]))

    extra, recorder = ExtraStep(), RecordingHook()
    async with monitored([extra, recorder]) as sess:
        await sess.run()
        await sess.run()
    assert extra.got == [[2.0, 2]]
    # The extra step (2) ran inside the first run's after_run: no before_run/after_run of it.
    assert recorder.calls == [
        *start(),
        ("before_run", 0),
        ("after_run", 2),
        ("before_run", 2),
        ("after_run", 3),
        ("end", 3),
    ]


# -- the end / no-end rules (TF 6-11) --------------------------------------------------------------


def _sync_next() -> Callable[..., Any]:
    batches = iter([1.0, 2.0])

    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"loss": next(batches)}

    return step


def _async_next() -> Callable[..., Any]:
    batches = iter([1.0, 2.0])

    async def step(state: dict[str, Any]) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return {"loss": next(batches)}  # Python turns this into RuntimeError(...StopIteration)

    return step


def _async_anext() -> Callable[..., Any]:
    async def source() -> Any:
        for batch in (1.0, 2.0):
            yield batch

    batches = source()

    async def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"loss": await anext(batches)}

    return step


def _raising_on_third(
    make_error: Callable[[], BaseException], *, is_async: bool
) -> Callable[[], Callable[..., Any]]:
    """A factory of steps that raise ``make_error()`` on their third call."""

    def make() -> Callable[..., Any]:
        calls = [0]

        def sync_step(state: dict[str, Any]) -> dict[str, Any]:
            calls[0] += 1
            if calls[0] == 3:
                raise make_error()
            return counting_step(state)

        async def async_step(state: dict[str, Any]) -> dict[str, Any]:
            await anyio.lowlevel.checkpoint()
            return sync_step(state)

        return async_step if is_async else sync_step

    return make


END_OF_INPUT_STEPS = {
    "sync StopIteration": _raising_on_third(StopIteration, is_async=False),
    "sync next() exhausted": _sync_next,
    "sync StopAsyncIteration": _raising_on_third(StopAsyncIteration, is_async=False),
    "sync OutOfRangeError": _raising_on_third(OutOfRangeError, is_async=False),
    "async StopAsyncIteration": _raising_on_third(StopAsyncIteration, is_async=True),
    "async OutOfRangeError": _raising_on_third(OutOfRangeError, is_async=True),
    "async next() exhausted": _async_next,
    "async anext() exhausted": _async_anext,
}


@pytest.mark.parametrize("make_step", END_OF_INPUT_STEPS.values(), ids=END_OF_INPUT_STEPS.keys())
async def test_end_of_input_from_the_step_ends_the_session_normally(
    make_step: Callable[[], Callable[..., Any]],
) -> None:
    hook = RecordingHook()
    async with monitored([hook], make_step()) as sess:
        await run_until_stopped(sess)
        pytest.fail("the third step should have ended the input")
    # Swallowed by `async with`; no after_run for the step that raised; end() called.
    assert hook.calls == [*start(), *steps(1, 2), ("before_run", 2), ("end", 2)]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("error_type", [ValueError, RuntimeError, PreemptedError])
async def test_any_other_exception_from_the_step_propagates_and_end_is_not_called(
    error_type: type[Exception], is_async: bool
) -> None:
    hook = RecordingHook()
    error = error_type("boom")
    make_step = _raising_on_third(lambda: error, is_async=is_async)
    sess = MonitoredSession(
        ChiefSessionCreator(new_state(), make_step()),
        hooks=[hook],
        recoverable_errors=(),  # PreemptedError too is just an error here
    )
    with pytest.raises(type(error)) as excinfo:
        async with sess:
            await run_until_stopped(sess)
    assert excinfo.value is error  # itself, never wrapped in an ExceptionGroup
    assert hook.calls == [*start(), *steps(1, 2), ("before_run", 2)]


async def run_once_then_fail(sess: MonitoredSession, error: BaseException) -> None:
    """Run one step, then fail in the user's code inside the ``async with`` block."""
    async with sess:
        await sess.run()
        raise error


async def test_an_exception_in_the_loop_body_propagates_and_end_is_not_called() -> None:
    hook = RecordingHook()
    with pytest.raises(ValueError, match="user code"):
        await run_once_then_fail(monitored([hook]), ValueError("user code"))
    assert hook.calls == [*start(), *steps(1, 1)]


async def test_an_exception_in_after_run_skips_later_hooks_and_end() -> None:
    log: Log = []
    error = NanLossDuringTrainingError()
    first, last = RecordingHook("first", log=log), RecordingHook("last", log=log)
    with pytest.raises(NanLossDuringTrainingError) as excinfo:
        async with monitored([first, FailingHook("after_run", 2, error), last]) as sess:
            await run_until_stopped(sess)
    assert excinfo.value is error
    assert log[-3:] == [
        ("first", "before_run", 1),
        ("last", "before_run", 1),
        ("first", "after_run", 2),  # then the failing hook; "last" never sees step 2
    ]
    assert ("last", "after_run", 2) not in log
    assert all(method != "end" for _, method, _ in log)


async def test_an_exception_in_before_run_skips_the_step_and_end() -> None:
    log: Log = []
    state = new_state()
    first, last = RecordingHook("first", log=log), RecordingHook("last", log=log)
    with pytest.raises(KeyError, match="before"):
        async with monitored(
            [first, FailingHook("before_run", 1, KeyError("before")), last], state=state
        ) as sess:
            await run_until_stopped(sess)
    assert log[-3:] == [
        ("first", "after_run", 1),
        ("last", "after_run", 1),
        ("first", "before_run", 1),
    ]
    assert state["w"].tolist() == [1.0, 1.0]  # the second step never ran


@pytest.mark.parametrize("how", ["hook", "caller", "close"])
async def test_run_after_a_stop_is_an_error(how: str) -> None:
    hook = RecordingHook(stop_at=1 if how == "hook" else None)
    async with monitored([hook]) as sess:
        await sess.run()
        if how == "caller":
            sess.request_stop()
        elif how == "close":
            await sess.close()
        assert sess.should_stop()
        with pytest.raises(RuntimeError, match=r"^Run called even after should_stop requested\.$"):
            await sess.run()
    assert hook.calls == [*start(), *steps(1, 1), ("end", 1)]


async def test_closing_twice_is_harmless_and_end_is_called_once() -> None:
    hook = RecordingHook()
    async with monitored([hook]) as sess:
        await sess.run()
        await sess.close()
        assert hook.calls[-1] == ("end", 1)
        await sess.close()
    await sess.close()
    assert hook.calls == [*start(), *steps(1, 1), ("end", 1)]


async def test_a_stop_request_in_after_run_lets_every_other_hook_finish_the_step() -> None:
    log: Log = []
    before, after = RecordingHook("before", log=log), RecordingHook("after", log=log)
    stopper = RecordingHook("stopper", log=log, stop_at=2)
    spy = ContextSpy()
    async with monitored([before, stopper, after, spy]) as sess:
        assert await run_until_stopped(sess) == 2
    assert log[-6:] == [
        ("before", "after_run", 2),
        ("stopper", "after_run", 2),
        ("after", "after_run", 2),
        ("before", "end", 2),
        ("stopper", "end", 2),
        ("after", "end", 2),
    ]
    # The request is on the context every hook of this run shares.
    assert spy.stop_seen == [(1, False), (2, True)]


# -- SessionRunArgs, SessionRunValues, SessionRunContext (TF 5, 12) --------------------------------


def test_session_run_args_is_a_named_tuple_with_tensorflows_defaults() -> None:
    assert SessionRunArgs._fields == ("fetches", "feed_dict", "options")
    assert SessionRunArgs() == (None, None, None)
    args = SessionRunArgs("loss", {"x": 1})
    assert isinstance(args, tuple)
    fetches, feed_dict, options = args
    assert (fetches, feed_dict, options) == ("loss", {"x": 1}, None)
    assert args._replace(fetches=["acc"]) == SessionRunArgs(["acc"], {"x": 1})


def test_session_run_values_is_a_named_tuple_of_results_options_and_metadata() -> None:
    assert SessionRunValues._fields == ("results", "options", "run_metadata")
    assert SessionRunValues(5) == (5, None, None)
    assert SessionRunValues(results=[1], options="o", run_metadata="m").run_metadata == "m"
    with pytest.raises(TypeError):
        SessionRunValues()  # type: ignore[call-arg]


def test_session_run_context_request_stop() -> None:
    raw = StepSession({}, counting_step, 4)
    args = SessionRunArgs("loss")
    context = SessionRunContext(args, raw)
    assert context.original_args is args
    assert context.session is raw
    before = (context.stop_requested, repr(context))
    context.request_stop()
    context.request_stop()  # idempotent
    after = (context.stop_requested, repr(context))
    assert before[0] is False
    assert "stop_requested=False" in before[1]
    assert after[0] is True
    assert "stop_requested=True" in after[1]


# -- StopAtStepHook (TF 74) ------------------------------------------------------------------------


async def test_stop_at_last_step_stops_exactly_when_the_global_step_reaches_it() -> None:
    hook, recorder = StopAtStepHook(last_step=10), RecordingHook()
    async with monitored([hook, recorder]) as sess:
        assert await run_until_stopped(sess) == 10
    assert hook.last_step == 10
    assert recorder.calls == [*start(), *steps(1, 10), ("end", 10)]


async def test_num_steps_counts_from_the_restored_step(tmp_path: Path) -> None:
    await train_to(tmp_path, 5)
    hook, recorder = StopAtStepHook(num_steps=3), RecordingHook()
    before_the_session = hook.last_step
    assert before_the_session is None  # known once the session exists
    async with monitored([hook, recorder], checkpoint_dir=tmp_path) as sess:
        assert await run_until_stopped(sess) == 3
    assert hook.last_step == 8
    assert recorder.calls == [*start(5), *steps(6, 8), ("end", 8)]


def test_num_steps_is_computed_once_not_on_every_after_create_session() -> None:
    hook, coord = StopAtStepHook(num_steps=3), Coordinator()
    hook.after_create_session(StepSession({}, counting_step, 5), coord)
    assert hook.last_step == 8
    hook.after_create_session(StepSession({}, counting_step, 6), coord)  # a recovery
    assert hook.last_step == 8
    assert not coord.should_stop()


async def test_a_recovery_does_not_extend_num_steps(tmp_path: Path) -> None:
    preempted = [False]

    def step(state: dict[str, Any]) -> dict[str, Any]:
        if state["w"][0] == 2 and not preempted[0]:
            preempted[0] = True
            raise PreemptedError("lost the worker")
        return counting_step(state)

    hook, recorder = StopAtStepHook(num_steps=4), RecordingHook()
    async with MonitoredTrainingSession(
        new_state(),
        step,
        checkpoint_dir=tmp_path,
        save_checkpoint_steps=1,
        log_step_count_steps=None,
        hooks=[hook, recorder],
    ) as sess:
        await run_until_stopped(sess)
    # Restored at 2 after the preemption; still stops at 0 + 4, not 2 + 4.
    assert hook.last_step == 4
    assert recorder.calls == [
        *start(),
        *steps(1, 2),
        ("before_run", 2),
        ("after_create_session", 2),
        *steps(3, 4),
        ("end", 4),
    ]


@pytest.mark.parametrize("args", [{"last_step": 5}, {"last_step": 3}, {"num_steps": 0}])
async def test_starting_at_or_past_the_last_step_runs_no_step(
    tmp_path: Path, args: dict[str, int]
) -> None:
    """A documented deviation: TensorFlow would run one more step."""
    await train_to(tmp_path, 5)
    recorder = RecordingHook()
    async with monitored([StopAtStepHook(**args), recorder], checkpoint_dir=tmp_path) as sess:
        assert await run_until_stopped(sess) == 0
    assert recorder.calls == [*start(5), ("end", 5)]


async def test_last_step_zero_on_a_fresh_start_runs_no_step() -> None:
    recorder = RecordingHook()
    async with monitored([StopAtStepHook(last_step=0), recorder]) as sess:
        assert await run_until_stopped(sess) == 0
    assert recorder.calls == [*start(), ("end", 0)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "exactly one of num_steps= or last_step="),
        ({"num_steps": 10, "last_step": 20}, "exactly one of num_steps= or last_step="),
        ({"num_steps": -1}, "num_steps must be >= 0"),
    ],
)
def test_stop_at_step_validation(args: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StopAtStepHook(**args)


# -- StepCounterHook (TF 73) -----------------------------------------------------------------------


async def test_step_counter_every_10_steps_over_30_runs_logs_at_11_and_21(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    # 0.5 s per step up to step 11, then 0.25 s: each rate is over the steps since the last log.
    step = timed_step(clock, lambda n: 0.5 if n <= 11 else 0.25)
    hook = StepCounterHook(every_n_steps=10, clock=clock)
    async with monitored([hook, StopAtStepHook(last_step=30)], step) as sess:
        assert await run_until_stopped(sess) == 30
    assert hook.steps_per_sec == [(11, 2.0), (21, 4.0)]
    assert messages(info_logs) == ["global_step/sec: 2", "global_step/sec: 4"]


async def test_step_counter_every_step_over_2_runs_logs_only_at_2() -> None:
    clock = FakeClock()
    hook = StepCounterHook(every_n_steps=1, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=2)], timed_step(clock, lambda n: 0.125)
    ) as sess:
        await run_until_stopped(sess)
    assert hook.steps_per_sec == [(2, 8.0)]


async def test_step_counter_first_trigger_only_arms(info_logs: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    hook = StepCounterHook(every_n_steps=1, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=1)], timed_step(clock, lambda n: 1.0)
    ) as sess:
        await run_until_stopped(sess)
    assert hook.steps_per_sec == []
    assert messages(info_logs) == []


async def test_step_counter_every_n_secs() -> None:
    clock = FakeClock()
    hook = StepCounterHook(every_n_steps=None, every_n_secs=1.0, clock=clock)
    step = timed_step(clock, lambda n: 0.25)
    async with monitored([hook, StopAtStepHook(last_step=10)], step) as sess:
        await run_until_stopped(sess)
    # Armed at step 1 (t=0.25); due once 1 s has passed since the last trigger.
    assert hook.steps_per_sec == [(5, 4.0), (9, 4.0)]


async def test_step_counter_begins_afresh_in_each_session() -> None:
    clock = FakeClock()
    hook = StepCounterHook(every_n_steps=1, clock=clock)
    for _ in range(2):
        async with monitored(
            [hook, StopAtStepHook(last_step=2)], timed_step(clock, lambda n: 0.5)
        ) as sess:
            await run_until_stopped(sess)
    # The first step of the second session only arms the timer again.
    assert hook.steps_per_sec == [(2, 2.0), (2, 2.0)]


async def test_step_counter_with_a_clock_that_did_not_move_logs_inf() -> None:
    hook = StepCounterHook(every_n_steps=1, clock=FakeClock())
    async with monitored([hook, StopAtStepHook(last_step=2)]) as sess:
        await run_until_stopped(sess)
    assert hook.steps_per_sec == [(2, math.inf)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"every_n_steps": None}, "exactly one of every_n_steps= or every_n_secs="),
        ({"every_n_steps": 10, "every_n_secs": 5.0}, "exactly one of every_n_steps="),
        ({"every_n_steps": 0}, "every_steps must be a positive int"),
    ],
)
def test_step_counter_validation(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StepCounterHook(**args)


# -- NanTensorHook (TF 75) -------------------------------------------------------------------------


def loss_step(losses: Sequence[Any]) -> Callable[..., Any]:
    """A counting step whose ``loss`` output is ``losses[step - 1]``."""

    def step(state: dict[str, Any]) -> dict[str, Any]:
        n = int(counting_step(state)["loss"])
        return {"loss": losses[n - 1]}

    return step


async def test_nan_loss_raises_and_end_is_not_called() -> None:
    recorder = RecordingHook()
    step = loss_step([0.5, 0.25, math.nan, 0.1])
    with pytest.raises(NanLossDuringTrainingError, match=r"^NaN loss during training\.$"):
        async with monitored([NanTensorHook("loss"), recorder], step) as sess:
            await run_until_stopped(sess)
    assert recorder.calls == [*start(), *steps(1, 2), ("before_run", 2)]


async def test_nan_in_an_array_loss_is_detected() -> None:
    step = loss_step([np.array([0.5, np.nan])])
    with pytest.raises(NanLossDuringTrainingError):
        async with monitored([NanTensorHook("loss")], step) as sess:
            await sess.run()


async def test_nan_loss_without_failing_warns_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingHook()
    step = loss_step([0.5, math.nan, 0.25])
    async with monitored([NanTensorHook("loss", fail_on_nan_loss=False), recorder], step) as sess:
        assert await run_until_stopped(sess) == 2
    assert recorder.calls == [*start(), *steps(1, 2), ("end", 2)]
    assert messages(caplog, logging.WARNING) == ["Model diverged with loss = NaN."]


async def test_a_finite_loss_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingHook()
    step = loss_step([0.5, math.inf, -math.inf, np.float32(1.0), np.ones(3)])
    async with monitored(
        [NanTensorHook("loss"), StopAtStepHook(last_step=5), recorder], step
    ) as sess:
        assert await run_until_stopped(sess) == 5
    assert recorder.calls[-1] == ("end", 5)
    assert messages(caplog, logging.WARNING) == []


def test_nan_tensor_hook_needs_an_output_name() -> None:
    with pytest.raises(TypeError, match="name of a step output"):
        NanTensorHook(["loss"])  # type: ignore[arg-type]


# -- LoggingTensorHook (TF 76) ---------------------------------------------------------------------


async def test_logging_every_2_iterations_first_line_without_seconds(
    info_logs: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    hook = LoggingTensorHook(["loss"], every_n_iter=2, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=6)], timed_step(clock, lambda n: 0.5)
    ) as sess:
        await run_until_stopped(sess)
    expected = ["loss = 1.0", "loss = 3.0 (1.000 sec)", "loss = 5.0 (1.000 sec)"]
    assert hook.logged == expected
    assert messages(info_logs) == expected


async def test_logging_counts_local_iterations_not_the_global_step(tmp_path: Path) -> None:
    await train_to(tmp_path, 100)
    hook = LoggingTensorHook({"step": "global_step"}, every_n_iter=3, clock=FakeClock())
    async with monitored([hook, StopAtStepHook(num_steps=5)], checkpoint_dir=tmp_path) as sess:
        await run_until_stopped(sess)
    # Iterations 0 and 3 of this session: global steps 101 and 104.
    assert hook.logged == ["step = 101", "step = 104 (0.000 sec)"]


async def test_logging_every_n_secs() -> None:
    clock = FakeClock()
    hook = LoggingTensorHook(["loss"], every_n_secs=1.0, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=12)], timed_step(clock, lambda n: 0.25)
    ) as sess:
        await run_until_stopped(sess)
    # As in TensorFlow, whether to log is decided before the run (iteration i starts at
    # t = 0.25 i) and the time is taken after it: iteration 0 logs at t = 0.25, iteration 5
    # is the first to start 1 s after that and logs at t = 1.5, then iteration 10.
    assert hook.logged == ["loss = 1.0", "loss = 6.0 (1.250 sec)", "loss = 11.0 (1.250 sec)"]


async def test_logging_fetches_only_on_logging_iterations() -> None:
    """The output is only asked for when it is logged: a step that lacks it otherwise is fine."""

    def step(state: dict[str, Any]) -> dict[str, Any]:
        n = int(counting_step(state)["loss"])
        return {"loss": float(n)} if n % 3 == 1 else {}

    hook = LoggingTensorHook(["loss"], every_n_iter=3, clock=FakeClock())
    async with monitored([hook, StopAtStepHook(last_step=7)], step) as sess:
        await run_until_stopped(sess)
    assert hook.logged == ["loss = 1.0", "loss = 4.0 (0.000 sec)", "loss = 7.0 (0.000 sec)"]


async def test_logging_at_end_only_logs_the_last_values_once_in_end() -> None:
    log: Log = []
    hook = LoggingTensorHook(["loss"], at_end=True)
    recorder = RecordingHook("recorder", log=log)

    class LoggedSoFar(SessionRunHook):
        def after_run(self, ctx: SessionRunContext, values: SessionRunValues) -> None:
            log.append(("logged", str(hook.logged), ctx.session.global_step))

    async with monitored([hook, LoggedSoFar(), StopAtStepHook(last_step=3), recorder]) as sess:
        await run_until_stopped(sess)
        assert hook.logged == []
    assert hook.logged == ["loss = 3.0"]
    assert ("logged", "[]", 3) in log


async def test_logging_at_end_and_every_n_iter() -> None:
    clock = FakeClock()
    hook = LoggingTensorHook(["loss"], every_n_iter=2, at_end=True, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=4)], timed_step(clock, lambda n: 1.0)
    ) as sess:
        await run_until_stopped(sess)
    assert hook.logged[:2] == ["loss = 1.0", "loss = 3.0 (2.000 sec)"]
    assert len(hook.logged) == 3
    assert hook.logged[2].startswith("loss = 4.0")


async def test_logging_at_end_logs_nothing_without_a_step_or_on_an_error() -> None:
    idle = LoggingTensorHook(["loss"], at_end=True)
    async with monitored([idle, StopAtStepHook(last_step=0)]) as sess:
        await run_until_stopped(sess)
    assert idle.logged == []
    failing = LoggingTensorHook(["loss"], at_end=True)
    with pytest.raises(ValueError, match="boom"):
        await run_once_then_fail(monitored([failing]), ValueError("boom"))
    assert failing.logged == []


async def test_logging_a_dict_sorts_its_tags_and_a_list_keeps_its_order() -> None:
    as_dict = LoggingTensorHook({"z_loss": "loss", "a_step": "global_step"}, every_n_iter=1)
    as_list = LoggingTensorHook(["loss", "global_step"], every_n_iter=1)
    async with monitored([as_dict, as_list]) as sess:
        await sess.run()
    assert as_dict.logged == ["a_step = 1, z_loss = 1.0"]
    assert as_list.logged == ["loss = 1.0, global_step = 1"]


async def test_logging_with_a_formatter() -> None:
    seen: list[dict[str, Any]] = []

    def formatter(values: dict[str, Any]) -> str:
        seen.append(values)
        return f"qqq={values['l']}"

    clock = FakeClock()
    hook = LoggingTensorHook({"l": "loss"}, every_n_iter=1, formatter=formatter, clock=clock)
    async with monitored(
        [hook, StopAtStepHook(last_step=2)], timed_step(clock, lambda n: 1.0)
    ) as sess:
        await run_until_stopped(sess)
    assert hook.logged == ["qqq=1.0", "qqq=2.0"]  # the formatter's line, with no seconds
    assert seen == [{"l": 1.0}, {"l": 2.0}]


async def test_logging_begins_afresh_in_each_session() -> None:
    hook = LoggingTensorHook(["loss"], every_n_iter=10, clock=FakeClock())
    for _ in range(2):
        async with monitored([hook, StopAtStepHook(last_step=2)]) as sess:
            await run_until_stopped(sess)
    assert hook.logged == ["loss = 1.0", "loss = 1.0"]  # iteration 0 of each session


async def test_logging_at_end_does_not_log_a_previous_sessions_values() -> None:
    hook = LoggingTensorHook(["loss"], at_end=True)
    async with monitored([hook, StopAtStepHook(last_step=2)]) as sess:
        await run_until_stopped(sess)
    async with monitored([hook, StopAtStepHook(last_step=0)]) as sess:
        await run_until_stopped(sess)
    assert hook.logged == ["loss = 2.0"]  # the second session ran no step: nothing to log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "exactly one of every_n_iter= or every_n_secs="),
        ({"every_n_iter": 5, "every_n_secs": 5.0}, "exactly one of"),
        ({"every_n_iter": 5, "every_n_secs": 5.0, "at_end": True}, "exactly one of"),
        ({"every_n_iter": 0}, "every_n_iter must be > 0"),
        ({"every_n_iter": -10}, "every_n_iter must be > 0"),
    ],
)
def test_logging_validation(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoggingTensorHook(["t"], **args)


def test_logging_tensors_must_be_a_dict_or_a_list_of_names() -> None:
    with pytest.raises(TypeError, match="dict of tags to output names or a list of names"):
        LoggingTensorHook("loss", every_n_iter=1)


# -- FinalOpsHook (TF 77) --------------------------------------------------------------------------


async def test_final_ops_by_name_read_the_last_steps_outputs() -> None:
    by_name = FinalOpsHook("loss")
    by_dict = FinalOpsHook({"l": "loss", "g": ["global_step"]})
    async with monitored([by_name, by_dict, StopAtStepHook(last_step=3)]) as sess:
        await run_until_stopped(sess)
        assert by_name.final_ops_values is None  # nothing before end()
        assert by_dict.final_ops_values is None
    assert by_name.final_ops_values == 3.0
    assert by_dict.final_ops_values == {"l": 3.0, "g": [3]}


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_final_ops_callable_is_evaluated_once_in_end(is_async: bool) -> None:
    calls: list[float] = []

    def sync_fn(state: dict[str, Any]) -> float:
        calls.append(float(state["w"][0]))
        return float(state["w"].sum())

    async def async_fn(state: dict[str, Any]) -> float:
        await anyio.lowlevel.checkpoint()
        return sync_fn(state)

    hook = FinalOpsHook(async_fn if is_async else sync_fn)
    async with monitored([hook, StopAtStepHook(last_step=3)]) as sess:
        await run_until_stopped(sess)
        assert hook.final_ops_values is None
        assert calls == []
    assert calls == [3.0]
    assert hook.final_ops_values == 6.0


async def test_final_ops_end_of_input_is_logged_and_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def final(state: dict[str, Any]) -> None:
        raise OutOfRangeError("no more evaluation data")

    with pytest.raises(OutOfRangeError, match="no more evaluation data"):
        async with monitored([FinalOpsHook(final)]) as sess:
            await sess.run()
    assert len(messages(caplog, logging.WARNING)) == 1


async def test_final_ops_with_no_step_and_on_an_error() -> None:
    idle = FinalOpsHook("loss")
    async with monitored([idle, StopAtStepHook(last_step=0)]) as sess:
        await run_until_stopped(sess)
    assert idle.final_ops_values is None
    failing = FinalOpsHook(lambda state: "evaluated")
    with pytest.raises(ValueError, match="boom"):
        await run_once_then_fail(monitored([failing]), ValueError("boom"))
    assert failing.final_ops_values is None  # end() was not called


async def test_final_ops_do_not_keep_a_previous_sessions_outputs() -> None:
    hook = FinalOpsHook("loss")
    async with monitored([hook, StopAtStepHook(last_step=2)]) as sess:
        await run_until_stopped(sess)
    assert hook.final_ops_values == 2.0
    async with monitored([hook, StopAtStepHook(last_step=0)]) as sess:
        await run_until_stopped(sess)
    assert hook.final_ops_values is None  # the second session ran no step


def test_final_ops_feed_dict_is_not_supported() -> None:
    with pytest.raises(ValueError, match="final_ops_feed_dict"):
        FinalOpsHook("loss", final_ops_feed_dict={"x": 1})


async def test_a_hook_driven_without_after_create_session_says_what_to_call() -> None:
    # TensorFlow's own tests drive hooks by hand; a missing after_create_session is a
    # RuntimeError that names it, not a bare AssertionError.
    hook = StopAtStepHook(num_steps=3)
    hook.begin()
    context = SessionRunContext(SessionRunArgs(), StepSession({}, lambda state: None, 0))
    with pytest.raises(RuntimeError, match=r"StopAtStepHook: call after_create_session"):
        hook.after_run(context, SessionRunValues(None))
