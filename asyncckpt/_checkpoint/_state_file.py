"""The state file and retention, as pure logic: names, the codec, the plan of what to keep.

Owns checkpoint names (``<basename>-<step>``), the state file's text (TensorFlow's
``checkpoint`` format plus a checksum comment), and which checkpoints a save retires. Does
no I/O: the directory (``_directory``) reads and writes what this decides.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .._core._crc32c import crc32c
from .._core._errors import CheckpointCorruptedError, CheckpointFormatError
from .._core._util import check_int
from .._storage import LOCK_NAME, MAX_SMALL_FILE
from ._shards import shard_checkpoint, shard_rank

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Sequence

__all__ = [
    "STATE_FILENAME",
    "CheckpointState",
    "Retention",
    "check_latest_filename",
    "check_name",
    "checkpoint_path",
    "format_state",
    "is_state_file_name",
    "lock_name",
    "owned_by",
    "parse_state",
    "plan_next_state",
    "plan_retention",
    "split_step",
    "state_path",
]

STATE_FILENAME: Final = "checkpoint"
_NAME_FORBIDDEN: Final = re.compile(r'[/\\\x00-\x1f"]')
_STATE_LINE: Final = re.compile(r'^([a-z_]+):\s*(?:"([^"\\]*)"|([-+0-9.eE]+|inf|nan))\s*$')
_CRC_LINE: Final = re.compile(r"^# crc32c: ([0-9a-f]{8})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointState:
    """What a state file says: the kept checkpoints, oldest first, with their save times.

    The file is TensorFlow's ``checkpoint`` text format with names relative to its
    directory, plus a checksum comment that TensorFlow's parser ignores.
    """

    directory: str
    names: tuple[str, ...] = ()
    timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float | None = None

    @property
    def latest(self) -> str | None:
        """The newest checkpoint's name, or None."""
        return self.names[-1] if self.names else None

    def paths(self) -> list[str]:
        """The kept checkpoints' paths, oldest first."""
        return [os.path.join(self.directory, name) for name in self.names]


def check_name(name: str, source: str) -> str:
    """Return ``name`` if it is a plain file name inside the directory.

    Raises:
        CheckpointFormatError: the name is empty, has a separator, or climbs out ("..").
    """
    if not name or name in (".", "..") or _NAME_FORBIDDEN.search(name) or len(name) > 255:
        raise CheckpointFormatError(
            source, f"refusing checkpoint name {name!r}: names must stay inside the directory"
        )
    return name


def format_state(state: CheckpointState) -> bytes:
    """Encode a state file (TensorFlow's text format, relative names, a checksum comment)."""
    lines = []
    if state.names:
        lines.append(f'model_checkpoint_path: "{state.names[-1]}"')
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in state.names]
    lines += [f"all_model_checkpoint_timestamps: {ts!r}" for ts in state.timestamps]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    body = "".join(line + "\n" for line in lines)
    return (body + f"# crc32c: {crc32c(body.encode()):08x}\n").encode()


def parse_state(data: bytes, directory: str, source: str) -> CheckpointState:
    """Decode a state file; a checksum comment, when present, must match.

    Raises:
        CheckpointCorruptedError: the checksum comment does not match the contents.
        CheckpointFormatError: unreadable lines, or names that would leave the directory.
    """
    if len(data) > MAX_SMALL_FILE:
        raise CheckpointFormatError(source, "state file is larger than any real one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointCorruptedError(source, "state file", "not UTF-8 text") from None
    lines = text.splitlines(keepends=True)
    crc_line = _CRC_LINE.match(lines[-1].strip()) if lines else None
    if crc_line:
        body = "".join(lines[:-1])
        if crc32c(body.encode()) != int(crc_line.group(1), 16):
            raise CheckpointCorruptedError(source, "state file", "checksum mismatch")
    elif not text.strip():
        # No writer leaves a state file empty (ours write a checksum even for an empty list,
        # TensorFlow's a path): it was truncated, and reading it as "no checkpoint" would
        # restart training from step 0 beside the checkpoints it lost.
        raise CheckpointCorruptedError(source, "state file", "the file is empty")
    latest = None
    names: list[str] = []
    stamps: list[float] = []
    preserved = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _STATE_LINE.match(line)
        if not match:
            raise CheckpointFormatError(source, f"unreadable state file line {line[:80]!r}")
        key, string, number = match.groups()
        if key in ("model_checkpoint_path", "all_model_checkpoint_paths") and string is not None:
            name = check_name(string, source)
            if key == "model_checkpoint_path":
                latest = name
            else:
                names.append(name)
        elif key in ("all_model_checkpoint_timestamps", "last_preserved_timestamp") and number:
            try:
                value = float(number)
            except ValueError:  # the pattern admits "1.2.3", "+-", "e"
                raise CheckpointFormatError(source, f"unreadable number in {key}") from None
            if not math.isfinite(value):
                raise CheckpointFormatError(source, f"non-finite timestamp in {key}")
            if key == "last_preserved_timestamp":
                preserved = value
            else:
                stamps.append(value)
        else:
            raise CheckpointFormatError(source, f"unknown or mistyped state file field {key!r}")
    if latest is not None and latest not in names:
        names.append(latest)  # TensorFlow lists the latest last; tolerate files that don't
    elif latest is not None and names[-1] != latest:
        names.remove(latest)
        names.append(latest)
    if len(stamps) != len(names):
        stamps = [0.0] * len(names)  # written without timestamps (older TensorFlow)
    return CheckpointState(
        directory=directory,
        names=tuple(names),
        timestamps=tuple(stamps),
        last_preserved_timestamp=preserved,
    )


def lock_name(latest_filename: str) -> str:
    """Return the lock file's name for the writers of one state file.

    ``.asyncckpt.lock`` for TensorFlow's ``checkpoint``; ``.asyncckpt.<name>.lock`` for any
    other, so that writers with their own state files (the input pipeline's
    ``checkpoint_input``) share a directory without waiting for each other.
    """
    if latest_filename == STATE_FILENAME:
        return LOCK_NAME
    return f".asyncckpt.{latest_filename}.lock"


def split_step(name: str) -> tuple[str, int | None]:
    """Split a checkpoint name ``<prefix>-<step>`` into its prefix and step.

    A name without a step is a prefix of its own: ``("name", None)``.
    """
    prefix, dash, digits = name.rpartition("-")
    if dash and prefix and digits.isascii() and digits.isdigit():
        return prefix, int(digits)
    return name, None


def owned_by(
    latest_filename: str | None, prefixes: Iterable[str], *, rank: int = 0
) -> Callable[[str], bool]:
    """Return whether a file name belongs to the writers of this state file and prefixes:
    the state file, a checkpoint of those prefixes, or rank ``rank``'s shard of one (each
    rank cleans up after its own shard writes alone: another rank may be writing its own)."""
    known = frozenset(prefixes)

    def owns(name: str) -> bool:
        if name == latest_filename:
            return True
        checkpoint = shard_checkpoint(name)
        if checkpoint is not None:
            return shard_rank(name) == rank and split_step(checkpoint)[0] in known
        return split_step(name)[0] in known

    return owns


def state_path(directory: str, latest_filename: str | None) -> str:
    """Return the state file's path in ``directory``.

    Raises:
        ValueError: ``latest_filename`` is not a plain file name.
    """
    filename = latest_filename or STATE_FILENAME
    if os.path.basename(filename) != filename or filename in (".", ".."):
        raise ValueError(f"latest_filename {filename!r} must be a file name without a directory")
    return os.path.join(directory, filename)


def plan_retention(
    names: Sequence[str],
    timestamps: Sequence[float],
    *,
    max_to_keep: int | None,
    keep_every_secs: float | None,
    last_preserved: float,
    pinned: Collection[str] = (),
) -> tuple[list[str], list[float], list[str], float]:
    """Decide which checkpoints to keep (pure).

    All surplus checkpoints beyond ``max_to_keep`` leave the list at once (TensorFlow removes
    one per save); a surplus checkpoint at least ``keep_every_secs`` newer than the last
    preserved one stays on disk, unlisted, as TensorFlow's ``keep_checkpoint_every_n_hours``.
    A surplus checkpoint in ``pinned`` stays listed (and on disk) for now: a later plan,
    once it is no longer pinned, retires it; listed, it is never left behind by a crash.

    Returns:
        ``(kept names, kept timestamps, names to delete, new last_preserved)``.
    """
    if not max_to_keep or len(names) <= max_to_keep:
        return list(names), list(timestamps), [], last_preserved
    surplus = len(names) - max_to_keep
    kept, stamps = [], []
    delete: list[str] = []
    for index, (name, stamp) in enumerate(zip(names, timestamps, strict=True)):
        if index >= surplus:
            kept.append(name)
            stamps.append(stamp)
        elif keep_every_secs is not None and stamp - keep_every_secs >= last_preserved:
            last_preserved = stamp
        elif name in pinned:
            kept.append(name)
            stamps.append(stamp)
        else:
            delete.append(name)
    return kept, stamps, delete, last_preserved


def is_state_file_name(name: str) -> bool:
    """Whether ``name`` is a state file by convention: ``checkpoint`` or ``checkpoint_<x>``."""
    return name == STATE_FILENAME or name.startswith(STATE_FILENAME + "_")


def check_latest_filename(latest_filename: str) -> str:
    """Return ``latest_filename`` if it can name a state file.

    Raises:
        ValueError: empty, not a plain file name, or starting with "." (lock and temporary
            files' names).
    """
    if not latest_filename:
        raise ValueError(f"latest_filename must be a file name, not {latest_filename!r}")
    state_path(".", latest_filename)
    if latest_filename.startswith("."):
        raise ValueError(
            f"latest_filename {latest_filename!r} must not start with '.': such names are "
            "kept for temporary and lock files"
        )
    return latest_filename


def checkpoint_path(
    save_path: str | os.PathLike[str],
    global_step: int | np.integer[Any] | None,
    latest_filename: str,
) -> tuple[str, int | None]:
    """Return the checkpoint's path, ``<save_path>-<global_step>``, and the step as an int.

    Raises:
        TypeError: ``global_step`` is not an int.
        ValueError: it is out of range, or the name is not a plain file name or collides
            with the state file or the temporary files.
    """
    prefix = os.fspath(save_path)
    if global_step is not None:
        if isinstance(global_step, bool) or not isinstance(global_step, int | np.integer):
            raise TypeError(f"global_step must be an int, not {type(global_step).__name__}")
        global_step = int(global_step)
        if not 0 <= global_step < 2**63:
            raise ValueError(f"global_step must be in [0, 2**63), not {global_step}")
    path = f"{prefix}-{global_step}" if global_step is not None else prefix
    name = os.path.basename(path)
    check_name(name, path)
    if name == latest_filename or name.startswith("."):
        raise ValueError(
            f"checkpoint name {name!r} collides with the state file or temporary files: "
            f"choose a save_path whose name is not {latest_filename!r} and does not "
            "start with '.'"
        )
    return path, global_step


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How many checkpoints a writer keeps (TensorFlow's ``Saver`` arguments).

    Raises:
        TypeError, ValueError: a bad ``max_to_keep`` or ``keep_checkpoint_every_n_hours``.
    """

    max_to_keep: int | None = 5
    keep_checkpoint_every_n_hours: float | None = None

    def __post_init__(self) -> None:
        if self.max_to_keep is not None:
            check_int("max_to_keep", self.max_to_keep, minimum=0)
        hours = self.keep_checkpoint_every_n_hours
        if hours is not None:
            if isinstance(hours, bool) or not isinstance(hours, int | float):
                raise TypeError(
                    f"keep_checkpoint_every_n_hours must be a number of hours (or None), "
                    f"not {type(hours).__name__}"
                )
            if not hours > 0:
                raise ValueError(
                    f"keep_checkpoint_every_n_hours must be positive, not {hours!r}; pass None "
                    "to keep only the newest max_to_keep checkpoints"
                )

    @property
    def keep_every_secs(self) -> float | None:
        """``keep_checkpoint_every_n_hours`` in seconds."""
        hours = self.keep_checkpoint_every_n_hours
        return None if hours is None else hours * 3600.0


def plan_next_state(
    old: CheckpointState,
    name: str | None,
    now: float,
    retention: Retention,
    *,
    first_preserved: float,
    pinned: Collection[str] = (),
) -> tuple[CheckpointState, list[str]]:
    """Decide the state after checkpoint ``name`` was written at ``now`` (pure).

    ``name`` becomes the latest (a re-saved name moves to the end); surplus checkpoints
    leave the list as ``plan_retention`` says, except ``pinned`` ones, which stay listed
    until a later plan. ``name=None`` plans retention alone (for pins released since).
    ``first_preserved`` stands for the last preserved time when the state file has none
    (the writer's creation time, as TensorFlow's).

    Returns:
        ``(new state, names to delete)``.
    """
    names = [n for n in old.names if n != name]
    stamps = [t for n, t in zip(old.names, old.timestamps, strict=True) if n != name]
    if name is not None:
        names.append(name)
        stamps.append(now)
    last_preserved = (
        first_preserved if old.last_preserved_timestamp is None else old.last_preserved_timestamp
    )
    names, stamps, delete, last_preserved = plan_retention(
        names,
        stamps,
        max_to_keep=retention.max_to_keep,
        keep_every_secs=retention.keep_every_secs,
        last_preserved=last_preserved,
        pinned=pinned,
    )
    new_state = CheckpointState(
        directory=old.directory,
        names=tuple(names),
        timestamps=tuple(stamps),
        last_preserved_timestamp=last_preserved,
    )
    return new_state, delete
