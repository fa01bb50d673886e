"""SecondOrStepTimer: when a periodic hook triggers; pure logic with an injectable clock.

Knows nothing of sessions or files. Intervals are relative to the last trigger, exactly as
TensorFlow's timer (not aligned to multiples of N).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["NeverTriggerTimer", "SecondOrStepTimer"]


class SecondOrStepTimer:
    """Trigger every ``every_secs`` seconds or every ``every_steps`` steps (exactly one).

    Args:
        every_secs: seconds between triggers.
        every_steps: steps between triggers.
        clock: a monotonic clock in seconds (``time.monotonic``); inject a fake in tests.

    Raises:
        ValueError: neither or both of ``every_secs`` and ``every_steps``.
    """

    def __init__(
        self,
        every_secs: float | None = None,
        every_steps: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # TensorFlow's messages, then what to do.
        if every_secs is None and every_steps is None:
            raise ValueError(
                "Either every_secs or every_steps should be provided: pass exactly one of them."
            )
        if every_secs is not None and every_steps is not None:
            raise ValueError(
                "Can not provide both every_secs and every_steps: pass exactly one of them."
            )
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps <= 0):
            raise ValueError(f"every_steps must be a positive int, not {every_steps!r}")
        if every_secs is not None and not every_secs >= 0:
            raise ValueError(f"every_secs must be >= 0, not {every_secs!r}")
        self._every_secs = every_secs
        self._every_steps = every_steps
        self._clock = clock
        self._last_time: float | None = None
        self._last_step: int | None = None
        # Hooks ask every step; these make the answer one comparison. A step schedule that
        # triggered keeps the first step due (every_steps >= 1, so a step that is due is
        # never the last trigger's); a time schedule keeps the time due.
        self._due_step: int | None = None
        self._due_time = 0.0

    def __repr__(self) -> str:
        every = (
            f"every_secs={self._every_secs}"
            if self._every_secs is not None
            else f"every_steps={self._every_steps}"
        )
        return f"SecondOrStepTimer({every}, last_triggered_step={self._last_step})"

    def reset(self) -> None:
        """Forget the last trigger: the next step triggers."""
        self._last_time = None
        self._last_step = None
        self._due_step = None

    def should_trigger_for_step(self, step: int) -> bool:
        """Return whether ``step`` is due (always, if the timer never triggered)."""
        due = self._due_step
        if due is not None:
            return step >= due
        last = self._last_step
        if last is None:
            return True
        if step == last:
            return False
        # Only a time schedule gets here; the clock is read only for a new step.
        return self._clock() >= self._due_time

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        """Record a trigger at ``step``; return ``(elapsed_secs, elapsed_steps)`` since the
        previous trigger, both None the first time."""
        now = self._clock()
        elapsed: tuple[float | None, int | None] = (None, None)
        if self._last_time is not None and self._last_step is not None:
            elapsed = (now - self._last_time, step - self._last_step)
        self._last_time = now
        self._last_step = step
        if self._every_steps is not None:
            self._due_step = step + self._every_steps
        else:
            assert self._every_secs is not None
            self._due_time = now + self._every_secs
        return elapsed

    def last_triggered_step(self) -> int | None:
        """The step of the last trigger, or None."""
        return self._last_step


class NeverTriggerTimer(SecondOrStepTimer):
    """A timer that never triggers (a hook with nothing to do periodically)."""

    def __init__(self) -> None:
        super().__init__(every_steps=1)

    def should_trigger_for_step(self, step: int) -> bool:
        """Never."""
        return False

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        """Record nothing."""
        return (None, None)

    def last_triggered_step(self) -> int | None:
        """Always None."""
        return None
