"""One checkpoint file: write it from a snapshot, read its header, read it into a tree.

Owns the order of a file's bytes on the way out (arrays straight from the snapshot, checksums
computed beside the write, the header last) and in (parallel reads straight into the target
arrays, each batch checked while cache-hot). The bytes' layout is ``_format``'s; the I/O is
the ``Storage``'s. Knows nothing of state files, retention or queues.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import anyio
import numpy as np

from .._core._crc32c import crc32c
from .._core._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointReadError,
)
from .._core._util import raise_first_exception, usable_cores
from .._tree import (
    Part,
    array_indices,
    build,
    build_parts,
    byte_view,
    check_into_array,
    check_selection,
    match_into,
    select,
)
from . import _format
from ._shards import Manifest

if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Sequence

    from .._core._types import StateTree
    from .._storage import ReadFile, Storage
    from ._snapshot import Snapshot

__all__ = [
    "ArrayMetadata",
    "CheckpointMetadata",
    "OnCorrupt",
    "check_on_corrupt",
    "read_checkpoint",
    "read_first_intact",
    "read_header",
    "read_header_sync",
    "read_mapped",
    "read_metadata",
    "refuse_manifest",
    "verify_file",
    "write_snapshot",
]


def _crcs(snapshot: Snapshot) -> list[int]:
    return [crc32c(byte_view(leaf.array)) for leaf in snapshot.leaves]


_ZEROS: Final = bytes(_format.ALIGNMENT)


def write_snapshot(
    storage: Storage,
    snapshot: Snapshot,
    path: str,
    *,
    step: int | None,
    metadata: dict[str, Any],
    wall_time: float,
    reuse: str | None = None,
    crc_thread: concurrent.futures.Executor | None = None,
    aborted: Callable[[], bool] | None = None,
) -> int:
    """Write one checkpoint file from a snapshot, atomically; return its size in bytes.

    A blocking call (one worker thread). Array bytes go straight from the snapshot's buffers
    to the file: no copy of the state. With ``reuse``, a retired checkpoint file is
    overwritten instead of a new one created. Their checksums are computed by ``crc_thread``
    while they are written (on this thread first when there is none), and the header that
    holds them is written last, over the room the layout reserved for it.

    Raises:
        WriteAborted: ``aborted()`` said True between two batches (see ``Storage``).
        CheckpointWriteError: the write failed; nothing was put in place.
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
        storage.write_atomic(path, [whole], reuse=reuse, aborted=aborted)
        return file_size
    layout = _format.plan_layout(**fields)
    pieces: list[Any] = [bytes(layout.data_start)]
    position = layout.data_start
    for leaf, offset in zip(snapshot.leaves, layout.offsets, strict=True):
        if offset > position:
            pieces.append(_ZEROS[: offset - position])
        pieces.append(byte_view(leaf.array))
        position = offset + leaf.array.nbytes
    crcs: concurrent.futures.Future[list[int]] | list[int] = (
        crc_thread.submit(_crcs, snapshot) if crc_thread is not None else _crcs(snapshot)
    )

    def head() -> bytes:
        found = crcs.result() if isinstance(crcs, concurrent.futures.Future) else crcs
        return _format.encode_head(layout, **fields, crcs=found)

    try:
        storage.write_atomic(path, pieces, late_head=head, reuse=reuse, aborted=aborted)
    finally:
        if isinstance(crcs, concurrent.futures.Future):
            # The snapshot's buffers go back to the pool after this: nothing may read them.
            concurrent.futures.wait([crcs])
    return layout.file_size


async def read_header(
    storage: Storage, path: str, *, limiter: anyio.CapacityLimiter | None = None
) -> _format.Header:
    """Read and validate a checkpoint's header without reading its arrays."""
    async with storage.open_for_read(path, limiter=limiter) as file:
        return await _read_header(file)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayMetadata:
    """One array of a checkpoint, as its header describes it."""

    path: str
    """Where it is in the tree (``model/0.weight``)."""
    dtype: str
    """Its dtype's name as saved (``float32``, ``bfloat16``)."""
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointMetadata:
    """What a checkpoint's header says, read without its array data."""

    path: str
    step: int | None
    time: float
    """When it was saved (seconds since the epoch)."""
    size: int
    """The file's size in bytes."""
    metadata: dict[str, Any]
    """What ``save(..., metadata=...)`` was given."""
    arrays: tuple[ArrayMetadata, ...]


async def read_metadata(
    storage: Storage, path: str, *, limiter: anyio.CapacityLimiter | None = None
) -> CheckpointMetadata:
    """Read a checkpoint's metadata (its header only; the header's checksum is checked).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError, CheckpointFormatError,
        CheckpointReadError: as for a restore's header.
    """
    header = await read_header(storage, path, limiter=limiter)
    return CheckpointMetadata(
        path=path,
        step=header.step,
        time=header.time,
        size=header.file_size,
        metadata=header.metadata,
        arrays=tuple(
            ArrayMetadata(path=e.path, dtype=e.dtype_name, shape=e.shape, nbytes=e.nbytes)
            for e in header.arrays
        ),
    )


_HEADER_READ_AHEAD: Final = 64 * 1024
"""Bytes read with the prelude: most headers come with it, in one request (a round trip
of an object store) instead of two."""


async def _read_header(file: ReadFile) -> _format.Header:
    first = await file.read(0, _format.PRELUDE_SIZE + _HEADER_READ_AHEAD)
    header_len, header_crc = _format.decode_prelude(
        first[: _format.PRELUDE_SIZE], file.size, file.path
    )
    header = first[_format.PRELUDE_SIZE : _format.PRELUDE_SIZE + header_len]
    if len(header) < header_len and len(first) == _format.PRELUDE_SIZE + _HEADER_READ_AHEAD:
        header += await file.read(len(first), header_len - len(header))
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

    def __init__(self, file: ReadFile, header: _format.Header, verify: bool) -> None:
        self._file = file
        self._entries = header.arrays
        self._data_start = header.data_start
        self._verify = verify
        self._crcs = [0] * len(header.arrays)

    def plan(
        self,
        arrays: Sequence[np.ndarray[Any, Any]],
        threads: int,
        wanted: Sequence[int] | None = None,
    ) -> list[list[_ReadBatch]]:
        """Cut the reads into shares; with ``wanted`` (array indices, in file order), read
        only those arrays (and the padding before each), skipping the others' bytes."""
        entries = self._entries
        indices: Sequence[int] = range(len(entries)) if wanted is None else wanted
        total = sum(entries[index].nbytes for index in indices)
        share_bytes = max(-(-total // max(threads, 1)), 1)
        shares: list[list[_ReadBatch]] = []
        share_room = 0
        position = self._data_start
        for index in indices:
            entry, array = entries[index], arrays[index]
            if wanted is not None and index:
                # Skipped arrays leave a hole: this array's padding starts where the one
                # before it ends.
                before = entries[index - 1]
                gap_start = before.offset + before.nbytes
                if gap_start != position and shares:
                    if shares[-1][-1].nbytes:
                        shares[-1].append(_ReadBatch(gap_start))
                    else:
                        shares[-1][-1].offset = gap_start
                position = gap_start
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
    storage: Storage,
    path: str,
    *,
    into: StateTree = None,
    use_mmap: bool = False,
    verify: bool = True,
    raw_dtypes: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
    paths: Sequence[str] | None = None,
    partial: bool = False,
) -> tuple[_format.Header, StateTree]:
    """Read one checkpoint: into existing arrays, into fresh ones, or as read-only views.

    With ``raw_dtypes``, arrays of ml_dtypes' dtypes (bfloat16 ...) come back as unsigned
    ints of the same size, which needs no ml_dtypes. With ``paths`` (tree paths such as
    ``"opt/state"``) or ``partial`` (only what ``into`` holds), only the arrays of those
    parts are read and checked; see ``asyncckpt._tree.select``.

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        CheckpointCorruptedError: a checksum or size does not match.
        CheckpointFormatError: the file is not a checkpoint this version can read, or
            (``DtypeUnavailableError``) an array's dtype needs ml_dtypes, not installed.
        KeyError: a path of ``paths`` is not in the checkpoint.
        ValueError: ``into`` does not have the checkpoint's structure.
    """
    check_selection(paths, partial, into)
    if paths is not None or partial:
        return await _read_parts(
            storage,
            path,
            into=into,
            use_mmap=use_mmap,
            verify=verify,
            raw_dtypes=raw_dtypes,
            limiter=limiter,
            paths=paths,
            partial=partial,
        )
    if use_mmap:
        header, arrays = await anyio.to_thread.run_sync(
            functools.partial(read_mapped, storage, path, verify, raw_dtypes=raw_dtypes),
            limiter=limiter,
        )
        refuse_manifest(header, path)
        _into_targets(header, into, path)  # the mapped arrays are then copied into into=
        return header, build(header.tree, arrays, into)
    async with storage.open_for_read(path, limiter=limiter) as file:
        header = _format.dtypes_for_restore(
            await _read_header(file), raw_dtypes=raw_dtypes, source=path
        )
        refuse_manifest(header, path)
        targets = _into_targets(header, into, path)
        arrays = [
            targets[index] if index in targets else np.empty(entry.shape, entry.dtype)
            for index, entry in enumerate(header.arrays)
        ]
        await _read_arrays(file, header, arrays, verify)
    return header, build(header.tree, arrays, into)


async def _read_arrays(
    file: ReadFile,
    header: _format.Header,
    arrays: Sequence[np.ndarray[Any, Any]],
    verify: bool,
    wanted: Sequence[int] | None = None,
) -> None:
    reads = _ArrayReads(file, header, verify)
    try:
        async with anyio.create_task_group() as tasks:
            for share in reads.plan(arrays, _read_threads(), wanted):
                tasks.start_soon(reads.run, share)
    except BaseExceptionGroup as group:
        raise_first_exception(group)


# Where an array is not read (outside paths= or into=): nothing refers to it.
_UNREAD: Final = np.empty(0, np.uint8)


async def _read_parts(
    storage: Storage,
    path: str,
    *,
    into: StateTree,
    use_mmap: bool,
    verify: bool,
    raw_dtypes: bool,
    limiter: anyio.CapacityLimiter | None,
    paths: Sequence[str] | None,
    partial: bool,
) -> tuple[_format.Header, StateTree]:
    """``read_checkpoint`` of the parts ``paths`` and ``partial`` select: only their arrays'
    bytes are read (and checked)."""
    parts: list[Part] = []

    def choose(header: _format.Header) -> list[int]:
        refuse_manifest(header, path)
        parts[:] = select(header.tree, paths=paths, into=into, partial=partial, source=path)
        return array_indices(parts)

    if use_mmap:
        header, arrays = await anyio.to_thread.run_sync(
            functools.partial(
                read_mapped, storage, path, verify, raw_dtypes=raw_dtypes, choose=choose
            ),
            limiter=limiter,
        )
        _part_targets(header, parts, path)  # the mapped arrays are then copied into into=
        return header, build_parts(parts, arrays)
    async with storage.open_for_read(path, limiter=limiter) as file:
        header = _format.dtypes_for_restore(
            await _read_header(file), raw_dtypes=raw_dtypes, source=path
        )
        wanted = choose(header)
        targets = _part_targets(header, parts, path)
        arrays = [_UNREAD] * len(header.arrays)
        for index in wanted:
            entry = header.arrays[index]
            target = targets.get(index)
            arrays[index] = np.empty(entry.shape, entry.dtype) if target is None else target
        await _read_arrays(file, header, arrays, verify, wanted)
    return header, build_parts(parts, arrays)


OnCorrupt = Literal["raise", "fallback"]
_ON_CORRUPT: Final = get_args(OnCorrupt)
# What makes a checkpoint file untrustworthy, as opposed to a caller's mistake (a ValueError
# for an into= of another structure): these make "fallback" try the next older checkpoint.
_UNTRUSTED: Final = (
    CheckpointCorruptedError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointReadError,
)
logger = logging.getLogger("asyncckpt")


def check_on_corrupt(on_corrupt: str) -> OnCorrupt:
    """Return ``on_corrupt`` if it is ``"raise"`` or ``"fallback"``.

    Raises:
        ValueError: it is neither.
    """
    if on_corrupt not in _ON_CORRUPT:
        raise ValueError(f'on_corrupt must be "raise" or "fallback", not {on_corrupt!r}')
    return on_corrupt  # type: ignore[return-value]


async def read_first_intact(
    storage: Storage,
    paths: Sequence[str],
    *,
    on_corrupt: OnCorrupt,
    into: StateTree = None,
    use_mmap: bool = False,
    verify: bool = True,
    raw_dtypes: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
    subtrees: Sequence[str] | None = None,
    partial: bool = False,
) -> tuple[_format.Header, StateTree, list[str]]:
    """Read the first checkpoint of ``paths`` (newest first) that is intact.

    With ``"raise"`` only the first is tried. With ``"fallback"`` a checkpoint that is
    corrupted, unreadable, missing or of an unknown format is skipped with a WARNING naming
    it, and the next is tried; ``into``'s arrays are filled again by the one that reads.
    A dtype this machine cannot make (ml_dtypes missing) is no fault of the file: it raises.
    ``subtrees`` is ``read_checkpoint``'s ``paths`` (a name ``paths`` holds here already).

    Returns:
        ``(header, tree, the paths skipped)``.

    Raises:
        CheckpointError: the first one's error when none reads (a note lists the others).
        KeyError: a path of ``subtrees`` is not in the checkpoint.
        ValueError: ``into`` does not have the checkpoint's structure.
    """
    check_selection(subtrees, partial, into)
    skipped: list[tuple[str, CheckpointError]] = []
    for path in paths if on_corrupt == "fallback" else paths[:1]:
        try:
            header, tree = await read_checkpoint(
                storage,
                path,
                into=into,
                use_mmap=use_mmap,
                verify=verify,
                raw_dtypes=raw_dtypes,
                limiter=limiter,
                paths=subtrees,
                partial=partial,
            )
        except _UNTRUSTED as exc:
            if on_corrupt == "raise" or isinstance(exc, _format.DtypeUnavailableError):
                raise
            logger.warning("cannot restore %s, trying an older checkpoint: %s", path, exc)
            skipped.append((path, exc))
            continue
        if skipped:
            logger.warning(
                "restored %s, the newest intact checkpoint; skipped %s",
                path,
                ", ".join(p for p, _ in skipped),
            )
        return header, tree, [p for p, _ in skipped]
    if not skipped:
        raise ValueError("no checkpoint to restore: paths is empty")
    first = skipped[0][1]
    if len(skipped) > 1:
        first.add_note(
            f'on_corrupt="fallback": none of the {len(skipped)} checkpoints could be restored: '
            + "; ".join(str(exc) for _, exc in skipped[1:])
        )
    raise first


def refuse_manifest(header: _format.Header, path: str) -> None:
    """Refuse to read a sharded checkpoint's manifest as if it were the checkpoint.

    Raises:
        ValueError: it is a manifest; the message says how to restore it.
    """
    manifest = Manifest.from_metadata(header.metadata, path)
    if manifest is not None:
        directory = os.path.dirname(path) or "."
        raise ValueError(
            f"{path} is a checkpoint sharded over {manifest.world_size} ranks: restore it on "
            "each rank with CheckpointManager(..., coordinator=...), or read one rank's "
            f"shard by its path ({os.path.join(directory, manifest.shards[0])} is rank 0's)"
        )


def _into_targets(
    header: _format.Header, into: StateTree, path: str
) -> dict[int, np.ndarray[Any, Any]]:
    """Check ``into`` against the checkpoint; return the arrays that can be read into in place.

    Raises:
        ValueError: ``into`` differs in structure, or an array in dtype or shape.
    """
    if into is None:
        return {}
    return _checked_targets(header, match_into(header.tree, into, path), path)


def _part_targets(
    header: _format.Header, parts: Sequence[Part], path: str
) -> dict[int, np.ndarray[Any, Any]]:
    """``_into_targets`` for the parts a restore reads, each against its ``into`` item."""
    targets: dict[int, np.ndarray[Any, Any]] = {}
    for part in parts:
        if part.live is not None:
            targets.update(match_into(part.spec, part.live, path, part.path))
    return _checked_targets(header, targets, path)


def _checked_targets(
    header: _format.Header, targets: dict[int, np.ndarray[Any, Any]], path: str
) -> dict[int, np.ndarray[Any, Any]]:
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


def read_header_sync(storage: Storage, path: str) -> _format.Header:
    """Read and validate a checkpoint's header (a blocking call: the CLI, worker threads)."""
    if not storage.supports_mmap:
        # Ranged reads, on an event loop of this thread's own (it runs none: the CLI's, or a
        # worker thread's).
        return anyio.run(read_header, storage, path)
    mapped = storage.open_mmap(path)
    try:
        return _decode_mapped(path, mapped)
    finally:
        mapped.close()


def read_mapped(
    storage: Storage,
    path: str,
    verify: bool,
    *,
    raw_dtypes: bool = False,
    choose: Callable[[_format.Header], Sequence[int]] | None = None,
) -> tuple[_format.Header, list[np.ndarray[Any, Any]]]:
    """Map a checkpoint and return its header and read-only arrays viewing the mapping
    (a blocking call); with ``verify``, every byte is checked first. ``raw_dtypes`` as for
    ``read_checkpoint``. With ``choose``, only the arrays it picks from the header (their
    indices, in file order) are viewed and checked; the others are left out.

    Raises:
        DtypeUnavailableError: an array's dtype needs ml_dtypes, and ``raw_dtypes`` is False.
    """
    mapped = storage.open_mmap(path)
    header = _format.dtypes_for_restore(
        _decode_mapped(path, mapped), raw_dtypes=raw_dtypes, source=path
    )
    if choose is not None:
        return header, _map_chosen(mapped, header, choose(header), verify, path)
    arrays: list[np.ndarray[Any, Any]] = []
    position = header.data_start
    for index, entry in enumerate(header.arrays):
        if verify:
            _check_padding(memoryview(mapped)[position : entry.offset], path, index)
        arrays.append(_mapped_array(mapped, entry))
        position = entry.offset + entry.nbytes
    if verify:
        _verify_arrays(path, header.arrays, arrays)
    return header, arrays


def _mapped_array(mapped: mmap.mmap, entry: _format.ArrayEntry) -> np.ndarray[Any, Any]:
    flat = np.frombuffer(mapped, np.uint8, entry.nbytes, entry.offset)
    return (
        flat.view(entry.dtype).reshape(entry.shape)
        if entry.nbytes
        else np.empty(entry.shape, entry.dtype)
    )


def _map_chosen(
    mapped: mmap.mmap,
    header: _format.Header,
    wanted: Sequence[int],
    verify: bool,
    path: str,
) -> list[np.ndarray[Any, Any]]:
    entries = header.arrays
    arrays = [_UNREAD] * len(entries)
    for index in wanted:
        entry = entries[index]
        arrays[index] = _mapped_array(mapped, entry)
        if verify:
            before = entries[index - 1] if index else None
            position = before.offset + before.nbytes if before else header.data_start
            _check_padding(memoryview(mapped)[position : entry.offset], path, index)
            if crc32c(byte_view(arrays[index])) != entry.crc32c:
                raise CheckpointCorruptedError(
                    path, _format.array_part(entry, index), "checksum mismatch"
                )
    return arrays


def verify_file(storage: Storage, path: str) -> _format.Header:
    """Check every byte of one checkpoint (prelude, header, padding, arrays); return its header.

    Raises:
        CheckpointCorruptedError, CheckpointFormatError, CheckpointNotFoundError.
    """
    # Checking bytes needs no dtype: ml_dtypes' arrays are viewed as raw ints.
    if not storage.supports_mmap:  # read into fresh arrays instead, as read_header_sync does
        header, _tree = anyio.run(
            functools.partial(read_checkpoint, storage, path, verify=True, raw_dtypes=True)
        )
        return header
    header, _arrays = read_mapped(storage, path, verify=True, raw_dtypes=True)
    return header
