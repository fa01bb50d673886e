"""Directory maintenance for the command line: find, verify and prune checkpoints.

Synchronous (a command-line tool blocks anyway); every byte through the ``Storage``. Knows
nothing of writers' queues or sessions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._core._errors import CheckpointError
from . import _format
from ._directory import get_checkpoint_state
from ._file import read_header_sync
from ._state_file import (
    STATE_FILENAME,
    CheckpointState,
    format_state,
    is_state_file_name,
    lock_name,
    owned_by,
    split_step,
    state_path,
)

if TYPE_CHECKING:
    from .._storage import Storage

__all__ = ["FoundCheckpoint", "prune", "scan_directory"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundCheckpoint:
    """A checkpoint file found on disk, with its header or the reason it could not be read."""

    name: str
    path: str
    size: int
    mtime: float
    header: _format.Header | None
    error: CheckpointError | None


def scan_directory(storage: Storage, directory: str) -> list[FoundCheckpoint]:
    """Find every checkpoint file in ``directory`` (by its magic bytes), headers read."""
    found = []
    for name in storage.list_names(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") or storage.read_prefix(path, len(_format.MAGIC)) != _format.MAGIC:
            continue
        info = storage.file_info(path)
        if info is None:
            continue
        header: _format.Header | None = None
        error: CheckpointError | None = None
        try:
            header = read_header_sync(storage, path)
        except CheckpointError as exc:
            error = exc
        found.append(
            FoundCheckpoint(
                name=name,
                path=path,
                size=info.st_size,
                mtime=info.st_mtime,
                header=header,
                error=error,
            )
        )
    return found


def _prefixes_of_other_state_files(storage: Storage, directory: str, filename: str) -> set[str]:
    prefixes: set[str] = set()
    for name in storage.list_names(directory):
        if name == filename or not is_state_file_name(name):
            continue
        try:
            state = get_checkpoint_state(directory, name, storage=storage)
        except CheckpointError:
            continue  # damaged too: nothing it says can be trusted, so it claims nothing
        if state is not None:
            prefixes.update(split_step(n)[0] for n in state.names)
    return prefixes


def prune(
    storage: Storage, directory: str, keep: int, latest_filename: str | None = None
) -> tuple[list[str], list[str]]:
    """Keep the newest ``keep`` listed checkpoints, delete the other listed ones.

    A state file that is missing, damaged or names missing files is rebuilt from the
    checkpoints on disk (ordered by the step in their headers). Unlisted checkpoints (kept
    by ``keep_checkpoint_every_n_hours``) are left alone unless the list is rebuilt.

    Returns:
        ``(kept names, deleted names)``.

    Raises:
        CheckpointLockedError: a writer holds the directory.
        ValueError: ``keep`` is negative.
    """
    if keep < 0:
        raise ValueError(f"--keep must be >= 0, not {keep}")
    filename = latest_filename or STATE_FILENAME
    lock = storage.lock(directory, lock_name(filename))
    lock.acquire()
    try:
        try:
            state = get_checkpoint_state(directory, latest_filename, storage=storage)
        except CheckpointError:
            state = None
        # Only the temporary files of this state file and of the prefixes it lists are ours:
        # another writer sharing the directory under its own lock may be writing the others.
        prefixes = [split_step(name)[0] for name in state.names] if state is not None else []
        storage.remove_temp_files(directory, owned_by(filename, prefixes))
        if state is not None and all(storage.file_info(p) is not None for p in state.paths()):
            names, stamps = list(state.names), list(state.timestamps)
        else:
            # With a readable state file, only its own prefixes: another writer's checkpoints
            # in the same directory (the input pipeline's) are not this list's to take.
            # Without one, at least not another state file's (checkpoint_input lists input.*).
            foreign = _prefixes_of_other_state_files(storage, directory, filename) - set(prefixes)
            readable = [
                f
                for f in scan_directory(storage, directory)
                if f.header is not None
                and (not prefixes or split_step(f.name)[0] in prefixes)
                and split_step(f.name)[0] not in foreign
            ]
            readable.sort(
                key=lambda f: (
                    f.header.step if f.header and f.header.step is not None else -1,
                    f.mtime,
                )
            )
            names = [f.name for f in readable]
            stamps = [f.header.time if f.header else f.mtime for f in readable]
        cut = max(len(names) - keep, 0)
        deleted, names, stamps = names[:cut], names[cut:], stamps[cut:]
        preserved = state.last_preserved_timestamp if state is not None else None
        new_state = CheckpointState(
            directory=directory,
            names=tuple(names),
            timestamps=tuple(stamps),
            last_preserved_timestamp=preserved,
        )
        storage.write_small_file_atomic(
            state_path(directory, latest_filename), format_state(new_state)
        )
        storage.remove_files([os.path.join(directory, n) for n in deleted])
        return names, deleted
    finally:
        lock.release()
