"""The synchronization primitives: Broadcast and EvictingQueue."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest
from anyio.lowlevel import checkpoint

from asyncckpt._core._sync import Broadcast, EvictingQueue

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

pytestmark = pytest.mark.anyio


async def test_a_broadcast_wakes_every_waiter_once() -> None:
    changes = Broadcast()
    woken: list[str] = []

    async def wait(name: str) -> None:
        await changes.changed()
        woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait, "a")
            tasks.start_soon(wait, "b")
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            changes.notify()
    assert sorted(woken) == ["a", "b"]


async def test_a_broadcast_before_anyone_waits_wakes_no_later_waiter() -> None:
    changes = Broadcast()
    changes.notify()  # nobody waits: nothing is remembered
    with anyio.move_on_after(0.05) as scope:
        await changes.changed()
    assert scope.cancelled_caught


async def test_a_waiter_cancelled_leaves_the_others_waiting() -> None:
    changes = Broadcast()
    woken: list[str] = []

    async def wait(name: str, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await changes.changed()
            woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            first = await tasks.start(wait, "a")
            await tasks.start(wait, "b")
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            changes.notify()
    assert woken == ["b"]


async def test_queue_keeps_fifo_order_and_its_bound() -> None:
    queue: EvictingQueue[int] = EvictingQueue(2)
    queue.put(1)
    assert not queue.full()
    queue.put(2)
    assert queue.full()
    with pytest.raises(RuntimeError, match="full"):
        queue.put(3)
    assert await queue.get() == 1
    queue.put(3)
    assert list(queue) == [2, 3]
    assert await queue.get() == 2
    assert await queue.get() == 3
    assert len(queue) == 0


async def test_queue_replace_evicts_the_newest() -> None:
    queue: EvictingQueue[str] = EvictingQueue(2)
    queue.put("old")
    queue.put("newer")
    assert queue.replace_newest("newest") == "newer"
    assert list(queue) == ["old", "newest"]


async def test_a_consumer_waits_for_an_item_then_sees_the_close() -> None:
    queue: EvictingQueue[int] = EvictingQueue(1)
    got: list[int | None] = []

    async def consume() -> None:
        while (item := await queue.get()) is not None:
            got.append(item)
        got.append(None)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            queue.put(7)
            await anyio.wait_all_tasks_blocked()
            queue.put(8)
            queue.close()
    assert got == [7, 8, None]


async def test_a_producer_waiting_for_room_is_woken_by_a_get() -> None:
    queue: EvictingQueue[int] = EvictingQueue(1)
    queue.put(1)
    order: list[str] = []

    async def produce() -> None:
        while queue.full():
            await queue.changes.changed()
        queue.put(2)
        order.append("put 2")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(produce)
            await anyio.wait_all_tasks_blocked()
            assert order == []
            assert await queue.get() == 1
            order.append("got 1")
            await checkpoint()
    assert order == ["got 1", "put 2"]
    assert queue.clear() == [2]


def test_queue_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        EvictingQueue(0)
