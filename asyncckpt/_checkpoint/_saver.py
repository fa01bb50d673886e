"""Saver: save / restore / latest_checkpoint, as TensorFlow's ``tf.train.Saver``.

Owns its snapshot pool and one ``CheckpointDirectory`` per directory it saved into; a save
holds that directory for its duration. Knows nothing of hooks, sessions or background queues.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import anyio

from .._core._errors import CheckpointError
from .._storage import is_url, resolve_storage, url_root
from . import _format
from ._directory import CheckpointDirectory
from ._directory import get_checkpoint_state as _get_checkpoint_state
from ._directory import latest_checkpoint as _latest_checkpoint
from ._file import CheckpointMetadata, OnCorrupt, check_on_corrupt, read_first_intact, read_metadata
from ._snapshot import SnapshotPool
from ._state_file import (
    STATE_FILENAME,
    Retention,
    check_latest_filename,
    checkpoint_path,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import numpy as np

    from .._core._types import StateTree
    from .._storage import Storage
    from ._state_file import CheckpointState

__all__ = ["Saver", "get_checkpoint_state", "latest_checkpoint"]


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointState | None:
    """Read the state file of ``checkpoint_dir`` (a path or a URL); None when there is none.

    Raises:
        CheckpointCorruptedError: the state file fails its checksum.
        CheckpointFormatError: the state file names files outside the directory.
        CheckpointReadError: the state file cannot be read (the OSError is its cause).
    """
    directory = os.fspath(checkpoint_dir)
    return _get_checkpoint_state(
        directory,
        latest_filename,
        storage=resolve_storage(directory, storage, storage_options),
    )


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
    *,
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str | None:
    """Return the path of the newest checkpoint in ``checkpoint_dir`` (a path or a URL), or
    None if none exists.

    Raises:
        CheckpointNotFoundError: the state file names a checkpoint that is missing; the
            directory was changed by hand.
        CheckpointCorruptedError, CheckpointFormatError: the state file is damaged.
    """
    directory = os.fspath(checkpoint_dir)
    return _latest_checkpoint(
        directory,
        latest_filename,
        storage=resolve_storage(directory, storage, storage_options),
    )


class Saver:
    """Save and restore state trees as checkpoint files, keeping the newest few.

    Like TensorFlow's ``tf.train.Saver``: ``save(state, "dir/model.ckpt", global_step=7)``
    writes ``dir/model.ckpt-7`` and lists it in ``dir/checkpoint``; older checkpoints beyond
    ``max_to_keep`` are deleted (all of them at once, unlike TensorFlow's one per save), except
    one every ``keep_checkpoint_every_n_hours``, which stays on disk. A Saver picks up the
    list from the state file each time it saves into a directory, so retention continues
    across restarts and sequential writers never clobber each other's list.

    Args:
        max_to_keep: how many recent checkpoints to keep; ``None`` or 0 keeps all.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per this many hours.
        latest_filename: the state file's name (TensorFlow's ``checkpoint``).
        clock: wall-clock source for timestamps (``time.time``), injectable for tests.
        storage: where checkpoints live; by default local files for paths, and an object
            store for URLs (``s3://bucket/prefix/model.ckpt``: docs/STORAGE.md).
        storage_options: the object store's configuration, for URLs (instead of or over
            the environment's ``AWS_*``... variables).
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = 10000.0,
        *,
        latest_filename: str = STATE_FILENAME,
        clock: Callable[[], float] = time.time,
        storage: Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.retention = Retention(
            max_to_keep=max_to_keep, keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours
        )
        self.latest_filename = check_latest_filename(latest_filename)
        if storage is not None and storage_options is not None:
            raise ValueError("pass storage= or storage_options=, not both")
        self.storage = storage
        self.storage_options = storage_options
        self._storages: dict[str, Storage] = {}
        self._clock = clock
        self._created = clock()
        self._directories: dict[str, CheckpointDirectory] = {}
        self._busy: set[str] = set()
        self._pool = SnapshotPool(max_free_sets=1)

    @property
    def max_to_keep(self) -> int | None:
        """How many recent checkpoints are kept (None or 0: all)."""
        return self.retention.max_to_keep

    @property
    def keep_checkpoint_every_n_hours(self) -> float | None:
        """One checkpoint per this many hours is kept besides."""
        return self.retention.keep_checkpoint_every_n_hours

    def __repr__(self) -> str:
        return (
            f"Saver(max_to_keep={self.max_to_keep}, keep_checkpoint_every_n_hours="
            f"{self.keep_checkpoint_every_n_hours}, directories={sorted(self._directories)})"
        )

    def storage_for(self, path: str) -> Storage:
        """The storage of ``path``: ``storage=`` if given, else local files or the object
        store of the URL (one per store, kept: it remembers the state files it read)."""
        if self.storage is not None:
            return self.storage
        key = url_root(path) if is_url(path) else ""
        found = self._storages.get(key)
        if found is None:
            found = self._storages[key] = resolve_storage(
                path, storage_options=self.storage_options
            )
        return found

    def _directory(self, path: str) -> CheckpointDirectory:
        directory = self._directories.get(path)
        if directory is None:
            directory = self._directories[path] = CheckpointDirectory(
                path,
                latest_filename=self.latest_filename,
                retention=self.retention,
                storage=self.storage_for(path),
                clock=self._clock,
                created=self._created,
            )
        return directory

    def last_checkpoints(self, checkpoint_dir: str | os.PathLike[str]) -> list[str]:
        """The kept checkpoints' paths in ``checkpoint_dir``, oldest first."""
        directory = self._directory(os.fspath(checkpoint_dir))
        if not directory.loaded:
            directory.load_state()  # a synchronous API, as TensorFlow's
        return directory.state.paths()

    async def save(
        self,
        state: StateTree,
        save_path: str | os.PathLike[str],
        global_step: int | np.integer[Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Save ``state`` to ``<save_path>-<global_step>`` and return that path.

        The state is copied into reused buffers first, so the caller may change it as soon as
        this coroutine yields. The file is written to a temporary name, fsynced and renamed;
        then the state file is replaced; then surplus checkpoints are deleted. The directory's
        lock is held for the save (taken and released in worker threads).

        Raises:
            TypeError: the state holds something that cannot be saved (named by path), or
                ``global_step`` is not an int, or ``metadata`` holds non-plain values.
            ValueError: ``global_step`` is negative, or the name is not a plain file name.
            RuntimeError: another save into the same directory by this Saver is running.
            CheckpointWriteError: the write failed; the message says what the directory
                holds (normally: the previous checkpoint is still the latest).
            CheckpointLockedError: another writer holds the directory.
        """
        path, step = checkpoint_path(save_path, global_step, self.latest_filename)
        meta = _format.check_metadata(metadata) if metadata is not None else {}
        directory_path, name = os.path.split(path)
        directory = self._directory(directory_path or ".")
        if directory.path in self._busy:
            raise RuntimeError(
                f"a save into {directory.path} is already running; await it before saving "
                "again (or use CheckpointManager, which queues saves)"
            )
        prefix = name if step is None else name.removesuffix(f"-{step}")
        snapshot = self._pool.take(state)
        self._busy.add(directory.path)
        try:
            await snapshot.staged()
            await anyio.to_thread.run_sync(directory.hold, [prefix])
            try:
                await directory.commit(snapshot, path, step=step, metadata=meta)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(directory.release)
        finally:
            self._busy.discard(directory.path)
            snapshot.release()
        return path

    async def restore(
        self,
        save_path: str | os.PathLike[str] | None,
        into: StateTree = None,
        *,
        mmap: bool = False,
        verify: bool = True,
        on_corrupt: OnCorrupt = "raise",
        raw_dtypes: bool = False,
        paths: Sequence[str] | None = None,
        partial: bool = False,
    ) -> StateTree:
        """Read the checkpoint at ``save_path`` and return its tree.

        Args:
            save_path: a checkpoint path, e.g. from ``latest_checkpoint(dir)``.
            into: a tree of the same structure to fill in place: its arrays receive the data
                (no new allocation), its dicts and lists are updated, its objects get
                ``load_state_dict``. On a corrupted file its arrays may hold partial data.
            mmap: return read-only arrays mapped from the file (zero copy).
            verify: check every array's checksum (with ``mmap``, ``False`` skips reading
                the data at all; the prelude and header are always checked).
            on_corrupt: ``"raise"``; or ``"fallback"``: when ``save_path`` is corrupted,
                unreadable or missing, restore the newest older checkpoint its directory's
                state file lists that is intact, with a WARNING naming each one skipped.
            raw_dtypes: read arrays of ml_dtypes' dtypes (bfloat16, float8, int4 ...) as
                unsigned ints of the same size holding their bits (``uint16`` for
                bfloat16), which needs no ml_dtypes.
            paths: read only these subtrees, named as ``format_path`` writes them
                (``"model"``, ``"opt/state"``, ``"layers/0/w"``: keys joined by ``/``, a
                list's items and int keys as digits); no other array's bytes are read or
                checked. The tree returned holds just them, inside nested dicts keyed as
                the checkpoint keys them (a list's item by its int index:
                ``{"layers": {0: {"w": ...}}}``); a path inside another one adds nothing.
                With ``into``, each subtree is matched against (and fills) ``into``'s item
                at the same path only.
            partial: with ``into``, fill only what ``into`` holds: the checkpoint's entries
                ``into`` lacks are not read nor returned; entries of ``into`` the checkpoint
                lacks raise ``ValueError``. Dicts (Mappings, dataclasses) may hold a subset
                of the saved keys; lists and tuples keep their saved length.

        Raises:
            CheckpointNotFoundError, CheckpointCorruptedError, CheckpointFormatError,
            CheckpointReadError: (with ``"fallback"``: no candidate could be restored);
                a ``CheckpointFormatError`` also when an array's dtype needs ml_dtypes,
                which is not installed (the message says what to install);
            KeyError: a path of ``paths`` is not in the checkpoint (the message lists its
                top-level keys).
            ValueError: ``save_path`` is None, or ``into`` does not match the checkpoint
                (with ``partial``: holds entries it lacks).
        """
        if save_path is None:
            raise ValueError(
                "save_path is None: there is no checkpoint to restore; check "
                "latest_checkpoint(dir) before calling restore"
            )
        path = os.fspath(save_path)
        candidates = [path]
        if check_on_corrupt(on_corrupt) == "fallback":
            candidates += await anyio.to_thread.run_sync(self._older_listed, path)
        _header, tree, _skipped = await read_first_intact(
            self.storage_for(path),
            candidates,
            on_corrupt=on_corrupt,
            into=into,
            use_mmap=mmap,
            verify=verify,
            raw_dtypes=raw_dtypes,
            subtrees=paths,
            partial=partial,
        )
        return tree

    async def metadata(self, save_path: str | os.PathLike[str]) -> CheckpointMetadata:
        """Return the step, time, size, user metadata and arrays (paths, dtypes, shapes) of
        the checkpoint at ``save_path``, from its header: no array data is read.

        Raises:
            CheckpointNotFoundError, CheckpointCorruptedError, CheckpointFormatError,
            CheckpointReadError: the header cannot be found, trusted or read.
        """
        path = os.fspath(save_path)
        return await read_metadata(self.storage_for(path), path)

    def _older_listed(self, path: str) -> list[str]:
        """The checkpoints listed before ``path`` in its directory's state file, newest first."""
        try:
            state = _get_checkpoint_state(
                os.path.dirname(path) or ".", self.latest_filename, storage=self.storage_for(path)
            )
        except CheckpointError:
            return []  # the state file is damaged too: nothing older can be trusted from it
        listed = state.paths() if state is not None else []
        older = listed[: listed.index(path)] if path in listed else listed
        return older[::-1]

    @staticmethod
    def latest_checkpoint(
        checkpoint_dir: str | os.PathLike[str],
        latest_filename: str | None = None,
        *,
        storage: Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Return the newest checkpoint's path in ``checkpoint_dir``, or None."""
        return latest_checkpoint(
            checkpoint_dir, latest_filename, storage=storage, storage_options=storage_options
        )
