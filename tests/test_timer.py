"""SecondOrStepTimer and NeverTriggerTimer: when a periodic hook triggers (TF_SEMANTICS 37-41).

Pure unit tests; time comes from a ``FakeClock``, so elapsed seconds are exact.
"""

from __future__ import annotations

import math

import pytest

from asyncckpt import NeverTriggerTimer, SecondOrStepTimer
from asyncckpt.testing import FakeClock

# -- validation (37) -------------------------------------------------------------------------------


def test_neither_interval_is_an_error_with_tensorflows_message() -> None:
    with pytest.raises(ValueError, match=r"^Either every_secs or every_steps should be provided"):
        SecondOrStepTimer()


def test_both_intervals_is_an_error_with_tensorflows_message() -> None:
    with pytest.raises(ValueError, match=r"^Can not provide both every_secs and every_steps"):
        SecondOrStepTimer(every_secs=2.0, every_steps=10)


@pytest.mark.parametrize("every_steps", [0, -3, True])
def test_every_steps_must_be_a_positive_int(every_steps: int) -> None:
    with pytest.raises(ValueError, match="every_steps must be a positive int"):
        SecondOrStepTimer(every_steps=every_steps)


@pytest.mark.parametrize("every_secs", [-0.5, math.nan])
def test_every_secs_must_be_non_negative(every_secs: float) -> None:
    with pytest.raises(ValueError, match="every_secs must be >= 0"):
        SecondOrStepTimer(every_secs=every_secs)


# -- should_trigger_for_step (38, 40) --------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 1000])
@pytest.mark.parametrize("kind", ["steps", "secs"])
def test_a_timer_that_never_triggered_triggers_for_any_step(kind: str, step: int) -> None:
    timer = (
        SecondOrStepTimer(every_steps=5)
        if kind == "steps"
        else SecondOrStepTimer(every_secs=60.0, clock=FakeClock())
    )
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(step) is True


@pytest.mark.parametrize("kind", ["steps", "secs"])
def test_the_step_of_the_last_trigger_never_triggers_again(kind: str) -> None:
    clock = FakeClock()
    timer = (
        SecondOrStepTimer(every_steps=1)
        if kind == "steps"
        else SecondOrStepTimer(every_secs=0.0, clock=clock)
    )
    timer.update_last_triggered_step(7)
    clock.advance(3600.0)
    assert timer.should_trigger_for_step(7) is False
    assert timer.should_trigger_for_step(8) is True


def test_every_3_steps_sequence_from_tensorflows_test() -> None:
    timer = SecondOrStepTimer(every_steps=3)
    assert timer.should_trigger_for_step(1) is True
    timer.update_last_triggered_step(1)
    assert [timer.should_trigger_for_step(step) for step in (1, 2, 3, 4)] == [
        False,
        False,
        False,
        True,
    ]


def test_step_intervals_count_from_the_last_trigger_not_multiples_of_n() -> None:
    timer = SecondOrStepTimer(every_steps=3)
    timer.update_last_triggered_step(4)
    assert [timer.should_trigger_for_step(step) for step in (5, 6, 7, 9, 100)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    timer.update_last_triggered_step(9)  # a late trigger moves the schedule
    assert [timer.should_trigger_for_step(step) for step in (10, 11, 12)] == [False, False, True]


def test_a_step_schedule_ignores_time() -> None:
    clock = FakeClock()
    timer = SecondOrStepTimer(every_steps=3, clock=clock)
    timer.update_last_triggered_step(1)
    clock.advance(1e9)
    assert timer.should_trigger_for_step(2) is False


def test_every_secs_triggers_once_the_interval_has_passed_since_the_last_trigger() -> None:
    clock = FakeClock(1000.0)
    timer = SecondOrStepTimer(every_secs=1.0, clock=clock)
    assert timer.should_trigger_for_step(1) is True
    timer.update_last_triggered_step(1)
    assert timer.should_trigger_for_step(1) is False
    assert timer.should_trigger_for_step(2) is False
    assert timer.should_trigger_for_step(10_000) is False  # steps do not count
    clock.advance(0.5)
    assert timer.should_trigger_for_step(2) is False
    clock.advance(0.5)  # exactly every_secs later: due (>=)
    assert timer.should_trigger_for_step(1) is False
    assert timer.should_trigger_for_step(2) is True
    clock.advance(0.25)
    timer.update_last_triggered_step(3)  # the next interval starts at this trigger
    clock.advance(0.75)
    assert timer.should_trigger_for_step(4) is False
    clock.advance(0.25)
    assert timer.should_trigger_for_step(4) is True


def test_every_secs_zero_triggers_for_every_new_step() -> None:
    timer = SecondOrStepTimer(every_secs=0.0, clock=FakeClock())
    triggered = []
    for step in (1, 1, 2, 2, 3):
        if timer.should_trigger_for_step(step):
            timer.update_last_triggered_step(step)
            triggered.append(step)
    assert triggered == [1, 2, 3]


# -- update_last_triggered_step (39) ---------------------------------------------------------------


def test_update_returns_none_first_then_exact_elapsed_secs_and_steps() -> None:
    clock = FakeClock(50.0)
    timer = SecondOrStepTimer(every_steps=1, clock=clock)
    assert timer.update_last_triggered_step(1) == (None, None)
    assert timer.last_triggered_step() == 1
    clock.advance(2.5)
    assert timer.update_last_triggered_step(5) == (2.5, 4)
    assert timer.last_triggered_step() == 5
    clock.advance(0.75)
    assert timer.update_last_triggered_step(7) == (0.75, 2)
    assert timer.last_triggered_step() == 7


def test_the_default_clock_is_monotonic_seconds() -> None:
    timer = SecondOrStepTimer(every_secs=3600.0)
    timer.update_last_triggered_step(1)
    elapsed_secs, elapsed_steps = timer.update_last_triggered_step(2)
    assert elapsed_secs is not None
    assert 0.0 <= elapsed_secs < 60.0
    assert elapsed_steps == 1


# -- reset -----------------------------------------------------------------------------------------


def test_reset_forgets_the_last_trigger() -> None:
    clock = FakeClock()
    timer = SecondOrStepTimer(every_steps=10, clock=clock)
    timer.update_last_triggered_step(5)
    timer.reset()
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(5) is True  # even the step of the forgotten trigger
    clock.advance(1.0)
    assert timer.update_last_triggered_step(6) == (None, None)
    assert timer.should_trigger_for_step(7) is False


def test_reset_forgets_the_last_trigger_of_a_time_schedule() -> None:
    clock = FakeClock()
    timer = SecondOrStepTimer(every_secs=10.0, clock=clock)
    timer.update_last_triggered_step(5)
    timer.reset()
    assert timer.should_trigger_for_step(5) is True
    timer.update_last_triggered_step(6)
    clock.advance(9.5)
    assert timer.should_trigger_for_step(7) is False  # 10 s from the new trigger, not the old
    clock.advance(0.5)
    assert timer.should_trigger_for_step(6) is False
    assert timer.should_trigger_for_step(7) is True


# -- NeverTriggerTimer (41) ------------------------------------------------------------------------


def test_never_trigger_timer_never_triggers_and_records_nothing() -> None:
    timer = NeverTriggerTimer()
    assert isinstance(timer, SecondOrStepTimer)  # usable wherever a timer is expected
    assert [timer.should_trigger_for_step(step) for step in (0, 1, 2, 10**9)] == [False] * 4
    assert timer.update_last_triggered_step(3) == (None, None)
    assert timer.update_last_triggered_step(9) == (None, None)
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(10) is False
    timer.reset()
    assert timer.should_trigger_for_step(0) is False
