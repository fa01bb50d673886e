"""Snapshots: a state tree frozen at a step boundary, in buffers reused from save to save.

Owns the buffer pool and the copy threads. Flattening (what a tree may hold) belongs to the
tree layer; what a snapshot becomes on disk, to ``_file``.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from .._core._util import usable_cores
from .._tree import ArrayLeaf, Spec, TreePath, flatten

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core._types import StateTree

__all__ = ["CopyThreads", "Snapshot", "SnapshotPool"]

_PARALLEL_COPY_BYTES: Final = 16 * 1024 * 1024
"""Below this a snapshot is copied on the caller's thread alone: a hand-off costs more."""

_CopyPair = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


@dataclass(slots=True, eq=False)
class Snapshot:
    """A tree frozen at one instant: its spec plus C-contiguous arrays.

    Arrays someone could still change were copied into pooled buffers; arrays nobody can
    write (bytes, read-only arrays that own their memory) are referenced. ``release()``
    hands the buffers back to the pool once they are written.
    """

    spec: Spec
    leaves: list[ArrayLeaf]
    nbytes: int
    _pool: SnapshotPool | None = None
    _buffers: dict[TreePath, np.ndarray[Any, Any]] = field(default_factory=dict)

    def release(self) -> None:
        """Return the buffers to the pool; the snapshot must not be used afterwards."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self._buffers)


class SnapshotPool:
    """Buffers reused from one snapshot to the next, so a repeated save allocates nothing.

    Each snapshot in flight holds one set of buffers, keyed by tree path; a released set is
    reused by the next snapshot if the arrays at the same paths keep their dtype and shape.
    Up to ``max_free_sets`` released sets are kept alive (freed memory costs dearly to touch
    again on these machines, so keeping it beats giving it back).
    """

    def __init__(self, max_free_sets: int = 2) -> None:
        self._free: list[dict[TreePath, np.ndarray[Any, Any]]] = []
        self._max_free_sets = max_free_sets
        self._copy_threads = CopyThreads()
        self.buffers_allocated = 0
        self.bytes_allocated = 0

    def close(self) -> None:
        """Stop the copy threads (idempotent; a later ``take`` starts them again)."""
        self._copy_threads.close()

    def take(self, tree: StateTree) -> Snapshot:
        """Snapshot ``tree``: copy its arrays, except those nobody can write.

        Runs synchronously on the caller's thread so that no other task can change the tree
        half-way through the copy.

        Raises:
            TypeError: a leaf or key cannot be saved; the message names its path.
        """
        reusable = self._free.pop() if self._free else {}
        snapshot = Snapshot(spec=[], leaves=[], nbytes=0, _pool=self)
        leaves = snapshot.leaves
        buffers = snapshot._buffers
        # (buffer, live array): copied once the whole tree was accepted, in parallel.
        copies: list[_CopyPair] = []

        def add_leaf(path: TreePath, array: np.ndarray[Any, Any]) -> int:
            if array.flags.writeable or not array.flags.c_contiguous or not _frozen(array):
                buffer = self._buffer_for(reusable, path, array)
                copies.append((buffer, array))
                buffers[path] = buffer
                array = buffer
            leaves.append(ArrayLeaf(path, array))
            snapshot.nbytes += array.nbytes
            return len(leaves) - 1

        try:
            snapshot.spec = flatten(tree, add_leaf)
            self._copy_threads.copy(copies)
        except BaseException:
            # Keep the buffers this attempt did not get to, so a rejected tree costs no
            # reallocation on the next save.
            for path, buffer in reusable.items():
                buffers.setdefault(path, buffer)
            snapshot.release()
            raise
        return snapshot

    def _buffer_for(
        self,
        reusable: dict[TreePath, np.ndarray[Any, Any]],
        path: TreePath,
        like: np.ndarray[Any, Any],
    ) -> np.ndarray[Any, Any]:
        buffer = reusable.pop(path, None)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            # copyto() copies a structured array field by field, never the padding between
            # fields: zero it once, or the file would carry whatever the heap held there.
            allocate = np.empty if like.dtype.fields is None else np.zeros
            buffer = allocate(like.shape, like.dtype)
            self.buffers_allocated += 1
            self.bytes_allocated += buffer.nbytes
        return buffer

    def _give_back(self, buffers: dict[TreePath, np.ndarray[Any, Any]]) -> None:
        if len(self._free) < self._max_free_sets:
            self._free.append(buffers)


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
