"""StopAgreement: the ranks of a job agree after every step whether to stop.

A stop asked for on one rank (a hook, a listener, a signal) takes effect on every rank at
the same step: after each step every rank posts whether it wants to stop and reads every
other rank's answer (at most the coordinator's timeout), and all stop if any wants to. The
exchange goes through the coordinator's own channel, never the training group. Knows
nothing of hooks or checkpoints.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio

from .._checkpoint import gather, wait_ready

if TYPE_CHECKING:
    from .._checkpoint import Channel, ShardCoordinator
    from .._storage import Storage

__all__ = ["StopAgreement"]

_NAMESPACE = "session"


class StopAgreement:
    """One session's agreement on when to stop, on one rank.

    Args:
        coordinator: the job's ranks and channels.
        storage, directory: where a ``StorageCoordinator``'s markers go (the checkpoint
            directory).
    """

    def __init__(self, coordinator: ShardCoordinator, storage: Storage, directory: str) -> None:
        self.coordinator = coordinator
        self._storage = storage
        self._directory = os.fspath(directory)
        self._channel: Channel | None = None
        self._round = 0

    def __repr__(self) -> str:
        return f"<StopAgreement {self.coordinator!r} round {self._round}>"

    async def open(self) -> None:
        """Open the channel (every rank, when its session is created)."""
        self._channel = await anyio.to_thread.run_sync(
            self.coordinator.channel, self._storage, self._directory, _NAMESPACE
        )
        self._round = 0

    async def decide(self, wants_stop: bool, step: int) -> bool:
        """Post this rank's wish and return whether any rank wants to stop after ``step``
        (the global step just run; the session's first step, before it runs).

        Raises:
            TimeoutError: a rank did not answer within the timeout (named).
        """
        channel = self._channel
        if channel is None:
            raise RuntimeError("the agreement is not open")
        round_ = self._round
        self._round += 1
        if round_ == 0:
            await wait_ready(channel)
        keys = [f"{round_}.rank{rank}" for rank in range(channel.world_size)]
        answers = await anyio.to_thread.run_sync(self._exchange, channel, round_, wants_stop, keys)
        if len(answers) < len(keys):
            answers = await gather(channel, keys)
        missing = [str(rank) for rank, key in enumerate(keys) if key not in answers]
        if missing:
            where = f"the end of step {step}" if round_ else f"the start at step {step}"
            raise TimeoutError(
                f"rank(s) {', '.join(missing)} did not reach {where} within "
                f"{channel.timeout:g} s of rank {channel.rank} (did they stop or fail? every "
                "rank must run the same steps)"
            )
        return any(answer == b"1" for answer in answers.values())

    @staticmethod
    def _exchange(
        channel: Channel, round_: int, wants_stop: bool, keys: list[str]
    ) -> dict[str, bytes]:
        """One worker-thread call per step when the ranks keep pace: post this rank's
        answer, forget its last one, and read what every rank answered so far."""
        channel.post(keys[channel.rank], b"1" if wants_stop else b"0")
        if round_ >= 2:
            # This rank read every answer of the last round, so every rank posted it, having
            # read all of the round before: this rank's answer to that one is read no more.
            # (The last round's may still be read by a rank slower than this one.)
            channel.discard([f"{round_ - 2}.rank{channel.rank}"])
        return channel.fetch(keys)
