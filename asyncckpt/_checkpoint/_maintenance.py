"""Directory maintenance for the command line: find, verify and prune checkpoints.

Synchronous (a command-line tool blocks anyway); every byte through the ``Storage``. Knows
nothing of writers' queues or sessions.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._core._errors import CheckpointError, CheckpointNotFoundError, CheckpointReadError
from .._storage import TEMP_MARKER
from . import _format
from ._directory import get_checkpoint_state
from ._file import read_header_sync, verify_file
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
    from collections.abc import Collection

    from .._storage import Storage

__all__ = ["FoundCheckpoint", "prune", "scan_directory"]

# TensorBoard's event files share checkpoint directories, and their names can end in
# "-<digits>" (a host name such as "worker-3"). Spelled out: the summary layer is not ours.
_EVENT_FILE_PREFIX: Final = "events.out.tfevents."


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundCheckpoint:
    """A checkpoint file found on disk, with its header or the reason it could not be read.

    ``retired``: the file was gone by the time it was read, as when a live writer's retention
    deletes it during the scan; no header, no error (and ``size``, ``mtime`` 0 if it was gone
    before it could be looked at).
    """

    name: str
    path: str
    size: int
    mtime: float
    header: _format.Header | None
    error: CheckpointError | None
    retired: bool = False


def scan_directory(
    storage: Storage, directory: str, *, listed: Collection[str] = (), verify: bool = False
) -> list[FoundCheckpoint]:
    """Find every checkpoint file in ``directory`` and read its header, in name order.

    A checkpoint file is one named ``<prefix>-<step>`` (the directory's other files aside:
    dotfiles, temporary and lock files, state files, event files) or in ``listed`` (the names
    its state files give), whatever its first bytes, so that a file damaged at its start is
    reported rather than skipped; or any other file starting with the magic bytes.

    Args:
        storage: where the directory is.
        directory: the directory.
        listed: names to take for checkpoints whatever they look like.
        verify: check every byte of each file (``verify_file``), not just its header.

    Raises:
        OSError: the directory cannot be listed.
    """
    found = []
    for name in storage.list_names(directory):
        path = os.path.join(directory, name)
        info = storage.file_info(path)
        if info is None:
            if name in listed or _is_checkpoint_name(name):
                found.append(_retired(name, path))
        elif _is_candidate(storage, name, path, info, listed):
            found.append(_examine(storage, name, path, info, verify=verify))
    return found


def _is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is ``<prefix>-<step>`` and none of the directory's other files."""
    if name.startswith("."):  # the lock files, hidden files, and temporary files as written
        return False
    if TEMP_MARKER in name or is_state_file_name(name) or name.startswith(_EVENT_FILE_PREFIX):
        return False
    return split_step(name)[1] is not None


def _is_candidate(
    storage: Storage, name: str, path: str, info: os.stat_result, listed: Collection[str]
) -> bool:
    """Whether to read ``name`` as a checkpoint: listed by a state file, whatever it is (the
    library refuses a symlink or a directory there, so that is reported); a regular file
    named like one, whatever its first bytes; or another regular file with the magic bytes."""
    if name in listed:
        return True
    # Only regular files are opened: opening a FIFO to read would wait for a writer.
    if not stat.S_ISREG(info.st_mode):
        return False
    if _is_checkpoint_name(name):
        return True
    return not name.startswith(".") and (
        storage.read_prefix(path, len(_format.MAGIC)) == _format.MAGIC
    )


def _retired(name: str, path: str, info: os.stat_result | None = None) -> FoundCheckpoint:
    return FoundCheckpoint(
        name=name,
        path=path,
        size=info.st_size if info else 0,
        mtime=info.st_mtime if info else 0.0,
        header=None,
        error=None,
        retired=True,
    )


def _examine(
    storage: Storage, name: str, path: str, info: os.stat_result, *, verify: bool
) -> FoundCheckpoint:
    """Read one file's header (with ``verify``, every byte); note why it failed, or that it
    was retired meanwhile."""
    header: _format.Header | None = None
    error: CheckpointError | None = None
    try:
        if not stat.S_ISREG(info.st_mode):
            # A listed symlink, directory or FIFO: never opened (a FIFO would block the open).
            raise CheckpointNotFoundError(path, "not a regular file")
        header = verify_file(storage, path) if verify else read_header_sync(storage, path)
    except CheckpointError as exc:
        error = exc
    except OSError as exc:  # the storage leaves a failed read untranslated
        error = CheckpointReadError(path, f"cannot read it: {exc.strerror or exc}")
        error.__cause__ = exc
    if error is not None and storage.file_info(path) is None:
        # Gone since it was listed: a writer's retention, not damage.
        return _retired(name, path, info)
    return FoundCheckpoint(
        name=name,
        path=path,
        size=info.st_size,
        mtime=info.st_mtime,
        header=header,
        error=error,
    )


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
