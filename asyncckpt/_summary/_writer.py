"""SummaryWriter: TensorBoard event files written by a background task behind a bounded queue.

Owns one event file per writer, the queue, the in-memory buffer and the flush schedule, and
the per-tag step order TensorBoard needs. Encoding lives in ``_proto``/``_records`` (and the
scalar fast path in ``_scalars``); files in the ``Storage`` it is given.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import socket
import time
from collections import deque
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import anyio.abc
import anyio.lowlevel

from .._core._errors import CheckpointWriteError
from .._core._lifecycle import BackgroundTask
from .._core._sync import Broadcast
from .._core._util import check_int
from .._storage import resolve_storage
from . import _proto
from ._records import frame
from ._scalars import ScalarRecords

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from .._storage import AppendFile, Storage

__all__ = ["SummaryWriter"]

_WRITER_NAME: Final = "asyncckpt"
# A run's event files must sort in the order they were created. TensorBoard's Python loader
# (directory_watcher.DirectoryWatcher) reads them one by one in name order and never goes
# back to an earlier name; plugin_event_accumulator takes the first SessionLog.START it reads
# for the run's start and purges every point at or after the step of a later one. A resumed
# session's file read first thus loses all its points to the START that opens the file of
# the session it resumed (the Rust loader drops them too: the steps go back). So a new file's
# <secs> is after every event file already in the directory, whatever the clock says (two
# processes in one second, told apart by pid only; a clock set back), and two writers of one
# process are ordered by a counter (zero-padded: ".10" sorting before ".9" would do the same).
_uids = itertools.count()
_UID_DIGITS: Final = 6
# Ten digits, as every writer pads them (name order is then number order); others ignored.
_EVENT_FILE_SECS: Final = re.compile(r"events\.out\.tfevents\.(\d{10})(?:\.|$)")


# Records taken from the queue wait in memory until this many bytes (or a flush) go to the OS:
# two worker-thread hops (write, flush) per ~4000 scalars, instead of one or two per batch of
# ``max_queue`` events, which cost more than encoding the batch.
_BUFFER_BYTES: Final = 256 * 1024

_REFUSED: Final = "the SummaryWriter closed before this call was accepted"


class _FlushRequest:
    __slots__ = ("done", "flushed")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.flushed = False


_Item = bytes | _FlushRequest


class _Waiter:
    """A caller's place in the line for room in the queue."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: anyio.Event | None = None  # set while the caller waits on one


class _Queue:
    """The bounded FIFO between the callers and the writer task.

    Not an anyio memory object stream (the project's usual queue), for two things the writer
    needs: putting into a queue with room does not yield to the event loop (as
    ``asyncio.Queue.put``; ``MemoryObjectSendStream.send`` always does, one loop turn per
    event), and the writer takes everything queued in one list swap, not one ``receive`` per
    event.

    A caller that finds the queue full takes a place in line (later callers queue behind it,
    so events keep the order in which their steps were claimed) and, when room is made and it
    is first in line, moves its item in itself, synchronously, after its last ``await``: a
    ``put`` that raises (a cancellation, a close) has queued nothing, one that returns has
    queued its item, on every backend.
    """

    __slots__ = ("_items", "_line", "_max", "_wakeup", "closed")

    def __init__(self, max_items: int) -> None:
        self._items: list[_Item] = []
        self._max = max_items
        self._line: deque[_Waiter] = deque()
        self._wakeup = Broadcast()
        self.closed = False

    def _wake_writer(self) -> None:
        self._wakeup.notify()

    def _wake_first(self) -> None:
        # Room for one more item: the first caller in line may move in. (One without an
        # event is between its checkpoint and its check: it sees the room itself.)
        if self._line and len(self._items) < self._max:
            event = self._line[0].event
            if event is not None:
                event.set()

    def put_nowait(self, item: _Item) -> bool:
        """Queue ``item`` if there is room and nobody waits for it; else return False.

        Raises:
            RuntimeError: the queue is closed.
        """
        if self.closed:
            raise RuntimeError(_REFUSED)
        if len(self._items) >= self._max or self._line:
            return False
        self._items.append(item)
        self._wake_writer()
        return True

    async def put(self, item: _Item) -> None:
        """Queue ``item``, waiting in line for room if there is none.

        Raises:
            RuntimeError: the queue closed before the item was queued.
        """
        if self.put_nowait(item):
            return
        waiter = _Waiter()
        self._line.append(waiter)
        self._wake_writer()
        try:
            # The writer is usually ready to run already (woken by the first item queued):
            # one loop turn lets it empty the queue, cheaper than a wait on an event.
            await anyio.lowlevel.checkpoint()
            while not self.closed and (
                self._line[0] is not waiter or len(self._items) >= self._max
            ):
                waiter.event = anyio.Event()
                await waiter.event.wait()
            if self.closed:
                raise RuntimeError(_REFUSED)
        except BaseException:
            first = self._line[0] is waiter
            self._line.remove(waiter)
            if first:
                self._wake_first()  # the room this caller was woken for is the next one's
            raise
        self._line.popleft()
        self._items.append(item)
        self._wake_writer()
        self._wake_first()

    def take(self) -> list[_Item]:
        """Take every queued item (and make room for the callers in line)."""
        items, self._items = self._items, []
        self._wake_first()
        return items

    async def wait(self, deadline: float) -> None:
        """Return once there is something to take, on close, or at ``deadline``."""
        if self._items or self.closed:
            return
        with anyio.CancelScope(deadline=deadline):
            await self._wakeup.changed()

    def close(self) -> None:
        """Refuse every waiting and later item; what is queued stays for the writer."""
        self.closed = True
        for waiter in self._line:
            if waiter.event is not None:
                waiter.event.set()
        self._wake_writer()


class SummaryWriter:
    """Write TensorBoard event files from a background task (TensorFlow's ``FileWriter``).

    Each writer creates one new file, ``events.out.tfevents.<secs>.<host>.<pid>.<uid>``
    (``<secs>``: the clock's, or one after the latest event file already in ``logdir``;
    ``<uid>``: a zero-padded counter of the process; so names sort in creation order, and
    ``path`` is final once the writer is open), in ``logdir`` and writes ``brain.Event:2``
    first. ``add_*`` encode the event on the caller's loop and put it in a queue of
    ``max_queue`` events: while there is room a call returns without waiting (nor yielding
    to other tasks); when it is full it waits for room (a cancelled call has added nothing,
    and gives its step back). The background task takes the queued events and keeps them in
    memory, as TensorFlow's own event writer does, until it writes and flushes them to the
    operating system (which makes them visible to TensorBoard) on ``flush()``, every
    ``flush_secs``, once they reach 256 KiB, and on close. A full queue does not flush: the
    caller waiting on it waits for the task to move events to memory, not for the disk, and
    a flush every ``max_queue`` events would cost a worker-thread hop each. Leaving the
    ``async with`` block, by any path, writes every event already accepted (an exceptional
    exit keeps writing for up to ``stop_grace_period_secs``).

    Steps must increase per tag, as TensorBoard's default loader assumes (it drops earlier
    points otherwise): a step that does not is refused with ``ValueError``, unless a
    ``SessionLog.START`` at or before it announced a restart.

    Usage::

        async with SummaryWriter("logs/run1") as writer:
            await writer.add_scalar("loss", 0.25, step=10)

    Args:
        logdir: the run directory (created if missing).
        max_queue: events that may wait for the writer task.
        flush_secs: flush at least this often.
        filename_suffix: appended to the file name.
        stop_grace_period_secs: how long an exceptional exit keeps writing accepted events.
        clock: wall-clock source for event times (``time.time``).
        storage: where the event file lives; by default local files for a path, an object
            store for a URL (docs/STORAGE.md).
        storage_options: the object store's configuration, for a URL.
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
        storage: Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_int("max_queue", max_queue, minimum=1)
        if not flush_secs > 0:
            raise ValueError(f"flush_secs must be > 0, not {flush_secs!r}")
        if os.sep in filename_suffix:
            raise ValueError("filename_suffix must not contain a path separator")
        self.logdir = os.fspath(logdir)
        self.storage = resolve_storage(self.logdir, storage, storage_options)
        self.max_queue = max_queue
        self.flush_secs = flush_secs
        self._grace = stop_grace_period_secs
        self._clock = clock
        self._secs = int(clock())
        self._name_tail = (
            f"{socket.gethostname()}.{os.getpid()}.{next(_uids):0{_UID_DIGITS}d}{filename_suffix}"
        )
        self.path = self._event_file_path(self._secs)
        self._last_steps: dict[str, int] = {}
        self._scalars = ScalarRecords()
        self._queue: _Queue | None = None
        self._stack: AsyncExitStack | None = None
        self._task = BackgroundTask("SummaryWriter")
        self._closed = False
        self._buffer: _Buffer | None = None
        self._flush_requests: set[_FlushRequest] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._queue is not None else "new"
        written = 0 if self._buffer is None else self._buffer.written
        return f"<SummaryWriter {self.path!r} {state} events_written={written}>"

    def _event_file_path(self, secs: int) -> str:
        return os.path.join(self.logdir, f"events.out.tfevents.{secs:010d}.{self._name_tail}")

    def _name_after(self, names: Sequence[str]) -> str:
        """The path of the event file, named to sort after the event files in ``names``."""
        existing = [int(m.group(1)) for name in names if (m := _EVENT_FILE_SECS.match(name))]
        return self._event_file_path(max([self._secs, *(secs + 1 for secs in existing)]))

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task.claim()
        try:
            names = await anyio.to_thread.run_sync(self.storage.list_names, self.logdir)
            self.path = self._name_after(names)
            file = await self.storage.create_new_file(self.path)
        except OSError as exc:
            raise _event_file_error(self.path, exc, "creating") from exc
        try:
            first = frame(
                _proto.encode_event(
                    wall_time=self._clock(),
                    file_version=_proto.FILE_VERSION,
                    source_writer=_WRITER_NAME,
                )
            )
            try:
                await file.write(first)
            except OSError as exc:
                # A full disk: no event file at all rather than an empty one.
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(OSError):  # the unwritten bytes fail it again
                        await file.aclose()
                    await anyio.to_thread.run_sync(self._remove_event_file)
                raise _event_file_error(self.path, exc, "writing") from exc
            queue = _Queue(self.max_queue)
            self._buffer = _Buffer(file)
            async with AsyncExitStack() as stack:
                stack.push_async_callback(file.aclose)
                await self._task.open(stack, functools.partial(self._serve, queue))
                self._queue = queue
                self._stack = stack.pop_all()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await file.aclose()
            raise
        return self

    def _remove_event_file(self) -> None:
        with contextlib.suppress(CheckpointWriteError):
            self.storage.remove_files([self.path])

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            await self.aclose()
        finally:
            if stack is not None:
                await self._task.exit(stack)  # the writer has returned: no wait

    async def aclose(self) -> None:
        """Write every accepted event, flush and close the file (idempotent).

        May be called from any task and inside any cancel scope (``anyio.fail_after``); the
        ``async with`` block's exit then has nothing left to do but raise a writer's error.
        """
        queue, self._queue = self._queue, None
        if queue is None:
            return
        self._closed = True
        queue.close()  # the writer writes what is queued, flushes and returns
        await self._task.stop(self._task.wait_done, self._grace)
        if self._buffer is not None:
            await self._buffer.close()

    async def close(self) -> None:
        """Same as ``aclose()`` (TensorFlow's name)."""
        await self.aclose()

    async def _serve(self, queue: _Queue) -> None:
        assert self._buffer is not None
        try:
            await self._write_until_closed(self._buffer, queue)
        finally:
            # A writer that failed (or outlived the grace period) refuses callers waiting
            # for room and leaves flush requests behind: wake them, so that they raise
            # instead of waiting forever.
            queue.close()
            for request in list(self._flush_requests):
                request.done.set()

    async def _write_until_closed(self, buffer: _Buffer, queue: _Queue) -> None:
        flush_at = anyio.current_time() + self.flush_secs
        while True:
            items = queue.take()
            requests: list[_FlushRequest] = []
            if items:
                if _FlushRequest in map(type, items):
                    requests = [item for item in items if isinstance(item, _FlushRequest)]
                    buffer.add([item for item in items if isinstance(item, bytes)])
                else:
                    buffer.add(items)  # type: ignore[arg-type]  # records only
            elif queue.closed:
                break
            if requests or buffer.size >= _BUFFER_BYTES or anyio.current_time() >= flush_at:
                await buffer.write()
                flush_at = anyio.current_time() + self.flush_secs
                for request in requests:
                    request.flushed = True
                    self._flush_requests.discard(request)
                    request.done.set()
            if items:
                # Let the callers refill the queue before asking whether it is idle: a busy
                # writer then never waits on an event or a deadline.
                await anyio.lowlevel.checkpoint()
            else:
                await queue.wait(flush_at)
        await buffer.write()

    # -- adding events ------------------------------------------------------------------------

    def _open_queue(self) -> _Queue:
        if self._queue is None:
            raise RuntimeError(
                "the SummaryWriter is closed"
                if self._closed
                else "the SummaryWriter is not open: use `async with SummaryWriter(...)`"
            )
        return self._queue

    def _wall_time(self, wall_time: float | None) -> float:
        value = self._clock() if wall_time is None else float(wall_time)
        if not math.isfinite(value):
            raise ValueError(f"wall_time must be finite, not {value}")
        return value

    def _check_steps(self, tags: Sequence[str], step: int) -> None:
        _check_step(step)
        if len(tags) > 1 and len(set(tags)) != len(tags):
            raise ValueError(f"a tag may appear once per event: {sorted(tags)}")
        for tag in tags:
            last = self._last_steps.get(tag)
            if last is not None and step <= last:
                raise _step_error(tag, step, last)

    async def _put_claiming(
        self, queue: _Queue, record: bytes, tags: Sequence[str], step: int
    ) -> None:
        """Queue ``record``, the event of ``tags`` at ``step``, and claim the step for them.

        The step is claimed before waiting for room in the queue, so that a concurrent add
        for the same tag is checked against it, and given back if the event is not queued.
        """
        previous = {tag: self._last_steps.get(tag) for tag in tags}
        self._last_steps.update(dict.fromkeys(tags, step))
        try:
            await queue.put(record)
        except BaseException:
            for tag, last in previous.items():
                if self._last_steps.get(tag) != step:
                    continue  # moved since (a later add claimed a step, or a START)
                if last is None:
                    del self._last_steps[tag]
                else:
                    self._last_steps[tag] = last
            raise

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
        queue = self._open_queue()
        self._check_steps(tags, step)
        event = _proto.encode_event(wall_time=self._wall_time(wall_time), step=step, values=values)
        await self._put_claiming(queue, frame(event), tags, step)

    async def add_scalar(
        self, tag: str, value: float, step: int, *, wall_time: float | None = None
    ) -> None:
        """Write a scalar (a point of a chart)."""
        # The event and the checks of add_summary(summary.scalar(...)), on the path a
        # training loop takes at every step: no list or set, and the bytes of the event
        # packed into those cached for the tag.
        queue = self._queue
        if queue is None:
            queue = self._open_queue()  # raises
        if type(step) is not int or not 0 <= step <= _proto.MAX_STEP:
            _check_step(step)
        wall = self._clock() if wall_time is None else float(wall_time)
        if not math.isfinite(wall):
            raise ValueError(f"wall_time must be finite, not {wall}")
        record = self._scalars.record(tag, value, step, wall)
        last = self._last_steps.get(tag)
        if last is not None and step <= last:
            raise _step_error(tag, step, last)
        if queue.put_nowait(record):
            self._last_steps[tag] = step
        else:
            await self._put_claiming(queue, record, (tag,), step)

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
        queue = self._open_queue()
        _check_step(step)
        event = _proto.encode_event(
            wall_time=self._wall_time(wall_time),
            step=step,
            session_log=_proto.session_log(status, checkpoint_path, msg),
        )
        await queue.put(frame(event))
        if status == _proto.SessionLog.START:
            for tag, last in self._last_steps.items():
                if last >= step:
                    self._last_steps[tag] = step - 1

    async def flush(self) -> None:
        """Wait until every event added so far is written and handed to the OS.

        Raises:
            RuntimeError: the writer is not open, or stopped (its disk write failed) first.
        """
        queue = self._open_queue()
        request = _FlushRequest()
        self._flush_requests.add(request)
        try:
            await queue.put(request)
            await request.done.wait()
        finally:
            self._flush_requests.discard(request)
        if not request.flushed:
            raise RuntimeError("the SummaryWriter stopped before this flush was done")


def _event_file_error(path: str, exc: OSError, doing: str) -> CheckpointWriteError:
    """The error of an event file that could not be created or written (a full disk, a
    read-only directory): what happened, and that checkpoints are not affected."""
    return CheckpointWriteError(
        path,
        f"{exc.strerror or exc} (errno {exc.errno}) while {doing} the event file; events "
        "not yet written are lost (checkpoints are written separately and not affected)",
    )


def _check_step(step: object) -> None:
    if check_int("step", step, minimum=0) > _proto.MAX_STEP:
        raise ValueError(f"step must be < 2**63 (an int64), not {step}")


def _step_error(tag: str, step: int, last: int) -> ValueError:
    return ValueError(
        f"step {step} for tag {tag!r} is not after step {last} already written: "
        "TensorBoard would drop points. Use increasing steps, or write "
        "add_session_log(SessionLog.START, step) first to announce a restart"
    )


class _Buffer:
    """Encoded records the writer task took, in memory until it hands them to the OS."""

    __slots__ = ("_file", "_records", "size", "written")

    def __init__(self, file: AppendFile) -> None:
        self._file: AppendFile = file
        self._records: list[bytes] = []
        self.size = 0
        self.written = 0  # records handed to the file

    def add(self, records: list[bytes]) -> None:
        self._records += records
        self.size += sum(map(len, records))

    async def write(self) -> None:
        """Hand the records to the file: one thread call, after which TensorBoard sees them."""
        if not self._records:
            return
        records, self._records = self._records, []
        self.size = 0
        try:
            await self._file.write(b"".join(records))
        except OSError as exc:
            raise _event_file_error(self._file.path, exc, "writing") from exc
        self.written += len(records)

    async def close(self) -> None:
        """Close the file (idempotent; what was written was handed to it already)."""
        await self._file.aclose()
