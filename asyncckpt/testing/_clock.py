"""FakeClock: a clock that moves only when a test says so."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock for timers and hooks that moves only when told: ``clock()``, ``advance(s)``.

    Pass it as ``clock=`` to ``SecondOrStepTimer``, ``CheckpointSaverHook``,
    ``StepCounterHook`` or ``LoggingTensorHook`` (monotonic seconds), or to ``Saver``
    (wall-clock seconds) to test time-based schedules without sleeping.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock({self.now})"
