"""Resumable iterators: orders, epochs, resuming from every position, refused states.

The contract of every iterator: stopped after any number of items and restored (into a new
iterator over the same data) from ``state_dict()``, it returns exactly the items the
uninterrupted iterator would have returned next. Its state is a few ints, never the data.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncckpt import Saver
from asyncckpt._hooks._iterators import (
    AsyncCountingIterator,
    BatchIterator,
    CountingIterator,
    ResumableIterator,
    SequenceIterator,
    ShuffledIterator,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio

DATA = list(range(10))


def unchecked(value: object) -> Any:
    """A wrong argument, passed on purpose."""
    return value


def take(iterator: Iterator[Any], n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


def fresh_iterators() -> dict[str, Callable[[], ResumableIterator[Any]]]:
    """A factory per kind of iterator, each over DATA for 3 epochs."""

    def numbers() -> Iterator[int]:
        yield from DATA

    return {
        "sequence": lambda: SequenceIterator(DATA, num_epochs=3),
        "shuffled": lambda: ShuffledIterator(DATA, seed=11, num_epochs=3),
        "batch-of-sequence": lambda: BatchIterator(SequenceIterator(DATA, num_epochs=3), 4),
        "batch-of-shuffled": lambda: BatchIterator(
            ShuffledIterator(DATA, seed=5, num_epochs=3), 3, drop_remainder=True
        ),
        "counting-list": lambda: CountingIterator(DATA, num_epochs=3),
        "counting-generator-function": lambda: CountingIterator(numbers, num_epochs=3),
    }


KINDS = sorted(fresh_iterators())


# -- orders -------------------------------------------------------------------------------------


def test_sequence_iterates_in_order_for_each_epoch() -> None:
    assert list(SequenceIterator(DATA)) == DATA
    assert list(SequenceIterator(DATA, num_epochs=2)) == DATA + DATA
    forever = SequenceIterator([1, 2], num_epochs=None)
    assert take(forever, 7) == [1, 2, 1, 2, 1, 2, 1]
    assert forever.epoch == 3
    assert forever.position == 1


def test_empty_data_ends_at_once_even_forever() -> None:
    assert list(SequenceIterator([], num_epochs=None)) == []
    assert list(ShuffledIterator([], seed=1, num_epochs=None)) == []
    assert list(CountingIterator([], num_epochs=None)) == []


def test_shuffled_order_is_a_new_permutation_each_epoch_and_fixed_by_the_seed() -> None:
    items = list(ShuffledIterator(DATA, seed=3, num_epochs=4))
    epochs = [items[i : i + 10] for i in range(0, 40, 10)]
    for epoch in epochs:
        assert sorted(epoch) == DATA
    assert len({tuple(epoch) for epoch in epochs}) == 4  # each epoch its own order
    assert list(ShuffledIterator(DATA, seed=3, num_epochs=4)) == items
    assert list(ShuffledIterator(DATA, seed=4, num_epochs=4)) != items


def test_shuffled_order_is_pinned() -> None:
    # The order depends only on PCG64's raw bits, which numpy keeps stable across versions:
    # a change here would reorder every restored run.
    assert list(ShuffledIterator(DATA, seed=0, num_epochs=2)) == [
        *[3, 2, 1, 8, 6, 0, 7, 4, 5, 9],
        *[7, 4, 5, 1, 9, 8, 6, 2, 0, 3],
    ]


def test_shuffled_reads_numpy_arrays_and_draws_a_seed_when_none_is_given() -> None:
    data = np.arange(100) * 2
    first, second = ShuffledIterator(data), ShuffledIterator(data)
    assert first.seed != second.seed
    assert 0 <= first.seed < 2**63
    assert sorted(int(x) for x in first) == list(range(0, 200, 2))


def test_batches_run_across_epochs_and_only_the_end_is_short() -> None:
    batches = list(BatchIterator(SequenceIterator([1, 2, 3, 4, 5], num_epochs=2), 3))
    assert batches == [[1, 2, 3], [4, 5, 1], [2, 3, 4], [5]]
    dropped = BatchIterator(SequenceIterator([1, 2, 3, 4, 5], num_epochs=2), 3, drop_remainder=True)
    assert list(dropped) == [[1, 2, 3], [4, 5, 1], [2, 3, 4]]
    assert list(dropped) == []  # stays exhausted


def test_counting_iterates_a_re_iterable_or_a_function_each_epoch() -> None:
    assert list(CountingIterator(("a", "b"), num_epochs=2)) == ["a", "b", "a", "b"]
    calls: list[int] = []

    def records() -> Iterator[int]:
        calls.append(1)
        yield from (7, 8)

    counting = CountingIterator(records, num_epochs=None)
    assert take(counting, 5) == [7, 8, 7, 8, 7]
    assert len(calls) == 3
    assert counting.state_dict() == {"kind": "CountingIterator", "epoch": 2, "position": 1}


def test_exhausted_iterators_keep_raising_stop_iteration() -> None:
    for factory in fresh_iterators().values():
        iterator = factory()
        list(iterator)
        for _ in range(2):
            with pytest.raises(StopIteration):
                next(iterator)


async def test_every_iterator_also_serves_async_for() -> None:
    for kind, factory in fresh_iterators().items():
        assert [item async for item in factory()] == list(factory()), kind


# -- resuming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_from_every_position_continues_exactly(kind: str) -> None:
    factory = fresh_iterators()[kind]
    expected = list(factory())
    assert expected
    for stop in range(len(expected) + 1):
        first = factory()
        head = take(first, stop)
        resumed = factory()
        resumed.load_state_dict(first.state_dict())
        assert head + list(resumed) == expected, (kind, stop)


@pytest.mark.parametrize("kind", KINDS)
async def test_states_survive_a_checkpoint_round_trip(kind: str, tmp_path: Path) -> None:
    factory = fresh_iterators()[kind]
    first = factory()
    head = take(first, 7)
    saver = Saver()
    path = await saver.save({"input": first}, str(tmp_path / "input.ckpt"), global_step=7)
    tree = await saver.restore(path)
    resumed = factory()
    resumed.load_state_dict(tree["input"])
    assert head + list(resumed) == list(factory())


@pytest.mark.slow  # a hundred Hypothesis examples: ~0.3 s
@given(
    length=st.integers(0, 12),
    num_epochs=st.integers(1, 3),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**63 - 1),
    stops=st.lists(st.integers(0, 8), max_size=4),
)
def test_any_chain_of_restarts_reproduces_the_uninterrupted_order(
    length: int, num_epochs: int, batch_size: int, seed: int, stops: list[int]
) -> None:
    data = list(range(length))

    def make() -> BatchIterator[int]:
        return BatchIterator(ShuffledIterator(data, seed, num_epochs=num_epochs), batch_size)

    expected = list(make())
    consumed: list[list[int]] = []
    state: dict[str, Any] | None = None
    for stop in stops:
        iterator = make()
        if state is not None:
            iterator.load_state_dict(state)
        consumed += [batch for _, batch in zip(range(stop), iterator, strict=False)]
        state = iterator.state_dict()
    last = make()
    if state is not None:
        last.load_state_dict(state)
    assert consumed + list(last) == expected


def test_a_state_is_a_few_ints_never_the_data() -> None:
    shuffled = ShuffledIterator(np.arange(1_000_000), seed=2, num_epochs=None)
    take(shuffled, 3)
    state = shuffled.state_dict()
    assert state == {
        "kind": "ShuffledIterator",
        "length": 1_000_000,
        "epoch": 0,
        "position": 3,
        "seed": 2,
    }
    batch = BatchIterator(SequenceIterator(list(range(50))), 8)
    next(batch)
    assert batch.state_dict() == {
        "kind": "BatchIterator",
        "source": {"kind": "SequenceIterator", "length": 50, "epoch": 0, "position": 8},
    }


def test_a_shuffled_iterator_without_seed_takes_the_saved_one() -> None:
    first = ShuffledIterator(DATA, seed=42, num_epochs=2)
    head = take(first, 13)
    resumed = ShuffledIterator(DATA, num_epochs=2)
    resumed.load_state_dict(first.state_dict())
    assert resumed.seed == 42
    assert head + list(resumed) == list(ShuffledIterator(DATA, seed=42, num_epochs=2))


def test_num_epochs_may_grow_between_runs() -> None:
    first = SequenceIterator([1, 2])
    assert list(first) == [1, 2]
    longer = SequenceIterator([1, 2], num_epochs=3)
    longer.load_state_dict(first.state_dict())
    assert list(longer) == [1, 2, 1, 2]
    shorter = SequenceIterator([1, 2], num_epochs=1)
    shorter.load_state_dict(longer.state_dict())
    assert list(shorter) == []
    mid_epoch = SequenceIterator([1, 2], num_epochs=3)
    assert take(mid_epoch, 3) == [1, 2, 1]  # epoch 1, position 1
    fewer = SequenceIterator([1, 2], num_epochs=1)
    fewer.load_state_dict(mid_epoch.state_dict())
    assert list(fewer) == []  # epoch 1 is beyond its one epoch


def test_batch_size_may_change_between_runs() -> None:
    first = BatchIterator(SequenceIterator(DATA), 4)
    assert next(first) == [0, 1, 2, 3]
    resumed = BatchIterator(SequenceIterator(DATA), 5)
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == [[4, 5, 6, 7, 8], [9]]


# -- async sources ------------------------------------------------------------------------------


class AsyncRecords:
    """An async re-iterable: each ``async for`` reads the records from the start."""

    def __init__(self, records: list[int]) -> None:
        self.records = records
        self.opened = 0

    async def __aiter__(self) -> AsyncIterator[int]:  # an async generator method
        self.opened += 1
        for record in self.records:
            await anyio.lowlevel.checkpoint()
            yield record


async def test_async_counting_iterates_each_epoch_afresh() -> None:
    source = AsyncRecords([1, 2, 3])
    counting = AsyncCountingIterator(source, num_epochs=2)
    assert [item async for item in counting] == [1, 2, 3, 1, 2, 3]
    assert source.opened == 2
    assert counting.state_dict() == {"kind": "AsyncCountingIterator", "epoch": 1, "position": 3}
    assert [item async for item in counting] == []


async def test_async_counting_takes_an_async_generator_function() -> None:
    closed: list[str] = []

    async def records() -> AsyncIterator[str]:
        try:
            for record in "xyz":
                yield record
        finally:
            closed.append("closed")

    async with aclosing(AsyncCountingIterator(records, num_epochs=None)) as counting:
        assert [await anext(counting) for _ in range(5)] == ["x", "y", "z", "x", "y"]
        assert (counting.epoch, counting.position) == (1, 2)
        assert closed == ["closed"]  # the first epoch's generator ran to its end
    assert closed == ["closed", "closed"]  # aclose() closed the unfinished one


async def test_async_counting_continues_after_aclose_and_closes_what_a_restore_replaces() -> None:
    source = AsyncRecords([1, 2, 3])
    counting = AsyncCountingIterator(source)
    assert await anext(counting) == 1
    await counting.aclose()
    await counting.aclose()  # idempotent
    assert await anext(counting) == 2  # reopened, passed over the item already taken
    counting.load_state_dict({"kind": "AsyncCountingIterator", "epoch": 0, "position": 0})
    assert [item async for item in counting] == [1, 2, 3]
    assert source.opened == 3


async def test_async_counting_resumes_from_every_position() -> None:
    expected = [1, 2, 3, 4, 1, 2, 3, 4]
    for stop in range(len(expected) + 1):
        async with aclosing(
            AsyncCountingIterator(AsyncRecords([1, 2, 3, 4]), num_epochs=2)
        ) as first:
            head = [await anext(first) for _ in range(stop)]
        resumed = AsyncCountingIterator(AsyncRecords([1, 2, 3, 4]), num_epochs=2)
        resumed.load_state_dict(first.state_dict())
        assert head + [item async for item in resumed] == expected, stop


async def test_async_counting_reports_a_source_that_got_shorter() -> None:
    async with aclosing(AsyncCountingIterator(AsyncRecords([1, 2, 3, 4]))) as first:
        for _ in range(3):
            await anext(first)
    shorter = AsyncCountingIterator(AsyncRecords([1, 2]))
    shorter.load_state_dict(first.state_dict())  # sync: cannot read the source yet
    with pytest.raises(ValueError, match="at item 3 of epoch 0, but the source now ends after 2"):
        await anext(shorter)
    with pytest.raises(StopAsyncIteration):
        await anext(shorter)


def test_counting_reports_a_source_that_got_shorter_on_restore() -> None:
    first = CountingIterator([1, 2, 3, 4])
    take(first, 4)
    with pytest.raises(ValueError, match="at item 4 of epoch 0, but the source now ends after 3"):
        CountingIterator([1, 2, 3]).load_state_dict(first.state_dict())


def test_counting_refuses_one_shot_iterators() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="pass a generator function itself, not the generator"):
        CountingIterator(numbers())
    with pytest.raises(TypeError, match="not int"):
        CountingIterator(unchecked(3))


async def test_async_counting_refuses_one_shot_iterators() -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="not async_generator"):
        AsyncCountingIterator(numbers())
    with pytest.raises(TypeError, match="returning a fresh async iterable, not list"):
        AsyncCountingIterator(unchecked([1]))


# -- refused states and arguments ---------------------------------------------------------------


@pytest.mark.parametrize("saved_kind", KINDS)
@pytest.mark.parametrize("loading_kind", KINDS)
def test_a_state_loads_only_into_its_own_kind(saved_kind: str, loading_kind: str) -> None:
    def kinds(iterator: object) -> list[type]:
        inner = kinds(iterator.source) if isinstance(iterator, BatchIterator) else []
        return [type(iterator), *inner]

    factories = fresh_iterators()
    saved = factories[saved_kind]()
    state = saved.state_dict()
    target = factories[loading_kind]()
    if kinds(target) == kinds(saved):
        target.load_state_dict(state)
        return
    with pytest.raises(ValueError, match="a state loads only into the kind of iterator"):
        target.load_state_dict(state)


@pytest.mark.parametrize(
    "make",
    [
        lambda data: SequenceIterator(data),
        lambda data: ShuffledIterator(data, seed=1),
        lambda data: BatchIterator(SequenceIterator(data), 2),
    ],
    ids=["sequence", "shuffled", "batch"],
)
def test_a_state_for_data_of_another_length_is_refused(
    make: Callable[[list[int]], ResumableIterator[Any]],
) -> None:
    state = make(list(range(10))).state_dict()
    with pytest.raises(
        ValueError,
        match=r"for data of 10 items but this \w+ has 11: restore into an iterator over "
        "the same data, or start from an empty input checkpoint directory",
    ):
        make(list(range(11))).load_state_dict(state)


def test_a_shuffled_state_with_another_seed_is_refused() -> None:
    state = ShuffledIterator(DATA, seed=1).state_dict()
    with pytest.raises(
        ValueError, match=r"seed 1 but this ShuffledIterator has seed 2: pass seed=1"
    ):
        ShuffledIterator(DATA, seed=2).load_state_dict(state)


GOOD = {"kind": "SequenceIterator", "length": 3, "epoch": 0, "position": 1}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([1, 2], "needs the mapping SequenceIterator.state_dict"),
        ({}, "got no iterator state"),
        ({**GOOD, "kind": 3}, "got no iterator state"),
        ({**GOOD, "position": -1}, "'position' must be an int >= 0, not -1"),
        ({**GOOD, "epoch": True}, "'epoch' must be an int >= 0, not True"),
        ({**GOOD, "length": "3"}, "'length' must be an int >= 0"),
        ({k: v for k, v in GOOD.items() if k != "epoch"}, "'epoch' must be an int >= 0, not None"),
        ({**GOOD, "position": 4}, "position 4 is past the end of its 3 items"),
    ],
)
def test_malformed_states_are_refused(state: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SequenceIterator([1, 2, 3]).load_state_dict(state)


def test_a_refused_state_leaves_the_iterator_where_it_was() -> None:
    iterator = SequenceIterator([1, 2, 3])
    next(iterator)
    with pytest.raises(ValueError, match="past the end"):
        iterator.load_state_dict({**GOOD, "epoch": 5, "position": 9})
    assert list(iterator) == [2, 3]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: SequenceIterator(DATA, num_epochs=0), ValueError, "num_epochs must be >= 1"),
        (lambda: SequenceIterator(DATA, num_epochs=unchecked(1.5)), TypeError, "must be an int"),
        (lambda: SequenceIterator(unchecked(iter(DATA))), TypeError, "with len"),
        (lambda: ShuffledIterator(DATA, seed=-1), ValueError, "seed must be >= 0"),
        (lambda: ShuffledIterator(DATA, seed=2**63), ValueError, "seed must be below 2"),
        (lambda: ShuffledIterator(DATA, seed=unchecked("1")), TypeError, "seed must be an int"),
        (lambda: BatchIterator(SequenceIterator(DATA), 0), ValueError, "batch_size must be >="),
        (lambda: BatchIterator(unchecked(iter(DATA)), 2), TypeError, "must be a ResumableIterator"),
        (lambda: CountingIterator(DATA, num_epochs=0), ValueError, "num_epochs must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def test_reprs_say_where_the_iterator_is() -> None:
    shuffled = ShuffledIterator(DATA, seed=9)
    take(shuffled, 2)
    assert repr(shuffled) == (
        "ShuffledIterator(length=10, epoch=0, position=2, num_epochs=1, seed=9)"
    )
    assert repr(BatchIterator(SequenceIterator(DATA), 3)) == (
        "BatchIterator(SequenceIterator(length=10, epoch=0, position=0, num_epochs=1), "
        "batch_size=3)"
    )
    assert repr(CountingIterator(DATA)) == "CountingIterator(epoch=0, position=0, num_epochs=1)"
