"""stop_on_signals: a signal stops the loop at the next step boundary, with every step function.

In-process tests raise real signals in this process with ``signal.raise_signal``, which runs
the Python-level handler before it returns: deterministic, and only ever inside the block,
where the handler is ours. The end-to-end tests (slow-marked) run ``tests/signal_trainer.py``
in a subprocess and signal it from here: exit code 0, and the latest checkpoint is the step
where the loop stopped.
"""

from __future__ import annotations

import functools
import importlib.util
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
import signal_trainer
from support import signal_when_ready

import asyncckpt
from asyncckpt import MonitoredTrainingSession, StopAtStepHook, stop_on_signals

if TYPE_CHECKING:
    from types import FrameType

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

_TRAINER = Path(signal_trainer.__file__)
_BACKENDS = ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") else [])
_WATCHED = (signal.SIGTERM, signal.SIGINT)


class _Stoppable:
    """Anything with ``request_stop()``: counts the requests, ``requested`` set at the first."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls = 0
        self.requested = anyio.Event()
        self._error = error

    def request_stop(self) -> None:
        self.calls += 1
        self.requested.set()
        if self._error is not None:
            raise self._error


def _handlers() -> dict[signal.Signals, Any]:
    return {signum: signal.getsignal(signum) for signum in _WATCHED}


def _own_handler(signum: int, frame: FrameType | None) -> None:
    raise AssertionError("the handler before the block ran inside it")


# -- in process --------------------------------------------------------------------------------


async def test_the_previous_handlers_are_back_after_the_block() -> None:
    before = _handlers()
    previous_term = signal.signal(signal.SIGTERM, _own_handler)
    try:
        async with stop_on_signals(_Stoppable()):
            inside = _handlers()
            assert inside[signal.SIGTERM] is not _own_handler
            assert inside[signal.SIGINT] is not before[signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) is _own_handler
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    assert _handlers() == before


async def test_the_handlers_are_restored_when_the_block_raises_or_is_cancelled() -> None:
    before = _handlers()
    with pytest.raises(KeyError) as raised:
        async with stop_on_signals(_Stoppable()):
            raise KeyError("from the block") from OSError("its cause")
    assert isinstance(raised.value.__cause__, OSError)  # surfaces as itself, cause kept
    assert _handlers() == before
    with anyio.CancelScope() as scope:
        async with stop_on_signals(_Stoppable()):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert _handlers() == before


async def test_only_the_signals_named_are_watched() -> None:
    before, usr1_before = _handlers(), signal.getsignal(signal.SIGUSR1)
    target = _Stoppable()
    with anyio.fail_after(5):
        async with stop_on_signals(target, signal.SIGUSR1):
            assert _handlers() == before
            assert signal.getsignal(signal.SIGUSR1) is not usr1_before
            signal.raise_signal(signal.SIGUSR1)
            await target.requested.wait()
    assert signal.getsignal(signal.SIGUSR1) is usr1_before


async def test_a_signal_that_cannot_be_watched_leaves_every_handler_as_it_was() -> None:
    before = _handlers()
    with pytest.raises(OSError):  # noqa: PT011 - the OS's own error, passed through
        async with stop_on_signals(_Stoppable(), signal.SIGTERM, signal.SIGKILL):
            pytest.fail("the block ran")
    assert _handlers() == before


@pytest.mark.parametrize(
    "signums",
    [[signal.SIGTERM], [signal.SIGINT], [signal.SIGINT, signal.SIGINT, signal.SIGTERM]],
    ids=lambda signums: "-".join(signum.name for signum in signums),
)
async def test_a_signal_mid_step_is_seen_by_should_stop_without_a_loop_turn(
    signums: list[signal.Signals],
) -> None:
    # The step never yields: the stop must show in the step itself, then no step may start.
    # A second signal while the stop is pending is the same stop (no KeyboardInterrupt).
    sessions: list[asyncckpt.MonitoredSession] = []
    seen_in_step: list[bool] = []
    woken: list[bool] = []

    def step(state: dict[str, int]) -> None:
        state["step"] += 1
        if state["step"] == 2:
            for signum in signums:
                signal.raise_signal(signum)
                seen_in_step.append(sessions[0].should_stop())

    async def wait_for_stop(sess: asyncckpt.MonitoredSession) -> None:
        await sess.coordinator.wait_for_stop()
        woken.append(True)

    with anyio.fail_after(5):
        async with (
            MonitoredTrainingSession(
                {"step": 0},
                step,
                save_summaries_steps=None,
                log_step_count_steps=None,
                # Bounds the loop should the stop go unseen (fail_after needs a loop turn).
                hooks=[StopAtStepHook(last_step=100)],
            ) as sess,
            anyio.create_task_group() as tg,
            stop_on_signals(sess),
        ):
            sessions.append(sess)
            tg.start_soon(wait_for_stop, sess)
            while not sess.should_stop():
                await sess.run()
            assert sess.global_step == 2
    assert seen_in_step == [True] * len(signums)
    # request_stop() ran (at a loop turn or at the block's exit): the waiter was woken, and
    # the task group's exit did not have to cancel it.
    assert woken == [True]


async def test_a_coordinator_is_stopped_as_its_session_is() -> None:
    async with MonitoredTrainingSession(
        {"step": 0}, lambda state: None, save_summaries_steps=None, log_step_count_steps=None
    ) as sess:
        coord = sess.coordinator
        with anyio.fail_after(5):
            async with stop_on_signals(coord):
                signal.raise_signal(signal.SIGTERM)
                assert coord.should_stop()  # before any loop turn
                assert sess.should_stop()
                await coord.wait_for_stop()
        with pytest.raises(RuntimeError, match="should_stop"):
            await sess.run()


async def test_any_object_with_request_stop_is_asked_at_the_loop_next_turn() -> None:
    target = _Stoppable()
    with anyio.fail_after(5):
        async with stop_on_signals(target):
            signal.raise_signal(signal.SIGTERM)
            await target.requested.wait()
    assert target.calls == 1


async def test_a_stop_still_in_flight_is_delivered_when_the_block_exits() -> None:
    target = _Stoppable()
    async with stop_on_signals(target):
        signal.raise_signal(signal.SIGTERM)
        # No await: the loop has had no turn since the signal.
    assert target.calls == 1
    await anyio.wait_all_tasks_blocked()
    for _ in range(5):  # the callback still queued, if any, runs and does nothing
        await anyio.lowlevel.checkpoint()
    assert target.calls == 1


async def test_a_second_signal_is_the_same_stop_request() -> None:
    target = _Stoppable()
    with anyio.fail_after(5):
        async with stop_on_signals(target):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt either
            await target.requested.wait()
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
    assert target.calls == 1


async def test_a_failing_request_stop_surfaces_when_the_block_exits() -> None:
    target = _Stoppable(ValueError("cannot stop"))

    async def loop_turns() -> None:
        async with stop_on_signals(target):
            signal.raise_signal(signal.SIGTERM)
            await target.requested.wait()  # it failed on the loop, in the callback

    async def no_loop_turn() -> None:
        async with stop_on_signals(target):
            signal.raise_signal(signal.SIGTERM)  # it fails at the exit

    for block in (loop_turns, no_loop_turn):
        with anyio.fail_after(5), pytest.raises(ValueError, match="cannot stop"):
            await block()
    assert target.calls == 2


async def test_the_block_error_wins_over_a_failing_request_stop() -> None:
    target = _Stoppable(ValueError("cannot stop"))

    async def block() -> None:
        async with stop_on_signals(target):
            signal.raise_signal(signal.SIGTERM)
            raise KeyError("from the block")

    with pytest.raises(KeyError) as raised:
        await block()
    # Told beside it, traceback and all, not swallowed.
    assert any("ValueError: cannot stop" in note for note in raised.value.__notes__)


async def test_outside_the_main_thread_is_a_clear_error(anyio_backend: str) -> None:
    async def use_it() -> None:
        async with stop_on_signals(_Stoppable()):
            pytest.fail("the block ran")

    def in_a_thread() -> BaseException | None:
        try:
            anyio.run(use_it, backend=anyio_backend)
        except RuntimeError as exc:
            return exc
        return None

    before = _handlers()
    error = await anyio.to_thread.run_sync(in_a_thread)
    assert isinstance(error, RuntimeError)
    assert "main thread" in str(error)
    assert _handlers() == before


def test_without_a_running_event_loop_is_a_clear_error() -> None:
    # Entering does not await, so the coroutine can be driven by hand, outside any loop.
    before = _handlers()
    enter = stop_on_signals(_Stoppable()).__aenter__()
    with pytest.raises(RuntimeError, match="running asyncio or trio event loop"):
        enter.send(None)
    assert _handlers() == before


# -- a real process, signalled from here ----------------------------------------------------


def _train_until_signalled(
    directory: Path, backend: str, step_kind: str, mode: str, signum: signal.Signals
) -> int:
    """Run the trainer, signal it once READY; return the step it stopped at."""
    stdout = signal_when_ready(
        [sys.executable, str(_TRAINER), str(directory), backend, step_kind, mode],
        "READY",
        signum,
    )
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    assert lines[0].startswith("FINAL "), stdout
    return int(lines[0].removeprefix("FINAL "))


def _assert_saved_at(directory: Path, last_step: int) -> None:
    """The latest checkpoint is the final save, written at ``last_step``, holding that step."""
    latest = asyncckpt.latest_checkpoint(directory)
    assert latest == str(directory / f"model.ckpt-{last_step}")
    state = anyio.run(functools.partial(asyncckpt.Saver().restore, latest))
    assert state["step"] == last_step
    np.testing.assert_array_equal(state["w"], np.full(8, float(last_step)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", _WATCHED, ids=lambda signum: signum.name)
@pytest.mark.parametrize("step_kind", signal_trainer.STEP_KINDS)
@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_signal_mid_step_stops_after_that_step_saves_it_and_exits_0(
    tmp_path: Path, backend: str, step_kind: str, signum: signal.Signals
) -> None:
    # The signal arrives while step READY_STEP runs (it waits for should_stop()): no step
    # may start after it, and the final save is that step's. (A second signal is tested in
    # process: sent from here, it could arrive after the block, when it is not ours.)
    last_step = _train_until_signalled(tmp_path, backend, step_kind, "hold", signum)
    assert last_step == signal_trainer.READY_STEP
    _assert_saved_at(tmp_path, last_step)
    checkpoint_state = asyncckpt.get_checkpoint_state(tmp_path)
    assert checkpoint_state is not None
    assert checkpoint_state.names == ("model.ckpt-0", f"model.ckpt-{last_step}")


@pytest.mark.slow
@pytest.mark.parametrize("step_kind", signal_trainer.STEP_KINDS)
@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_signal_while_training_saves_the_last_step_and_exits_0(
    tmp_path: Path, backend: str, step_kind: str
) -> None:
    last_step = _train_until_signalled(tmp_path, backend, step_kind, "run", signal.SIGTERM)
    assert last_step >= signal_trainer.READY_STEP
    _assert_saved_at(tmp_path, last_step)
