"""Snapshots: a state tree frozen at a step boundary, in buffers reused from save to save.

Owns the buffer pool, the copy threads, and the staging of device tensors: which are copied
into which pinned buffers, and the wait for those copies. Flattening (what a tree may hold)
and the torch calls that copy off a device belong to the tree layer; what a snapshot becomes
on disk, to ``_file``.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeAlias

import anyio
import anyio.lowlevel
import numpy as np

from .._core._util import usable_cores
from .._tree import (
    ArrayLeaf,
    CudaCopier,
    DeviceLeaves,
    DeviceTensor,
    Spec,
    TreePath,
    byte_view,
    flatten,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._core._types import StateTree

__all__ = [
    "BufferNeed",
    "CopyThreads",
    "DeviceCopier",
    "PinnedBuffer",
    "Snapshot",
    "SnapshotPool",
    "make_buffers",
]

_PARALLEL_COPY_BYTES: Final = 16 * 1024 * 1024
"""Below this a snapshot is copied on the caller's thread alone: a hand-off costs more."""

_PAGE_BYTES: Final = 4096

_CopyPair = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
Buffers = dict[TreePath, np.ndarray[Any, Any]]
Wait: TypeAlias = "Callable[[], None]"
"""Blocks until the copies off a device it was returned for have landed."""


class BufferNeed(NamedTuple):
    """A snapshot buffer that does not exist yet: where in the tree, and of what array;
    ``pinned`` when a device copies into it (a tensor on a CUDA device)."""

    path: TreePath
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    pinned: bool = False


class PinnedBuffer(np.ndarray[Any, Any]):
    """A pooled buffer in pinned host memory, which a device copies into: a view of what
    ``DeviceCopier.pinned`` made, which its chain of bases keeps alive.

    Its own type, so that a free set says which of its buffers a device copy may reuse.
    """


class DeviceCopier(Protocol):
    """The device operations a snapshot makes: ``CudaCopier`` (the tree layer's torch module,
    the only one that may import torch), or a stand-in in tests."""

    @property
    def device_types(self) -> frozenset[str]:
        """The device types (``"cuda"``) whose tensors it copies."""
        ...

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """A host array a device copies into asynchronously (blocking: for a worker thread)."""
        ...

    def start(self, copies: Sequence[tuple[np.ndarray[Any, Any], DeviceTensor]]) -> Wait:
        """Enqueue the copy of each tensor into its buffer (one ``pinned`` made), after the
        work its device was given so far and before any it is given later; return the
        blocking wait for them all (for a worker thread)."""
        ...


def make_buffers(
    needs: Sequence[BufferNeed],
    allocate_pinned: Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]] | None = None,
) -> Buffers:
    """Allocate and touch the buffers ``needs`` asks for (blocking: for a worker thread);
    pinned ones through ``allocate_pinned`` (by default ``CudaCopier.pinned``).

    Every page is written once here, so the snapshot that copies into them later costs no
    more than one into warm buffers (fresh memory costs about 2.7 s per GiB to touch on
    these machines). Zeroed, so a structured array's padding carries no stale heap bytes.

    Raises:
        RuntimeError: a pinned buffer is asked for and torch sees no CUDA device.
    """
    buffers: Buffers = {}
    pinned = CudaCopier.pinned if allocate_pinned is None else allocate_pinned
    for need in needs:
        if need.pinned:
            # Page-locked memory is resident from its allocation on: nothing to touch, and a
            # device copy overwrites every byte (tensors have no padding).
            buffers[need.path] = pinned(need.shape, need.dtype).view(PinnedBuffer)
            continue
        buffer = np.zeros(need.shape, need.dtype)
        # np.zeros of a large array maps pages it has not touched yet: write one byte of each.
        np.frombuffer(byte_view(buffer), np.uint8)[::_PAGE_BYTES] = 0
        buffers[need.path] = buffer
    return buffers


@dataclass(slots=True, eq=False)
class Snapshot:
    """A tree frozen at one instant: its spec plus C-contiguous arrays.

    Arrays someone could still change were copied into pooled buffers; arrays nobody can
    write (bytes, read-only arrays that own their memory) are referenced. Tensors on a device
    are copied into pooled pinned buffers by the device itself: the snapshot is complete once
    ``staged()`` returns. ``release()`` hands the buffers back to the pool once they are
    written.
    """

    spec: Spec
    leaves: list[ArrayLeaf]
    nbytes: int
    _pool: SnapshotPool | None = None
    _buffers: Buffers = field(default_factory=dict)
    # Copies off a device may still write the pinned buffers (from before they are enqueued
    # until they are seen to land); _wait waits for them.
    _in_flight: bool = False
    _wait: Wait | None = None

    async def staged(self) -> None:
        """Wait until the copies of device tensors have landed in the snapshot's buffers;
        return at once when it holds none (without a checkpoint: no other task runs).

        The wait runs in a worker thread, never on the event loop's.

        Raises:
            Exception: whatever the device reports for the copies (a CUDA error); the
                snapshot's pinned buffers are then dropped, never reused.
        """
        wait = self._wait
        if wait is None:
            return
        # Shielded (and one worker-thread call, which a cancellation waits for anyway): the
        # copies are ours, already on the device and bounded by their bytes over the bus.
        # Returning before they land would either hand the pool buffers the device is still
        # writing, or throw away pinned memory that is slow to allocate again.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(wait)
        self._wait = None
        self._in_flight = False
        # A save cancelled meanwhile is not taken: its buffers, now safe, go back to the pool.
        await anyio.lowlevel.checkpoint_if_cancelled()

    def release(self) -> None:
        """Return the buffers to the pool; the snapshot must not be used afterwards."""
        pool, self._pool = self._pool, None
        if pool is not None:
            buffers = self._buffers
            if self._in_flight:
                # Released before its copies off a device were seen to land (or after they
                # failed): the device may still write its pinned buffers, so they are dropped.
                # torch frees pinned memory for reuse only once the copies into it are done.
                buffers = {p: b for p, b in buffers.items() if not isinstance(b, PinnedBuffer)}
            pool._give_back(buffers)


class SnapshotPool:
    """Buffers reused from one snapshot to the next, so a repeated save allocates nothing.

    Each snapshot in flight holds one set of buffers, keyed by tree path; a released set is
    reused by the next snapshot if the arrays at the same paths keep their dtype and shape.
    Up to ``max_free_sets`` released sets are kept alive (freed memory costs dearly to touch
    again on these machines, so keeping it beats giving it back).

    ``take`` allocates what is missing on the caller's thread; ``take_warm`` instead says
    what is missing, for the caller to ``make_buffers`` in a worker thread, ``stock`` them,
    and take again: an event loop is then blocked only for copies into warm buffers.

    Tensors on a device (CUDA) are always copied, into pinned buffers pooled like the others,
    by ``copier`` (one side stream per device, kept with the pool); a snapshot that holds
    such copies is complete once ``Snapshot.staged()`` returns.
    """

    def __init__(self, max_free_sets: int = 2, *, copier: DeviceCopier | None = None) -> None:
        self._free: list[Buffers] = []
        self._max_free_sets = max_free_sets
        self._copy_threads = CopyThreads()
        self._copier: DeviceCopier = CudaCopier() if copier is None else copier
        self.buffers_allocated = 0
        self.bytes_allocated = 0

    def close(self) -> None:
        """Stop the copy threads (idempotent; a later ``take`` starts them again)."""
        self._copy_threads.close()

    @property
    def free_sets(self) -> int:
        """How many released sets wait for reuse."""
        return len(self._free)

    def take(self, tree: StateTree) -> Snapshot:
        """Snapshot ``tree``: copy its arrays, except those nobody can write.

        Runs synchronously on the caller's thread so that no other task can change the tree
        half-way through the copy; buffers that do not exist yet are allocated here too.

        Raises:
            TypeError: a leaf or key cannot be saved; the message names its path.
        """
        snapshot = self._take(tree, None)
        assert snapshot is not None
        return snapshot

    def take_warm(self, tree: StateTree, missing: list[BufferNeed]) -> Snapshot | None:
        """Snapshot ``tree`` as ``take`` does if every buffer it needs exists; else copy
        nothing, append the buffers it lacks to ``missing`` and return None.

        Raises:
            TypeError: a leaf or key cannot be saved; the message names its path.
        """
        return self._take(tree, missing)

    def plan_reserve(self, tree: StateTree, sets: int) -> list[list[BufferNeed]]:
        """What each of ``sets`` sets lacks for snapshots of ``tree``: the free sets first,
        then sets not made yet (all of their buffers)."""
        every: list[BufferNeed] = []

        def add_leaf(path: TreePath, array: np.ndarray[Any, Any]) -> int:
            if _must_copy(array):
                every.append(BufferNeed(path, array.shape, array.dtype))
            return 0

        def add_device_leaf(path: TreePath, leaf: DeviceTensor) -> int:
            every.append(BufferNeed(path, leaf.shape, leaf.dtype, pinned=True))
            return 0

        flatten(tree, add_leaf, DeviceLeaves(self._copier.device_types, add_device_leaf))
        plans = []
        for index in range(min(sets, self._max_free_sets)):
            have = self._free[index] if index < len(self._free) else {}
            plans.append([need for need in every if not _fits(have.get(need.path), need)])
        return plans

    def stock(self, buffers: Buffers, *, index: int | None = None) -> None:
        """Add buffers made by ``make_buffers`` to free set ``index`` (a new set past the
        end), or by default to the set the next snapshot takes."""
        if index is None:
            index = len(self._free) - 1
            if index >= 0 and any(
                _fits(self._free[index].get(path), _need_of(path, b)) for path, b in buffers.items()
            ):
                # A warm set came back while these were made (a write finished): merging
                # would drop its buffers. Keep them as a set of their own, taken after it.
                self._free.insert(0, buffers)
                return
        if 0 <= index < len(self._free):
            self._free[index].update(buffers)
        else:
            self._free.append(buffers)

    def _take(self, tree: StateTree, missing: list[BufferNeed] | None) -> Snapshot | None:
        reusable = self._free.pop() if self._free else {}
        snapshot = Snapshot(spec=[], leaves=[], nbytes=0, _pool=self)
        leaves = snapshot.leaves
        buffers = snapshot._buffers
        # (buffer, live array): copied once the whole tree was accepted, in parallel.
        copies: list[_CopyPair] = []
        device_copies: list[tuple[np.ndarray[Any, Any], DeviceTensor]] = []

        def add_leaf(path: TreePath, array: np.ndarray[Any, Any]) -> int:
            if _must_copy(array):
                buffer = reusable.pop(path, None)
                if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
                    if missing is not None:
                        missing.append(BufferNeed(path, array.shape, array.dtype))
                        return len(leaves)
                    buffer = self._allocate(array)
                copies.append((buffer, array))
                buffers[path] = buffer
                array = buffer
            leaves.append(ArrayLeaf(path, array))
            snapshot.nbytes += array.nbytes
            return len(leaves) - 1

        def add_device_leaf(path: TreePath, leaf: DeviceTensor) -> int:
            need = BufferNeed(path, leaf.shape, leaf.dtype, pinned=True)
            buffer = reusable.pop(path, None)
            if buffer is None or not _fits(buffer, need):
                if missing is not None:
                    missing.append(need)
                    return len(leaves)
                buffer = self._allocate_pinned(need)
            device_copies.append((buffer, leaf))
            buffers[path] = buffer
            leaves.append(ArrayLeaf(path, buffer.view(np.ndarray)))
            snapshot.nbytes += buffer.nbytes
            return len(leaves) - 1

        devices = DeviceLeaves(self._copier.device_types, add_device_leaf)
        try:
            snapshot.spec = flatten(tree, add_leaf, devices)
            if missing:
                raise _Cold
            if device_copies:
                # Enqueued first, so that the devices copy while this thread copies the host
                # arrays; marked first, so that a failure half-way drops their buffers.
                snapshot._in_flight = True
                snapshot._wait = self._copier.start(device_copies)
            self._copy_threads.copy(copies)
        except BaseException as exc:
            # Keep the buffers this attempt did not get to, so a rejected tree (or a cold
            # one) costs no reallocation on the next save.
            for path, buffer in reusable.items():
                buffers.setdefault(path, buffer)
            snapshot.release()
            if isinstance(exc, _Cold):
                return None
            raise
        return snapshot

    def _allocate(self, like: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        # copyto() copies a structured array field by field, never the padding between
        # fields: zero it once, or the file would carry whatever the heap held there.
        allocate = np.empty if like.dtype.fields is None else np.zeros
        buffer = allocate(like.shape, like.dtype)
        self.buffers_allocated += 1
        self.bytes_allocated += buffer.nbytes
        return buffer

    def _allocate_pinned(self, need: BufferNeed) -> PinnedBuffer:
        buffer = self._copier.pinned(need.shape, need.dtype).view(PinnedBuffer)
        self.buffers_allocated += 1
        self.bytes_allocated += buffer.nbytes
        return buffer

    def count_made(self, buffers: Buffers) -> None:
        """Count buffers that ``make_buffers`` made for this pool."""
        self.buffers_allocated += len(buffers)
        self.bytes_allocated += sum(buffer.nbytes for buffer in buffers.values())

    def _give_back(self, buffers: Buffers) -> None:
        # An empty set (a snapshot with nothing to copy, or one that found no set) would be
        # taken next in place of a warm one.
        if buffers and len(self._free) < self._max_free_sets:
            self._free.append(buffers)


class _Cold(Exception):
    """A warm-only snapshot found buffers missing (never leaves this module)."""


def _must_copy(array: np.ndarray[Any, Any]) -> bool:
    return array.flags.writeable or not array.flags.c_contiguous or not _frozen(array)


def _fits(buffer: np.ndarray[Any, Any] | None, need: BufferNeed) -> bool:
    # A pinned buffer serves a host copy too (as a snapshot's take does), not the reverse:
    # a device copy into pageable memory would block the host.
    return (
        buffer is not None
        and buffer.shape == need.shape
        and buffer.dtype == need.dtype
        and (not need.pinned or isinstance(buffer, PinnedBuffer))
    )


def _need_of(path: TreePath, buffer: np.ndarray[Any, Any]) -> BufferNeed:
    return BufferNeed(path, buffer.shape, buffer.dtype, isinstance(buffer, PinnedBuffer))


def _frozen(array: np.ndarray[Any, Any]) -> bool:
    """Whether nobody can change a read-only array's bytes while a snapshot holds them.

    True when every array down its chain of bases is read-only and the chain ends in memory
    of its own or in ``bytes``. A read-only view of a writable array, or of memory another
    library owns (a jax array's buffer, a mapped file, a torch tensor), is copied instead:
    its owner may still write it, or (jax) would stop donating it while it is held.
    """
    while True:
        base: object = array.base  # numpy's stubs know of array bases only
        if base is None:
            return True
        if not isinstance(base, np.ndarray):
            return type(base) is bytes
        if base.flags.writeable:
            return False
        array = base


class CopyThreads:
    """The threads that copy a large snapshot beside the caller's thread, one per extra core.

    Owned by one ``SnapshotPool``: started on the first large copy, stopped by ``close()``
    (or when the pool is collected). A process forked from the owner starts its own, since a
    child has none of its parent's threads.
    """

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._count = 0
        self._pid = 0

    def _threads(self) -> tuple[concurrent.futures.ThreadPoolExecutor, int] | None:
        if self._executor is None or self._pid != os.getpid():
            extra = usable_cores() - 1
            if extra < 1:
                return None
            self._executor = concurrent.futures.ThreadPoolExecutor(
                extra, thread_name_prefix="asyncckpt-copy"
            )
            self._count, self._pid = extra, os.getpid()
        return self._executor, self._count

    def close(self) -> None:
        """Let the threads finish and stop (idempotent)."""
        executor, self._executor = self._executor, None
        if executor is not None and self._pid == os.getpid():
            executor.shutdown(wait=True)

    def copy(self, pairs: list[_CopyPair]) -> None:
        """Copy live arrays into their buffers, on every core for a large state.

        The caller's thread takes a share and waits for the others: the snapshot is complete,
        and no other task of its event loop ran, when this returns.
        """
        total = sum(array.nbytes for _buffer, array in pairs)
        copy_threads = self._threads() if total >= _PARALLEL_COPY_BYTES else None
        if copy_threads is None:
            _copy_all(pairs)
            return
        threads, count = copy_threads
        shares = _split(pairs, total, count + 1)
        futures = [threads.submit(_copy_all, share) for share in shares[1:]]
        try:
            _copy_all(shares[0])
        finally:
            # Even when interrupted: no thread may still write into buffers going back to the pool.
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()


def _copy_all(pairs: Sequence[_CopyPair]) -> None:
    for buffer, array in pairs:
        np.copyto(buffer, array, casting="no")


def _split(pairs: list[_CopyPair], total: int, count: int) -> list[list[_CopyPair]]:
    """Cut the copies into ``count`` shares of about equal bytes, cutting arrays into rows."""
    share_bytes = -(-total // count)
    shares: list[list[_CopyPair]] = [[] for _ in range(count)]
    index, room = 0, share_bytes
    for buffer, array in pairs:
        if array.ndim == 0 or array.nbytes <= room or index == count - 1:
            shares[index].append((buffer, array))
            room -= array.nbytes
        else:
            if array.flags.c_contiguous:  # rows of one element: any cut point will do
                buffer, array = buffer.reshape(-1), array.reshape(-1)
            rows, row_bytes, start = len(array), array.nbytes // len(array), 0
            while start < rows:
                if room <= 0 and index < count - 1:
                    index, room = index + 1, share_bytes
                take = rows - start
                if index < count - 1:
                    take = min(take, max(1, room // row_bytes))
                shares[index].append((buffer[start : start + take], array[start : start + take]))
                room -= take * row_bytes
                start += take
        if room <= 0 and index < count - 1:
            index, room = index + 1, share_bytes
    return shares
