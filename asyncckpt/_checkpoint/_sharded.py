"""One rank's side of sharded checkpoints: write its shard, report it, and (the chief)
commit the manifest once every rank's shard of the same save is durable; restore its shard.

The protocol, per save (the manager's writer runs saves one at a time, in the same order on
every rank, so the n-th save of each rank is the same save):

1. every rank writes its shard under a fresh name and posts ``<n>.rank<r>``: the shard's name
   and step, or its error;
2. the chief waits for every rank's report (at most the coordinator's timeout), and writes
   the manifest and then the state file only when all of them report a durable shard of its
   step; it posts ``<n>.commit``, its verdict, either way;
3. every other rank waits for that verdict (at most the timeout); without one it names, from
   the reports it sees, the ranks that did not answer.

A save that is not committed raises ``CheckpointWriteError`` on every rank, naming the ranks
at fault; the previous checkpoint stays the latest. Knows nothing of queues or hooks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import anyio

from .._core._errors import CheckpointError, CheckpointLockedError, CheckpointWriteError
from .._tree import graft, is_within, present, without
from ._coordination import gather, wait_ready
from ._file import read_checkpoint, read_header
from ._shards import MANIFEST_KEY, Manifest, ShardReport, judge_reports, shard_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core._types import StateTree
    from .._storage import Storage
    from ._coordination import Channel, ShardCoordinator
    from ._directory import CheckpointDirectory
    from ._format import Header
    from ._snapshot import Snapshot

__all__ = ["ShardedSaves", "read_manifest", "read_shards"]

logger = logging.getLogger("asyncckpt")


class ShardedSaves:
    """Sharded saves and restores of one manager, on one rank.

    Args:
        coordinator: the ranks, and the channel between them (opened by ``bind``).
        directory: the manager's directory (held by the chief alone).
        replicated: tree paths that rank 0 alone saves (every rank holds the same values).
        state_file_lock: the manager's lock around state-file changes.
    """

    def __init__(
        self,
        coordinator: ShardCoordinator,
        directory: CheckpointDirectory,
        storage: Storage,
        *,
        replicated: Sequence[str],
        state_file_lock: anyio.Lock,
    ) -> None:
        self.coordinator = coordinator
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.replicated = tuple(replicated)
        self._directory = directory
        self._storage = storage
        self._state_file_lock = state_file_lock
        self._rounds = 0
        self._channel: Channel | None = None
        # Another rank: its shard of each committed checkpoint, to recycle once retired.
        self._committed_shards: dict[str, str] = {}

    @property
    def chief(self) -> bool:
        return self.rank == 0

    def bind(self, namespace: str) -> None:
        """Open this manager's channel (blocking)."""
        self._channel = self.coordinator.channel(self._storage, self._directory.path, namespace)
        self._rounds = 0

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise RuntimeError("the manager is not open")
        return self._channel

    def own_part(self, state: StateTree) -> StateTree:
        """What this rank saves of ``state``: all of it on rank 0, else all but the
        replicated paths.

        Raises:
            TypeError: a replicated path leads through something not a Mapping.
        """
        if self.chief:
            return state
        return without(state, self.replicated, f"rank {self.rank}")

    # -- saving -------------------------------------------------------------------------------

    async def save(
        self,
        snapshot: Snapshot,
        path: str,
        *,
        step: int,
        metadata: dict[str, Any],
        limiter: anyio.CapacityLimiter | None,
        abandon_after: float,
    ) -> int:
        """Write this rank's shard of checkpoint ``path`` and see the save committed.

        Returns:
            The shard's size in bytes (the chief's: the shard and the manifest).

        Raises:
            CheckpointWriteError: the save was not committed (every rank raises it, naming
                the ranks at fault), or this rank's shard failed.
        """
        round_ = self._rounds
        self._rounds += 1
        name = shard_name(os.path.basename(path), self.rank, self.world_size)
        failure: CheckpointWriteError | None = None
        size = 0
        try:
            size = await self._directory.write_shard(
                snapshot,
                os.path.join(self._directory.path, name),
                step=step,
                metadata=metadata,
                limiter=limiter,
                abandon_after=abandon_after,
            )
            report = ShardReport(rank=self.rank, step=step, shard=name)
        except CheckpointWriteError as exc:
            failure = exc
            report = ShardReport(rank=self.rank, step=step, shard=None, error=str(exc))
        await wait_ready(self.channel, limiter=limiter)
        await anyio.to_thread.run_sync(
            self.channel.post, f"{round_}.rank{self.rank}", report.encode(), limiter=limiter
        )
        cause: CheckpointError | None = None
        if self.chief:
            reason, size_of_manifest, cause = await self._judge(
                round_, path, step, metadata, limiter
            )
            size += size_of_manifest
        else:
            reason = await self._verdict(round_, step, limiter)
            if reason is None and failure is None:
                self._committed_shards[os.path.basename(path)] = name
        if failure is not None:
            raise failure
        if reason is not None:
            # A chief whose lease was taken over stays a CheckpointLockedError.
            error = CheckpointLockedError if isinstance(cause, CheckpointLockedError) else None
            raise (error or CheckpointWriteError)(
                path,
                f"step {step} was not committed: {reason}; {self._previous()}",
            ) from cause
        return size

    def _previous(self) -> str:
        latest = self._directory.state.latest
        if latest is None:
            return "no earlier checkpoint exists here"
        return f"the previous checkpoint is still the latest ({latest})"

    async def _judge(
        self,
        round_: int,
        path: str,
        step: int,
        metadata: dict[str, Any],
        limiter: anyio.CapacityLimiter | None,
    ) -> tuple[str | None, int, CheckpointError | None]:
        """The chief: wait for every report, commit if they all agree, post the verdict.

        Returns why it was not committed (None: it was), the manifest's size, and the error
        that kept it from being committed."""
        channel = self.channel
        keys = [f"{round_}.rank{rank}" for rank in range(self.world_size)]
        found = await gather(channel, keys, limiter=limiter)
        reports = _decode_reports(found)
        reason = judge_reports(reports, self.world_size, step, channel.timeout)
        size = 0
        cause: CheckpointError | None = None
        if reason is None:
            manifest = Manifest(
                world_size=self.world_size,
                shards=tuple(str(reports[rank].shard) for rank in range(self.world_size)),
                replicated=self.replicated,
            )
            try:
                async with self._state_file_lock:
                    size = await anyio.to_thread.run_sync(
                        lambda: self._directory.commit_manifest(
                            path,
                            step=step,
                            metadata={**metadata, MANIFEST_KEY: manifest.to_metadata()},
                        ),
                        limiter=limiter,
                    )
            except CheckpointError as exc:
                if os.path.basename(path) not in self._directory.state.names:
                    reason = f"rank 0 could not commit it: {exc}"
                    cause = exc
                else:
                    # Listed (deleting old checkpoints failed, say): it is committed.
                    await self._post_verdict(round_, step, None, limiter)
                    raise
        await self._post_verdict(round_, step, reason, limiter)
        if reason is not None and cause is None:
            # The ranks' fault: nothing was listed. After a failed commit the store may hold
            # a state file that lists the manifest all the same (its answer lost): its shards
            # stay, and the next chief's start sweeps them if it is not listed.
            await self._discard_shards(reports, limiter)
        if round_ and len(reports) == self.world_size:
            # Every rank reported this round, so each has read the previous verdict (a rank
            # that did not report may still be waiting for it).
            previous = [f"{round_ - 1}.rank{rank}" for rank in range(self.world_size)]
            await anyio.to_thread.run_sync(
                channel.discard, [*previous, f"{round_ - 1}.commit"], limiter=limiter
            )
        return reason, size, cause

    async def _post_verdict(
        self, round_: int, step: int, reason: str | None, limiter: anyio.CapacityLimiter | None
    ) -> None:
        verdict = json.dumps(
            {
                "step": step,
                "committed": reason is None,
                "reason": reason,
                "retired": self._directory.take_handed_off(),
            }
        )
        await anyio.to_thread.run_sync(
            self.channel.post, f"{round_}.commit", verdict.encode(), limiter=limiter
        )

    async def _discard_shards(
        self, reports: dict[int, ShardReport], limiter: anyio.CapacityLimiter | None
    ) -> None:
        shards = [
            os.path.join(self._directory.path, report.shard)
            for report in reports.values()
            if report.shard is not None
        ]
        with contextlib.suppress(CheckpointWriteError):
            # Unlisted shards are never read; the next chief's start sweeps what stays.
            await anyio.to_thread.run_sync(self._storage.remove_files, shards, limiter=limiter)

    async def _recycle(self, retired: Sequence[str], limiter: anyio.CapacityLimiter | None) -> None:
        """Another rank: delete (and keep one as the next shard's spare) its own shards of
        the checkpoints rank 0 retired."""
        paths = [
            os.path.join(self._directory.path, self._committed_shards.pop(name))
            for name in retired
            if name in self._committed_shards
        ]
        if not paths:
            return
        try:
            await anyio.to_thread.run_sync(
                self._directory.retire_own_shards, paths, limiter=limiter
            )
        except CheckpointWriteError as exc:
            # Unlisted, a shard left behind is never read; rank 0's start sweeps it.
            logger.warning("rank %d could not delete its retired shards: %s", self.rank, exc)

    async def _verdict(
        self, round_: int, step: int, limiter: anyio.CapacityLimiter | None
    ) -> str | None:
        """Another rank: the chief's verdict; why there is none when it does not come."""
        channel = self.channel
        key = f"{round_}.commit"
        found = await gather(channel, [key], limiter=limiter)
        if key in found:
            verdict = json.loads(found[key])
            await self._recycle(verdict.get("retired", ()), limiter)
            if verdict["step"] != step:
                return f"rank 0 saved step {verdict['step']} where rank {self.rank} saved {step}"
            return None if verdict["committed"] else str(verdict["reason"])
        keys = [f"{round_}.rank{rank}" for rank in range(self.world_size)]
        reports = _decode_reports(
            await anyio.to_thread.run_sync(channel.fetch, keys, limiter=limiter)
        )
        seen = judge_reports(reports, self.world_size, step, channel.timeout)
        if seen is None:
            seen = "every rank reported a shard: rank 0 may still commit it"
        return f"rank 0 gave no verdict within {channel.timeout:g} s ({seen})"

    async def close(self, limiter: anyio.CapacityLimiter | None) -> None:
        """At the manager's close, after its last save: the other ranks say they are done,
        and the chief waits for them (at most the timeout), so that it never takes away what
        they still read (the ``TCPStore`` lives in rank 0's process)."""
        channel = self.channel
        if not self.chief:
            with contextlib.suppress(CheckpointWriteError):  # a chief gone already
                await wait_ready(channel, limiter=limiter)
                await anyio.to_thread.run_sync(
                    channel.post, f"closed.rank{self.rank}", b"", limiter=limiter
                )
            return
        keys = [f"closed.rank{rank}" for rank in range(1, self.world_size)]
        found = await gather(channel, keys, limiter=limiter)
        missing = [key.removeprefix("closed.rank") for key in keys if key not in found]
        await anyio.to_thread.run_sync(self._directory.remove_handed_off_shards, limiter=limiter)
        if not missing and self._rounds:
            last = self._rounds - 1
            ended = [*keys, f"{last}.commit", *(f"{last}.rank{r}" for r in range(self.world_size))]
            await anyio.to_thread.run_sync(channel.discard, ended, limiter=limiter)
        if missing:
            logger.warning(
                "%s: rank(s) %s did not close within %g s of rank 0's close",
                self._directory.path,
                ", ".join(missing),
                channel.timeout,
            )

    # -- restoring ----------------------------------------------------------------------------

    async def manifest(self, path: str, limiter: anyio.CapacityLimiter | None) -> Manifest:
        """The manifest of checkpoint ``path`` (see ``read_manifest``)."""
        _header, manifest = await read_manifest(self._storage, path, self.replicated, limiter)
        return manifest

    async def restore(
        self,
        path: str,
        *,
        into: StateTree,
        paths: Sequence[str] | None,
        partial: bool,
        read: dict[str, Any],
        limiter: anyio.CapacityLimiter | None,
    ) -> StateTree:
        """Restore this rank's part of checkpoint ``path`` (see ``read_shards``)."""
        _header, tree = await read_shards(
            self._storage, path, rank=self.rank, world_size=self.world_size,
            replicated=self.replicated, into=into, paths=paths, partial=partial, read=read,
            limiter=limiter,
        )  # fmt: skip
        return tree


async def read_manifest(
    storage: Storage,
    path: str,
    replicated: Sequence[str],
    limiter: anyio.CapacityLimiter | None = None,
) -> tuple[Header, Manifest]:
    """The header and manifest of checkpoint ``path``; an unsharded checkpoint counts as one
    shard (a single process's), whose replicated paths are ``replicated`` (this job's).

    Raises:
        CheckpointError: as for reading a header.
    """
    header = await read_header(storage, path, limiter=limiter)
    manifest = Manifest.from_metadata(header.metadata, path)
    if manifest is None:
        name = os.path.basename(path)
        manifest = Manifest(world_size=1, shards=(name,), replicated=tuple(replicated))
    return header, manifest


async def read_shards(
    storage: Storage,
    path: str,
    *,
    rank: int,
    world_size: int,
    replicated: Sequence[str],
    into: StateTree,
    paths: Sequence[str] | None = None,
    partial: bool = False,
    read: dict[str, Any] | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> tuple[Header, StateTree]:
    """Restore rank ``rank``'s part of checkpoint ``path``: its shard, and on ranks other
    than 0 the replicated paths from rank 0's. Returns the manifest's header and the tree.

    ``read`` holds ``read_checkpoint``'s ``use_mmap``, ``verify`` and ``raw_dtypes``.

    Raises:
        ValueError: the checkpoint was saved by another number of ranks and more than its
            replicated paths were asked for (or ``into`` does not match).
        CheckpointError: a file cannot be trusted or read.
    """
    read = read or {}
    header, manifest = await read_manifest(storage, path, replicated, limiter)
    directory = os.path.dirname(path)
    first = os.path.join(directory, manifest.shards[0])
    from_first: list[str] = []
    if rank and manifest.replicated:
        # Only those rank 0's tree held (a replicated path may name nothing, as it may at save).
        shared_header = await read_header(storage, first, limiter=limiter)
        from_first = present(shared_header.tree, manifest.replicated)
    if manifest.world_size != world_size:
        if paths is None or not all(is_within(p, manifest.replicated) for p in paths):
            raise ValueError(
                f"{path} was saved by {manifest.world_size} rank(s) and this job has "
                f"{world_size}: only its replicated paths {list(manifest.replicated)} "
                "can be restored here; restore them with "
                f"restore(paths={list(manifest.replicated)!r})"
            )
        _header, only = await read_checkpoint(
            storage, first, into=into, paths=paths, partial=partial, **read, limiter=limiter
        )
        return header, only
    own = os.path.join(directory, manifest.shards[rank])
    if paths is not None:
        mine = [p for p in paths if not is_within(p, from_first)]
        theirs = [p for p in paths if is_within(p, from_first)]
    else:
        mine, theirs = None, from_first
    tree: StateTree = {}
    if mine is None or mine:
        own_into = without(into, from_first, path) if into is not None else None
        _header, tree = await read_checkpoint(
            storage, own, into=own_into, paths=mine, partial=partial, **read, limiter=limiter
        )
    if theirs:
        _header, shared = await read_checkpoint(
            storage, first, into=into, paths=theirs, **read, limiter=limiter
        )
        tree = graft(tree, {p: _at(shared, p) for p in theirs})
    return header, tree


def _at(tree: Any, text: str) -> Any:
    """The value at tree path ``text`` of the nested dicts a ``paths=`` restore returns."""
    node = tree
    for segment in text.strip("/").split("/"):
        node = node[segment]
    return node


def _decode_reports(found: dict[str, bytes]) -> dict[int, ShardReport]:
    reports = {}
    for data in found.values():
        try:
            report = ShardReport.decode(data)
        except ValueError as exc:
            logger.warning("ignoring a coordination marker that is no report: %s", exc)
            continue
        reports[report.rank] = report
    return reports
