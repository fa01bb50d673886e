"""The standard hooks with TensorFlow's arguments and semantics, where a "tensor" is the name
of a step output: StopAtStepHook, StepCounterHook, NanTensorHook, LoggingTensorHook,
FinalOpsHook."""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core._errors import NanLossDuringTrainingError, OutOfRangeError
from ._base import (
    CoordinatorLike,
    SessionLike,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    created,
)
from ._summary import summary_writer_for
from ._timer import SecondOrStepTimer

if TYPE_CHECKING:
    import os

    from .._storage import Storage
    from .._summary import SummaryWriter

__all__ = [
    "FinalOpsHook",
    "LoggingTensorHook",
    "NanTensorHook",
    "StepCounterHook",
    "StopAtStepHook",
]

logger = logging.getLogger("asyncckpt")


class StopAtStepHook(SessionRunHook):
    """Request a stop once the global step reaches ``last_step``.

    Args:
        num_steps: run this many steps from the step the session starts (or resumes) at;
            computed once, so a recovery does not extend it.
        last_step: stop once the global step is at least this.

    Raises:
        ValueError: not exactly one of ``num_steps`` / ``last_step``.

    Unlike TensorFlow, a session that starts at or past ``last_step`` (a resumed run that
    already finished) stops before running a step, instead of running one more.
    """

    def __init__(self, num_steps: int | None = None, last_step: int | None = None) -> None:
        if (num_steps is None) == (last_step is None):
            raise ValueError("pass exactly one of num_steps= or last_step=")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, not {num_steps}")
        self._num_steps = num_steps
        self._last_step = last_step

    def __repr__(self) -> str:
        return f"StopAtStepHook(last_step={self._last_step}, num_steps={self._num_steps})"

    @property
    def last_step(self) -> int | None:
        """The step at which the session stops (known once the session is created)."""
        return self._last_step

    def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Fix ``last_step`` from ``num_steps`` (once); stop at once if already there."""
        if self._last_step is None:
            assert self._num_steps is not None
            self._last_step = session.global_step + self._num_steps
        if session.global_step >= self._last_step:
            coord.request_stop()

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Request a stop once the global step reaches ``last_step``."""
        if run_context.session.global_step >= created(self._last_step, self):
            run_context.request_stop()


class StepCounterHook(SessionRunHook):
    """Log the steps per second every N steps or seconds (``global_step/sec``).

    The first trigger only arms the timer, as in TensorFlow. The figure is also written as
    the scalar ``global_step/sec`` to ``summary_writer``, or to the session's writer for
    ``output_dir`` when one is given.

    Args:
        every_n_steps: log every this many steps (the default, 100).
        every_n_secs: log every this many seconds instead.
        output_dir: where the summary will be written.
        summary_writer: a writer to use instead.
        clock: the monotonic clock of the timer.
        storage: where the event file lives (local files by default).
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        every_n_secs: float | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        summary_writer: SummaryWriter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        storage: Storage | None = None,
    ) -> None:
        if (every_n_steps is None) == (every_n_secs is None):
            raise ValueError(
                "pass exactly one of every_n_steps= or every_n_secs= (set every_n_steps=None "
                "to use every_n_secs)"
            )
        self._timer = SecondOrStepTimer(
            every_secs=every_n_secs, every_steps=every_n_steps, clock=clock
        )
        self.output_dir = output_dir
        self._storage = storage
        self.summary_writer = summary_writer
        self.steps_per_sec: list[tuple[int, float]] = []
        """Every ``(global_step, steps/sec)`` figure logged so far."""

    def begin(self) -> None:
        """Reset the timer (a new session starts counting afresh)."""
        self._timer.reset()

    async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Get the session's summary writer for ``output_dir`` (if any)."""
        if self.summary_writer is None and self.output_dir is not None:
            self.summary_writer = await summary_writer_for(coord, self.output_dir, self._storage)

    def after_run(
        self, run_context: SessionRunContext, run_values: SessionRunValues
    ) -> Coroutine[Any, Any, None] | None:
        """Log steps/sec when the timer triggers (the first trigger only arms it)."""
        step = run_context.session.global_step
        if not self._timer.should_trigger_for_step(step):
            return None
        elapsed_secs, elapsed_steps = self._timer.update_last_triggered_step(step)
        if elapsed_secs is None or elapsed_steps is None:
            return None
        rate = elapsed_steps / elapsed_secs if elapsed_secs > 0 else math.inf
        self.steps_per_sec.append((step, rate))
        logger.info("global_step/sec: %g", rate)
        if self.summary_writer is None:
            return None
        return self.summary_writer.add_scalar("global_step/sec", rate, step)


class NanTensorHook(SessionRunHook):
    """Fail (or stop) when the loss output is NaN.

    Args:
        loss_tensor: the name of the step output holding the loss.
        fail_on_nan_loss: raise ``NanLossDuringTrainingError`` (so ``end()`` is not called);
            otherwise log a warning and request a stop.
    """

    def __init__(self, loss_tensor: str, fail_on_nan_loss: bool = True) -> None:
        if not isinstance(loss_tensor, str):
            raise TypeError("loss_tensor must be the name of a step output")
        self._loss_tensor = loss_tensor
        self._fail_on_nan_loss = fail_on_nan_loss
        self._args = SessionRunArgs(loss_tensor)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        """Fetch the loss every step."""
        return self._args

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Raise or stop on a NaN loss."""
        if np.isnan(run_values.results).any():
            if self._fail_on_nan_loss:
                raise NanLossDuringTrainingError
            logger.warning("Model diverged with loss = NaN.")
            run_context.request_stop()


def _log_line(values: Mapping[str, Any], elapsed: float | None) -> str:
    line = ", ".join(f"{tag} = {value}" for tag, value in values.items())
    return f"{line} ({elapsed:.3f} sec)" if elapsed is not None else line


class LoggingTensorHook(SessionRunHook):
    """Log step outputs every N local iterations or seconds, and/or at the end.

    Args:
        tensors: a dict from tags to output names (logged in sorted tag order, as in
            TensorFlow), or a list of output names (logged in that order).
        every_n_iter: log every this many runs of this session (a local counter from 0,
            not the global step, as in TensorFlow).
        every_n_secs: log every this many seconds.
        at_end: log the last values in ``end()``.
        formatter: ``formatter(dict of values) -> str`` replacing the default line.
        clock: the monotonic clock of the timer.

    Raises:
        ValueError: neither ``at_end`` nor exactly one interval; a non-positive interval.
    """

    def __init__(
        self,
        tensors: Mapping[str, str] | Sequence[str],
        every_n_iter: int | None = None,
        every_n_secs: float | None = None,
        at_end: bool = False,
        formatter: Callable[[dict[str, Any]], str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        only_at_end = at_end and every_n_iter is None and every_n_secs is None
        if not only_at_end and (every_n_iter is None) == (every_n_secs is None):
            raise ValueError(
                "pass at_end=True and/or exactly one of every_n_iter= or every_n_secs="
            )
        if every_n_iter is not None and every_n_iter <= 0:
            raise ValueError(f"every_n_iter must be > 0, not {every_n_iter}")
        if isinstance(tensors, str):
            raise TypeError("tensors must be a dict of tags to output names or a list of names")
        # TensorFlow logs a dict's tags sorted, a list's names in the order given.
        self._tensors: dict[str, str] = (
            dict(sorted(tensors.items()))
            if isinstance(tensors, Mapping)
            else {name: name for name in tensors}
        )
        self._timer = (
            None
            if only_at_end
            else SecondOrStepTimer(every_secs=every_n_secs, every_steps=every_n_iter, clock=clock)
        )
        self._at_end = at_end
        self._formatter = formatter
        self._args = SessionRunArgs(self._tensors)
        self._iteration = 0
        self._should_log = False
        self._last_values: dict[str, Any] | None = None
        self.logged: list[str] = []
        """Every line logged so far."""

    def begin(self) -> None:
        """Reset the local counter, the timer and the values kept for ``at_end``."""
        self._iteration = 0
        self._last_values = None
        if self._timer is not None:
            self._timer.reset()

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Fetch the tensors on logging iterations (and every step when ``at_end``)."""
        self._should_log = self._timer is not None and self._timer.should_trigger_for_step(
            self._iteration
        )
        return self._args if self._should_log or self._at_end else None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Log on logging iterations; count the iteration."""
        if run_values.results is not None:
            self._last_values = run_values.results
        if self._should_log:
            assert self._timer is not None
            elapsed, _steps = self._timer.update_last_triggered_step(self._iteration)
            self._log(run_values.results, elapsed)
        self._iteration += 1

    def end(self, session: SessionLike) -> None:
        """Log the last values when ``at_end``."""
        if self._at_end and self._last_values is not None:
            self._log(self._last_values, None)

    def _log(self, values: dict[str, Any], elapsed: float | None) -> None:
        line = self._formatter(values) if self._formatter else _log_line(values, elapsed)
        self.logged.append(line)
        logger.info("%s", line)


class FinalOpsHook(SessionRunHook):
    """Evaluate final values when the session ends; read them from ``final_ops_values``.

    Args:
        final_ops: an output name (or a list/dict of names), read from the last step's
            outputs; or a callable ``fn(state)``, plain or async, called in ``end()``.
        final_ops_feed_dict: kept for TensorFlow's signature; must be None.

    An ``OutOfRangeError`` or ``StopIteration`` from a callable is logged and re-raised,
    as TensorFlow does.
    """

    def __init__(
        self, final_ops: Any, final_ops_feed_dict: Mapping[str, Any] | None = None
    ) -> None:
        if final_ops_feed_dict is not None:
            raise ValueError("final_ops_feed_dict is not supported: final ops read outputs")
        self._final_ops = final_ops
        self._callable = callable(final_ops)
        self._args = None if self._callable else SessionRunArgs(final_ops)
        self._last: Any = None
        self._values: Any = None

    @property
    def final_ops_values(self) -> Any:
        """The final values (None until the session ended)."""
        return self._values

    def begin(self) -> None:
        """Forget the outputs of a previous session (a hook may be used again)."""
        self._last = None

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Fetch the named outputs every step (their last values are the final ones)."""
        return self._args

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Keep the latest values."""
        self._last = run_values.results

    def end(self, session: SessionLike) -> Coroutine[Any, Any, None] | None:
        """Compute the final values."""
        if not self._callable:
            self._values = self._last
            return None
        try:
            value = self._final_ops(session.state)
        except (OutOfRangeError, StopIteration) as exc:
            logger.warning(
                "An OutOfRangeError or StopIteration while evaluating final ops: %r", exc
            )
            raise
        if inspect.isawaitable(value):
            return self._finish(value)
        self._values = value
        return None

    async def _finish(self, pending: Awaitable[Any]) -> None:
        self._values = await pending
