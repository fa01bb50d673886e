"""MonitoredSession and MonitoredTrainingSession: the step loop, its hooks, stops, recovery.

Owns one task group per session (the hooks' background tasks live there), the lifecycle of
hooks (see ``asyncckpt._hooks._base``), and recovery from recoverable errors.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from .._checkpoint import check_coordinator
from .._core._errors import OutOfRangeError, PreemptedError
from .._core._util import raise_single_exception
from .._hooks import (
    CheckpointSaverHook,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    StepCounterHook,
    SummarySaverHook,
    input_pipeline_listeners,
)
from ._agreement import StopAgreement
from ._coordinator import Coordinator
from ._creators import (
    ChiefSessionCreator,
    SessionCreator,
    StepFn,
    StepSession,
)
from ._fetches import merge_feeds, resolve_fetches
from ._scaffold import Scaffold

if TYPE_CHECKING:
    from types import TracebackType

    from .._checkpoint import OnCorrupt, ShardCoordinator
    from .._core._types import StateTree
    from .._storage import Storage

__all__ = ["MonitoredSession", "MonitoredTrainingSession"]

_END_OF_INPUT: Final = (StopIteration, StopAsyncIteration, OutOfRangeError)
_NO_RESULTS: Final = SessionRunValues(None)
_NO_ARGS: Final = SessionRunArgs()
_NOT_OPEN: Final = "the session is not open: use `async with` first"
_isawaitable: Final = inspect.isawaitable
_NO_FEEDS: Final[Mapping[str, Any]] = {}
_TURNS_PER_STEP_WHILE_PENDING: Final = 8
"""About 5 us each when there is nothing to run; enough for every link from a save's
snapshot to its after_save (measured: 2 before the write's thread starts, 2 after it ends)."""


_BeforeRun: TypeAlias = Callable[[SessionRunContext], Any]
_AfterRun: TypeAlias = Callable[[SessionRunContext, SessionRunValues], Any]


def _is_end_of_input(exc: BaseException | None) -> bool:
    return isinstance(exc, _END_OF_INPUT) or (
        isinstance(exc, RuntimeError) and isinstance(exc.__cause__, StopIteration)
    )


def _overrides(hook: SessionRunHook, method: str) -> bool:
    base = getattr(SessionRunHook, method)
    return getattr(type(hook), method, base) is not base


class _Default:
    """Marks an argument left out, where None has a meaning of its own (turn a hook off)."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Final = _Default()


class MonitoredSession:
    """Run a step function under hooks, as TensorFlow's ``MonitoredSession``.

    An async context manager: entering calls every hook's ``begin()``, creates the session
    (restoring the latest checkpoint or initializing), then calls ``after_create_session``;
    leaving calls ``end()`` on a normal exit or at the end of the input, and closes the hooks'
    background tasks. See ``asyncckpt._hooks._base`` for the exact call sequence.

    Usage::

        async with MonitoredSession(ChiefSessionCreator(state, step_fn, checkpoint_dir=d),
                                    hooks=[...]) as sess:
            while not sess.should_stop():
                await sess.run()

    Args:
        session_creator: builds the raw session (``ChiefSessionCreator``).
        hooks: ``SessionRunHook`` instances, called in this order.
        stop_grace_period_secs: on an exceptional exit, how long snapshots already taken
            keep being written before the exception propagates.
        recoverable_errors: exceptions from the step after which the session restores the
            latest checkpoint and retries the step.
    """

    def __init__(
        self,
        session_creator: SessionCreator | None = None,
        hooks: Sequence[SessionRunHook] | None = None,
        stop_grace_period_secs: float = 120.0,
        *,
        recoverable_errors: tuple[type[BaseException], ...] = (PreemptedError,),
    ) -> None:
        if session_creator is None:
            raise ValueError(
                "pass a session_creator, e.g. ChiefSessionCreator(state, step_fn), or use "
                "MonitoredTrainingSession(state=..., step_fn=...)"
            )
        hooks = list(hooks or ())
        for hook in hooks:
            if not isinstance(hook, SessionRunHook):
                raise TypeError(f"hooks must be SessionRunHook instances, not {hook!r}")
        if not stop_grace_period_secs >= 0:
            raise ValueError("stop_grace_period_secs must be >= 0")
        self._creator = session_creator
        self._hooks: tuple[SessionRunHook, ...] = tuple(hooks)
        self._grace = stop_grace_period_secs
        self._recoverable = tuple(recoverable_errors)
        self._coord = Coordinator()
        self._raw: StepSession | None = None
        self._stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._entered = False
        self._closed = False
        self._before_run: tuple[tuple[int, _BeforeRun], ...] = ()
        self._after_run: tuple[tuple[int, _AfterRun], ...] = ()
        self._after_run_calls: tuple[_AfterRun, ...] = ()
        # Set by MonitoredTrainingSession(coordinator=...): the stop is the ranks' decision.
        self._agreement: StopAgreement | None = None
        self._agreed_stop = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._entered else "new"
        step = self._raw.global_step if self._raw is not None else None
        return (
            f"<{type(self).__name__} {state} global_step={step} hooks={len(self._hooks)} "
            f"stop_requested={self._coord.should_stop()}>"
        )

    @property
    def hooks(self) -> tuple[SessionRunHook, ...]:
        """The hooks, in calling order (frozen once the session begins)."""
        return self._hooks

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator hooks receive as ``coord``."""
        return self._coord

    def _session(self) -> StepSession:
        if self._raw is None:
            raise RuntimeError(_NOT_OPEN)
        return self._raw

    @property
    def state(self) -> StateTree:
        """The live state (restored from the checkpoint when one existed)."""
        return self._session().state

    @property
    def global_step(self) -> int:
        """How many steps have completed, counting the restored checkpoint's."""
        return self._session().global_step

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> MonitoredSession:
        if self._entered:
            raise RuntimeError("a session can be entered only once; create a new one")
        self._entered = True
        for hook in self._hooks:
            if _overrides(hook, "begin"):
                await _maybe_await(hook.begin())
        try:
            async with AsyncExitStack() as stack:
                self._task_group = await stack.enter_async_context(anyio.create_task_group())
                self._coord.attach(self._task_group)
                stack.callback(self._coord.detach)
                await self._create()
                # Bound once, so the step path looks nothing up; each with the key that
                # routes the results of its hook's fetches back to it.
                self._before_run = tuple(
                    (id(hook), hook.before_run)
                    for hook in self._hooks
                    if _overrides(hook, "before_run")
                )
                self._after_run = tuple(
                    (id(hook), hook.after_run)
                    for hook in self._hooks
                    if _overrides(hook, "after_run")
                )
                self._after_run_calls = tuple(after_run for _, after_run in self._after_run)
                self._stack = stack.pop_all()
        except BaseExceptionGroup as group:
            # A hook's background task failed while the session was being created.
            raise_single_exception(group)
        return self

    async def _create(self) -> None:
        if self._agreement is not None:
            await self._agreement.open()
        self._raw = await self._creator.create_session()
        for hook in self._hooks:
            if _overrides(hook, "after_create_session"):
                await _maybe_await(hook.after_create_session(self._raw, self._coord))
        if self._agreement is not None:
            # A stop asked for before any step (a resumed run that is done) stops every rank.
            self._agreed_stop = await self._agreement.decide(
                self._coord.should_stop(), self._raw.global_step
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self._close(exc)

    async def close(self) -> None:
        """End the session as a normal exit does (``end()`` on every hook); idempotent."""
        await self._close(None)

    async def _close(self, exc: BaseException | None) -> bool:
        stack, self._stack = self._stack, None
        if stack is None or self._closed:
            return False
        self._closed = True
        normal = exc is None or _is_end_of_input(exc)
        try:
            if normal:
                raw = self._session()
                for hook in self._hooks:
                    if _overrides(hook, "end"):
                        await _maybe_await(hook.end(raw))
        finally:
            self._coord.request_stop()
            # Background tasks are cancelled; a checkpoint writer among them still writes
            # the snapshots already taken, within its grace period, before it returns.
            assert self._task_group is not None
            self._task_group.cancel_scope.cancel()
            try:
                await stack.aclose()
            except BaseExceptionGroup as group:
                raise_single_exception(group)
        return normal and exc is not None

    # -- stepping -----------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """Whether a hook, a listener or the caller asked to stop (or the session is closed).

        With a coordinator (several ranks), whether the ranks agreed to stop after the last
        step: a stop asked for on this rank takes effect on every rank after the next step.
        """
        if self._agreement is not None:
            return self._agreed_stop or self._closed
        return self._coord.should_stop() or self._closed

    def request_stop(self) -> None:
        """Ask the loop to stop at its next step boundary (never interrupts a step)."""
        self._coord.request_stop()

    async def run(self, fetches: Any = None, feed_dict: Mapping[str, Any] | None = None) -> Any:
        """Run one step under the hooks; return the caller's fetches (all outputs for None).

        Raises:
            RuntimeError: a stop was already requested, or two parties feed one input.
            KeyError: a fetch names no output of the step.
            OutOfRangeError: the step's input is exhausted (the ``async with`` block then
                ends normally).
        """
        coord = self._coord
        if self.should_stop():
            raise RuntimeError("Run called even after should_stop requested.")
        raw = self._raw
        if raw is None:
            raise RuntimeError(_NOT_OPEN)
        # The caller's arguments, as every hook of this run sees them; most runs pass none.
        original_args = (
            _NO_ARGS
            if fetches is None and feed_dict is None
            else SessionRunArgs(fetches, feed_dict)
        )
        # The step path is hot: hooks that return None (most steps of most hooks) cost a
        # call: no await, no allocation.
        while True:
            try:
                context = SessionRunContext(original_args, raw)
                hook_fetches: dict[int, Any] | None = None
                hook_feeds: list[Mapping[str, Any]] | None = None
                for key, before_run in self._before_run:
                    args = before_run(context)
                    if args is not None and _isawaitable(args):
                        args = await args
                    if args is not None:
                        if args.fetches is not None:
                            hook_fetches = hook_fetches or {}
                            hook_fetches[key] = args.fetches
                        if args.feed_dict:
                            hook_feeds = hook_feeds or []
                            hook_feeds.append(args.feed_dict)
                feeds = (
                    merge_feeds(feed_dict, hook_feeds) if hook_feeds else (feed_dict or _NO_FEEDS)
                )
                outputs = await raw.step(feeds)
                step = raw.global_step
                if hook_fetches is None:
                    for after_run in self._after_run_calls:
                        done = after_run(context, _NO_RESULTS)
                        if done is not None and _isawaitable(done):
                            await done
                else:
                    for key, after_run in self._after_run:
                        wanted = hook_fetches.get(key)
                        values = (
                            _NO_RESULTS
                            if wanted is None
                            else SessionRunValues(resolve_fetches(wanted, outputs, step))
                        )
                        done = after_run(context, values)
                        if done is not None and _isawaitable(done):
                            await done
                if context.stop_requested:
                    coord.request_stop()
                if coord.pending:
                    # Let background work (a save's hand-off to its thread, its completion,
                    # the listeners' after_save) progress even when the step function never
                    # awaits: a few loop turns per step while any is in flight, none
                    # otherwise. Each link of that chain needs one turn; a save's write
                    # itself needs none (one worker-thread call). After the step, not
                    # before it: a stop requested during these turns (a listener's True) is
                    # seen by the caller's should_stop() before another step can start.
                    for _ in range(_TURNS_PER_STEP_WHILE_PENDING):
                        await anyio.lowlevel.checkpoint()
                if self._agreement is not None:
                    # After the turns: a listener's stop asked for during them counts now.
                    self._agreed_stop = await self._agreement.decide(coord.should_stop(), step)
                # The caller's fetches are resolved last: a typo there must not hide the
                # completed step from the hooks (a stop at this step, a save) if the caller
                # catches the KeyError.
                if fetches is None:
                    # (dict() of the empty read-only mapping takes the slow, generic path.)
                    return dict(outputs) if outputs else {}
                return resolve_fetches(fetches, outputs, step, all_if_none=True)
            except self._recoverable:
                raw = await self._recover()

    async def _recover(self) -> StepSession:
        # TensorFlow's recoverable session: finish what was being saved, restore the latest
        # checkpoint, tell the hooks, and retry the same run.
        await self._coord.wait_pending()
        await self._create()
        return self._session()

    async def until_stopped(self, source: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        """Yield items of ``source`` (sync or async) until a stop is requested.

        A stop request cancels a pending wait for the next item; it never interrupts a step.
        The input running out ends the iteration normally.
        """
        if isinstance(source, AsyncIterable):
            iterator = aiter(source)
            while not self.should_stop():
                # Ranks that agree on their stop: a wait for the next item is never cut short
                # by this rank's own stop request, which takes effect after the next step.
                cancelled_on_stop = (
                    self._coord.cancelled_on_stop()
                    if self._agreement is None
                    else anyio.CancelScope()
                )
                with cancelled_on_stop as scope:
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    return
                yield item
            return
        # Check for a stop before taking the next item, never after: an item taken and then
        # dropped would be lost to a resumable input whose position is saved at the end.
        items = iter(source)
        while not self.should_stop():
            try:
                item = next(items)
            except StopIteration:
                return
            yield item


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _interval(
    steps: int | _Default | None,
    secs: float | _Default | None,
    default_secs: float | None,
    default_steps: int | None,
    what: str,
) -> tuple[int | None, float | None]:
    """Resolve a (steps, secs) schedule: both given -> error; neither -> the default."""
    if not isinstance(steps, _Default) and not isinstance(secs, _Default):
        if steps is not None and secs is not None:
            raise ValueError(f"pass save_{what}_steps= or save_{what}_secs=, not both")
        return steps, secs
    if isinstance(steps, _Default) and isinstance(secs, _Default):
        return default_steps, default_secs
    return (
        None if isinstance(steps, _Default) else steps,
        None if isinstance(secs, _Default) else secs,
    )


class MonitoredTrainingSession(MonitoredSession):
    """A MonitoredSession with TensorFlow's training defaults.

    Restores the latest checkpoint of ``checkpoint_dir`` (state and global step) before the
    hooks' ``after_create_session``, and, where ``is_chief``, adds the default hooks in
    TensorFlow's order: ``chief_only_hooks``, then, when there is a summary directory, a
    ``StepCounterHook`` (every ``log_step_count_steps``) and a ``SummarySaverHook`` (every
    ``save_summaries_steps``, 100 by default, or ``save_summaries_secs``; it writes every
    numeric scalar output unless ``scaffold.summary_op`` says otherwise), then a
    ``CheckpointSaverHook`` (every ``save_checkpoint_secs``, 600 by default, or
    ``save_checkpoint_steps``), then ``hooks``. Passing None for an interval turns that hook
    off; passing both the steps and the secs of one schedule is a ``ValueError``.

    Args:
        state: the live state tree (restored in place).
        step_fn: ``step_fn(state, **feeds)``, plain or async, returning named outputs.
        is_chief: only the chief saves and runs ``chief_only_hooks`` and the default hooks.
        checkpoint_dir: where checkpoints are restored from and saved to.
        scaffold: ``init_fn`` for a fresh start, ``saver`` for retention settings.
        hooks: user hooks, after the default ones.
        chief_only_hooks: hooks that run only on the chief.
        save_checkpoint_secs, save_checkpoint_steps: the checkpoint schedule.
        save_summaries_steps, save_summaries_secs: the summary schedule.
        summary_dir: where summaries go (``checkpoint_dir`` by default).
        log_step_count_steps: how often steps/sec is logged (None or 0: never).
        stop_grace_period_secs: see ``MonitoredSession``.
        recoverable_errors: see ``MonitoredSession``.
        storage: where checkpoints and summaries live (local files by default).
        on_corrupt: when the latest checkpoint is corrupted, unreadable or missing:
            ``"raise"``, or ``"fallback"`` to the newest intact one (see
            ``ChiefSessionCreator``).
        coordinator: one rank of a job with several processes
            (``TorchDistributedCoordinator()``, ``StorageCoordinator(rank, world_size)``;
            docs/DISTRIBUTED.md). Rank 0 is the chief (``is_chief`` is not consulted, except
            that ``is_chief=False`` on rank 0 is an error). Every rank restores and saves its
            own shard (the checkpoint hook runs on every rank, by steps:
            ``save_checkpoint_steps`` is required); the chief alone runs
            ``chief_only_hooks``, the step counter and the summaries. After every step the
            ranks agree whether to stop: a stop asked for on any rank (a hook, a listener, a
            signal) stops every rank after the same step, and the final save is one
            committed checkpoint.
        replicated: with ``coordinator``, the tree paths whose values every rank holds
            alike (``["model"]``): rank 0 alone saves them; every rank restores them.
    """

    def __init__(
        self,
        state: StateTree,
        step_fn: StepFn,
        is_chief: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        scaffold: Scaffold | None = None,
        hooks: Sequence[SessionRunHook] | None = None,
        chief_only_hooks: Sequence[SessionRunHook] | None = None,
        save_checkpoint_secs: float | _Default | None = _DEFAULT,
        save_checkpoint_steps: int | _Default | None = _DEFAULT,
        save_summaries_steps: int | _Default | None = _DEFAULT,
        save_summaries_secs: float | _Default | None = _DEFAULT,
        summary_dir: str | os.PathLike[str] | None = None,
        log_step_count_steps: int | None = 100,
        stop_grace_period_secs: float = 120.0,
        *,
        recoverable_errors: tuple[type[BaseException], ...] = (PreemptedError,),
        storage: Storage | None = None,
        on_corrupt: OnCorrupt = "raise",
        coordinator: ShardCoordinator | None = None,
        replicated: Sequence[str] = (),
    ) -> None:
        scaffold = scaffold or Scaffold()
        ckpt_steps, ckpt_secs = _interval(
            save_checkpoint_steps, save_checkpoint_secs, 600.0, None, "checkpoint"
        )
        if coordinator is not None:
            check_coordinator(coordinator)
            if coordinator.rank == 0 and not is_chief:
                raise ValueError(
                    "with coordinator=, rank 0 is the chief: is_chief=False contradicts it"
                )
            is_chief = coordinator.rank == 0
            if ckpt_secs is not None and checkpoint_dir is not None:
                raise ValueError(
                    "with coordinator=, checkpoints are saved by steps: pass "
                    "save_checkpoint_steps=N (a schedule in seconds would trigger at another "
                    "step on each rank), or save_checkpoint_secs=None for none"
                )
        self.save_summaries_steps, self.save_summaries_secs = _interval(
            save_summaries_steps, save_summaries_secs, None, 100, "summaries"
        )
        self.summary_dir = summary_dir if summary_dir is not None else checkpoint_dir
        all_hooks: list[SessionRunHook] = []
        if is_chief:
            all_hooks.extend(chief_only_hooks or ())
            if self.summary_dir is not None and log_step_count_steps:
                all_hooks.append(
                    StepCounterHook(
                        every_n_steps=log_step_count_steps,
                        output_dir=self.summary_dir,
                        storage=storage,
                    )
                )
            if self.summary_dir is not None and (
                self.save_summaries_steps or self.save_summaries_secs
            ):
                all_hooks.append(
                    SummarySaverHook(
                        save_steps=self.save_summaries_steps or None,
                        save_secs=self.save_summaries_secs or None,
                        output_dir=self.summary_dir,
                        scaffold=scaffold,
                        storage=storage,
                    )
                )
        if (is_chief or coordinator is not None) and (
            checkpoint_dir is not None and (ckpt_steps or ckpt_secs)
        ):
            all_hooks.append(
                CheckpointSaverHook(
                    checkpoint_dir,
                    save_secs=ckpt_secs or None,
                    save_steps=ckpt_steps or None,
                    scaffold=scaffold,
                    # Input pipeline hooks without a schedule save with each checkpoint.
                    listeners=input_pipeline_listeners(
                        [*((chief_only_hooks or ()) if is_chief else ()), *(hooks or ())]
                    ),
                    stop_grace_period_secs=stop_grace_period_secs,
                    storage=storage,
                    coordinator=coordinator,
                    replicated=replicated,
                )
            )
        all_hooks.extend(hooks or ())
        creator = ChiefSessionCreator(
            state,
            step_fn,
            scaffold,
            checkpoint_dir=checkpoint_dir,
            storage=storage,
            on_corrupt=on_corrupt,
            coordinator=coordinator,
            replicated=replicated,
        )
        super().__init__(
            creator, all_hooks, stop_grace_period_secs, recoverable_errors=recoverable_errors
        )
        if coordinator is not None:
            if checkpoint_dir is None:
                raise ValueError("coordinator= needs checkpoint_dir= (where the ranks' shards go)")
            self._agreement = StopAgreement(coordinator, creator.storage, os.fspath(checkpoint_dir))
