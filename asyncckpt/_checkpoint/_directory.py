"""A checkpoint directory as one writer holds it, and the state-file reads everyone uses.

Owns the order of a commit: the checkpoint file (``_file``), then the state file that lists
it, then the retirement of what retention no longer keeps, so that a crash at any instant
leaves the state file naming durable files only. What to keep is decided by the pure plan in
``_state_file``; every byte goes through the ``Storage``. Knows nothing of queues or hooks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio

from .._core._errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
)
from .._core._util import usable_cores
from .._storage import DirectorySyncError, WriteAborted
from ._file import write_snapshot
from ._shards import shard_checkpoint, shard_rank, shards_of
from ._snapshot import Snapshot
from ._state_file import (
    CheckpointState,
    Retention,
    format_state,
    lock_name,
    owned_by,
    parse_state,
    plan_next_state,
    split_step,
    state_path,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from .._storage import Storage

__all__ = [
    "CheckpointDirectory",
    "get_checkpoint_state",
    "latest_checkpoint",
    "unlist_checkpoints",
]

logger = logging.getLogger("asyncckpt")

UNLISTED_GRACE_SECS = 3600.0
"""How old an unlisted checkpoint object must be before a new writer sweeps it: a writer
that lost its lease (a long network partition) may still be uploading one for a while."""


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
    *,
    storage: Storage,
) -> CheckpointState | None:
    """Read the state file of ``checkpoint_dir`` (a blocking call); None when there is none.

    Raises:
        CheckpointCorruptedError: the state file fails its checksum.
        CheckpointFormatError: the state file names files outside the directory.
        CheckpointReadError: the state file cannot be read (the OSError is its cause).
    """
    directory = os.fspath(checkpoint_dir)
    path = state_path(directory, latest_filename)
    try:
        data = storage.read_small_file(path)
    except OSError as exc:  # a storage that leaves it untranslated, or a path through a file
        reason = exc.detail if isinstance(exc, CheckpointNotFoundError) else exc
        raise CheckpointReadError(path, f"cannot read the state file: {reason}") from exc
    if data is None:
        return None
    return parse_state(data, directory, path)


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
    *,
    storage: Storage,
) -> str | None:
    """Return the newest checkpoint's path in ``checkpoint_dir`` (a blocking call), or None.

    Raises:
        CheckpointNotFoundError: the state file names a checkpoint that is missing.
        CheckpointCorruptedError, CheckpointFormatError: the state file is damaged.
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename, storage=storage)
    if state is None or state.latest is None:
        return None
    path = os.path.join(state.directory, state.latest)
    if storage.file_info(path) is None:
        raise CheckpointNotFoundError(
            path,
            "the state file names this checkpoint but it is missing; restore it, restore "
            'with on_corrupt="fallback", or run '
            f"`asyncckpt prune {state.directory} --keep 5` to rewrite the state file from the "
            "checkpoints on disk",
        )
    return path


def unlist_checkpoints(
    storage: Storage, directory: str, latest_filename: str, names: Sequence[str]
) -> bool:
    """Drop ``names`` from a directory's state file, if no writer holds it (blocking).

    Returns:
        Whether it was done (False: a writer holds the directory; it is left alone).
    """
    held = CheckpointDirectory(
        directory, latest_filename=latest_filename, retention=Retention(), storage=storage
    )
    try:
        held.hold(())
    except CheckpointLockedError:
        return False
    try:
        held.unlist(names)
    finally:
        held.release()
    return True


def _nothing_new(old: CheckpointState) -> str:
    """What a failed save leaves: the directory as it was, said for this directory."""
    if old.latest is None:
        return "nothing was saved, and no earlier checkpoint exists here to restore"
    return f"the previous checkpoint is still the latest ({old.latest})"


def _failed_save(exc: CheckpointWriteError, old: CheckpointState) -> CheckpointWriteError:
    """``exc`` (a storage error, which knows files, not checkpoints) with what it means for
    the directory."""
    # Its own class kept: a state file another writer changed is a CheckpointLockedError.
    error = type(exc)(exc.path, f"{exc.detail}; {_nothing_new(old)}")
    for note in getattr(exc, "__notes__", ()):
        error.add_note(note)
    error.__cause__ = exc.__cause__
    return error


def _reason(exc: BaseException) -> str:
    """Describe the OSError behind a storage error as ``strerror (errno N)``."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return f"{cause.strerror or cause} (errno {cause.errno})"
    return str(exc)


class CheckpointDirectory:
    """One directory as its writer sees it: the state file, the lock, and the spare file.

    The interface between the writers (``Saver``, ``CheckpointManager``) and the files::

        directory.hold(prefixes)       # blocking: lock, read the state file, remove our
                                       # crashed writers' temporary files
        await directory.commit(...)    # the file, then the state file, then retention
        directory.release()            # blocking: the spare file and the lock go back

    A ``Saver`` holds a directory for one save at a time; a manager for its whole life, and
    with ``recycle`` the checkpoint that retention retires is kept as a temporary file that
    the next save overwrites in place (fresh page-cache memory costs about 2.7 s per GiB to
    touch on these machines, and a delete frees every extent; see docs/PERFORMANCE.md).

    Args:
        path: the directory.
        latest_filename: its state file's name (the lock is that state file's).
        retention: what to keep.
        storage: where the files live.
        recycle: reuse retired files (only for a writer that holds the lock across saves).
        sharded: its checkpoints are manifests with shards (``_shards``), which retention
            retires with them.
        clock: wall-clock time for the state file's timestamps.
        created: when the writer was made (``clock()`` by default): the first period of
            ``keep_checkpoint_every_n_hours`` starts then.
    """

    def __init__(
        self,
        path: str,
        *,
        latest_filename: str,
        retention: Retention,
        storage: Storage,
        recycle: bool = False,
        sharded: bool = False,
        clock: Callable[[], float] = time.time,
        created: float | None = None,
    ) -> None:
        self.path = path
        self.latest_filename = latest_filename
        self.state = CheckpointState(directory=path)
        self.loaded = False
        self._retention = retention
        self._storage = storage
        self._recycle = recycle
        self._sharded = sharded
        # Retired sharded checkpoints whose other ranks' shards are left to those ranks.
        self._handed_off: list[str] = []
        self._clock = clock
        # TensorFlow's Saver counts keep_checkpoint_every_n_hours from its creation.
        self._created = clock() if created is None else created
        self._lock = storage.lock(path, lock_name(latest_filename))
        self._spare: str | None = None
        self._crc_executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Taken on the loop, read by the commit thread: the lock guards only the counter.
        self._pins: collections.Counter[str] = collections.Counter()
        self._pins_lock = threading.Lock()

    def __repr__(self) -> str:
        held = "held" if self._lock.held else "not held"
        return f"<CheckpointDirectory {self.path!r} {self.latest_filename!r} {held}>"

    @property
    def held(self) -> bool:
        """Whether this writer holds the directory's lock."""
        return self._lock.held

    @property
    def renew_every(self) -> float | None:
        """How often a holder that saves nothing must ``renew()`` its lock (None: never)."""
        return self._lock.renew_every

    def renew(self) -> None:
        """Extend the lock's lease (blocking; a no-op for a lock that never expires).

        Raises:
            CheckpointLockedError: the lease was lost to another writer.
            CheckpointWriteError: it could not be renewed (it is held until it expires).
        """
        self._lock.renew()

    # -- blocking calls (worker threads) ------------------------------------------------------

    def load_state(self) -> CheckpointState:
        """Read the state file now (an empty state when there is none) and return it."""
        found = get_checkpoint_state(self.path, self.latest_filename, storage=self._storage)
        self.state = found if found is not None else CheckpointState(directory=self.path)
        self.loaded = True
        return self.state

    def hold(self, prefixes: Iterable[str]) -> list[str]:
        """Take the lock, read the state file, and remove the temporary files that crashed
        or cancelled writers of this state file and these checkpoint prefixes left.

        Only those are ours: another writer sharing the directory under its own lock (the
        input pipeline's) may be writing the others.

        On a storage that writes in place (an object store), the unlisted checkpoints of
        these prefixes older than ``UNLISTED_GRACE_SECS`` are removed too, and in a sharded
        directory the shards of checkpoints never listed (a save that failed on a rank).

        Returns:
            The names of the temporary files (and unlisted checkpoints) removed.

        Raises:
            CheckpointLockedError: another writer holds the directory.
            CheckpointWriteError, CheckpointFormatError: the lock or the state file fails.
        """
        self._lock.acquire()
        try:
            # Another writer may have saved here since this one last held the lock.
            self.load_state()
            owns = owned_by(self.latest_filename, prefixes)
            removed = self._storage.remove_temp_files(self.path, owns)
            if self._storage.writes_in_place or self._sharded:
                removed += self._remove_unlisted(prefixes)
            return removed
        except BaseException:
            self._lock.release()
            raise

    def take_handed_off(self) -> list[str]:
        """The retired checkpoints whose other ranks' shards await those ranks (cleared):
        what rank 0 tells them with its next verdict, so that each recycles its own."""
        names, self._handed_off = self._handed_off, []
        return names

    def retire_own_shards(self, paths: Sequence[str]) -> None:
        """Another rank: delete its shards of retired checkpoints, keeping the first one no
        reader holds as the spare its next shard overwrites (blocking).

        Raises:
            CheckpointWriteError: a shard could not be deleted (unlisted, it is never read;
                rank 0's start sweeps it).
        """
        spare = self._storage.remove_files(paths, keep_spare=self._recycle and self._spare is None)
        self._spare = spare or self._spare

    def remove_handed_off_shards(self) -> None:
        """Rank 0 at its close: delete the other ranks' shards of retired checkpoints that
        no verdict told them of (blocking; best effort, as ``retire_own_shards``)."""
        names = self.take_handed_off()
        if not names:
            return
        present = self._storage.list_names(self.path)
        doomed = [os.path.join(self.path, s) for n in names for s in shards_of(n, present)]
        with contextlib.suppress(CheckpointWriteError):
            self._storage.remove_files(doomed)

    def remove_own_shard_temp_files(self, prefixes: Iterable[str], rank: int) -> list[str]:
        """Remove the temporary files of rank ``rank``'s crashed shard writes (blocking; for
        a rank that does not hold the directory: it alone writes its shards)."""
        owns = owned_by(None, prefixes, rank=rank)

        def own_shard(name: str) -> bool:
            return shard_checkpoint(name) is not None and owns(name)

        return self._storage.remove_temp_files(self.path, own_shard)

    def _remove_unlisted(self, prefixes: Iterable[str]) -> list[str]:
        """Delete checkpoints of these prefixes that the state file does not list and that
        are older than ``UNLISTED_GRACE_SECS``: what a writer that crashed between a
        checkpoint's upload and the state file (or before retiring old ones) left behind."""
        known = frozenset(prefixes)
        listed = frozenset(self.state.names)
        doomed = []
        for name in self._storage.list_names(self.path):
            checkpoint = shard_checkpoint(name)
            if checkpoint is None and not self._storage.writes_in_place:
                continue  # a local file is put in place by rename: only shards are orphans
            prefix, step = split_step(checkpoint or name)
            if prefix not in known or step is None or (checkpoint or name) in listed:
                continue
            path = os.path.join(self.path, name)
            info = self._storage.file_info(path)
            if (
                info is not None
                and stat.S_ISREG(info.st_mode)
                and self._clock() - info.st_mtime > UNLISTED_GRACE_SECS
            ):
                doomed.append(path)
        if doomed:
            logger.info("%s: removing unlisted checkpoints %s", self.path, doomed)
            self._storage.remove_files(doomed)
        return [os.path.basename(path) for path in doomed]

    def release(self) -> None:
        """Delete the spare file, stop the checksum thread and release the lock (idempotent)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            self._storage.remove_spare(spare)
        executor, self._crc_executor = self._crc_executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._lock.release()

    def unlist(self, names: Iterable[str]) -> None:
        """Drop ``names`` from the state file, leaving their files on disk (blocking; must be
        held): checkpoints that could not be restored, so that the next save's step follows
        the one that was, and ``asyncckpt verify`` still reports the damaged files."""
        doomed = set(names)
        old = self.state
        kept = [(n, t) for n, t in zip(old.names, old.timestamps, strict=True) if n not in doomed]
        if len(kept) == len(old.names):
            return
        new_state = CheckpointState(
            directory=self.path,
            names=tuple(n for n, _ in kept),
            timestamps=tuple(t for _, t in kept),
            last_preserved_timestamp=old.last_preserved_timestamp,
        )
        self._register(new_state, None, old)

    # -- pins (any thread) --------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """Keep checkpoint ``name`` listed and on disk until as many ``unpin`` calls.

        Retention planned after this call defers it: it stays listed, beyond ``max_to_keep``,
        and a later commit (or ``retire_unpinned``) retires it once unpinned.
        """
        with self._pins_lock:
            self._pins[name] += 1

    def unpin(self, name: str) -> None:
        """Release one ``pin(name)``."""
        with self._pins_lock:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    def _pinned(self) -> frozenset[str]:
        with self._pins_lock:
            return frozenset(self._pins)

    def _plan_unpinned(self) -> tuple[CheckpointState, list[str]]:
        return plan_next_state(
            self.state,
            None,
            self._clock(),
            self._retention,
            first_preserved=self._created,
            pinned=self._pinned(),
        )

    def has_unpinned_surplus(self) -> bool:
        """Whether retention deferred checkpoints whose pins were released since (pure)."""
        return bool(self._plan_unpinned()[1])

    def retire_unpinned(self) -> None:
        """Retire the listed checkpoints that retention deferred for pins released since
        (blocking; must be held).

        Raises:
            CheckpointWriteError: the state file or a deletion failed (as in ``commit``).
        """
        old = self.state
        new_state, retired = self._plan_unpinned()
        if retired:
            self._register(new_state, None, old)
            self._retire(retired, str(new_state.latest))

    # -- one save -----------------------------------------------------------------------------

    async def commit(
        self,
        snapshot: Snapshot,
        path: str,
        *,
        step: int | None,
        metadata: dict[str, Any],
        limiter: anyio.CapacityLimiter | None = None,
        abandon_after: float = math.inf,
    ) -> int:
        """Write ``snapshot`` as checkpoint ``path``, list it, retire what retention drops.

        Must be held. The whole save (the file, its fsync and rename, the state file,
        retention) is one worker-thread call: it needs no turn of the event loop once begun,
        however rarely the loop gets one. A failed or cancelled save leaves the directory as
        it was: the previous checkpoint stays the latest and nothing new is listed.

        A cancellation asks the thread to stop at its next bounded batch (it removes its
        temporary file) and waits for it up to ``abandon_after`` seconds; a thread still
        stuck then (a write stuck in the kernel) is abandoned and logged, and can list
        nothing any more.

        Returns:
            The checkpoint file's size in bytes.

        Raises:
            CheckpointWriteError: the message says what the directory holds now.
        """
        return await self._abandonable(
            lambda aborted: self._commit_sync(snapshot, path, step, metadata, aborted),
            path,
            limiter=limiter,
            abandon_after=abandon_after,
        )

    async def write_shard(
        self,
        snapshot: Snapshot,
        path: str,
        *,
        step: int,
        metadata: dict[str, Any],
        limiter: anyio.CapacityLimiter | None = None,
        abandon_after: float = math.inf,
    ) -> int:
        """Write one rank's shard of a sharded checkpoint: the file alone, listed nowhere
        (the chief's manifest will name it). Need not be held: only this rank writes it.

        Cancelled as ``commit`` is. Returns its size in bytes.

        Raises:
            CheckpointWriteError: it was not written.
        """

        def write(aborted: Callable[[], bool]) -> int:
            # The error is the file's alone: what the directory holds is the chief's to say.
            return self._write_file(snapshot, path, step, metadata, self._clock(), aborted)

        return await self._abandonable(write, path, limiter=limiter, abandon_after=abandon_after)

    def commit_manifest(
        self,
        path: str,
        *,
        step: int,
        metadata: dict[str, Any],
    ) -> int:
        """List a sharded checkpoint whose every shard is durable: write its manifest (a
        checkpoint file without arrays, ``metadata`` naming the shards), then the state file,
        then retire what retention drops, shards included (blocking; must be held).

        The lock is renewed first: a chief that lost its lease to another writer (a network
        partition longer than the lease) must not list a late manifest over that writer's.

        Raises:
            CheckpointLockedError: the lease was taken over.
            CheckpointWriteError: as for ``commit``; the shards are left for the caller.
        """
        self._lock.renew()
        manifest = Snapshot(spec=["d", []], leaves=[], nbytes=0)
        size = self._commit_sync(manifest, path, step, metadata, lambda: False)
        return size

    async def _abandonable(
        self,
        work: Callable[[Callable[[], bool]], int],
        path: str,
        *,
        limiter: anyio.CapacityLimiter | None,
        abandon_after: float,
    ) -> int:
        """Run ``work(aborted)`` in a worker thread; a cancellation sets ``aborted`` and
        waits for the thread up to ``abandon_after`` seconds (see ``commit``)."""
        abandoned = threading.Event()
        finished = threading.Event()
        # Whether the thread began: a cancellation can land before it does (anyio checks
        # before it hands the call to a thread), and then there is nothing to wait for.
        began = threading.Lock()
        started: list[bool] = []

        def save() -> int:
            with began:
                if abandoned.is_set():
                    raise WriteAborted("the writer abandoned this save before it began")
                started.append(True)
            try:
                return work(abandoned.is_set)
            finally:
                finished.set()

        try:
            return await anyio.to_thread.run_sync(save, limiter=limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            with began:
                abandoned.set()
            stopped = not started
            if started:
                timeout = None if math.isinf(abandon_after) else abandon_after
                with anyio.CancelScope(shield=True):
                    stopped = await anyio.to_thread.run_sync(
                        finished.wait, timeout, abandon_on_cancel=True
                    )
            if not stopped:
                logger.warning(
                    "checkpoint %s abandoned: its write was still stuck %.1f s after it was "
                    "cancelled; it will not be listed, and the previous checkpoint stays the "
                    "latest",
                    path,
                    abandon_after,
                )
            raise

    def _commit_sync(
        self,
        snapshot: Snapshot,
        path: str,
        step: int | None,
        metadata: dict[str, Any],
        aborted: Callable[[], bool],
    ) -> int:
        name = os.path.basename(path)
        now = self._clock()
        old = self.state
        size = self._write(snapshot, path, step, metadata, now, old, aborted)
        new_state, retired = plan_next_state(
            old, name, now, self._retention, first_preserved=self._created, pinned=self._pinned()
        )
        if aborted():
            self._discard_unlisted(path, old)
            raise WriteAborted("the writer abandoned this save before listing it")
        self._register(new_state, path, old)
        if retired:
            # No longer listed: if they are not retired now, no later save will.
            self._retire(retired, name)
        return size

    def _crc_thread(self) -> concurrent.futures.Executor | None:
        if self._crc_executor is None and usable_cores() > 1:
            self._crc_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="asyncckpt-crc"
            )
        return self._crc_executor

    def _write(
        self,
        snapshot: Snapshot,
        path: str,
        step: int | None,
        metadata: dict[str, Any],
        now: float,
        old: CheckpointState,
        aborted: Callable[[], bool],
    ) -> int:
        try:
            return self._write_file(snapshot, path, step, metadata, now, aborted)
        except BaseException as exc:
            if not isinstance(exc, DirectorySyncError):
                if isinstance(exc, CheckpointWriteError):
                    raise _failed_save(exc, old) from exc.__cause__
                raise
            # Complete and in place, but never listed and perhaps not durable: remove it.
            self._discard_unlisted(path, old)
            raise CheckpointWriteError(
                path,
                f"{_reason(exc)} while syncing the directory after writing this checkpoint; "
                f"it was not registered: {_nothing_new(old)}",
            ) from exc.__cause__

    def _write_file(
        self,
        snapshot: Snapshot,
        path: str,
        step: int | None,
        metadata: dict[str, Any],
        now: float,
        aborted: Callable[[], bool],
    ) -> int:
        """Write one checkpoint file, over the spare file if there is one."""
        spare, self._spare = self._spare, None
        try:
            return write_snapshot(
                self._storage,
                snapshot,
                path,
                step=step,
                metadata=metadata,
                wall_time=now,
                reuse=spare,
                crc_thread=self._crc_thread(),
                aborted=aborted,
            )
        except BaseException:
            if spare is not None:  # unless the write took it and removed it already
                self._storage.remove_spare(spare)
            raise

    def _register(self, new_state: CheckpointState, path: str | None, old: CheckpointState) -> None:
        # The state file names only durable checkpoints; retirements come after it, so a
        # crash in between leaves unlisted files, never a listed file that is gone.
        state_file = state_path(self.path, self.latest_filename)
        try:
            self._storage.write_small_file_atomic(state_file, format_state(new_state))
        except DirectorySyncError as exc:
            # The new state file is what readers see now; deleting old checkpoints could
            # break the old one, should a power loss bring it back, so none are deleted.
            self.state = new_state
            raise CheckpointWriteError(
                state_file,
                f"{_reason(exc)} while syncing the directory after updating the state file: "
                f"{new_state.latest} is listed as the latest checkpoint, but a power "
                "loss may bring back the previous state file; no old checkpoint was deleted",
            ) from exc.__cause__
        except BaseException as exc:
            landed = (
                self._landed(new_state)
                if isinstance(exc, CheckpointWriteError) and self._storage.writes_in_place
                else False
            )
            if landed:
                logger.warning(
                    "%s: the state file was written although its write failed (%s): the store "
                    "applied it and its answer was lost",
                    state_file,
                    exc,
                )
                return  # self.state is new_state, read back
            # A failed save leaves the directory as it was; one that may have landed (the
            # state file cannot be read to tell) keeps its file, which may be listed.
            if path is not None and landed is False:
                self._discard_unlisted(path, old)
            if isinstance(exc, CheckpointWriteError):
                error = _failed_save(exc, old)
                if landed is None:
                    error.add_note(
                        "the state file could not be read back: the store may have applied "
                        "the write; the next writer reads what it holds"
                    )
                raise error from exc.__cause__
            raise
        self.state = new_state

    def _landed(self, new_state: CheckpointState) -> bool | None:
        """After a state-file write that failed: whether the store applied it all the same
        (its answer lost: a reset or a timeout after the request arrived), read back; None
        when the state file cannot be read either."""
        try:
            found = self.load_state()
        except CheckpointError:
            return None
        return found.names == new_state.names and found.timestamps == new_state.timestamps

    def _retire(self, retired: list[str], name: str) -> None:
        doomed = [os.path.join(self.path, n) for n in retired]
        if self._sharded:
            # Rank 0's own shards first (the first one no reader holds becomes the spare its
            # next shard overwrites); the other ranks' are theirs to recycle, once told.
            present = self._storage.list_names(self.path)
            own = [
                os.path.join(self.path, shard)
                for checkpoint in retired
                for shard in shards_of(checkpoint, present)
                if shard_rank(shard) == 0
            ]
            doomed = own + doomed
            self._handed_off.extend(retired)
        try:
            spare = self._storage.remove_files(
                doomed, keep_spare=self._recycle and self._spare is None
            )
            self._spare = spare or self._spare
        except CheckpointWriteError as exc:
            what = "this old checkpoint" if exc.path in doomed else "old checkpoints"
            error = CheckpointWriteError(
                exc.path,
                f"{exc.detail}; the new checkpoint {name} was saved and is the latest, "
                f"but {what} (no longer listed) must be deleted by hand",
            )
            for note in getattr(exc, "__notes__", ()):
                error.add_note(note)
            raise error from exc.__cause__

    def _discard_unlisted(self, path: str, old: CheckpointState) -> None:
        """Remove a checkpoint file this save wrote but did not list (best effort: a file
        left behind is unlisted, never taken for a checkpoint, and ``ls`` shows it)."""
        name = os.path.basename(path)
        if name in old.names or name in self.state.names:
            # Re-saving a listed step: the listed file is the new one now (or, when another
            # writer's commit won, read back into self.state, it lists a file of that name).
            return
        with contextlib.suppress(CheckpointWriteError):
            self._storage.remove_files([path])

    def steps(self, basename: str) -> list[int]:
        """Steps of the listed checkpoints named ``<basename>-<step>``, oldest first."""
        steps = []
        for name in self.state.names:
            prefix, step = split_step(name)
            if prefix == basename and step is not None:
                steps.append(step)
        return steps
