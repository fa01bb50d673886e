"""Resumable iterators: input pipelines whose position is a small ``state_dict()``.

Owns how an iterator's place in its data (epoch, position, shuffling seed) is captured and
validated. Knows nothing of checkpoints, files or hooks: ``CheckpointInputPipelineHook``
saves these states, and any object with ``state_dict()`` / ``load_state_dict()`` serves it
as well. A state never holds the data, only where the iterator is in it.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeAlias, TypeVar

import numpy as np

from .._core._util import check_int

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "AsyncCountingIterator",
    "BatchIterator",
    "CountingIterator",
    "IndexableData",
    "ResumableIterator",
    "SequenceIterator",
    "ShuffledIterator",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_MAX_SEED: Final = 2**63


class IndexableData(Protocol[T_co]):
    """Data a sequence iterator reads by index: a list, a tuple, a numpy array, a dataset."""

    def __len__(self) -> int:
        """The number of items."""

    def __getitem__(self, index: int, /) -> T_co:
        """The item at ``index`` (0 <= index < len)."""


StateDict: TypeAlias = dict[str, Any]

_RESTART_HINT: Final = (
    "restore into an iterator over the same data, or start from an empty input checkpoint directory"
)


# -- state validation (shared by every iterator) ------------------------------------------------


def _read_state(state: object, kind: str, fields: tuple[str, ...]) -> dict[str, int]:
    """Check that ``state`` is a state of ``kind`` with non-negative int ``fields``.

    Raises:
        ValueError: another kind of state, a missing field, or a field of the wrong kind.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{kind}.load_state_dict() needs the mapping {kind}.state_dict() returned, not "
            f"{type(state).__name__}"
        )
    saved_kind = state.get("kind")
    if saved_kind != kind:
        what = f"a {saved_kind} state" if isinstance(saved_kind, str) else "no iterator state"
        raise ValueError(
            f"{kind}.load_state_dict() got {what}: a state loads only into the kind of "
            f"iterator that saved it; {_RESTART_HINT}"
        )
    values: dict[str, int] = {}
    for name in fields:
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(
                f"the {kind} state's {name!r} must be an int >= 0, not {value!r}: the state is "
                f"damaged or was not made by {kind}.state_dict()"
            )
        values[name] = int(value)
    return values


def _check_length(kind: str, saved: int, actual: int) -> None:
    if saved != actual:
        raise ValueError(
            f"the state is for data of {saved} items but this {kind} has {actual}: {_RESTART_HINT}"
        )


def _check_position(kind: str, position: int, length: int) -> None:
    if position > length:
        raise ValueError(
            f"the {kind} state's position {position} is past the end of its {length} items: "
            "the state is damaged"
        )


def _check_num_epochs(num_epochs: int | None) -> int | None:
    if num_epochs is not None:
        check_int("num_epochs", num_epochs, minimum=1)
    return num_epochs


# -- the base: one step at a time, for `for` and `async for` ------------------------------------


class ResumableIterator(ABC, Generic[T]):
    """Base of the iterators whose position can be saved and restored.

    Works with ``for`` and with ``async for`` alike (an ``async for`` never waits: the
    next item is at hand). A subclass implements ``_next()`` (raising ``StopIteration`` at
    the end), ``state_dict()`` and ``load_state_dict()``.
    """

    def __iter__(self) -> Self:
        """Return the iterator itself."""
        return self

    def __next__(self) -> T:
        """Return the next item.

        Raises:
            StopIteration: the data (every epoch of it) is consumed.
        """
        return self._next()

    def __aiter__(self) -> Self:
        """Return the iterator itself, for ``async for``."""
        return self

    async def __anext__(self) -> T:
        """Return the next item, for ``async for``.

        Raises:
            StopAsyncIteration: the data (every epoch of it) is consumed.
        """
        try:
            return self._next()
        except StopIteration:
            raise StopAsyncIteration from None

    @abstractmethod
    def _next(self) -> T:
        """Return the next item or raise ``StopIteration``."""

    @abstractmethod
    def state_dict(self) -> StateDict:
        """Return where the iterator is (small plain values, never the data)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Move the iterator to where ``state`` (from ``state_dict()``) says it was."""


class _Place:
    """Where an iterator is: the epoch, and how many items it returned in that epoch."""

    _kind: str = ""  # the class name, recorded in the state

    def __init__(self, num_epochs: int | None) -> None:
        self._num_epochs = _check_num_epochs(num_epochs)
        self._epoch = 0
        self._position = 0

    def __repr__(self) -> str:
        return (
            f"{self._kind}({self._repr_data()}epoch={self._epoch}, position={self._position}, "
            f"num_epochs={self._num_epochs})"
        )

    def _repr_data(self) -> str:
        return ""

    @property
    def epoch(self) -> int:
        """The current epoch, from 0."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many items of the current epoch have been returned."""
        return self._position

    def _has_epoch(self, epoch: int) -> bool:
        return self._num_epochs is None or epoch < self._num_epochs


class _EpochIterator(_Place, ResumableIterator[T]):
    """Index-based iteration over ``length`` items for ``num_epochs`` epochs (or forever)."""

    def __init__(self, data: IndexableData[T], num_epochs: int | None) -> None:
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError(
                f"{self._kind} needs data with len() and indexing (a list, tuple, array), not "
                f"{type(data).__name__}; wrap other iterables in CountingIterator"
            )
        super().__init__(num_epochs)
        self._data = data
        self._length = len(data)

    def _repr_data(self) -> str:
        return f"length={self._length}, "

    def _next(self) -> T:
        if self._position >= self._length:
            if not self._length or not self._has_epoch(self._epoch + 1):
                raise StopIteration
            self._epoch += 1
            self._position = 0
            self._start_epoch()
        elif not self._has_epoch(self._epoch):
            raise StopIteration
        index = self._index(self._position)
        self._position += 1
        return self._data[index]

    def _start_epoch(self) -> None:
        """Prepare the order of the current epoch (nothing to do in data order)."""

    def _index(self, position: int) -> int:
        return position

    def state_dict(self) -> StateDict:
        """Return ``{"kind", "length", "epoch", "position"}``."""
        return {
            "kind": self._kind,
            "length": self._length,
            "epoch": self._epoch,
            "position": self._position,
        }

    def _load(self, state: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, int]:
        values = _read_state(state, self._kind, ("length", "epoch", "position", *fields))
        _check_length(self._kind, values["length"], self._length)
        _check_position(self._kind, values["position"], self._length)
        return values

    def _apply(self, values: dict[str, int]) -> None:
        self._epoch = values["epoch"]
        self._position = values["position"]
        self._start_epoch()


class SequenceIterator(_EpochIterator[T]):
    """Iterate over indexable data in order, for ``num_epochs`` epochs; resumable.

    The state is the epoch and the position in it, plus the data's length (a state for
    data of another length is refused).

    Example::

        items = SequenceIterator(records, num_epochs=None)   # forever, epoch after epoch
        hook = CheckpointInputPipelineHook(items, "ckpt")

    Args:
        data: a list, tuple, numpy array or anything with ``len()`` and integer indexing.
        num_epochs: how many passes over the data; None repeats forever.

    Raises:
        TypeError: ``data`` has no ``len()`` or indexing.
        ValueError: ``num_epochs`` < 1.
    """

    _kind = "SequenceIterator"

    def __init__(self, data: IndexableData[T], *, num_epochs: int | None = 1) -> None:
        super().__init__(data, num_epochs)

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Move to the saved epoch and position.

        Raises:
            ValueError: the state is another iterator's, or for data of another length.
        """
        self._apply(self._load(state, ()))


class ShuffledIterator(_EpochIterator[T]):
    """Iterate over indexable data in a seeded random order that changes every epoch.

    Epoch ``e`` visits the items in a permutation drawn from ``(seed, e)`` (PCG64 raw bits,
    stable across numpy versions), so the order is reproduced exactly after a restore. The
    state is the seed, the epoch and the position: the permutation (one int64 per item) is
    recomputed, never saved.

    Args:
        data: a list, tuple, numpy array or anything with ``len()`` and integer indexing.
        seed: an int >= 0; None draws one at random, and a restored state then brings its
            own (the saved order continues).
        num_epochs: how many passes over the data; None repeats forever.

    Raises:
        TypeError: ``data`` has no ``len()`` or indexing, or ``seed`` is not an int.
        ValueError: ``seed`` < 0 or ``num_epochs`` < 1.
    """

    _kind = "ShuffledIterator"

    def __init__(
        self, data: IndexableData[T], seed: int | None = None, *, num_epochs: int | None = 1
    ) -> None:
        super().__init__(data, num_epochs)
        if seed is not None:
            check_int("seed", seed, minimum=0)
            if seed >= _MAX_SEED:
                raise ValueError(f"seed must be below 2**63, not {seed}")
        self._seed_given = seed is not None
        self._seed = seed if seed is not None else secrets.randbelow(_MAX_SEED)
        self._order: np.ndarray[Any, np.dtype[np.intp]] | None = None

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, seed={self._seed})"

    @property
    def seed(self) -> int:
        """The seed of the order (drawn at random when none was given, or restored)."""
        return self._seed

    def _start_epoch(self) -> None:
        self._order = None  # drawn on first use: a restore or a new epoch costs nothing until then

    def _index(self, position: int) -> int:
        if self._order is None:
            bits = np.random.PCG64(np.random.SeedSequence([self._seed, self._epoch])).random_raw(
                self._length
            )
            # A stable sort of 64 random bits per item: a uniform permutation that depends on
            # nothing but the bit stream, which numpy keeps identical across versions.
            self._order = np.argsort(bits, kind="stable")
        return int(self._order[position])

    def state_dict(self) -> StateDict:
        """Return ``{"kind", "length", "epoch", "position", "seed"}``."""
        return {**super().state_dict(), "seed": self._seed}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Move to the saved epoch and position of the saved order.

        Raises:
            ValueError: the state is another iterator's, for data of another length, or
                shuffled with another seed than the one this iterator was given.
        """
        values = self._load(state, ("seed",))
        if self._seed_given and values["seed"] != self._seed:
            raise ValueError(
                f"the state was shuffled with seed {values['seed']} but this ShuffledIterator "
                f"has seed {self._seed}: pass seed={values['seed']} (or seed=None to take the "
                "saved one), or start from an empty input checkpoint directory"
            )
        self._seed = values["seed"]
        self._apply(values)


class BatchIterator(ResumableIterator[list[T]]):
    """Group the items of a resumable iterator into lists of ``batch_size``.

    A batch is taken whole from ``source``, so the state is the source's: restoring it
    resumes at the first item of the next batch. Batches run across epoch boundaries, as
    ``tf.data``'s ``repeat().batch()`` does; only the very end may be short.

    Args:
        source: a ``ResumableIterator`` (``SequenceIterator``, ``ShuffledIterator``...).
        batch_size: items per batch.
        drop_remainder: drop a short last batch instead of returning it.

    Raises:
        TypeError: ``source`` is not a ``ResumableIterator``.
        ValueError: ``batch_size`` < 1.
    """

    _kind = "BatchIterator"

    def __init__(
        self, source: ResumableIterator[T], batch_size: int, *, drop_remainder: bool = False
    ) -> None:
        if not isinstance(source, ResumableIterator):
            raise TypeError(
                f"source must be a ResumableIterator (SequenceIterator, ShuffledIterator...), "
                f"not {type(source).__name__}"
            )
        check_int("batch_size", batch_size, minimum=1)
        self.source = source
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder

    def __repr__(self) -> str:
        return f"BatchIterator({self.source!r}, batch_size={self.batch_size})"

    def _next(self) -> list[T]:
        batch: list[T] = []
        for item in self.source:
            batch.append(item)
            if len(batch) == self.batch_size:
                return batch
        if not batch or self.drop_remainder:
            raise StopIteration
        return batch

    def state_dict(self) -> StateDict:
        """Return ``{"kind", "source"}``: the source's state after the last batch."""
        return {"kind": self._kind, "source": self.source.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Restore the source's state; the next batch starts where the last one ended.

        Raises:
            ValueError: the state is another iterator's, or the source refuses its part.
        """
        _read_state(state, self._kind, ())
        self.source.load_state_dict(state["source"])


# -- counting wrappers for any re-iterable ------------------------------------------------------

_END: Final = object()


class _Counter(_Place):
    """The state of a counting wrapper: the epoch, and the items returned in it."""

    _what: str = ""  # what the source must be, for messages

    def __init__(
        self, num_epochs: int | None, source: object, protocols: tuple[type, type]
    ) -> None:
        super().__init__(num_epochs)
        self._skip = 0  # items to pass over before the next one is returned (after a restore)
        self._done = False
        one_shot, iterable = protocols
        if not callable(source) and (
            isinstance(source, one_shot) or not isinstance(source, iterable)
        ):
            raise TypeError(
                f"{self._kind} needs a source that starts over each time it is iterated (a "
                f"list, a dataset object) or a function returning a fresh {self._what}, not "
                f"{type(source).__name__}: pass a generator function itself, not the generator"
            )

    def _exhausted(self) -> bool:
        return self._done or not self._has_epoch(self._epoch)

    def _counted(self, item: object) -> bool:
        """Count an item taken from the source; at its end (``_END``) go to the next epoch,
        or be done when there is none or this one was empty. Return whether it is an item."""
        if item is not _END:
            self._position += 1
            return True
        if not self._position or not self._has_epoch(self._epoch + 1):
            self._done = True
        else:
            self._epoch += 1
            self._position = 0
        return False

    def _short(self, found: int) -> ValueError:
        self._done = True
        return ValueError(
            f"the {self._kind} state is at item {self._skip} of epoch {self._epoch}, but the "
            f"source now ends after {found} items: {_RESTART_HINT}"
        )

    def state_dict(self) -> StateDict:
        """Return ``{"kind", "epoch", "position"}``."""
        return {"kind": self._kind, "epoch": self._epoch, "position": self._position}

    def _load(self, state: Mapping[str, Any]) -> None:
        values = _read_state(state, self._kind, ("epoch", "position"))
        self._epoch = values["epoch"]
        self._position = self._skip = values["position"]
        self._done = False


class CountingIterator(_Counter, ResumableIterator[T]):
    """Make any re-iterable resumable by counting the items taken from it.

    Each epoch iterates ``source`` afresh (``iter(source)``, or ``source()`` when it is a
    function, such as a generator function). The state is the epoch and the number of items
    taken in it; a restore starts the epoch over and passes over that many items, which
    costs reading them again (data that can seek deserves its own ``state_dict()``).

    Args:
        source: a re-iterable (iterating it again starts over) or a function returning a
            fresh iterable; it must yield the same items each time.
        num_epochs: how many passes; None repeats forever.

    Raises:
        TypeError: ``source`` is a one-shot iterator (a generator, an open file).
        ValueError: ``num_epochs`` < 1.
    """

    _kind = "CountingIterator"
    _what = "iterable"

    def __init__(
        self, source: Iterable[T] | Callable[[], Iterable[T]], *, num_epochs: int | None = 1
    ) -> None:
        super().__init__(num_epochs, source, (Iterator, Iterable))
        self._source = source
        self._items: Iterator[T] | None = None

    def _open(self) -> Iterator[T]:
        source = self._source
        items = iter(source() if callable(source) else source)
        for found in range(self._skip):
            if next(items, _END) is _END:
                raise self._short(found)
        self._skip = 0
        return items

    def _next(self) -> T:
        while not self._exhausted():
            if self._items is None:
                self._items = self._open()
            item = next(self._items, _END)
            if self._counted(item):
                return item  # type: ignore[return-value]
            self._items = None
        raise StopIteration

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Start the saved epoch over and pass over the items already taken from it.

        Raises:
            ValueError: the state is another iterator's, or the iterable now ends before
                the saved position.
        """
        self._load(state)
        self._items = None if self._exhausted() else self._open()


class AsyncCountingIterator(_Counter, Generic[T]):
    """``CountingIterator`` for async sources, used with ``async for``.

    Each epoch iterates ``source`` afresh (``aiter(source)``, or ``source()`` when it is a
    function, such as an async generator function). After a restore, the items already
    taken in the saved epoch are passed over on the next ``__anext__`` (``load_state_dict``
    is synchronous and cannot read them); a source that now ends too early is reported then.

    An async generator left unfinished must be closed from the event loop (trio insists):
    stopping before the end, call ``aclose()``, or iterate inside
    ``contextlib.aclosing(iterator)``. A restore closes the source iterator it replaces
    on the next pull.

    Args:
        source: an async re-iterable or a function returning a fresh async iterable; it must
            yield the same items each time.
        num_epochs: how many passes; None repeats forever.

    Raises:
        TypeError: ``source`` is a one-shot async iterator (an async generator object).
        ValueError: ``num_epochs`` < 1.
    """

    _kind = "AsyncCountingIterator"
    _what = "async iterable"

    def __init__(
        self,
        source: AsyncIterable[T] | Callable[[], AsyncIterable[T]],
        *,
        num_epochs: int | None = 1,
    ) -> None:
        super().__init__(num_epochs, source, (AsyncIterator, AsyncIterable))
        self._source = source
        self._items: AsyncIterator[T] | None = None
        self._abandoned: list[AsyncIterator[T]] = []

    async def _open(self) -> AsyncIterator[T]:
        source = self._source
        items = aiter(source() if callable(source) else source)
        try:
            for found in range(self._skip):
                if await anext(items, _END) is _END:
                    raise self._short(found)
        except BaseException:
            self._abandoned.append(items)
            raise
        self._skip = 0
        return items

    def _abandon(self) -> None:
        if self._items is not None:
            self._abandoned.append(self._items)
            self._items = None

    async def _close_abandoned(self) -> None:
        while self._abandoned:
            close = getattr(self._abandoned.pop(), "aclose", None)
            if close is not None:
                await close()

    def __aiter__(self) -> Self:
        """Return the iterator itself."""
        return self

    async def __anext__(self) -> T:
        """Return the next item.

        Raises:
            StopAsyncIteration: the source (every epoch of it) is consumed.
            ValueError: after a restore, the source ends before the saved position.
        """
        await self._close_abandoned()
        while not self._exhausted():
            if self._items is None:
                self._items = await self._open()
            item = await anext(self._items, _END)
            if self._counted(item):
                return item  # type: ignore[return-value]
            self._items = None
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Close the source's current iterator (idempotent); the position is kept.

        A later pull starts the epoch over and passes over the items already taken, as
        after a restore.
        """
        self._abandon()
        self._skip = self._position
        await self._close_abandoned()

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Move to the saved epoch and position (the items are passed over on the next pull).

        Raises:
            ValueError: the state is another iterator's.
        """
        self._load(state)
        self._abandon()
