"""CheckpointManager: snapshots on the caller's loop, writes in a background task.

Owns the bounded queue of snapshots, its policies (block / skip / replace), the writer task
and its task group, and how write errors reach the caller. The directory (``_directory``) does the
file work; knows nothing of hooks or sessions.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, Self, get_args

import anyio
import anyio.abc

from .._core._errors import CheckpointError, CheckpointLockedError, CheckpointNotFoundError
from .._core._lifecycle import BackgroundTask
from .._core._sync import EvictingQueue
from .._core._util import check_int
from .._storage import resolve_storage
from .._tree import check_selection
from . import _format
from ._coordination import check_coordinator
from ._directory import CheckpointDirectory
from ._file import CheckpointMetadata, OnCorrupt, check_on_corrupt, read_first_intact, read_metadata
from ._sharded import ShardedSaves
from ._shards import check_user_metadata
from ._snapshot import BufferNeed, Snapshot, SnapshotPool, make_buffers
from ._state_file import (
    STATE_FILENAME,
    Retention,
    check_latest_filename,
    check_name,
    checkpoint_path,
    split_step,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from .._core._types import StateTree
    from .._storage import Storage
    from ._coordination import ShardCoordinator

__all__ = ["CheckpointManager", "CheckpointManagerStatistics", "Policy", "SaveOutcome"]

logger = logging.getLogger("asyncckpt")

Policy = Literal["block", "skip", "replace"]
_POLICIES: Final = get_args(Policy)
OnWriteError = Literal["raise", "log"]
_ON_WRITE_ERROR: Final = get_args(OnWriteError)
_IO_THREADS: Final = 4
_UNACKNOWLEDGED_LIMIT: Final = 2
"""Written checkpoints that may await acknowledgement (one being handled, one next) before
the writer takes no new snapshot: a slow consumer then fills the queue and the policy
applies to new saves."""
_ABANDON_AFTER_SECS: Final = 1.0
"""How long a write cancelled at the end of the grace period may take to stop at its next
batch before its thread is abandoned (a write stuck in the kernel)."""
_READ_ONLY_ATTEMPTS: Final = 3
"""Reads of a read-only manager's latest checkpoint, each after reading the state file."""
_WARM_ROUNDS: Final = 3
"""Times a save with a callable step makes missing buffers off the loop and looks again
before it allocates on the loop (a tree whose shapes change under every look)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointManagerStatistics:
    """A CheckpointManager's counters at one instant."""

    pending: int
    """Snapshots taken and not yet durable (waiting, plus the one being written)."""
    max_pending: int
    """How many snapshots may wait while another is being written."""
    written: int
    """Checkpoints committed and listed in the state file."""
    skipped: int
    """Saves dropped by the ``"skip"`` policy because the queue was full."""
    replaced: int
    """Waiting snapshots dropped by the ``"replace"`` policy for a newer one."""
    failed: int
    """Writes that failed (each surfaces once as an error)."""
    bytes_written: int
    """Bytes of checkpoint files committed."""
    latest_step: int | None
    """The step of the newest durable checkpoint."""
    last_error: CheckpointError | None
    """The most recent write error, reported or not."""
    buffers_allocated: int
    """Snapshot buffers ever allocated; flat once the pool is warm."""
    bytes_allocated: int
    """Bytes of snapshot buffers ever allocated."""
    last_stall_secs: float | None
    """How long the last accepted ``save()`` blocked the event loop (its snapshot copy)."""
    max_stall_secs: float
    """The longest any ``save()`` blocked the event loop."""
    last_write_secs: float | None
    """How long the last finished write took, from its start to durable (or failed)."""
    latest_durable_time: float | None
    """When (``time.time()``) the newest checkpoint written by this manager became durable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveOutcome:
    """How one accepted save ended, as reported to ``add_done_callback`` callbacks."""

    step: int
    """The checkpoint's step."""
    path: str
    """The checkpoint's path."""
    written: bool
    """Whether it is durable and listed (False: dropped by ``"replace"``, abandoned at
    close, or failed)."""
    error: CheckpointError | None = None
    """The write error, if any (a checkpoint can be written and still report one, e.g. when
    deleting an old checkpoint failed)."""


@dataclass(slots=True, eq=False)
class _SaveJob:
    snapshot: Snapshot
    step: int
    path: str
    metadata: dict[str, Any]


def _check_sharding(
    coordinator: object,
    replicated: Sequence[str],
    policy: str,
    on_corrupt: str,
    read_only: bool,
) -> None:
    if coordinator is None:
        if replicated:
            raise ValueError("replicated= names what rank 0 alone saves: pass coordinator= too")
        return
    check_coordinator(coordinator)
    if isinstance(replicated, str):
        raise TypeError(f"replicated= takes a list of tree paths: replicated=[{replicated!r}]")
    if policy != "block":
        raise ValueError(
            f"policy={policy!r} would let one rank drop a save that the others write: every "
            'rank must write every save; use policy="block" with coordinator='
        )
    if on_corrupt != "raise":
        raise ValueError(
            'on_corrupt="fallback" could restore different steps on different ranks: use '
            'on_corrupt="raise" with coordinator='
        )
    if read_only:
        raise ValueError(
            "read_only=True reads checkpoints and coordinator= saves them: to read a sharded "
            "checkpoint on each rank, open the manager with coordinator= and only restore"
        )


class CheckpointManager:
    """Save a service's or trainer's state in the background, keeping the newest few.

    ``await save(state, step)`` returns as soon as the state is snapshotted (copied into
    reused buffers); a background task owned by the manager writes it, atomically. When
    ``max_pending`` snapshots already wait behind the one being written, ``policy`` decides:
    ``"block"`` waits for room, ``"skip"`` drops this save (counted), ``"replace"`` swaps
    the newest waiting snapshot for this one (counted).

    For a service, whose handlers change the state while a save waits: ``await
    reserve(state)`` before serving makes the snapshot buffers in a worker thread, and a
    callable ``step`` (``save(state, lambda: version)``) makes any buffer still missing off
    the loop and labels the snapshot at the instant it is taken (see ``save``).

    A failed write never passes silently: with ``on_write_error="raise"`` it is raised by
    the next ``save()``, ``wait()`` or the exit of the ``async with`` block; with ``"log"``
    it is logged (ERROR, on the ``asyncckpt`` logger) and counted, and saving goes on.
    Either way the previous checkpoint stays the latest.
    On a normal exit every accepted snapshot is written; when the block exits by an
    exception or a cancellation, snapshots already taken are still written for up to
    ``stop_grace_period_secs`` before the exception propagates.

    Usage::

        async with CheckpointManager("ckpt", max_to_keep=3) as manager:
            state = await manager.restore(into=state) if manager.latest_step() is not None \\
                else state
            ...
            await manager.save(state, step)

    Args:
        directory: where checkpoints and the state file live; created if missing.
        max_to_keep: how many recent checkpoints to keep; None or 0 keeps all.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per period.
        basename: checkpoint files are named ``<basename>-<step>``.
        max_pending: snapshots that may wait while another is being written (>= 0; 0 keeps
            at most one snapshot: the state plus one snapshot is the whole memory cost).
        policy: ``"block"``, ``"skip"`` or ``"replace"`` (which needs ``max_pending >= 1``).
        stop_grace_period_secs: how long an exceptional exit keeps writing taken snapshots.
        on_corrupt: what ``restore()`` of the latest checkpoint does when it is corrupted,
            unreadable or missing: ``"raise"``, or ``"fallback"`` to the newest listed
            checkpoint that is intact (with a WARNING naming each one skipped; those are
            dropped from the state file, their files left for ``asyncckpt verify``, so the
            next save continues from the restored step).
        latest_filename: the state file's name. Managers with different state files (and
            basenames) may share a directory: each holds only its own state file's lock and
            cleans up only its own temporary files.
        storage: where checkpoints live; by default local files for a path, an object store
            for a URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://``:
            docs/STORAGE.md).
        storage_options: the object store's configuration, for a URL (instead of or over
            the environment's ``AWS_*``... variables).
        on_write_error: ``"raise"`` or ``"log"`` (see above).
        read_only: open a directory that another process writes, to restore from it: no
            lock is taken and nothing is written (``save()`` raises); ``restore()`` and
            ``metadata()`` of the latest, and ``reload()``, read the state file afresh.
        coordinator: save one shard per rank of a job with several processes
            (``TorchDistributedCoordinator()``, ``StorageCoordinator(rank, world_size)``;
            docs/DISTRIBUTED.md): every rank saves its own tree at the same steps, rank 0
            commits a checkpoint once every rank's shard of it is durable, and a save that is
            not committed raises ``CheckpointWriteError`` on every rank, naming the ranks
            at fault. Needs ``policy="block"`` (every rank must save every step it is asked
            to) and ``on_corrupt="raise"`` (every rank must restore the same step).
        replicated: with ``coordinator``, the tree paths (``"model"``, ``"a/b"``) whose
            values every rank holds alike: rank 0 alone saves them, and every rank restores
            them from rank 0's shard (also in a job with another number of ranks).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        basename: str = "model.ckpt",
        max_pending: int = 1,
        policy: Policy = "block",
        *,
        stop_grace_period_secs: float = 120.0,
        latest_filename: str = STATE_FILENAME,
        storage: Storage | None = None,
        on_corrupt: OnCorrupt = "raise",
        on_write_error: OnWriteError = "raise",
        read_only: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        coordinator: ShardCoordinator | None = None,
        replicated: Sequence[str] = (),
    ) -> None:
        check_int("max_pending", max_pending, minimum=0)
        _check_sharding(coordinator, replicated, policy, on_corrupt, read_only)
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, not {policy!r}")
        if policy == "replace" and max_pending == 0:
            raise ValueError(
                'policy="replace" swaps a waiting snapshot, and max_pending=0 lets none wait: '
                'pass max_pending=1, or policy="skip"'
            )
        if on_write_error not in _ON_WRITE_ERROR:
            raise ValueError(
                f"on_write_error must be one of {_ON_WRITE_ERROR}, not {on_write_error!r}"
            )
        if not stop_grace_period_secs >= 0:
            raise ValueError("stop_grace_period_secs must be >= 0")
        self.directory = os.fspath(directory)
        self.basename = check_name(basename, self.directory)
        self.max_pending = max_pending
        self.policy: Policy = policy
        self._grace = stop_grace_period_secs
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.on_write_error: OnWriteError = on_write_error
        self.read_only = read_only
        # The writer's commits and a restore's unlisting both replace the state file.
        self._state_file_lock = anyio.Lock()
        self.latest_filename = check_latest_filename(latest_filename)
        self.storage = resolve_storage(self.directory, storage, storage_options)
        self._directory = CheckpointDirectory(
            self.directory,
            latest_filename=latest_filename,
            retention=Retention(
                max_to_keep=max_to_keep,
                keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
            ),
            storage=self.storage,
            recycle=True,
            sharded=coordinator is not None,
        )
        self._sharded = (
            None
            if coordinator is None
            else ShardedSaves(
                coordinator,
                self._directory,
                self.storage,
                replicated=replicated,
                state_file_lock=self._state_file_lock,
            )
        )
        # Rank 0 holds the directory; the other ranks of a sharded manager write their
        # shards only, and read the state file as a read-only manager does.
        self._holds = not read_only and (self._sharded is None or self._sharded.chief)
        # One set per snapshot the manager may hold: being written, max_pending waiting, and
        # one taken at the call by a save with an int step that waits for room (or whose
        # snapshot replaces a waiting one).
        self._pool = SnapshotPool(max_free_sets=max_pending + 2)
        self._queue: EvictingQueue[_SaveJob] | None = None
        self._stack: AsyncExitStack | None = None
        self._task = BackgroundTask("CheckpointManager")
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = False
        self._writing: _SaveJob | None = None
        self._unreported: list[CheckpointError] = []
        self._latest_step: int | None = None
        self._written = self._skipped = self._replaced = self._failed = self._bytes = 0
        self._last_error: CheckpointError | None = None
        self._done_callbacks: list[Callable[[SaveOutcome], object]] = []
        self._acknowledged_callback = False
        self._unacknowledged: list[SaveOutcome] = []
        self._last_stall: float | None = None
        self._max_stall = 0.0
        self._last_write: float | None = None
        self._latest_durable_time: float | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._queue is not None else "new"
        return (
            f"<CheckpointManager {self.directory!r} {state} policy={self.policy!r} "
            f"pending={self._pending()}/{self.max_pending} written={self._written} "
            f"latest_step={self._latest_step}>"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task.claim()
        try:
            async with AsyncExitStack() as stack:
                self._limiter = anyio.CapacityLimiter(_IO_THREADS)
                self._queue = EvictingQueue(self.max_pending + 1)
                if self.read_only:
                    await self.reload()
                else:
                    # First: a cancellation that lands just after the lock was taken (in a
                    # worker thread, which finishes first) must still release it.
                    stack.push_async_callback(self._release_directory)
                    hold = self._hold if self._holds else self._open_shards
                    await anyio.to_thread.run_sync(hold, limiter=self._limiter)
                    self._latest_step = self._listed_latest_step()
                    if self._sharded is not None:
                        await anyio.to_thread.run_sync(
                            self._sharded.bind, self.basename, limiter=self._limiter
                        )
                    await self._task.open(stack, self._serve)
                self._stack = stack.pop_all()
        except BaseException:
            self._queue = None  # not open: save() refuses, aclose() has nothing to stop
            raise
        return self

    def _hold(self) -> None:
        """Take the directory; a listed latest checkpoint that is missing is an error (or,
        with ``on_corrupt="fallback"``, the missing ones are unlisted), never a latest step
        that ``restore()`` cannot find."""
        self._directory.hold([self.basename])
        state = self._directory.state
        if state.latest is None or self.storage.file_info(state.paths()[-1]) is not None:
            return
        missing = [name for name, path in zip(state.names, state.paths(), strict=True)
                   if self.storage.file_info(path) is None]  # fmt: skip
        if self.on_corrupt == "raise":
            raise CheckpointNotFoundError(
                state.paths()[-1],
                "the state file lists it as the latest checkpoint, but it is missing; open "
                'the manager with on_corrupt="fallback" to continue from the newest one '
                f"present, or run `asyncckpt prune {self.directory} --keep 5` to rebuild the "
                "state file from the checkpoints present",
            )
        logger.warning(
            "%s: listed checkpoints %s are missing; continuing from the newest one present",
            self.directory,
            missing,
        )
        self._directory.unlist(missing)

    def _open_shards(self) -> None:
        """A rank other than 0: read the state file, remove this rank's own crashed writes."""
        assert self._sharded is not None
        self._directory.load_state()
        self._directory.remove_own_shard_temp_files([self.basename], self._sharded.rank)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            await self._stop(exc)
        finally:
            if stack is not None:
                await self._task.exit(stack)  # the writer has stopped: the group exits at once
        self._report(exc)

    async def aclose(self) -> None:
        """Write every accepted snapshot, stop the writer and release the directory (idempotent).

        May be called from any task and inside any cancel scope (``anyio.fail_after``); the
        ``async with`` block's exit then has nothing left to do.

        Raises:
            CheckpointWriteError: a write failed and was not reported yet.
        """
        await self._stop(None)
        self._report(None)

    async def _stop(self, exc: BaseException | None) -> None:
        """Write what must be written, stop the writer and release the directory.

        The task group is not exited here but in ``__aexit__`` (see ``BackgroundTask``), so
        ``aclose()`` works under the caller's own ``fail_after``.
        """
        queue = self._queue
        if queue is None or self._closed:
            return
        self._closed = True
        queue.changes.notify()  # a writer waiting for acknowledgements writes on now
        try:
            try:
                if exc is None:
                    queue.close()
                    await self._wait_idle()  # every accepted snapshot (the caller may cancel)
                    await self._retire_unpinned()
                    if self._sharded is not None:
                        await self._sharded.close(self._limiter)
            finally:
                # An exception, a cancellation of the owner, or a cancelled drain: keep
                # writing the snapshots already taken for up to the grace period. Only a
                # write that outlives it is abandoned (its temp file is removed), and the
                # previous checkpoint stays the latest. A cancelled write waits for its
                # worker thread, so nothing is torn and that wait stays short.
                await self._task.stop(self._wait_idle, self._grace)
                queue.close()
        finally:
            for job in queue.clear():
                job.snapshot.release()
                self._settle(SaveOutcome(step=job.step, path=job.path, written=False))
            await self._release_directory()

    async def _release_directory(self) -> None:
        # Our own bounded cleanup (a spare file's unlink, a close): shielded, so a
        # cancelled owner never leaves the lock held.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._directory.release, limiter=self._limiter)
        self._pool.close()

    def _report(self, exc: BaseException | None) -> None:
        if exc is None:
            self._raise_unreported()
        elif self._unreported:
            errors, self._unreported = self._unreported, []
            exc.add_note(f"asyncckpt: {len(errors)} checkpoint write(s) also failed: {errors}")

    async def _serve(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while (job := await self._next_job(queue)) is not None:
                self._writing = job
                outcome = SaveOutcome(step=job.step, path=job.path, written=False)
                logger.info("saving checkpoint for step %d into %s", job.step, job.path)
                began = time.monotonic()
                try:
                    size = await self._write(job)
                except CheckpointError as exc:
                    self._last_write = time.monotonic() - began
                    self._write_failed(exc)
                    # A failure after the state file was replaced (deleting old checkpoints)
                    # leaves the new checkpoint listed as the latest: follow the state
                    # file, or restore() would read an unlisted old file.
                    if self._holds:
                        self._latest_step = self._listed_latest_step()
                    listed = self._latest_step == job.step
                    outcome = replace(outcome, written=listed, error=exc)
                else:
                    self._last_write = time.monotonic() - began
                    self._latest_durable_time = time.time()
                    self._written += 1
                    self._bytes += size
                    self._latest_step = job.step
                    outcome = replace(outcome, written=True)
                    logger.info(
                        "checkpoint %s is durable (%.1f MiB in %.3f s)",
                        job.path,
                        size / 2**20,
                        self._last_write,
                    )
                finally:
                    job.snapshot.release()
                    self._writing = None
                    queue.changes.notify()
                    self._settle(outcome)
        finally:
            queue.changes.notify()  # waiters see the writer gone

    async def _write(self, job: _SaveJob) -> int:
        """Write one job: the checkpoint, or this rank's shard of it (whose commit takes the
        state file's lock itself, for the commit alone: not while it waits for the ranks)."""
        write = functools.partial(
            self._directory.commit if self._sharded is None else self._sharded.save,
            job.snapshot,
            job.path,
            step=job.step,
            metadata=job.metadata,
            limiter=self._limiter,
            abandon_after=_ABANDON_AFTER_SECS,
        )
        if self._sharded is not None:
            return await write()
        async with self._state_file_lock:
            return await write()

    async def _next_job(self, queue: EvictingQueue[_SaveJob]) -> _SaveJob | None:
        while len(self._unacknowledged) >= _UNACKNOWLEDGED_LIMIT and not self._closed:
            await queue.changes.changed()
        await self._retire_unpinned()
        every = self._directory.renew_every if self._holds else None
        while every is not None:
            # An idle writer keeps its lease (an object store's lock) alive between saves.
            with anyio.move_on_after(every):
                return await queue.get()
            try:
                await anyio.to_thread.run_sync(self._directory.renew, limiter=self._limiter)
            except CheckpointLockedError as exc:
                self._write_failed(exc)
                every = None  # lost: the next commit is refused, and says so again
            except CheckpointError as exc:
                self._write_failed(exc)  # a network error: try again in a while
        return await queue.get()

    async def _retire_unpinned(self) -> None:
        # The common case, nothing to retire, costs no await: the writer calls this before
        # every job. Then under the state file's lock (a restore's fallback may be unlisting,
        # and the writer's and the close's calls must not both retire), checked again.
        if not self._holds or not self._directory.has_unpinned_surplus():
            return
        async with self._state_file_lock:
            if not self._directory.has_unpinned_surplus():
                return
            try:
                await anyio.to_thread.run_sync(
                    self._directory.retire_unpinned, limiter=self._limiter
                )
            except CheckpointError as exc:
                self._write_failed(exc)

    def _write_failed(self, exc: CheckpointError) -> None:
        """Count, log and keep a write error: never swallowed, raised by the next
        ``save()``, ``wait()`` or close unless errors are only logged."""
        self._failed += 1
        self._last_error = exc
        if self.on_write_error == "log":
            logger.error("%s; checkpointing goes on", exc)
        else:
            logger.warning("%s (raised by the next save(), wait() or close)", exc)
            self._unreported.append(exc)

    # -- saving -------------------------------------------------------------------------------

    def _open_queue(self) -> EvictingQueue[_SaveJob]:
        if self._queue is None or self._closed:
            raise RuntimeError(
                "the CheckpointManager is not open: use it as `async with CheckpointManager(...)`"
                if not self._closed
                else "the CheckpointManager is closed"
            )
        return self._queue

    def _writable_queue(self) -> EvictingQueue[_SaveJob]:
        queue = self._open_queue()
        if self.read_only:
            raise RuntimeError(
                f"this CheckpointManager of {self.directory!r} is read-only (read_only=True): "
                "it restores what another process writes, and cannot save"
            )
        return queue

    def _raise_unreported(self) -> None:
        if self._unreported:
            errors, self._unreported = self._unreported, []
            first = errors[0]
            if len(errors) > 1:
                first.add_note(f"{len(errors) - 1} later write(s) also failed: {errors[1:]}")
            raise first

    def _pending(self) -> int:
        queued = len(self._queue) if self._queue is not None else 0
        return queued + (self._writing is not None)

    def _full(self) -> bool:
        # A writer that waits for acknowledgements counts as busy, as one writing does:
        # max_pending snapshots may wait behind it, not one more.
        queued = len(self._queue) if self._queue is not None else 0
        busy = self._writing is not None or len(self._unacknowledged) >= _UNACKNOWLEDGED_LIMIT
        return queued + busy > self.max_pending

    async def _wait_for_room(self) -> None:
        while self._full():
            if not self._task.alive:
                raise RuntimeError("the CheckpointManager's writer has stopped")
            await self._open_queue().changes.changed()
        self._open_queue()

    def _label(self, step: object) -> tuple[str, int]:
        path, step_value = checkpoint_path(
            os.path.join(self.directory, self.basename),
            step,  # type: ignore[arg-type]  # checked there
            self.latest_filename,
        )
        if step_value is None:
            raise TypeError("step must be an int")
        return path, step_value

    async def save(
        self,
        state: StateTree,
        step: int | Callable[[], int],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Snapshot ``state`` as checkpoint ``step`` and queue it for writing.

        Returns once the snapshot is taken; the state may change as soon as this returns.
        The step always labels what the snapshot holds:

        * an int: the snapshot is taken at the call, before any wait. Under ``"block"``
          with the queue full, it waits for room holding that snapshot (one set of buffers
          beyond ``max_pending``); buffers that do not exist yet (a first save without
          ``reserve``) are allocated on the caller's thread.
        * a callable (``lambda: version``): called at the instant of the snapshot, after
          any wait for room and after any missing buffers were made in a worker thread, so
          the event loop is blocked only for the copy into warm buffers, and memory stays
          within ``max_pending``. What a service that changes its state while it saves
          wants.

        Returns:
            True if the snapshot was queued; False if the ``"skip"`` policy dropped it.

        Raises:
            CheckpointWriteError: an earlier write failed (raised once; this save is not
                taken; never with ``on_write_error="log"``).
            TypeError: the state holds something that cannot be saved (named by path), or
                the step is not an int.
            RuntimeError: the manager is not open, or is read-only.
        """
        self._writable_queue()
        self._raise_unreported()
        meta = _format.check_metadata(metadata) if metadata is not None else {}
        check_user_metadata(meta)
        if self._sharded is not None:
            state = self._sharded.own_part(state)
        if callable(step):
            return await self._save_when_ready(state, step, meta)
        path, step_value = self._label(step)
        if self._full() and self.policy == "skip":
            self._skipped += 1
            return False
        snapshot = await self._snapshot(state, None)
        assert snapshot is not None
        job = _SaveJob(snapshot, step_value, path, meta)
        try:
            if self.policy == "block":
                await self._wait_for_room()
        except BaseException:
            job.snapshot.release()
            raise
        if self._full() and self.policy == "skip":  # filled while tensors came off a device
            job.snapshot.release()
            self._skipped += 1
            return False
        self._enqueue(job)
        return True

    async def _save_when_ready(
        self, state: StateTree, step: Callable[[], int], meta: dict[str, Any]
    ) -> bool:
        rounds = 0
        while True:
            self._writable_queue()  # still open after the last round's await
            if self._full():
                if self.policy == "skip":
                    self._skipped += 1
                    return False
                if self.policy == "block":
                    await self._wait_for_room()
            # No await from here to the snapshot: the label is the state's at that instant.
            path, step_value = self._label(step())
            missing: list[BufferNeed] | None = [] if rounds < _WARM_ROUNDS else None
            snapshot = await self._snapshot(state, missing)
            if snapshot is not None:
                if self._full() and self.policy != "replace":
                    # Another save filled the queue while tensors came off a device: the
                    # policy decides again, and a later snapshot gets a label of its own.
                    snapshot.release()
                    continue
                self._enqueue(_SaveJob(snapshot, step_value, path, meta))
                return True
            assert missing
            rounds += 1
            buffers = await anyio.to_thread.run_sync(make_buffers, missing, limiter=self._limiter)
            self._pool.count_made(buffers)
            self._pool.stock(buffers)

    async def _snapshot(
        self, state: StateTree, missing: list[BufferNeed] | None
    ) -> Snapshot | None:
        """Take the snapshot on the loop and wait for its copies off devices, timed (the stall
        that ``statistics()`` reports); with ``missing``, only into warm buffers (None, and
        what is missing, if not)."""
        began = time.perf_counter()
        snapshot = (
            self._pool.take(state) if missing is None else self._pool.take_warm(state, missing)
        )
        if snapshot is not None:
            try:
                await snapshot.staged()
            except BaseException:
                snapshot.release()
                raise
            stall = time.perf_counter() - began
            self._last_stall = stall
            self._max_stall = max(self._max_stall, stall)
        return snapshot

    def _enqueue(self, job: _SaveJob) -> None:
        queue = self._writable_queue()
        if self._full():  # only "replace" gets here full
            dropped = queue.replace_newest(job)
            dropped.snapshot.release()
            self._replaced += 1
            self._settle(SaveOutcome(step=dropped.step, path=dropped.path, written=False))
        else:
            queue.put(job)

    async def reserve(self, state: StateTree) -> None:
        """Make and touch, in a worker thread, the snapshot buffers that saves of ``state``
        will copy into: one set per snapshot the manager may hold (``max_pending + 1``).

        Call it before serving: the first saves then block the loop only for their copy
        (fresh memory costs about 2.7 s per GiB to touch on the project's machines).

        Raises:
            TypeError: the state holds something that cannot be saved (named by path).
            RuntimeError: the manager is not open, or is read-only.
        """
        self._writable_queue()
        if self._sharded is not None:
            state = self._sharded.own_part(state)
        for _ in range(self.max_pending + 1 + _WARM_ROUNDS):
            plans = self._pool.plan_reserve(state, self.max_pending + 1)
            index = next((i for i, plan in enumerate(plans) if plan), None)
            if index is None:
                return
            buffers = await anyio.to_thread.run_sync(
                make_buffers, plans[index], limiter=self._limiter
            )
            self._pool.count_made(buffers)
            self._pool.stock(buffers, index=index)

    async def _wait_idle(self) -> None:
        assert self._queue is not None
        while self._pending() and self._task.alive:
            await self._queue.changes.changed()

    async def wait(self) -> None:
        """Wait until every snapshot taken so far is durable (or failed).

        Raises:
            CheckpointWriteError: a write failed and was not reported yet.
        """
        self._open_queue()
        await self._wait_idle()
        self._raise_unreported()

    # -- reading ------------------------------------------------------------------------------

    def _step_of(self, name: str) -> int | None:
        prefix, step = split_step(name)
        return step if prefix == self.basename else None

    def _listed_latest_step(self) -> int | None:
        latest = self._directory.state.latest
        return self._step_of(latest) if latest is not None else None

    def latest_step(self) -> int | None:
        """The step of the newest durable checkpoint, or None."""
        return self._latest_step

    def all_steps(self) -> list[int]:
        """Steps of the kept checkpoints, oldest first."""
        return self._directory.steps(self.basename)

    async def restore(
        self,
        step: int | None = None,
        into: StateTree = None,
        *,
        mmap: bool = False,
        verify: bool = True,
        on_corrupt: OnCorrupt | None = None,
        raw_dtypes: bool = False,
        paths: Sequence[str] | None = None,
        partial: bool = False,
    ) -> StateTree:
        """Restore checkpoint ``step`` (the latest when None) after pending writes finish.

        Args:
            step: which checkpoint; None for the newest.
            into: a tree to fill in place (see ``Saver.restore``).
            mmap: return read-only arrays mapped from the file.
            verify: check array checksums.
            on_corrupt: overrides the manager's ``on_corrupt`` for this call; applies when
                ``step`` is None (an explicit step is that checkpoint or an error).
            raw_dtypes: read ml_dtypes' dtypes as unsigned ints of their size (see
                ``Saver.restore``).
            paths: read and return only these subtrees (``"opt/state"``; see
                ``Saver.restore``).
            partial: with ``into``, read and fill only what ``into`` holds (see
                ``Saver.restore``).

        Raises:
            CheckpointNotFoundError: there is no such checkpoint.
            CheckpointCorruptedError, CheckpointFormatError, CheckpointReadError: the file
                cannot be trusted or read (with ``"fallback"``: no listed one can); a
                ``CheckpointFormatError`` also when an array's dtype needs ml_dtypes.
            CheckpointWriteError: an earlier write failed and was not reported yet.
            KeyError: a path of ``paths`` is not in the checkpoint.
            ValueError: ``into`` does not match the checkpoint (see ``Saver.restore``).
        """
        check_selection(paths, partial, into)
        await self.wait()
        policy = self.on_corrupt if on_corrupt is None else check_on_corrupt(on_corrupt)
        if step is not None:
            policy = "raise"
        if self._sharded is not None:
            return await self._restore_shard(
                step, into, paths=paths, partial=partial,
                read={"use_mmap": mmap, "verify": verify, "raw_dtypes": raw_dtypes},
            )  # fmt: skip
        # A read-only manager's latest may be retired by its writer between the state file
        # and the open (the storage then refuses it): read the state file again and retry.
        attempts_left = _READ_ONLY_ATTEMPTS if self.read_only and step is None else 1
        while True:
            await self.reload()
            if step is None and self._latest_step is None:
                raise CheckpointNotFoundError(self.directory, "no checkpoint has been saved here")
            steps = self.all_steps()[::-1] if step is None else [step]
            candidates = [os.path.join(self.directory, f"{self.basename}-{s}") for s in steps]
            try:
                _header, tree, skipped = await read_first_intact(
                    self.storage,
                    candidates,
                    on_corrupt=policy,
                    into=into,
                    use_mmap=mmap,
                    verify=verify,
                    raw_dtypes=raw_dtypes,
                    limiter=self._limiter,
                    subtrees=paths,
                    partial=partial,
                )
            except CheckpointNotFoundError:
                attempts_left -= 1
                if not attempts_left:
                    raise
                continue
            if skipped and not self.read_only:
                await self._unlist([os.path.basename(p) for p in skipped])
            return tree

    async def _restore_shard(
        self,
        step: int | None,
        into: StateTree,
        *,
        paths: Sequence[str] | None,
        partial: bool,
        read: dict[str, Any],
    ) -> StateTree:
        assert self._sharded is not None
        await self.reload()
        step = self._latest_step if step is None else step
        if step is None:
            raise CheckpointNotFoundError(self.directory, "no checkpoint has been saved here")
        path = os.path.join(self.directory, f"{self.basename}-{step}")
        return await self._sharded.restore(
            path, into=into, paths=paths, partial=partial, read=read, limiter=self._limiter
        )

    async def reload(self) -> None:
        """Read the state file again, to see the checkpoints that another process wrote
        since (a read-only manager; the writing manager's view is always current, and this
        does nothing for it).

        Raises:
            CheckpointCorruptedError, CheckpointFormatError, CheckpointReadError: the state
                file cannot be trusted or read.
        """
        self._open_queue()
        if not self._holds:
            await anyio.to_thread.run_sync(self._directory.load_state, limiter=self._limiter)
            self._latest_step = self._listed_latest_step()

    async def _unlist(self, names: list[str]) -> None:
        async with self._state_file_lock:
            await anyio.to_thread.run_sync(self._directory.unlist, names, limiter=self._limiter)
        self._latest_step = self._listed_latest_step()

    async def metadata(self, step: int | None = None) -> CheckpointMetadata:
        """Return the step, time, size, user metadata and arrays (paths, dtypes, shapes) of
        checkpoint ``step`` (the latest when None), from its header: no array data is read.

        Raises:
            CheckpointNotFoundError: there is no such checkpoint.
            CheckpointCorruptedError, CheckpointFormatError, CheckpointReadError: its header
                cannot be trusted or read.
        """
        self._open_queue()
        if step is None:
            await self.reload()
            step = self._latest_step
            if step is None:
                raise CheckpointNotFoundError(self.directory, "no checkpoint has been saved here")
        path = os.path.join(self.directory, f"{self.basename}-{step}")
        if self._sharded is not None:
            manifest = await self._sharded.manifest(path, self._limiter)
            if manifest.world_size == self._sharded.world_size:
                path = os.path.join(self.directory, manifest.shards[self._sharded.rank])
        return await read_metadata(self.storage, path, limiter=self._limiter)

    def add_done_callback(
        self, fn: Callable[[SaveOutcome], object], *, acknowledge: bool = False
    ) -> None:
        """Call ``fn(outcome)`` on the event loop each time an accepted save is settled.

        Outcomes arrive in the order the saves were written or dropped. ``fn`` must be quick
        and must not block (hand the work to a task); an exception from it ends the
        manager with that exception.

        With ``acknowledge=True`` (one callback at most), each written checkpoint reported
        to ``fn`` stays pinned (see ``pin``) until ``acknowledge(outcome)``, and while two
        await it the writer takes no new snapshot: a slow consumer (an upload) fills the
        queue, and the policy applies to new saves. At close every taken snapshot is written.

        Raises:
            ValueError: another callback already asked for acknowledgements.
        """
        if acknowledge:
            if self._acknowledged_callback:
                raise ValueError("only one done callback may ask for acknowledgements")
            self._acknowledged_callback = True
        self._done_callbacks.append(fn)

    def acknowledge(self, outcome: SaveOutcome) -> None:
        """Release a written checkpoint reported to the acknowledging callback: its pin,
        and its place among the outcomes the writer waits for (a no-op for any other)."""
        for index, waiting in enumerate(self._unacknowledged):
            if waiting is outcome:
                del self._unacknowledged[index]
                self.unpin(outcome.step)
                if self._queue is not None:
                    self._queue.changes.notify()
                return

    def announce(self, step: int) -> None:
        """Report the kept checkpoint ``step`` to the done callbacks again, as if it had
        just been written (pinned until acknowledged, like one).

        For a restart that finds its starting step saved already: whoever acts on written
        checkpoints (the hook's listeners) hears of it without a rewrite of the file.

        Raises:
            CheckpointNotFoundError: ``step`` is not a kept checkpoint.
        """
        if step not in self.all_steps():
            raise CheckpointNotFoundError(
                os.path.join(self.directory, f"{self.basename}-{step}"),
                f"step {step} is not among the kept checkpoints {self.all_steps()}",
            )
        path = os.path.join(self.directory, f"{self.basename}-{step}")
        self._settle(SaveOutcome(step=step, path=path, written=True))

    def pin(self, step: int) -> None:
        """Keep checkpoint ``step`` on disk and listed until as many ``unpin(step)`` calls.

        Retention decided after the call defers it (the directory keeps more than
        ``max_to_keep`` meanwhile); the first save, or the close, after its last unpin
        retires it. For whoever reads a checkpoint by path while the manager writes on
        (an upload, an evaluator).
        """
        self._directory.pin(f"{self.basename}-{step}")

    def unpin(self, step: int) -> None:
        """Release one ``pin(step)``."""
        self._directory.unpin(f"{self.basename}-{step}")

    def _settle(self, outcome: SaveOutcome) -> None:
        if outcome.written and self._acknowledged_callback:
            # Pinned before the writer's next commit can plan its retention.
            self.pin(outcome.step)
            self._unacknowledged.append(outcome)
        for fn in self._done_callbacks:
            fn(outcome)

    def statistics(self) -> CheckpointManagerStatistics:
        """Return the counters (pending, written, skipped, replaced, errors, bytes) and the
        timings (stalls of the loop, the last write, when the newest became durable)."""
        return CheckpointManagerStatistics(
            pending=self._pending(),
            max_pending=self.max_pending,
            written=self._written,
            skipped=self._skipped,
            replaced=self._replaced,
            failed=self._failed,
            bytes_written=self._bytes,
            latest_step=self._latest_step,
            last_error=self._last_error,
            buffers_allocated=self._pool.buffers_allocated,
            bytes_allocated=self._pool.bytes_allocated,
            last_stall_secs=self._last_stall,
            max_stall_secs=self._max_stall,
            last_write_secs=self._last_write,
            latest_durable_time=self._latest_durable_time,
        )
