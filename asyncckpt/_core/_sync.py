"""The synchronization primitives the package needs beyond anyio's: a broadcast, and a
bounded queue that can evict its newest item.

Pure event-loop objects: no threads, no I/O, nothing of checkpoints.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Broadcast", "EvictingQueue"]

T = TypeVar("T")


class Broadcast:
    """Wake every task waiting for "something changed", then wait afresh.

    ``notify()`` wakes all current waiters and never blocks; ``await changed()`` waits for the
    next ``notify()``. A waiter re-checks its own condition after waking, so a notification
    carries no value and may be spurious for some waiters (an ``anyio.Event`` that is
    replaced on each notification: the idea three hand-written loops used to repeat).
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        """Wake every task waiting in ``changed()`` (a no-op when none waits)."""
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def changed(self) -> None:
        """Wait until the next ``notify()``."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class EvictingQueue(Generic[T]):
    """A bounded FIFO that can also replace its newest item, with a closed state.

    anyio's memory object streams cannot evict, and a "replace the waiting snapshot" policy
    must; this one serves "block" (``await wait_for_room()`` then ``put``), "skip" (``full()``
    then drop) and "replace" (``replace_newest``) alike. Every change notifies ``changes``,
    which the consumer and the producers wait on.

    Args:
        capacity: items that may wait (>= 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self.closed = False
        self.changes = Broadcast()
        self._items: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def full(self) -> bool:
        """Whether ``capacity`` items wait."""
        return len(self._items) >= self.capacity

    def put(self, item: T) -> None:
        """Append ``item`` (the caller checked ``full()``)."""
        if self.full():
            raise RuntimeError("the queue is full: check full() or wait_for_room() first")
        self._items.append(item)
        self.changes.notify()

    def replace_newest(self, item: T) -> T:
        """Put ``item`` in the newest item's place; return the item it replaced."""
        old = self._items.pop()
        self._items.append(item)
        self.changes.notify()
        return old

    async def get(self) -> T | None:
        """Take the oldest item, waiting for one; None once the queue is closed and empty."""
        while not self._items:
            if self.closed:
                return None
            await self.changes.changed()
        item = self._items.popleft()
        self.changes.notify()
        return item

    def clear(self) -> list[T]:
        """Remove and return every waiting item."""
        items = list(self._items)
        self._items.clear()
        self.changes.notify()
        return items

    def close(self) -> None:
        """Let the consumer finish the waiting items, then get None."""
        self.closed = True
        self.changes.notify()
