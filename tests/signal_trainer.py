"""A trainer for tests/test_signals.py: trains under ``stop_on_signals`` until a signal stops it.

    python signal_trainer.py DIR BACKEND STEP MODE

BACKEND is ``asyncio`` or ``trio``; STEP is the kind of step function (see ``STEP_KINDS``):
each step updates a numpy array in place and keeps the CPU busy for ``STEP_SECONDS``. MODE says
when ``READY`` is printed (always inside the ``stop_on_signals`` block, its handlers installed):

- ``run``: after step ``READY_STEP``, between steps; training goes on until the signal.
- ``hold``: from inside step ``READY_STEP``, which then keeps working until ``should_stop()``
  says the stop has been seen (or ``HOLD_SECONDS`` pass: then it complains on stderr). The
  signal thus arrives in the middle of a step, and the loop must stop right after it: the
  final step is ``READY_STEP``. A step function that never yields gives the event loop no
  turn in which to hear the signal, so this shows the stop is seen without one.

After the session has closed (its final save written) it prints ``FINAL <global step>``. Not a
test module: the tests run it in a subprocess, since a signal is process-wide.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import numpy as np

import asyncckpt

if TYPE_CHECKING:
    from collections.abc import Callable

STEP_SECONDS: Final = 0.005
HOLD_SECONDS: Final = 5.0
READY_STEP: Final = 3
STEP_KINDS: Final = ("sync", "async-no-await", "async-awaiting")
MODES: Final = ("run", "hold")


def _spin(seconds: float) -> None:
    # Busy CPU, like a real step: the signal handler runs between two bytecodes of this loop.
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


class _Steps:
    """The step functions, with what the ``hold`` mode needs: the session, to see the stop."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.session: asyncckpt.MonitoredSession | None = None

    def _work(self, state: dict[str, Any]) -> dict[str, Any]:
        state["w"] += 1.0
        state["step"] += 1
        _spin(STEP_SECONDS)
        return {"step": state["step"]}

    def _holding(self, state: dict[str, Any]) -> bool:
        if not self.hold or state["step"] != READY_STEP:
            return False
        print("READY", flush=True)
        return True

    def _stop_seen(self, deadline: float) -> bool:
        assert self.session is not None
        if self.session.should_stop():
            return True
        if time.monotonic() > deadline:
            print(f"no stop seen within {HOLD_SECONDS} s of READY", file=sys.stderr)
            return True
        _spin(0.001)
        return False

    def sync(self, state: dict[str, Any]) -> dict[str, Any]:
        """A plain ``def``: the event loop gets no turn during or between steps."""
        outputs = self._work(state)
        if self._holding(state):
            deadline = time.monotonic() + HOLD_SECONDS
            while not self._stop_seen(deadline):
                pass
        return outputs

    async def async_no_await(self, state: dict[str, Any]) -> dict[str, Any]:
        """An ``async def`` that never awaits: no more turns for the loop than a plain ``def``."""
        return self.sync(state)

    async def async_awaiting(self, state: dict[str, Any]) -> dict[str, Any]:
        """An ``async def`` that awaits (as a trainer awaiting its data does)."""
        outputs = self._work(state)
        if self._holding(state):
            deadline = time.monotonic() + HOLD_SECONDS
            while not self._stop_seen(deadline):
                await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()  # anyio.sleep(0)
        return outputs

    def by_kind(self, kind: str) -> Callable[[dict[str, Any]], Any]:
        steps: dict[str, Callable[[dict[str, Any]], Any]] = {
            "sync": self.sync,
            "async-no-await": self.async_no_await,
            "async-awaiting": self.async_awaiting,
        }
        return steps[kind]


async def train(directory: str, step_kind: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    steps = _Steps(hold=mode == "hold")
    state = {"w": np.zeros(8), "step": 0}
    async with (
        asyncckpt.MonitoredTrainingSession(
            state,
            steps.by_kind(step_kind),
            checkpoint_dir=directory,
            save_checkpoint_steps=50,
            save_summaries_steps=None,
            log_step_count_steps=None,
            hooks=[asyncckpt.StopAtStepHook(last_step=100_000)],
        ) as sess,
        asyncckpt.stop_on_signals(sess),
    ):
        steps.session = sess
        while not sess.should_stop():
            await sess.run()
            if mode == "run" and sess.global_step == READY_STEP:
                print("READY", flush=True)
    print(f"FINAL {sess.global_step}", flush=True)


def main(argv: list[str]) -> None:
    directory, backend, step_kind, mode = argv
    anyio.run(train, directory, step_kind, mode, backend=backend)


if __name__ == "__main__":
    main(sys.argv[1:])
