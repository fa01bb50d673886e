"""Session creators: build the raw step session, restoring the latest checkpoint or
initializing. Knows nothing of hooks beyond the session they receive."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio

from .._checkpoint import (
    STATE_FILENAME,
    OnCorrupt,
    check_coordinator,
    check_on_corrupt,
    get_checkpoint_state,
    latest_checkpoint,
    read_first_intact,
    read_shards,
    unlist_checkpoints,
)
from .._core._errors import OutOfRangeError
from .._core._util import call_maybe_async
from .._storage import resolve_storage
from ._fetches import resolve_fetches
from ._scaffold import Scaffold

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._checkpoint import ShardCoordinator
    from .._core._types import StateTree
    from .._storage import Storage

__all__ = [
    "NO_OUTPUTS",
    "ChiefSessionCreator",
    "SessionCreator",
    "StepFn",
    "StepSession",
]

logger = logging.getLogger("asyncckpt")

NO_OUTPUTS: Mapping[str, Any] = MappingProxyType({})
"""The outputs of a step function that returned None."""

StepFn: TypeAlias = Callable[..., "Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None"]
"""``step_fn(state, **feeds)``, plain or async, returning named outputs (or None)."""


def step_outputs(outputs: Any) -> Mapping[str, Any]:
    """Return what the step function returned as its outputs: a mapping, or None for none.

    Raises:
        TypeError: something else.
    """
    if outputs is None:
        return NO_OUTPUTS
    if type(outputs) is not dict and not isinstance(outputs, Mapping):  # fast path: dict
        raise TypeError(
            f"step_fn must return a mapping of named outputs (or None), not "
            f"{type(outputs).__name__}"
        )
    return outputs


def ends_input(exc: StopIteration | RuntimeError) -> bool:
    """Whether the step function's exception is the end of its input.

    PEP 479: a ``StopIteration`` escaping an async step becomes a ``RuntimeError`` caused by
    it.
    """
    return isinstance(exc, StopIteration) or isinstance(exc.__cause__, StopIteration)


def end_of_input(exc: BaseException) -> OutOfRangeError:
    """The ``OutOfRangeError`` that a step's ``StopIteration`` comes out as."""
    error = OutOfRangeError("the step function's input is exhausted")
    error.__cause__ = exc
    return error


class StepSession:
    """The raw session hooks receive: the live state, the global step, and a hook-free run.

    ``run()`` calls the step function once and counts it; no hook sees it (TensorFlow's
    raw ``session.run`` inside a hook).
    """

    __slots__ = ("_is_async", "global_step", "state", "step_fn")

    def __init__(self, state: StateTree, step_fn: StepFn, global_step: int = 0) -> None:
        self.state = state
        self.step_fn = step_fn
        self.global_step = global_step
        self._is_async = inspect.iscoroutinefunction(step_fn)

    def __repr__(self) -> str:
        return f"<StepSession global_step={self.global_step} step_fn={self.step_fn!r}>"

    async def step(self, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        """Call the step function with ``feeds`` and count the step; return its outputs.

        The part of a run that a ``MonitoredSession`` wraps in its hooks. A ``StopIteration``
        (which cannot cross a coroutine) comes out as ``OutOfRangeError``, the end of the
        input.
        """
        try:
            # (Unpacking an empty mapping into the call is not free, and this is every step.)
            outputs: Any = self.step_fn(self.state, **feeds) if feeds else self.step_fn(self.state)
            if self._is_async or inspect.isawaitable(outputs):
                outputs = await outputs
        except (StopIteration, RuntimeError) as exc:
            if ends_input(exc):
                raise end_of_input(exc) from exc
            raise
        self.global_step += 1
        return step_outputs(outputs)

    async def run(self, fetches: Any = None, feed_dict: Mapping[str, Any] | None = None) -> Any:
        """Run one step without hooks; return the fetched outputs (all of them for None)."""
        outputs = await self.step(dict(feed_dict or {}))
        return resolve_fetches(fetches, outputs, self.global_step, all_if_none=True)


class SessionCreator(Protocol):
    """Creates the raw session; called at start and again after each recovery."""

    async def create_session(self) -> StepSession:
        """Return a session whose state is restored or initialized."""


class ChiefSessionCreator:
    """Create the session from the latest checkpoint of ``checkpoint_dir``, or initialize it.

    On a fresh start (no checkpoint) ``scaffold.init_fn(scaffold, session)`` is called. When
    a checkpoint exists, it is read into ``state`` in place (its arrays are filled, dicts
    and lists updated, ``load_state_dict`` called) and the global step is the checkpoint's.

    Args:
        state: the live state tree.
        step_fn: ``step_fn(state, **feeds)``.
        scaffold: where ``init_fn`` comes from.
        checkpoint_dir: restore the latest checkpoint of this directory.
        checkpoint_filename_with_path: restore exactly this checkpoint instead.
        storage: where the checkpoints live (local files by default).
        on_corrupt: when the latest checkpoint of ``checkpoint_dir`` is corrupted,
            unreadable or missing: ``"raise"``; or ``"fallback"``: restore the newest listed
            one that is intact, with a WARNING naming each one skipped, and drop those from
            the state file (their files stay for ``asyncckpt verify``), so that the run
            continues from the restored step.
        coordinator: restore this rank's shard of a sharded checkpoint (and, from rank 0's,
            the ``replicated`` paths): see docs/DISTRIBUTED.md. Needs ``on_corrupt="raise"``.
        replicated: with ``coordinator``, the tree paths rank 0 alone saves.
    """

    def __init__(
        self,
        state: StateTree,
        step_fn: StepFn,
        scaffold: Scaffold | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_filename_with_path: str | os.PathLike[str] | None = None,
        *,
        storage: Storage | None = None,
        on_corrupt: OnCorrupt = "raise",
        coordinator: ShardCoordinator | None = None,
        replicated: Sequence[str] = (),
    ) -> None:
        if coordinator is not None:
            check_coordinator(coordinator)
            if on_corrupt != "raise":
                raise ValueError(
                    'on_corrupt="fallback" could restore different steps on different ranks: '
                    'use on_corrupt="raise" with coordinator='
                )
        if not callable(step_fn):
            raise TypeError("step_fn must be callable as step_fn(state, **feeds)")
        if checkpoint_dir is not None and checkpoint_filename_with_path is not None:
            raise ValueError("pass checkpoint_dir= or checkpoint_filename_with_path=, not both")
        self.state = state
        self.step_fn = step_fn
        self.scaffold = scaffold or Scaffold()
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.storage = resolve_storage(self.checkpoint_dir or "", storage)
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.coordinator = coordinator
        self.replicated = tuple(replicated)
        self.checkpoint_filename_with_path = (
            None
            if checkpoint_filename_with_path is None
            else os.fspath(checkpoint_filename_with_path)
        )

    def __repr__(self) -> str:
        return f"ChiefSessionCreator(checkpoint_dir={self.checkpoint_dir!r})"

    async def create_session(self) -> StepSession:
        """Restore the latest checkpoint into the state, or call ``init_fn``."""
        paths = await anyio.to_thread.run_sync(self._candidates)
        if not paths:
            session = StepSession(self.state, self.step_fn, 0)
            if self.scaffold.init_fn is not None:
                await call_maybe_async(self.scaffold.init_fn, self.scaffold, session)
            return session
        if self.coordinator is not None:
            header, tree = await read_shards(
                self.storage,
                paths[0],
                rank=self.coordinator.rank,
                world_size=self.coordinator.world_size,
                replicated=self.replicated,
                into=self.state,
            )
            self.state = tree
            return StepSession(tree, self.step_fn, header.step or 0)
        header, tree, skipped = await read_first_intact(
            self.storage, paths, on_corrupt=self.on_corrupt, into=self.state
        )
        if skipped:
            assert self.checkpoint_dir is not None
            names = [os.path.basename(p) for p in skipped]
            unlisted = await anyio.to_thread.run_sync(
                unlist_checkpoints, self.storage, self.checkpoint_dir, STATE_FILENAME, names
            )
            if not unlisted:
                logger.warning(
                    "%s: another writer holds the directory; the checkpoints that could not "
                    "be restored (%s) stay listed",
                    self.checkpoint_dir,
                    names,
                )
        self.state = tree
        return StepSession(tree, self.step_fn, header.step or 0)

    def _candidates(self) -> list[str]:
        """The checkpoints to try, newest first (blocking): the one asked for, or the latest
        of ``checkpoint_dir`` (with ``"fallback"``, every listed one)."""
        if self.checkpoint_filename_with_path is not None:
            return [self.checkpoint_filename_with_path]
        if self.checkpoint_dir is None:
            return []
        if self.on_corrupt == "raise":
            latest = latest_checkpoint(self.checkpoint_dir, storage=self.storage)
            return [] if latest is None else [latest]
        state = get_checkpoint_state(self.checkpoint_dir, storage=self.storage)
        return [] if state is None else state.paths()[::-1]
