"""SummaryWriter: TensorBoard event files written by a background task behind a bounded queue.

Owns one event file per writer, the queue, the flush schedule, and the per-tag step order
TensorBoard needs. Encoding lives in ``_proto``/``_records``; files in ``_storage``.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import anyio.abc

from .. import _storage
from .._util import check_int, single_exception
from . import _proto
from ._records import frame

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["SummaryWriter"]

_WRITER_NAME: Final = "asyncckpt"
# Two writers of one process never share a file name, and a later writer's name sorts after
# an earlier one's within the same second: TensorBoard reads a run's files in name order, so
# ".10" sorting before ".9" would replay a resumed session before the one it resumed.
_uids = itertools.count()
_UID_DIGITS: Final = 6


class _FlushRequest:
    __slots__ = ("done", "flushed")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.flushed = False


_Item = bytes | _FlushRequest


class SummaryWriter:
    """Write TensorBoard event files from a background task (TensorFlow's ``FileWriter``).

    Each writer creates one new file, ``events.out.tfevents.<secs>.<host>.<pid>.<uid>``
    (``<uid>``: a zero-padded counter of the process, so names sort in creation order), in
    ``logdir`` and writes ``brain.Event:2`` first. ``add_*`` encode the event on the caller's
    loop and put it in a queue of ``max_queue`` events (waiting when it is full); a
    background task writes whole records and flushes every ``flush_secs``, whenever it finds
    the queue full, on ``flush()`` and on close. Leaving the ``async with`` block, by any
    path, writes every event already accepted (an exceptional exit keeps writing for up to
    ``stop_grace_period_secs``).

    Steps must increase per tag, as TensorBoard's default loader assumes (it drops earlier
    points otherwise): a step that does not is refused with ``ValueError``, unless a
    ``SessionLog.START`` at or before it announced a restart.

    Usage::

        async with SummaryWriter("logs/run1") as writer:
            await writer.add_scalar("loss", 0.25, step=10)

    Args:
        logdir: the run directory (created if missing).
        max_queue: events that may wait for the writer.
        flush_secs: flush at least this often.
        filename_suffix: appended to the file name.
        stop_grace_period_secs: how long an exceptional exit keeps writing accepted events.
        clock: wall-clock source for event times (``time.time``).
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        max_queue: int = 10,
        flush_secs: float = 120,
        filename_suffix: str = "",
        *,
        stop_grace_period_secs: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_int("max_queue", max_queue, minimum=1)
        if not flush_secs > 0:
            raise ValueError(f"flush_secs must be > 0, not {flush_secs!r}")
        if os.sep in filename_suffix:
            raise ValueError("filename_suffix must not contain a path separator")
        self.logdir = os.fspath(logdir)
        self.max_queue = max_queue
        self.flush_secs = flush_secs
        self._grace = stop_grace_period_secs
        self._clock = clock
        name = (
            f"events.out.tfevents.{int(clock()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_uids):0{_UID_DIGITS}d}{filename_suffix}"
        )
        self.path = os.path.join(self.logdir, name)
        self._last_steps: dict[str, int] = {}
        self._send: MemoryObjectSendStream[_Item] | None = None
        self._stack: AsyncExitStack | None = None
        self._writer_scope: anyio.CancelScope | None = None
        self._entered = self._closed = False
        self._written = 0
        self._writer_done: anyio.Event | None = None
        self._flush_requests: set[_FlushRequest] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._entered else "new"
        return f"<SummaryWriter {self.path!r} {state} events_written={self._written}>"

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a SummaryWriter can be entered only once; create a new one")
        self._entered = True
        file = await _storage.create_new_file(self.path)
        first = frame(
            _proto.encode_event(
                wall_time=self._clock(),
                file_version=_proto.FILE_VERSION,
                source_writer=_WRITER_NAME,
            )
        )
        try:
            await file.write(first)
            await file.flush()
            send, receive = anyio.create_memory_object_stream[_Item](self.max_queue)
            self._writer_scope = anyio.CancelScope(shield=True)
            self._writer_done = anyio.Event()
            async with AsyncExitStack() as stack:
                stack.push_async_callback(file.aclose)
                task_group = await stack.enter_async_context(anyio.create_task_group())
                task_group.start_soon(self._serve, file, receive)
                self._send = send
                self._stack = stack.pop_all()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await file.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Write every accepted event, flush and close the file (idempotent)."""
        stack, self._stack = self._stack, None
        send, self._send = self._send, None
        if stack is None or send is None:
            return
        self._closed = True
        assert self._writer_scope is not None
        assert self._writer_done is not None
        send.close()  # the writer drains the queue, flushes and returns
        with anyio.move_on_after(self._grace, shield=True):
            await self._writer_done.wait()
        self._writer_scope.cancel()  # only a writer that outlived the grace period
        try:
            # The writer has returned: leaving the task group does not wait. (It must not
            # be wrapped in a new cancel scope: scopes exit in the order they were entered.)
            await stack.aclose()
        except BaseExceptionGroup as group:
            raise single_exception(group) from None

    async def close(self) -> None:
        """Same as ``aclose()`` (TensorFlow's name)."""
        await self.aclose()

    async def _serve(
        self, file: _storage.AppendFile, receive: MemoryObjectReceiveStream[_Item]
    ) -> None:
        assert self._writer_scope is not None
        assert self._writer_done is not None
        # Shielded from the owner's cancellation (it must not drop accepted events);
        # aclose() cancels this scope itself once its grace period is over.
        try:
            await self._write_until_closed(file, receive)
        finally:
            self._writer_done.set()
            # A writer that failed (or outlived the grace period) leaves requests behind:
            # wake their callers, whose flush() then raises instead of waiting forever.
            for request in list(self._flush_requests):
                request.done.set()

    async def _write_until_closed(
        self, file: _storage.AppendFile, receive: MemoryObjectReceiveStream[_Item]
    ) -> None:
        assert self._writer_scope is not None
        with self._writer_scope, receive:
            next_flush = anyio.current_time() + self.flush_secs
            dirty = False
            while True:
                item: _Item | None = None
                with anyio.move_on_after(max(next_flush - anyio.current_time(), 0)):
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        break
                if item is None:  # the flush timer went off
                    if dirty:
                        await file.flush()
                        dirty = False
                    next_flush = anyio.current_time() + self.flush_secs
                    continue
                batch = [item]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                records = [x for x in batch if isinstance(x, bytes)]
                flushes = [x for x in batch if isinstance(x, _FlushRequest)]
                if records:
                    await file.write(b"".join(records))
                    self._written += len(records)
                    dirty = True
                # A full queue means the caller is waiting on us: hand the bytes over now.
                if dirty and (flushes or len(batch) >= self.max_queue):
                    await file.flush()
                    dirty = False
                    next_flush = anyio.current_time() + self.flush_secs
                for request in flushes:
                    request.flushed = True
                    self._flush_requests.discard(request)
                    request.done.set()
            if dirty:
                await file.flush()

    # -- adding events ------------------------------------------------------------------------

    def _sender(self) -> MemoryObjectSendStream[_Item]:
        if self._send is None:
            raise RuntimeError(
                "the SummaryWriter is closed"
                if self._closed
                else "the SummaryWriter is not open: use `async with SummaryWriter(...)`"
            )
        return self._send

    def _wall_time(self, wall_time: float | None) -> float:
        value = self._clock() if wall_time is None else float(wall_time)
        if not math.isfinite(value):
            raise ValueError(f"wall_time must be finite, not {value}")
        return value

    def _check_steps(self, tags: Sequence[str], step: int) -> None:
        check_int("step", step, minimum=0)
        if len(set(tags)) != len(tags):
            raise ValueError(f"a tag may appear once per event: {sorted(tags)}")
        for tag in tags:
            last = self._last_steps.get(tag)
            if last is not None and step <= last:
                raise ValueError(
                    f"step {step} for tag {tag!r} is not after step {last} already written: "
                    "TensorBoard would drop points. Use increasing steps, or write "
                    "add_session_log(SessionLog.START, step) first to announce a restart"
                )

    async def _put(self, item: _Item) -> None:
        try:
            await self._sender().send(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Closed while this call waited for room, or the writer task failed (its error
            # ends the writer's `async with`): the item was not accepted.
            raise RuntimeError("the SummaryWriter closed before this call was accepted") from None

    async def add_summary(
        self,
        summary: _proto.SummaryValue | Sequence[_proto.SummaryValue],
        step: int,
        *,
        wall_time: float | None = None,
    ) -> None:
        """Write summary values (``asyncckpt.summary.scalar(...)`` etc.) at ``step``.

        Raises:
            ValueError: a step that does not increase for one of the tags, a tag twice.
        """
        values = [summary] if isinstance(summary, _proto.SummaryValue) else list(summary)
        if not values:
            return
        for value in values:
            if not isinstance(value, _proto.SummaryValue):
                raise TypeError(f"summaries must be SummaryValue objects, not {value!r}")
        tags = [value.tag for value in values]
        self._sender()
        self._check_steps(tags, step)
        event = _proto.encode_event(wall_time=self._wall_time(wall_time), step=step, values=values)
        # Claim the step before waiting for room in the queue, so that a concurrent add for
        # the same tag is checked against it; give it back if this event is not accepted.
        previous = {tag: self._last_steps.get(tag) for tag in tags}
        self._last_steps.update(dict.fromkeys(tags, step))
        try:
            await self._put(frame(event))
        except BaseException:
            for tag, last in previous.items():
                if self._last_steps.get(tag) != step:
                    continue  # moved since (a later add claimed a step, or a START): keep it
                if last is None:
                    del self._last_steps[tag]
                else:
                    self._last_steps[tag] = last
            raise

    async def add_scalar(
        self, tag: str, value: float, step: int, *, wall_time: float | None = None
    ) -> None:
        """Write a scalar (a point of a chart)."""
        await self.add_summary(_proto.scalar(tag, value), step, wall_time=wall_time)

    async def add_histogram(
        self,
        tag: str,
        values: Any,
        step: int,
        *,
        bins: int = 30,
        wall_time: float | None = None,
    ) -> None:
        """Write a histogram of ``values`` (``bins`` equal-width buckets)."""
        await self.add_summary(_proto.histogram(tag, values, bins), step, wall_time=wall_time)

    async def add_text(
        self, tag: str, text: str, step: int, *, wall_time: float | None = None
    ) -> None:
        """Write Markdown text."""
        await self.add_summary(_proto.text(tag, text), step, wall_time=wall_time)

    async def add_image(
        self,
        tag: str,
        image: Any,
        step: int,
        *,
        dataformats: str = "HWC",
        wall_time: float | None = None,
    ) -> None:
        """Write an image (uint8, or float in [0, 1]; ``HWC``, ``CHW`` or ``HW``) as PNG."""
        await self.add_summary(_proto.image(tag, image, dataformats), step, wall_time=wall_time)

    async def add_session_log(
        self,
        status: _proto.SessionLog,
        step: int,
        *,
        checkpoint_path: str = "",
        msg: str = "",
        wall_time: float | None = None,
    ) -> None:
        """Write a ``SessionLog``: ``START`` (a restart from ``step``), ``STOP``, or
        ``CHECKPOINT`` with its path.

        After ``START`` at ``step``, every tag accepts steps from ``step`` on again.
        TensorBoard's Python loader then drops the points of steps >= ``step`` written
        before, except at the first ``START`` of a run, which it takes for the run's
        beginning; the default (Rust) loader ignores ``START`` and drops the earlier points
        of a tag at or after each step that goes back. Write ``START`` when a session
        begins, as ``SummarySaverHook`` does, so that a restart is never the first.
        """
        status = _proto.SessionLog(status)
        self._sender()
        check_int("step", step, minimum=0)
        event = _proto.encode_event(
            wall_time=self._wall_time(wall_time),
            step=step,
            session_log=_proto.session_log(status, checkpoint_path, msg),
        )
        await self._put(frame(event))
        if status == _proto.SessionLog.START:
            for tag, last in self._last_steps.items():
                if last >= step:
                    self._last_steps[tag] = step - 1

    async def flush(self) -> None:
        """Wait until every event added so far is written and handed to the OS.

        Raises:
            RuntimeError: the writer is not open, or stopped (its disk write failed) first.
        """
        request = _FlushRequest()
        self._flush_requests.add(request)
        try:
            await self._put(request)
            await request.done.wait()
        finally:
            self._flush_requests.discard(request)
        if not request.flushed:
            raise RuntimeError("the SummaryWriter stopped before this flush was done")
