"""The hook protocol: SessionRunHook, its run arguments, context and values, and listeners.

Knows nothing of how sessions are built or run; it only fixes what they promise hooks.

The call sequence, kept exactly from TensorFlow's ``SessionRunHook``::

    hook.begin()                                   # once, before the session is created;
                                                   # may change what will be saved
    (restore the latest checkpoint or init_fn)
    hook.after_create_session(session, coord)      # after creation AND after each recovery
    while not session.should_stop():
        hook.before_run(run_context)               # -> SessionRunArgs | None
        results = step_fn(state, **feeds)          # global_step += 1
        hook.after_run(run_context, run_values)    # skipped for a step that raised
    hook.end(session)                              # see below

* Every method may be a plain method or ``async def``; the session awaits what it returns.
  Hooks are called one after another, in the order they were given.
* A method a hook does not override costs nothing on the step path.
* If the step raises, ``after_run`` is not called for it.
* If the step raises ``StopIteration``, ``StopAsyncIteration`` or ``OutOfRangeError`` (the
  end of the input), ``end()`` is called and the session's ``async with`` block ends
  normally. Any other exception (including one from a hook's ``after_run``) propagates and
  ``end()`` is NOT called.
* ``run_context.request_stop()`` lets every hook's ``after_run`` of this step run; the loop
  then ends at ``should_stop()``.
* A recoverable error (``PreemptedError`` by default) from the step: pending saves finish,
  the latest checkpoint is restored, ``after_create_session`` runs again, and the step is
  retried (``before_run`` again, no ``after_run`` for the failed attempt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import anyio
import anyio.abc

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Hashable, Mapping
    from contextlib import AbstractAsyncContextManager

    from .._core._types import MaybeAwaitable, StateTree

__all__ = [
    "CheckpointSaverListener",
    "CoordinatorLike",
    "SessionLike",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "created",
    "open_in_session",
]


class SessionLike(Protocol):
    """What hooks receive as ``session``: the live state and the raw, hook-free run."""

    @property
    def state(self) -> StateTree:
        """The live state tree the step function updates."""

    @property
    def global_step(self) -> int:
        """How many steps have completed (restored from the checkpoint on resume)."""

    async def run(self, fetches: Any = None, feed_dict: Mapping[str, Any] | None = None) -> Any:
        """Run one step without calling any hook."""


class CoordinatorLike(Protocol):
    """What hooks receive as ``coord``: stop requests and background tasks."""

    def request_stop(self) -> None:
        """Ask the session to stop at its next step boundary."""

    def should_stop(self) -> bool:
        """Whether a stop was requested."""

    async def wait_for_stop(self) -> None:
        """Wait until a stop is requested."""

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a background task owned by the session."""

    async def start(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run ``fn(*args, task_status=...)`` in the session and return what it started with."""

    @property
    def shared(self) -> dict[Hashable, Any]:
        """What the hooks of this session share (summary writers by directory)."""

    def pending_started(self) -> None:
        """Count a background job in flight: the session lets it progress between steps."""

    def pending_finished(self) -> None:
        """Count a background job done."""


class SessionRunArgs(NamedTuple):
    """What a hook adds to the upcoming step: outputs to fetch and inputs to feed.

    ``fetches`` is a name of a step output (or ``"global_step"``), or a list, tuple or dict
    of them, nested as you like; ``feed_dict`` maps keyword arguments of the step function to
    values. ``options`` is kept for TensorFlow compatibility and passed through.
    """

    fetches: Any = None
    feed_dict: Mapping[str, Any] | None = None
    options: Any = None


class SessionRunValues(NamedTuple):
    """What a hook gets back: ``results`` has the structure of the hook's own fetches."""

    results: Any
    options: Any = None
    run_metadata: Any = None


class SessionRunContext:
    """One ``run()`` call as the hooks see it; shared by every hook of that call.

    Args:
        original_args: the caller's ``SessionRunArgs(fetches, feed_dict)``.
        session: the raw session (its ``run`` calls no hooks).
    """

    __slots__ = ("_original_args", "_session", "_stop_requested")

    def __init__(self, original_args: SessionRunArgs, session: SessionLike) -> None:
        self._original_args = original_args
        self._session = session
        self._stop_requested = False

    @property
    def original_args(self) -> SessionRunArgs:
        """The fetches and feeds the caller passed to ``run()``."""
        return self._original_args

    @property
    def session(self) -> SessionLike:
        """The raw session: its state, global step and hook-free ``run``."""
        return self._session

    @property
    def stop_requested(self) -> bool:
        """Whether a hook asked to stop during this call."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Stop the loop after this step (every hook's ``after_run`` still runs)."""
        self._stop_requested = True

    def __repr__(self) -> str:
        return (
            f"SessionRunContext(original_args={self._original_args!r}, "
            f"stop_requested={self._stop_requested})"
        )


class SessionRunHook:
    """Base class of hooks: override any of the five methods, plain or ``async def``.

    See this module's docstring for the exact call sequence. Methods that are not
    overridden are never called, so they cost nothing per step.
    """

    def begin(self) -> MaybeAwaitable[None]:
        """Called once before the session is created; may change what will be saved."""

    def after_create_session(
        self, session: SessionLike, coord: CoordinatorLike
    ) -> MaybeAwaitable[None]:
        """Called once the session exists (state restored or initialized), and again after
        every recovery from a recoverable error."""

    def before_run(self, run_context: SessionRunContext) -> MaybeAwaitable[SessionRunArgs | None]:
        """Called before each step; return ``SessionRunArgs`` to fetch outputs or feed inputs."""
        return None

    def after_run(
        self, run_context: SessionRunContext, run_values: SessionRunValues
    ) -> MaybeAwaitable[None]:
        """Called after each step that completed, with the results of this hook's fetches."""

    def end(self, session: SessionLike) -> MaybeAwaitable[None]:
        """Called when the session ends normally or at the end of the input (not on errors)."""


class CheckpointSaverListener:
    """Callbacks around each save of a ``CheckpointSaverHook``; each plain or ``async def``.

    ``before_save`` is awaited on the loop before the state is snapshotted, so it sees the
    same state that is saved. ``after_save`` is awaited once the checkpoint is durable and
    listed; returning True asks the session to stop (at its next step boundary). ``end`` is
    called once, after the final save; a listener acting on its own schedule should handle
    the last checkpoint there without acting twice on it.
    """

    def begin(self) -> MaybeAwaitable[None]:
        """Called once when the hook begins."""

    def before_save(self, session: SessionLike, global_step_value: int) -> MaybeAwaitable[None]:
        """Called before the state at ``global_step_value`` is snapshotted."""

    def after_save(
        self, session: SessionLike, global_step_value: int
    ) -> MaybeAwaitable[bool | None]:
        """Called once checkpoint ``global_step_value`` is durable; True requests a stop."""
        return None

    def end(self, session: SessionLike, global_step_value: int) -> MaybeAwaitable[None]:
        """Called at the end, after the last save."""


R = TypeVar("R")


def created(value: R | None, hook: SessionRunHook) -> R:
    """``value``, which ``hook.after_create_session`` sets; a clear error when a hook is
    driven by hand (as TensorFlow's own tests drive hooks) without that call."""
    if value is None:
        raise RuntimeError(
            f"{type(hook).__name__}: call after_create_session(session, coord) before this "
            "(a MonitoredSession does; code that drives hooks by hand must too)"
        )
    return value


async def open_in_session(
    coord: CoordinatorLike,
    resource: AbstractAsyncContextManager[R],
    until: anyio.Event | None = None,
) -> R:
    """Enter ``resource`` in a background task of the session and return what it yields.

    It stays open until ``until`` is set, or until the session closes and cancels the task
    (a writer then finishes what it accepted, within its grace period). This is how a hook
    owns something with tasks of its own (a CheckpointManager, a SummaryWriter): its task
    group nests in the session's, so it never outlives the session, on any exit path.
    """

    async def hold(*, task_status: anyio.abc.TaskStatus[R]) -> None:
        async with resource as value:
            task_status.started(value)
            await (until.wait() if until is not None else anyio.sleep_forever())

    opened: R = await coord.start(hold)
    return opened
