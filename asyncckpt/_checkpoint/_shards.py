"""Sharded checkpoints, pure: the names of rank files, the manifest, the ranks' reports.

A checkpoint saved by several ranks is one manifest, ``<basename>-<step>`` (a checkpoint file
with no arrays, listed in the state file like any), and one shard per rank, a complete
checkpoint file of that rank's tree named ``<basename>-<step>.rank<r>-of-<n>.<nonce>``. The
manifest names every shard, so a reader never takes a shard of another save (the nonce) for
one of this save. Knows nothing of files, storage or coordinators.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._core._errors import CheckpointFormatError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MANIFEST_KEY",
    "Manifest",
    "ShardReport",
    "check_user_metadata",
    "judge_reports",
    "shard_checkpoint",
    "shard_name",
    "shard_rank",
    "shards_of",
]

MANIFEST_KEY: Final = "asyncckpt.shards"
"""The manifest's metadata key: reserved, so no user metadata can pass for a manifest."""

_RESERVED_PREFIX: Final = "asyncckpt."
_SHARD_NAME: Final = re.compile(r"(.+)\.rank([0-9]+)-of-[0-9]+\.[0-9a-f]{8}")


def check_user_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse user metadata keys in the namespace asyncckpt keeps for itself.

    Raises:
        ValueError: a key starts with ``asyncckpt.``.
    """
    reserved = sorted(key for key in metadata if key.startswith(_RESERVED_PREFIX))
    if reserved:
        raise ValueError(
            f"metadata keys starting with {_RESERVED_PREFIX!r} are asyncckpt's own: rename "
            f"{reserved}"
        )


def shard_name(checkpoint: str, rank: int, world_size: int) -> str:
    """A new shard name for ``rank`` of checkpoint ``checkpoint`` (a fresh nonce each call:
    a re-save of a step never overwrites a shard that a listed manifest names)."""
    return f"{checkpoint}.rank{rank}-of-{world_size}.{secrets.token_hex(4)}"


def shard_checkpoint(name: str) -> str | None:
    """The checkpoint a shard's file name belongs to; None for a name that is no shard's."""
    match = _SHARD_NAME.fullmatch(name)
    return match.group(1) if match else None


def shard_rank(name: str) -> int | None:
    """The rank whose shard the file name is; None for a name that is no shard's."""
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(2)) if match else None


def shards_of(checkpoint: str, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are shards of ``checkpoint`` (any save of it)."""
    prefix = f"{checkpoint}.rank"
    return sorted(name for name in names if name.startswith(prefix))


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a sharded checkpoint is made of: its shards by rank, and the paths rank 0 alone
    saved (the ones every rank shares)."""

    world_size: int
    shards: tuple[str, ...]
    """Shard file names, by rank."""
    replicated: tuple[str, ...]

    def to_metadata(self) -> dict[str, Any]:
        """The manifest as the value of ``MANIFEST_KEY`` in a checkpoint's metadata."""
        return {
            "world_size": self.world_size,
            "shards": list(self.shards),
            "replicated": list(self.replicated),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str) -> Manifest | None:
        """The manifest a checkpoint's metadata holds; None for an unsharded checkpoint.

        Raises:
            CheckpointFormatError: the manifest is malformed.
        """
        raw = metadata.get(MANIFEST_KEY)
        if raw is None:
            return None
        try:
            world_size = raw["world_size"]
            shards = tuple(raw["shards"])
            replicated = tuple(raw["replicated"])
        except (KeyError, TypeError):
            raise CheckpointFormatError(source, f"malformed shard manifest: {raw!r}") from None
        valid = (
            type(world_size) is int
            and world_size >= 1
            and len(shards) == world_size
            and all(isinstance(s, str) and "/" not in s and s for s in shards)
            and all(isinstance(p, str) for p in replicated)
        )
        if not valid:
            raise CheckpointFormatError(source, f"malformed shard manifest: {raw!r}")
        return cls(world_size=world_size, shards=shards, replicated=replicated)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardReport:
    """What one rank tells the chief about one save: its step, and its shard or its error."""

    rank: int
    step: int
    shard: str | None
    """The durable shard's file name; None when the write failed."""
    error: str | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {"rank": self.rank, "step": self.step, "shard": self.shard, "error": self.error}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> ShardReport:
        """Raises: ValueError: not a report (a foreign or torn marker)."""
        try:
            raw = json.loads(data)
            return cls(rank=raw["rank"], step=raw["step"], shard=raw["shard"], error=raw["error"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a shard report: {data[:80]!r}") from exc


def judge_reports(
    reports: Mapping[int, ShardReport], world_size: int, step: int, waited: float
) -> str | None:
    """Why a save of ``step`` cannot be committed from these reports; None if it can.

    Every rank must have reported a durable shard of the same step; the reason names each
    rank that did not, and how.
    """
    problems = []
    missing = [rank for rank in range(world_size) if rank not in reports]
    if missing:
        problems.append(
            f"rank{'s' if len(missing) > 1 else ''} {_ranks(missing)} reported no shard "
            f"within {waited:g} s"
        )
    for rank, report in sorted(reports.items()):
        if report.error is not None:
            problems.append(f"rank {rank} failed: {report.error}")
        elif report.step != step:
            problems.append(f"rank {rank} saved step {report.step} where rank 0 saved {step}")
    return "; ".join(problems) or None


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(rank) for rank in ranks)
