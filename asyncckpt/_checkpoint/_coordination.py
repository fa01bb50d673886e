"""Coordinators: how the ranks of one job tell each other about their shards.

A coordinator is a small key-value exchange with a timeout: each rank posts its report of a
save, the chief posts its verdict, and waits poll with a deadline (``gather``), so a rank that
died is named, never waited for forever. Two of them: ``StorageCoordinator`` (marker files
next to the checkpoints, through the ``Storage``: no torch) and
``TorchDistributedCoordinator`` (a ``TCPStore`` of its own, its address handed out once over a
gloo group of its own: never a collective on the training group). What the messages mean
belongs to the manager; knows nothing of snapshots or files' contents.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import anyio

from .._core._errors import CheckpointWriteError
from .._core._util import check_int
from .._tree import distributed_store

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from .._storage import Storage

__all__ = [
    "Channel",
    "ShardCoordinator",
    "StorageCoordinator",
    "TorchDistributedCoordinator",
    "check_coordinator",
    "gather",
    "wait_ready",
]

_FIRST_POLL_SECS: Final = 0.005
_LAST_POLL_SECS: Final = 0.25
"""A wait polls often at first (a healthy rank answers within milliseconds of the chief)
and then backs off: a store reached over a network pays a request per poll."""

_MARKER_PREFIX: Final = ".asyncckpt.coord."


class Channel(Protocol):
    """One key-value exchange between the ranks (a manager's, a session's): keys of one
    channel never meet another's.

    Every method blocks (callers use worker threads) and returns promptly: waiting is
    ``gather``'s and ``wait_ready``'s, which poll.
    """

    rank: int
    world_size: int
    timeout: float

    def ready(self) -> bool:
        """Whether ``post`` can be called yet (False while the chief has not begun)."""

    def post(self, key: str, value: bytes) -> None:
        """Publish ``value`` under ``key`` for every rank to see."""

    def fetch(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Return the values of those ``keys`` posted so far."""

    def discard(self, keys: Sequence[str]) -> None:
        """Forget ``keys`` (best effort: a key left behind is never read again)."""


@runtime_checkable
class ShardCoordinator(Protocol):
    """What ``coordinator=`` takes: the ranks, and channels between them."""

    rank: int
    world_size: int
    timeout: float

    def channel(self, storage: Storage, directory: str, namespace: str) -> Channel:
        """Open a channel for one user of ``directory`` (blocking); every rank opens its
        channels in the same order, with the same names."""


def check_coordinator(coordinator: object) -> ShardCoordinator:
    """Raises: TypeError: ``coordinator`` is not one (a ``Coordinator`` of the session, say)."""
    if not isinstance(coordinator, ShardCoordinator):
        raise TypeError(
            f"coordinator= takes asyncckpt.TorchDistributedCoordinator() or "
            f"asyncckpt.StorageCoordinator(rank, world_size), not {type(coordinator).__name__}"
        )
    return coordinator


def _check_timeout(timeout: float) -> float:
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _check_ranks(rank: int, world_size: int) -> None:
    check_int("world_size", world_size, minimum=1)
    check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")


async def wait_ready(channel: Channel, *, limiter: anyio.CapacityLimiter | None = None) -> None:
    """Wait until the coordinator can post (at most its timeout).

    Raises:
        CheckpointWriteError: rank 0 did not begin within the timeout.
    """
    deadline = time.monotonic() + channel.timeout
    delay = _FIRST_POLL_SECS
    while not await anyio.to_thread.run_sync(channel.ready, limiter=limiter):
        left = deadline - time.monotonic()
        if left <= 0:
            raise CheckpointWriteError(
                repr(channel),
                f"rank 0 did not open the checkpoint directory within {channel.timeout:g} "
                "s: start rank 0 with the same directory and basename",
            )
        await anyio.sleep(min(delay, left))
        delay = min(delay * 2, _LAST_POLL_SECS)


async def gather(
    channel: Channel,
    keys: Sequence[str],
    *,
    limiter: anyio.CapacityLimiter | None = None,
) -> dict[str, bytes]:
    """Wait until every key is posted or the channel's timeout passed; return those posted
    (the caller names what is missing). Cancellable at every poll."""
    deadline = time.monotonic() + channel.timeout
    delay = _FIRST_POLL_SECS
    while True:
        found = await anyio.to_thread.run_sync(channel.fetch, keys, limiter=limiter)
        left = deadline - time.monotonic()
        if len(found) == len(keys) or left <= 0:
            return found
        await anyio.sleep(min(delay, left))
        delay = min(delay * 2, _LAST_POLL_SECS)


class StorageCoordinator:
    """Ranks that share nothing but the checkpoint storage: messages are marker files there.

    For trainers without ``torch.distributed`` (JAX's processes, independent workers) on
    local disk shared by the ranks or on an object store. Each manager opened by the chief
    starts a new epoch (a random name, in a marker file that it writes after removing the
    markers of earlier runs), and only markers of the current epoch are read, so a marker of
    a run that crashed is never taken for one of this run. A rank that reported under an
    epoch that has ended since (it read the last run's before the chief began this one)
    reports again under the new one while it waits. Costs: a save makes ``world_size + 1``
    small writes, and each waiting rank lists the directory (and reads the epoch) at every
    poll, backing off to four polls a second.

    Args:
        rank: this process's rank, ``0 <= rank < world_size``; rank 0 is the chief.
        world_size: how many ranks save each checkpoint.
        timeout: how long any rank waits for the others, in seconds.
    """

    def __init__(self, rank: int, world_size: int, timeout: float = 600.0) -> None:
        _check_ranks(rank, world_size)
        self.rank = rank
        self.world_size = world_size
        self.timeout = _check_timeout(timeout)

    def __repr__(self) -> str:
        return (
            f"<StorageCoordinator rank {self.rank} of {self.world_size} timeout={self.timeout:g}s>"
        )

    def channel(self, storage: Storage, directory: str, namespace: str) -> Channel:
        """Open a channel of marker files in ``directory`` (blocking): rank 0 starts its
        epoch there; every rank opens its channels in the same order, with the same names."""
        return _MarkerChannel(self, storage, directory, namespace)


class _MarkerChannel:
    """A ``StorageCoordinator``'s channel: marker files ``.asyncckpt.coord.<namespace>.*``."""

    def __init__(
        self, coordinator: StorageCoordinator, storage: Storage, directory: str, namespace: str
    ) -> None:
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.timeout = coordinator.timeout
        self._storage = storage
        self._directory = directory
        self._prefix = f"{_MARKER_PREFIX}{namespace}."
        self._epoch: str | None = None  # another rank's: read when first needed
        # What this rank posted under the current epoch, to post again under a new one.
        self._posted: dict[str, bytes] = {}
        if self.rank == 0:
            stale = [n for n in storage.list_names(directory) if n.startswith(self._prefix)]
            if stale:
                storage.remove_files([os.path.join(directory, n) for n in stale])
            self._epoch = secrets.token_hex(8)
            storage.write_small_file_atomic(self._epoch_path(), self._epoch.encode())

    def __repr__(self) -> str:
        return f"<StorageCoordinator channel {self._prefix}* in {self._directory!r}>"

    def _epoch_path(self) -> str:
        return os.path.join(self._directory, f"{self._prefix}epoch")

    def _marker(self, epoch: str, key: str) -> str:
        return f"{self._prefix}{epoch}.{key}"

    def ready(self) -> bool:
        self._follow_epoch()
        return self._epoch is not None

    def _follow_epoch(self) -> None:
        """Another rank: read the epoch again; if it changed, post again under it."""
        if self.rank == 0:
            return
        data = self._storage.read_small_file(self._epoch_path())
        epoch = data.decode(errors="replace") if data is not None else None
        if epoch is None or epoch == self._epoch:
            return
        self._epoch = epoch
        for key, value in self._posted.items():
            self._write_marker(epoch, key, value)

    def post(self, key: str, value: bytes) -> None:
        epoch = self._epoch
        if epoch is None:
            raise RuntimeError("post() before ready() said True")
        round_ = key.partition(".")[0]
        # Only the round under way may need posting again: the older ones are settled.
        self._posted = {k: v for k, v in self._posted.items() if k.partition(".")[0] == round_}
        self._posted[key] = value
        self._write_marker(epoch, key, value)

    def _write_marker(self, epoch: str, key: str, value: bytes) -> None:
        path = os.path.join(self._directory, self._marker(epoch, key))
        self._storage.write_small_file_atomic(path, value)

    def fetch(self, keys: Sequence[str]) -> dict[str, bytes]:
        self._follow_epoch()
        epoch = self._epoch
        if epoch is None:
            return {}
        present = set(self._storage.list_names(self._directory))
        found = {}
        for key in keys:
            name = self._marker(epoch, key)
            if name in present:
                data = self._storage.read_small_file(os.path.join(self._directory, name))
                if data is not None:
                    found[key] = data
        return found

    def discard(self, keys: Sequence[str]) -> None:
        epoch = self._epoch
        if epoch is None:
            return
        paths = [os.path.join(self._directory, self._marker(epoch, key)) for key in keys]
        # A marker left behind is of a finished round: never read again.
        with contextlib.suppress(CheckpointWriteError):
            self._storage.remove_files(paths)


class TorchDistributedCoordinator:
    """The ranks of a ``torch.distributed`` job: rank and world size from it, messages through
    a ``TCPStore`` of this coordinator's own.

    Construct it on every rank at the same point of the program, after
    ``torch.distributed.init_process_group`` (as any process group is made): it makes a gloo
    group of its own and, over it once, tells the other ranks the address of the store that
    rank 0 starts (on ``MASTER_ADDR``, or this host's name, at a free port). No message ever
    goes over the training group, so a background save never races the training loop's
    collectives.

    Args:
        timeout: how long any rank waits for the others, in seconds (also the gloo group's
            and the store's timeout).

    Raises:
        RuntimeError: torch.distributed is not initialized.
    """

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = _check_timeout(timeout)
        self.rank, self.world_size, self._store = distributed_store(self.timeout)
        self._channels: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"<TorchDistributedCoordinator rank {self.rank} of {self.world_size} "
            f"timeout={self.timeout:g}s>"
        )

    def channel(self, storage: Storage, directory: str, namespace: str) -> Channel:
        """Open a channel of keys in this coordinator's store; every rank opens its channels
        in the same order, with the same names."""
        # The store lives as long as this job: a fresh one holds no run's keys but this
        # one's. Every rank opens its channels in the same order, so a count tells apart
        # the keys of a manager opened again.
        place = f"{directory}/{namespace}"
        self._channels[place] = self._channels.get(place, 0) + 1
        return _StoreChannel(self, f"asyncckpt/{place}/{self._channels[place]}/")


class _StoreChannel:
    """A ``TorchDistributedCoordinator``'s channel: keys under a prefix of its store."""

    def __init__(self, coordinator: TorchDistributedCoordinator, prefix: str) -> None:
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.timeout = coordinator.timeout
        self._store = coordinator._store
        self._prefix = prefix

    def __repr__(self) -> str:
        return f"<TorchDistributedCoordinator channel {self._prefix}>"

    def ready(self) -> bool:
        return True  # the store was started with the coordinator

    def post(self, key: str, value: bytes) -> None:
        with self._reaching(key):
            self._store.set(self._prefix + key, value)

    def fetch(self, keys: Sequence[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            with self._reaching(key):
                if self._store.check([self._prefix + key]):
                    found[key] = bytes(self._store.get(self._prefix + key))
        return found

    def discard(self, keys: Sequence[str]) -> None:
        for key in keys:
            with self._reaching(key):
                self._store.delete_key(self._prefix + key)

    @contextlib.contextmanager
    def _reaching(self, key: str) -> Iterator[None]:
        # The store is rank 0's: when rank 0 is gone, every call fails (torch raises
        # RuntimeError or its DistStoreError). That is a failed save, said as one.
        try:
            yield
        except RuntimeError as exc:
            raise CheckpointWriteError(
                f"{self._prefix}{key}",
                f"cannot reach rank 0's coordination store ({exc}): is rank 0 still running?",
            ) from exc
