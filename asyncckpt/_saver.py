"""Saver: save / restore / latest_checkpoint, the state file, and retention.

Owns checkpoint names (``<basename>-<step>``), the state file that lists them, and which old
checkpoints to delete. Reads and writes whole checkpoints through ``_format`` (bytes) and
``_storage`` (files). Knows nothing of hooks, sessions or background queues.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import numpy as np

from . import _format, _storage
from ._crc32c import crc32c
from ._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from ._tree import Snapshot, SnapshotPool, build, byte_view, check_into_array, match_into

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from ._types import StateTree
from ._util import check_int, raise_single_exception, usable_cores

__all__ = [
    "CheckpointState",
    "FoundCheckpoint",
    "Saver",
    "get_checkpoint_state",
    "latest_checkpoint",
    "lock_name",
    "plan_retention",
    "prune",
    "read_checkpoint",
    "read_header",
    "read_header_sync",
    "scan_directory",
    "split_step",
    "verify_file",
]

STATE_FILENAME: Final = "checkpoint"
_SMALL_ARRAY: Final = 256 * 1024
_SPAN_BYTES: Final = 8 * 1024 * 1024
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
    if len(data) > _storage.MAX_SMALL_FILE:
        raise CheckpointFormatError(source, "state file is larger than any real one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointCorruptedError(source, "state file", "not UTF-8 text") from None
    lines = text.splitlines(keepends=True)
    if lines and (crc_line := _CRC_LINE.match(lines[-1].strip())):
        body = "".join(lines[:-1])
        if crc32c(body.encode()) != int(crc_line.group(1), 16):
            raise CheckpointCorruptedError(source, "state file", "checksum mismatch")
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


def _reason(exc: BaseException) -> str:
    """Describe the OSError behind a storage error as ``strerror (errno N)``."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return f"{cause.strerror or cause} (errno {cause.errno})"
    return str(exc)


def lock_name(latest_filename: str) -> str:
    """Return the lock file's name for the writers of one state file.

    ``.asyncckpt.lock`` for TensorFlow's ``checkpoint``; ``.asyncckpt.<name>.lock`` for any
    other, so that writers with their own state files (the input pipeline's
    ``checkpoint_input``) share a directory without waiting for each other.
    """
    if latest_filename == STATE_FILENAME:
        return _storage.LOCK_NAME
    return f".asyncckpt.{latest_filename}.lock"


def split_step(name: str) -> tuple[str, int | None]:
    """Split a checkpoint name ``<prefix>-<step>`` into its prefix and step.

    A name without a step is a prefix of its own: ``("name", None)``.
    """
    prefix, dash, digits = name.rpartition("-")
    if dash and prefix and digits.isascii() and digits.isdigit():
        return prefix, int(digits)
    return name, None


def _owned_by(latest_filename: str, prefixes: Iterable[str]) -> Callable[[str], bool]:
    """Return whether a file name belongs to the writers of this state file and prefixes."""
    known = frozenset(prefixes)

    def owns(name: str) -> bool:
        return name == latest_filename or split_step(name)[0] in known

    return owns


def _state_path(directory: str, latest_filename: str | None) -> str:
    filename = latest_filename or STATE_FILENAME
    if os.path.basename(filename) != filename or filename in (".", ".."):
        raise ValueError(f"latest_filename {filename!r} must be a file name without a directory")
    return os.path.join(directory, filename)


def get_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> CheckpointState | None:
    """Read the state file of ``checkpoint_dir``; None when there is none.

    Raises:
        CheckpointCorruptedError: the state file fails its checksum.
        CheckpointFormatError: the state file is unreadable or names files outside the directory.
    """
    directory = os.fspath(checkpoint_dir)
    path = _state_path(directory, latest_filename)
    try:
        data = _storage.read_small_file(path)
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot read the state file: {exc}") from exc
    if data is None:
        return None
    return parse_state(data, directory, path)


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> str | None:
    """Return the path of the newest checkpoint in ``checkpoint_dir``, or None if none exists.

    Raises:
        CheckpointNotFoundError: the state file names a checkpoint that is missing; the
            directory was changed by hand.
        CheckpointCorruptedError, CheckpointFormatError: the state file is damaged.
    """
    state = get_checkpoint_state(checkpoint_dir, latest_filename)
    if state is None or state.latest is None:
        return None
    path = os.path.join(state.directory, state.latest)
    if _storage.file_info(path) is None:
        raise CheckpointNotFoundError(
            path,
            "the state file names this checkpoint but it is missing; restore it, or run "
            "`asyncckpt prune` to rewrite the state file from the checkpoints on disk",
        )
    return path


def plan_retention(
    names: Sequence[str],
    timestamps: Sequence[float],
    *,
    max_to_keep: int | None,
    keep_every_secs: float | None,
    last_preserved: float,
) -> tuple[list[str], list[float], list[str], float]:
    """Decide which checkpoints to keep (pure).

    All surplus checkpoints beyond ``max_to_keep`` leave the list at once (TensorFlow removes
    one per save); a surplus checkpoint at least ``keep_every_secs`` newer than the last
    preserved one stays on disk, unlisted, as TensorFlow's ``keep_checkpoint_every_n_hours``.

    Returns:
        ``(kept names, kept timestamps, names to delete, new last_preserved)``.
    """
    kept, stamps = list(names), list(timestamps)
    delete: list[str] = []
    if not max_to_keep:
        return kept, stamps, delete, last_preserved
    while len(kept) > max_to_keep:
        name, stamp = kept.pop(0), stamps.pop(0)
        if keep_every_secs is not None and stamp - keep_every_secs >= last_preserved:
            last_preserved = stamp
        else:
            delete.append(name)
    return kept, stamps, delete, last_preserved


# -- reading and writing one checkpoint -------------------------------------------------------


def _crcs(snapshot: Snapshot) -> list[int]:
    return [crc32c(byte_view(leaf.array)) for leaf in snapshot.leaves]


_ZEROS: Final = bytes(_format.ALIGNMENT)


async def write_snapshot(
    snapshot: Snapshot,
    path: str,
    *,
    step: int | None,
    metadata: dict[str, Any],
    wall_time: float,
    reuse: str | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> int:
    """Write one checkpoint file from a snapshot, atomically; return its size in bytes.

    Array bytes go straight from the snapshot's buffers to the file: no copy of the state.
    With ``reuse``, a retired checkpoint file is overwritten instead of a new one created.
    Their checksums are computed in a second thread while they are written, and the header
    that holds them is written last, over the room the layout reserved for it.
    """
    fields: dict[str, Any] = {
        "step": step,
        "time": wall_time,
        "metadata": metadata,
        "tree": snapshot.spec,
        "leaves": snapshot.leaves,
    }
    if not snapshot.leaves:
        whole, _offsets, file_size = _format.encode_header(**fields, crcs=[])
        await _storage.write_atomic(path, [whole], reuse=reuse, limiter=limiter)
        return file_size
    layout = _format.plan_layout(**fields)
    pieces: list[Any] = [bytes(layout.data_start)]
    position = layout.data_start
    for leaf, offset in zip(snapshot.leaves, layout.offsets, strict=True):
        if offset > position:
            pieces.append(_ZEROS[: offset - position])
        pieces.append(byte_view(leaf.array))
        position = offset + leaf.array.nbytes
    crcs: list[int] = []
    crcs_done = anyio.Event()

    async def compute_crcs() -> None:
        crcs.extend(await anyio.to_thread.run_sync(_crcs, snapshot, limiter=limiter))
        crcs_done.set()

    async def head() -> bytes:
        await crcs_done.wait()
        return _format.encode_head(layout, **fields, crcs=crcs)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(compute_crcs)
            await _storage.write_atomic(path, pieces, late_head=head, reuse=reuse, limiter=limiter)
    except BaseExceptionGroup as group:
        raise_single_exception(group)
    return layout.file_size


async def read_header(path: str, *, limiter: anyio.CapacityLimiter | None = None) -> _format.Header:
    """Read and validate a checkpoint's header without reading its arrays."""
    async with _storage.open_for_read(path, limiter=limiter) as file:
        return await _read_header(file)


async def _read_header(file: _storage.ReadFile) -> _format.Header:
    prelude = await file.read(0, _format.PRELUDE_SIZE)
    header_len, header_crc = _format.decode_prelude(prelude, file.size, file.path)
    header = await file.read(_format.PRELUDE_SIZE, header_len)
    if len(header) != header_len:
        raise CheckpointCorruptedError(file.path, "size", "file shrank while being read")
    return _format.decode_header(header, header_crc, file.size, file.path)


_READ_BATCH_BYTES: Final = 16 * 1024 * 1024
"""Bytes one worker-thread call reads (and checks): a cancellation waits for one at most."""


def _read_threads() -> int:
    return usable_cores()


@dataclass(slots=True)
class _ReadBatch:
    """File bytes from ``offset`` read by one vectored call: padding and (parts of) arrays."""

    offset: int
    views: list[memoryview] = field(default_factory=list)
    nbytes: int = 0
    # (array index, its bytes in this batch, whether they end the array)
    parts: list[tuple[int, memoryview, bool]] = field(default_factory=list)
    # (index of the array the padding precedes, the padding's bytes)
    padding: list[tuple[int, bytearray]] = field(default_factory=list)

    def add(self, view: memoryview) -> None:
        self.views.append(view)
        self.nbytes += len(view)


class _ArrayReads:
    """Read a checkpoint's arrays straight into their targets, on every core.

    The arrays are cut into one share of consecutive file bytes per thread; each thread reads
    its share in bounded batches and checks each batch's checksums and padding right after
    reading it, while the bytes are still in the CPU's cache.
    """

    def __init__(self, file: _storage.ReadFile, header: _format.Header, verify: bool) -> None:
        self._file = file
        self._entries = header.arrays
        self._data_start = header.data_start
        self._verify = verify
        self._crcs = [0] * len(header.arrays)

    def plan(self, arrays: Sequence[np.ndarray[Any, Any]], threads: int) -> list[list[_ReadBatch]]:
        total = sum(entry.nbytes for entry in self._entries)
        share_bytes = max(-(-total // max(threads, 1)), 1)
        shares: list[list[_ReadBatch]] = []
        share_room = 0
        position = self._data_start
        for index, (entry, array) in enumerate(zip(self._entries, arrays, strict=True)):
            if share_room <= 0 or not shares:
                shares.append([_ReadBatch(position)])
                share_room = share_bytes
            batch = shares[-1][-1]
            if entry.offset > position:
                gap = bytearray(entry.offset - position)
                batch.add(memoryview(gap))
                batch.padding.append((index, gap))
            view = byte_view(array)
            start = 0
            while True:
                room = _READ_BATCH_BYTES - batch.nbytes
                if room <= 0:
                    batch = _ReadBatch(entry.offset + start)
                    shares[-1].append(batch)
                    room = _READ_BATCH_BYTES
                part = view[start : start + room]
                start += len(part)
                batch.add(part)
                batch.parts.append((index, part, start == len(view)))
                if start == len(view):
                    break
            share_room -= entry.nbytes
            position = entry.offset + entry.nbytes
        return shares

    async def run(self, share: list[_ReadBatch]) -> None:
        for batch in share:
            await self._file.run_sync(self._read, batch)

    def _read(self, batch: _ReadBatch) -> None:
        path = self._file.path
        if self._file.read_into_sync(batch.offset, batch.views) != batch.nbytes:
            raise CheckpointCorruptedError(path, "size", "file shrank while being read")
        if not self._verify:
            return
        for index, gap in batch.padding:
            _check_padding(gap, path, index)
        crcs = self._crcs
        for index, data, last in batch.parts:
            crcs[index] = crc32c(data, crcs[index])
            if last and crcs[index] != self._entries[index].crc32c:
                raise CheckpointCorruptedError(
                    path, _format.array_part(self._entries[index], index), "checksum mismatch"
                )


def _check_padding(data: bytes | bytearray | memoryview, path: str, index: int) -> None:
    if bytes(data).count(0) != len(data):
        raise CheckpointCorruptedError(path, f"padding before array {index}", "non-zero bytes")


def _verify_arrays(
    path: str, entries: Sequence[_format.ArrayEntry], arrays: Sequence[np.ndarray[Any, Any]]
) -> None:
    for index, (entry, array) in enumerate(zip(entries, arrays, strict=True)):
        if crc32c(byte_view(array)) != entry.crc32c:
            raise CheckpointCorruptedError(
                path, _format.array_part(entry, index), "checksum mismatch"
            )


async def read_checkpoint(
    path: str,
    *,
    into: StateTree = None,
    use_mmap: bool = False,
    verify: bool = True,
    limiter: anyio.CapacityLimiter | None = None,
) -> tuple[_format.Header, StateTree]:
    """Read one checkpoint: into existing arrays, into fresh ones, or as read-only views.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointCorruptedError: a checksum or size does not match.
        CheckpointFormatError: the file is not a checkpoint this version can read.
        ValueError: ``into`` does not have the checkpoint's structure.
    """
    if use_mmap:
        header, arrays = await anyio.to_thread.run_sync(_read_mapped, path, verify, limiter=limiter)
        _into_targets(header, into, path)  # the mapped arrays are then copied into into=
        return header, build(header.tree, arrays, into)
    async with _storage.open_for_read(path, limiter=limiter) as file:
        header = await _read_header(file)
        targets = _into_targets(header, into, path)
        arrays = [
            targets[index] if index in targets else np.empty(entry.shape, entry.dtype)
            for index, entry in enumerate(header.arrays)
        ]
        reads = _ArrayReads(file, header, verify)
        try:
            async with anyio.create_task_group() as tasks:
                for share in reads.plan(arrays, _read_threads()):
                    tasks.start_soon(reads.run, share)
        except BaseExceptionGroup as group:
            raise_single_exception(group)
    return header, build(header.tree, arrays, into)


def _into_targets(
    header: _format.Header, into: StateTree, path: str
) -> dict[int, np.ndarray[Any, Any]]:
    """Check ``into`` against the checkpoint; return the arrays that can be read into in place.

    Raises:
        ValueError: ``into`` differs in structure, or an array in dtype or shape.
    """
    if into is None:
        return {}
    targets = match_into(header.tree, into, path)
    return {
        index: live
        for index, live in targets.items()
        if check_into_array(
            index,
            live,
            header.arrays[index].dtype,
            header.arrays[index].shape,
            header.arrays[index].path,
            path,
        )
    }


def _decode_mapped(path: str, mapped: mmap.mmap) -> _format.Header:
    size = len(mapped)
    header_len, header_crc = _format.decode_prelude(mapped[: _format.PRELUDE_SIZE], size, path)
    return _format.decode_header(
        mapped[_format.PRELUDE_SIZE : _format.PRELUDE_SIZE + header_len], header_crc, size, path
    )


def read_header_sync(path: str) -> _format.Header:
    """Read and validate a checkpoint's header from a synchronous caller (the CLI)."""
    mapped = _storage.open_mmap(path)
    try:
        return _decode_mapped(path, mapped)
    finally:
        mapped.close()


def _read_mapped(path: str, verify: bool) -> tuple[_format.Header, list[np.ndarray[Any, Any]]]:
    mapped = _storage.open_mmap(path)
    header = _decode_mapped(path, mapped)
    arrays: list[np.ndarray[Any, Any]] = []
    position = header.data_start
    for index, entry in enumerate(header.arrays):
        if verify:
            _check_padding(memoryview(mapped)[position : entry.offset], path, index)
        flat = np.frombuffer(mapped, np.uint8, entry.nbytes, entry.offset)
        arrays.append(
            flat.view(entry.dtype).reshape(entry.shape)
            if entry.nbytes
            else np.empty(entry.shape, entry.dtype)
        )
        position = entry.offset + entry.nbytes
    if verify:
        _verify_arrays(path, header.arrays, arrays)
    return header, arrays


# -- Saver ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _DirectoryBook:
    """What a Saver knows of one directory: its state and whether it holds the lock."""

    state: CheckpointState
    lock: _storage.DirectoryLock
    busy: bool = False
    # While the lock is held across saves (CheckpointManager), the checkpoint retention
    # retires is kept as a temporary file for the next save to overwrite in place.
    recycles: bool = False
    spare: str | None = None


class Saver:
    """Save and restore state trees as checkpoint files, keeping the newest few.

    Like TensorFlow's ``tf.train.Saver``: ``save(state, "dir/model.ckpt", global_step=7)``
    writes ``dir/model.ckpt-7`` and lists it in ``dir/checkpoint``; older checkpoints beyond
    ``max_to_keep`` are deleted (all of them at once, unlike TensorFlow's one per save), except
    one every ``keep_checkpoint_every_n_hours``, which stays on disk. A Saver picks up the
    list from the state file the first time it saves into a directory, so retention
    continues across restarts.

    Args:
        max_to_keep: how many recent checkpoints to keep; ``None`` or 0 keeps all.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per this many hours.
        latest_filename: the state file's name (TensorFlow's ``checkpoint``).
        clock: wall-clock source for timestamps (``time.time``), injectable for tests.
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = 10000.0,
        *,
        latest_filename: str = STATE_FILENAME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, minimum=0)
        hours = keep_checkpoint_every_n_hours
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
        if not latest_filename:
            raise ValueError(f"latest_filename must be a file name, not {latest_filename!r}")
        _state_path(".", latest_filename)
        if latest_filename.startswith("."):
            raise ValueError(
                f"latest_filename {latest_filename!r} must not start with '.': such names are "
                "kept for temporary and lock files"
            )
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.latest_filename = latest_filename
        self._clock = clock
        self._created = clock()
        self._books: dict[str, _DirectoryBook] = {}
        self._pool = SnapshotPool(max_free_sets=1)

    def __repr__(self) -> str:
        return (
            f"Saver(max_to_keep={self.max_to_keep}, keep_checkpoint_every_n_hours="
            f"{self.keep_checkpoint_every_n_hours}, directories={sorted(self._books)})"
        )

    # The manager holds the directory lock for its whole life; a bare Saver takes it per save.
    # The lock covers this Saver's state file (see lock_name), so only the temporary files of
    # that state file and of the checkpoints named ``<basename>-<step>`` are ours to remove.
    def _hold(self, directory: str, basename: str) -> list[str]:
        book = self._book(directory)
        if not book.lock.held:
            book.lock.acquire()
            # The book may have been read before the lock was ours: read what is there now.
            book.state = get_checkpoint_state(directory, self.latest_filename) or book.state
        return _storage.remove_temp_files(directory, _owned_by(self.latest_filename, [basename]))

    def _release(self, directory: str) -> None:
        book = self._books.get(directory)
        if book is not None:
            if book.spare is not None:
                _storage.remove_spare(book.spare)
                book.spare = None
            book.lock.release()

    def _book(self, directory: str) -> _DirectoryBook:
        book = self._books.get(directory)
        if book is None:
            state = get_checkpoint_state(directory, self.latest_filename)
            if state is None:
                state = CheckpointState(directory=directory)
            lock = _storage.DirectoryLock(directory, lock_name(self.latest_filename))
            book = _DirectoryBook(state=state, lock=lock)
            self._books[directory] = book
        return book

    @contextlib.contextmanager
    def _writing(self, directory: str, prefix: str) -> Iterator[_DirectoryBook]:
        book = self._book(directory)
        if book.busy:
            raise RuntimeError(
                f"a save into {directory} is already running; await it before saving again "
                "(or use CheckpointManager, which queues saves)"
            )
        book.busy = True
        temporary_lock = not book.lock.held
        try:
            if temporary_lock:
                book.lock.acquire()
                _storage.remove_temp_files(directory, _owned_by(self.latest_filename, [prefix]))
                # Another writer may have saved here since we last held the lock.
                book.state = get_checkpoint_state(directory, self.latest_filename) or book.state
            book.recycles = not temporary_lock
            yield book
        finally:
            book.busy = False
            book.recycles = False
            if temporary_lock:
                book.lock.release()

    def last_checkpoints(self, checkpoint_dir: str | os.PathLike[str]) -> list[str]:
        """The kept checkpoints' paths in ``checkpoint_dir``, oldest first."""
        return self._book(os.fspath(checkpoint_dir)).state.paths()

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
        then the state file is replaced; then surplus checkpoints are deleted.

        Raises:
            TypeError: the state holds something that cannot be saved (named by path), or
                ``global_step`` is not an int, or ``metadata`` holds non-plain values.
            ValueError: ``global_step`` is negative, or the name is not a plain file name.
            RuntimeError: another save into the same directory by this Saver is running.
            CheckpointWriteError: the write failed; the message says what the directory
                holds (normally: the previous checkpoint is still the latest).
            CheckpointLockedError: another writer holds the directory.
        """
        path, step, meta = self._prepare(save_path, global_step, metadata)
        snapshot = self._pool.take(state)
        try:
            await self._commit(snapshot, path, step=step, metadata=meta)
        finally:
            snapshot.release()
        return path

    def _prepare(
        self,
        save_path: str | os.PathLike[str],
        global_step: int | np.integer[Any] | None,
        metadata: dict[str, Any] | None,
    ) -> tuple[str, int | None, dict[str, Any]]:
        prefix = os.fspath(save_path)
        if global_step is not None:
            if isinstance(global_step, bool) or not isinstance(global_step, int | np.integer):
                raise TypeError(f"global_step must be an int, not {type(global_step).__name__}")
            global_step = int(global_step)
            if not 0 <= global_step < 2**63:
                raise ValueError(f"global_step must be in [0, 2**63), not {global_step}")
        path = f"{prefix}-{global_step}" if global_step is not None else prefix
        _directory, name = os.path.split(path)
        check_name(name, path)
        if name == self.latest_filename or name.startswith("."):
            raise ValueError(
                f"checkpoint name {name!r} collides with the state file or temporary files: "
                f"choose a save_path whose name is not {self.latest_filename!r} and does not "
                "start with '.'"
            )
        meta = _format.check_metadata(metadata) if metadata is not None else {}
        return path, global_step, meta

    async def _commit(
        self,
        snapshot: Snapshot,
        path: str,
        *,
        step: int | None,
        metadata: dict[str, Any],
        limiter: anyio.CapacityLimiter | None = None,
    ) -> int:
        directory, name = os.path.split(path)
        directory = directory or "."
        prefix = name if step is None else name.removesuffix(f"-{step}")
        with self._writing(directory, prefix) as book:
            now = self._clock()
            old = book.state
            spare, book.spare = book.spare, None
            try:
                size = await write_snapshot(
                    snapshot,
                    path,
                    step=step,
                    metadata=metadata,
                    wall_time=now,
                    reuse=spare,
                    limiter=limiter,
                )
            except BaseException as exc:
                if spare is not None:  # unless the write took it and removed it already
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(
                            _storage.remove_spare, spare, limiter=limiter
                        )
                if not isinstance(exc, _storage.DirectorySyncError):
                    raise
                # Complete and in place, but never listed and perhaps not durable: remove it.
                await self._discard_unlisted(path, old, limiter)
                raise CheckpointWriteError(
                    path,
                    f"{_reason(exc)} while syncing the directory after writing this checkpoint; "
                    "it was not registered and the previous checkpoint is still the latest",
                ) from exc.__cause__
            names = [n for n in old.names if n != name] + [name]
            stamps = [t for n, t in zip(old.names, old.timestamps, strict=True) if n != name]
            stamps.append(now)
            keep_secs = (
                None
                if self.keep_checkpoint_every_n_hours is None
                else self.keep_checkpoint_every_n_hours * 3600.0
            )
            last_preserved = (
                self._created
                if old.last_preserved_timestamp is None
                else old.last_preserved_timestamp
            )
            names, stamps, delete, last_preserved = plan_retention(
                names,
                stamps,
                max_to_keep=self.max_to_keep,
                keep_every_secs=keep_secs,
                last_preserved=last_preserved,
            )
            new_state = CheckpointState(
                directory=directory,
                names=tuple(names),
                timestamps=tuple(stamps),
                last_preserved_timestamp=last_preserved,
            )
            state_path = _state_path(directory, self.latest_filename)
            # The state file names only durable checkpoints; deletions come after it, so a
            # crash in between leaves unlisted files, never a listed file that is gone.
            try:
                await anyio.to_thread.run_sync(
                    _storage.write_small_file_atomic,
                    state_path,
                    format_state(new_state),
                    limiter=limiter,
                )
            except _storage.DirectorySyncError as exc:
                # The new state file is what readers see now; deleting old checkpoints could
                # break the old one, should a power loss bring it back, so none are deleted.
                book.state = new_state
                raise CheckpointWriteError(
                    state_path,
                    f"{_reason(exc)} while syncing the directory after updating the state file: "
                    f"{name} is listed as the latest checkpoint, but a power loss may bring back "
                    "the previous state file; no old checkpoint was deleted",
                ) from exc.__cause__
            except BaseException:
                # A failed or cancelled save leaves the directory as it was.
                await self._discard_unlisted(path, old, limiter)
                raise
            book.state = new_state
            if delete:
                doomed = [os.path.join(directory, n) for n in delete]
                try:
                    # The state file no longer lists them: if they are not deleted now, no
                    # later save will, so a cancellation waits for these few unlinks.
                    with anyio.CancelScope(shield=True):
                        book.spare = await anyio.to_thread.run_sync(
                            functools.partial(
                                _storage.remove_files, doomed, keep_spare=book.recycles
                            ),
                            limiter=limiter,
                        )
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
        return size

    @staticmethod
    async def _discard_unlisted(
        path: str, old: CheckpointState, limiter: anyio.CapacityLimiter | None
    ) -> None:
        """Remove a checkpoint file this save wrote but did not list (best effort)."""
        if os.path.basename(path) in old.names:
            return  # re-saving a listed step: the listed file is the new one now
        with anyio.CancelScope(shield=True), contextlib.suppress(CheckpointWriteError):
            await anyio.to_thread.run_sync(_storage.remove_files, [path], limiter=limiter)

    async def restore(
        self,
        save_path: str | os.PathLike[str] | None,
        into: StateTree = None,
        *,
        mmap: bool = False,
        verify: bool = True,
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

        Raises:
            CheckpointNotFoundError, CheckpointCorruptedError, CheckpointFormatError;
            ValueError: ``save_path`` is None, or ``into`` does not match the checkpoint.
        """
        if save_path is None:
            raise ValueError(
                "save_path is None: there is no checkpoint to restore; check "
                "latest_checkpoint(dir) before calling restore"
            )
        _header, tree = await read_checkpoint(
            os.fspath(save_path), into=into, use_mmap=mmap, verify=verify
        )
        return tree

    @staticmethod
    def latest_checkpoint(
        checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
    ) -> str | None:
        """Return the newest checkpoint's path in ``checkpoint_dir``, or None."""
        return latest_checkpoint(checkpoint_dir, latest_filename)


# -- directory maintenance (the command line) -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundCheckpoint:
    """A checkpoint file found on disk, with its header or the reason it could not be read."""

    name: str
    path: str
    size: int
    mtime: float
    header: _format.Header | None
    error: CheckpointError | None


def scan_directory(directory: str) -> list[FoundCheckpoint]:
    """Find every checkpoint file in ``directory`` (by its magic bytes), headers read."""
    found = []
    for name in _storage.list_names(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") or _storage.read_prefix(path, len(_format.MAGIC)) != _format.MAGIC:
            continue
        info = _storage.file_info(path)
        if info is None:
            continue
        header: _format.Header | None = None
        error: CheckpointError | None = None
        try:
            header = read_header_sync(path)
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


def verify_file(path: str) -> _format.Header:
    """Check every byte of one checkpoint (prelude, header, padding, arrays); return its header.

    Raises:
        CheckpointCorruptedError, CheckpointFormatError, CheckpointNotFoundError.
    """
    header, _arrays = _read_mapped(path, verify=True)
    return header


def is_state_file_name(name: str) -> bool:
    """Whether ``name`` is a state file by convention: ``checkpoint`` or ``checkpoint_<x>``."""
    return name == STATE_FILENAME or name.startswith(STATE_FILENAME + "_")


def _prefixes_of_other_state_files(directory: str, filename: str) -> set[str]:
    prefixes: set[str] = set()
    for name in _storage.list_names(directory):
        if name == filename or not is_state_file_name(name):
            continue
        try:
            state = get_checkpoint_state(directory, name)
        except CheckpointError:
            continue  # damaged too: nothing it says can be trusted, so it claims nothing
        if state is not None:
            prefixes.update(split_step(n)[0] for n in state.names)
    return prefixes


def prune(
    directory: str, keep: int, latest_filename: str | None = None
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
    lock = _storage.DirectoryLock(directory, lock_name(filename))
    lock.acquire()
    try:
        try:
            state = get_checkpoint_state(directory, latest_filename)
        except CheckpointError:
            state = None
        # Only the temporary files of this state file and of the prefixes it lists are ours:
        # another writer sharing the directory under its own lock may be writing the others.
        prefixes = [split_step(name)[0] for name in state.names] if state is not None else []
        _storage.remove_temp_files(directory, _owned_by(filename, prefixes))
        if state is not None and all(_storage.file_info(p) is not None for p in state.paths()):
            names, stamps = list(state.names), list(state.timestamps)
        else:
            # With a readable state file, only its own prefixes: another writer's checkpoints
            # in the same directory (the input pipeline's) are not this list's to take.
            # Without one, at least not another state file's (checkpoint_input lists input.*).
            foreign = _prefixes_of_other_state_files(directory, filename) - set(prefixes)
            readable = [
                f
                for f in scan_directory(directory)
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
        _storage.write_small_file_atomic(
            _state_path(directory, latest_filename), format_state(new_state)
        )
        _storage.remove_files([os.path.join(directory, n) for n in deleted])
        return names, deleted
    finally:
        lock.release()
