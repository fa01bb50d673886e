"""SummarySaverHook, and the summary writers hooks share within a session.

Owns the summary schedule and what a ``summary_op`` may be; the writer below it owns the
event file and its queue.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .._storage import is_url
from .._summary import SessionLog, SummaryValue, SummaryWriter, histogram, scalar, text
from ._base import (
    CoordinatorLike,
    SessionLike,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    created,
    open_in_session,
)
from ._timer import SecondOrStepTimer

if TYPE_CHECKING:
    from .._storage import Storage

__all__ = ["SummaryOp", "SummarySaverHook", "summary_writer_for"]

SummaryOp: TypeAlias = "str | Sequence[str] | Callable[[Mapping[str, Any]], Any]"


def _directory_key(logdir: str | os.PathLike[str]) -> str:
    path = os.fspath(logdir)
    # normpath would fold a URL's "//" (s3://bucket -> s3:/bucket).
    return path.rstrip("/") if is_url(path) else os.path.normpath(path)


async def summary_writer_for(
    coord: CoordinatorLike, logdir: str | os.PathLike[str], storage: Storage | None = None
) -> SummaryWriter:
    """Return the session's writer for ``logdir``, opening it on first use.

    Hooks of one session that write to one directory share one writer and one event file
    (TensorFlow's ``SummaryWriterCache``). The writer runs in a background task of the
    session, so it is closed, with every accepted event written, when the session closes;
    sharing stops at the session because a writer's task must have one owner. The first
    hook to ask for a directory chooses its ``storage``.
    """
    directory = _directory_key(logdir)
    key = (SummaryWriter, directory)
    writer = coord.shared.get(key)
    if not isinstance(writer, SummaryWriter):
        writer = coord.shared[key] = SummaryWriter(directory, storage=storage)
        await open_in_session(coord, writer)
    return writer


def _is_number(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return (
        isinstance(value, np.ndarray)
        and value.ndim == 0
        and np.issubdtype(value.dtype, np.number)
        and not np.issubdtype(value.dtype, np.complexfloating)
    )


def _as_summaries(tag: str, value: object) -> list[SummaryValue]:
    """Turn one fetched value into summary values, by what it is."""
    if isinstance(value, SummaryValue):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, SummaryValue) for v in value):
        return list(value)
    if _is_number(value):
        return [scalar(tag, float(value))]  # type: ignore[arg-type]
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.number):
        return [histogram(tag, value)]
    if isinstance(value, str):
        return [text(tag, value)]
    raise TypeError(
        f"cannot summarize output {tag!r} of type {type(value).__name__}: return numbers, "
        "numeric arrays, str, or asyncckpt.summary values"
    )


class SummarySaverHook(SessionRunHook):
    """Write summaries every N steps or seconds (TensorFlow's hook).

    Summaries are requested on the first step and whenever the timer triggers (relative to
    the last trigger), and written at the global step after the run. The first step also
    writes ``SessionLog.START``, so TensorBoard drops the points a dead run wrote past the
    step this run resumed from; a recovery does the same. ``end()`` flushes the writer.

    ``summary_op`` (or ``scaffold.summary_op``) says what to write:

    * an output name, or a list of names: numbers become scalars, numeric arrays
      histograms, str text, and ``asyncckpt.summary`` values are written as they are;
    * a callable of the step's outputs (a mapping), returning ``asyncckpt.summary`` values,
      or a mapping of tags to values converted as above;
    * None in the scaffold: every numeric scalar output (TensorFlow's ``merge_all``).

    Args:
        save_steps: write every this many steps (exactly one of steps/secs).
        save_secs: write every this many seconds.
        output_dir: where the session's shared writer for this directory writes.
        summary_writer: an open ``SummaryWriter`` to use instead (you own it).
        scaffold: take ``summary_op`` from here (exactly one of scaffold/summary_op).
        summary_op: see above.
        clock: the monotonic clock of the timer.
        storage: where the event file lives (local files by default).

    Raises:
        ValueError: not exactly one of scaffold/summary_op or of save_steps/save_secs, or
            neither output_dir nor summary_writer.
    """

    def __init__(
        self,
        save_steps: int | None = None,
        save_secs: float | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        summary_writer: SummaryWriter | None = None,
        scaffold: Any = None,
        summary_op: SummaryOp | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        storage: Storage | None = None,
    ) -> None:
        if (scaffold is None) == (summary_op is None):
            raise ValueError("Exactly one of scaffold or summary_op should be set.")
        if output_dir is None and summary_writer is None:
            raise ValueError("pass output_dir= (or an open summary_writer=) to say where to write")
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock)
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self._storage = storage
        self._given_writer = summary_writer
        self._writer: SummaryWriter | None = summary_writer
        op = summary_op if summary_op is not None else getattr(scaffold, "summary_op", None)
        self._summary_op = op
        if op is None or callable(op):
            self._args = SessionRunArgs(...)  # every output
        elif isinstance(op, str):
            self._args = SessionRunArgs(op)
        elif isinstance(op, Sequence) and all(isinstance(name, str) for name in op):
            self._args = SessionRunArgs(list(op))
        else:
            raise TypeError("summary_op must be an output name, a list of names, or a callable")
        self._next_step: int | None = None
        self._request = False

    def __repr__(self) -> str:
        return f"SummarySaverHook(output_dir={self.output_dir!r}, timer={self._timer!r})"

    @property
    def summary_writer(self) -> SummaryWriter | None:
        """The writer in use (known once the session is created)."""
        return self._writer

    def begin(self) -> None:
        """Start a new schedule: the next step writes ``SessionLog.START`` and summaries."""
        self._next_step = None
        self._timer.reset()

    async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Get the writer; after a recovery, announce the restart again."""
        if self._given_writer is None:
            assert self.output_dir is not None
            self._writer = await summary_writer_for(coord, self.output_dir, self._storage)
        self._next_step = None

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Request the summary outputs on the first step and when the timer triggers."""
        self._request = self._next_step is None or self._timer.should_trigger_for_step(
            self._next_step
        )
        return self._args if self._request else None

    def after_run(
        self, run_context: SessionRunContext, run_values: SessionRunValues
    ) -> Coroutine[Any, Any, None] | None:
        """Write the summaries at the global step after the run (no await otherwise)."""
        step = run_context.session.global_step
        first = self._next_step is None
        self._next_step = step + 1
        if not (first or self._request):
            return None
        return self._write(step, run_values.results, first)

    async def _write(self, step: int, results: Any, first: bool) -> None:
        writer = created(self._writer, self)
        if first:
            await writer.add_session_log(SessionLog.START, step)
        if self._request:
            self._timer.update_last_triggered_step(step)
            values = self._summaries(results)
            if values:
                await writer.add_summary(values, step)

    def _summaries(self, results: Any) -> list[SummaryValue]:
        op = self._summary_op
        if op is None:  # every numeric scalar output
            return [scalar(tag, float(v)) for tag, v in results.items() if _is_number(v)]
        if isinstance(op, str):
            return _as_summaries(op, results)
        if not callable(op):
            return [
                v for tag, value in zip(op, results, strict=True) for v in _as_summaries(tag, value)
            ]
        produced = op(results)
        if isinstance(produced, Mapping):
            return [v for tag, value in produced.items() for v in _as_summaries(str(tag), value)]
        return _as_summaries("summary_op", produced)

    async def end(self, session: SessionLike) -> None:
        """Flush the writer."""
        if self._writer is not None:
            await self._writer.flush()
