"""CheckpointInputPipelineHook: the input iterators' state, in checkpoints of its own.

Owns which input checkpoint a session resumes from, and when the input is saved relative to
the model (on its own schedule, or just before each of the model's saves). A wrapped
``CheckpointSaverHook`` owns the manager, the background writes and the files, exactly as
for the model (TensorFlow composes its hook the same way). Knows nothing of sessions beyond
the hook protocol.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .._checkpoint import STATE_FILENAME, Saver, check_name
from .._core._types import SupportsStateDict
from .._core._util import check_int
from ._base import (
    CheckpointSaverListener,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    created,
)
from ._checkpoint import CheckpointSaverHook

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterable

    from .._checkpoint import CheckpointManager, Policy
    from .._core._types import StateTree
    from .._storage import Storage
    from ._base import CoordinatorLike, SessionLike, SessionRunValues

__all__ = ["CheckpointInputPipelineHook", "Iterators", "input_pipeline_listeners"]

logger = logging.getLogger("asyncckpt")

_NEVER: Final = 2**63  # steps between saves of a hook that follows the model's saves

Iterators: TypeAlias = (
    SupportsStateDict | Sequence[SupportsStateDict] | Mapping[str, SupportsStateDict]
)
"""One iterator, a list of them, or a dict of them by name (each with ``state_dict()`` /
``load_state_dict()``)."""


def _by_name(iterators: Iterators) -> dict[str, SupportsStateDict]:
    """Name every iterator: a single one is ``"0"``, a list's are their indices.

    Raises:
        TypeError: an iterator without ``state_dict()`` / ``load_state_dict()``, or a
            dict key that is not a str.
        ValueError: no iterator at all.
    """
    named: dict[Any, object]
    if isinstance(iterators, SupportsStateDict):
        named = {"0": iterators}
    elif isinstance(iterators, Mapping):
        named = dict(iterators)
    elif isinstance(iterators, Sequence):
        named = {str(index): iterator for index, iterator in enumerate(iterators)}
    else:
        raise TypeError(
            "iterators must be an object with state_dict()/load_state_dict(), or a list or "
            f"dict of them, not {type(iterators).__name__}"
        )
    if not named:
        raise ValueError("iterators is empty: pass the iterators whose position to save")
    for name, iterator in named.items():
        if not isinstance(name, str):
            raise TypeError(f"iterator names must be str, not {name!r}")
        if not isinstance(iterator, SupportsStateDict):
            raise TypeError(
                f"iterator {name!r} ({type(iterator).__name__}) has no state_dict()/"
                "load_state_dict(): wrap it, e.g. in asyncckpt.CountingIterator"
            )
    return named  # type: ignore[return-value]


class _InputSession:
    """The session as the wrapped CheckpointSaverHook sees it: its state is the iterators."""

    __slots__ = ("_base", "state")

    def __init__(self, base: SessionLike, iterators: dict[str, SupportsStateDict]) -> None:
        self._base = base
        self.state: StateTree = iterators

    @property
    def global_step(self) -> int:
        """The session's global step."""
        return self._base.global_step

    async def run(self, fetches: Any = None, feed_dict: Mapping[str, Any] | None = None) -> Any:
        """Run one step of the session, without hooks."""
        return await self._base.run(fetches, feed_dict)


class _FollowSaves(CheckpointSaverListener):
    """Makes the input hook save just before each of a model CheckpointSaverHook's saves."""

    def __init__(self, hook: CheckpointInputPipelineHook) -> None:
        self._hook = hook
        self.begun = False

    def __repr__(self) -> str:
        return f"<saver_listener of {self._hook!r}>"

    def begin(self) -> None:
        """Note that a CheckpointSaverHook of the coming session calls this listener."""
        self.begun = True

    async def before_save(self, session: SessionLike, global_step_value: int) -> None:
        """Save the input at this step, durably, before the model's snapshot is taken."""
        await self._hook._follow(session, global_step_value)


class CheckpointInputPipelineHook(SessionRunHook):
    """Save the input iterators' positions, so that a resumed run continues its input.

    TensorFlow's ``CheckpointInputPipelineHook``: it saves only the iterators' state
    (``state_dict()``), never the model, in checkpoints of its own,
    ``<checkpoint_prefix>.ckpt-<step>``, listed in a state file of its own
    (``latest_filename``), with the same background writes and atomic commits as the model's
    checkpoints; the two share ``checkpoint_dir`` without getting in each other's way.

    When the session is created (and after every recovery) it restores the iterators from
    the input checkpoint of the step the session resumes at (``session.global_step``, the
    model's restored step), before the first step pulls an item. If there is none of that
    step it restores the newest one and logs a warning (the input then repeats or skips the
    items in between); with no input checkpoint at all it saves one of the starting step.

    The state saved at step N is the iterators' state once step N is done: pull the items of
    a step inside the step function (or feed them through ``until_stopped``), so that the
    input checkpoint of step N resumes with the items of step N + 1.

    When to save: without ``save_steps`` / ``save_secs``, the hook saves whenever the model's
    ``CheckpointSaverHook`` saves: hand it ``saver_listener()`` (``MonitoredTrainingSession``
    does so when it saves checkpoints). Each input checkpoint is then durable before the
    model's of the same step is even taken, so whatever step the model resumes at, after a
    crash at any instant, has its input checkpoint. With a schedule of its own, the hook
    saves on it (as TensorFlow's does), and a crash between the two writes can leave the
    model one save ahead of the input (a warning on restore says so).

    Args:
        iterators: an object with ``state_dict()`` / ``load_state_dict()`` (any
            ``ResumableIterator``), or a list or dict of them.
        checkpoint_dir: the directory, normally the model's ``checkpoint_dir``.
        save_steps: save every this many steps (at most one of ``save_steps`` /
            ``save_secs``; none: follow the model's saves).
        save_secs: save every this many seconds.
        checkpoint_prefix: input checkpoints are ``<checkpoint_prefix>.ckpt-<step>``.
        latest_filename: the input's state file.
        task_type: with ``task_id``, for several workers sharing ``checkpoint_dir``: both
            the prefix and the state file get ``_<task_type>_<task_id>`` appended, as in
            TensorFlow (``input_worker_1.ckpt-<step>``, ``checkpoint_input_worker_1``), so
            that each worker saves and restores its own input.
        task_id: the worker's index among those of ``task_type``.
        max_to_keep: input checkpoints kept (keep at least as many as the model does).
        max_pending, policy, stop_grace_period_secs, clock, storage: as for
            ``CheckpointSaverHook``.

    Raises:
        ValueError: both ``save_steps`` and ``save_secs``; an empty ``iterators``; only one
            of ``task_type`` / ``task_id``; names that are not plain file names or that are
            the model's (``model.ckpt``, ``checkpoint``).
        TypeError: an iterator without ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(
        self,
        iterators: Iterators,
        checkpoint_dir: str | os.PathLike[str],
        save_steps: int | None = None,
        save_secs: float | None = None,
        checkpoint_prefix: str = "input",
        latest_filename: str = "checkpoint_input",
        *,
        task_type: str | None = None,
        task_id: int | None = None,
        max_to_keep: int | None = 5,
        max_pending: int = 1,
        policy: Policy = "block",
        stop_grace_period_secs: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        storage: Storage | None = None,
    ) -> None:
        if save_steps is not None and save_secs is not None:
            raise ValueError(
                "pass at most one of save_steps= or save_secs= (neither: save whenever the "
                "model's CheckpointSaverHook saves, through saver_listener())"
            )
        self._iterators = _by_name(iterators)
        if (task_type is None) != (task_id is None):
            raise ValueError("pass both task_type= and task_id= (a worker's input), or neither")
        if task_type is not None and task_id is not None:
            if not task_type:
                raise ValueError("task_type must be a worker kind such as 'worker', not ''")
            check_int("task_id", task_id, minimum=0)
            suffix = f"_{task_type}_{task_id}"
            checkpoint_prefix += suffix
            latest_filename += suffix
        basename = check_name(f"{checkpoint_prefix}.ckpt", checkpoint_prefix)
        if basename == "model.ckpt" or latest_filename == STATE_FILENAME:
            raise ValueError(
                f"checkpoint_prefix={checkpoint_prefix!r} and latest_filename="
                f"{latest_filename!r} must differ from the model's ('model', 'checkpoint'): "
                "the input's checkpoints live beside the model's, in files of their own"
            )
        self.save_steps = save_steps
        self.save_secs = save_secs
        self.checkpoint_prefix = checkpoint_prefix
        self.latest_filename = latest_filename
        self._saver_hook = CheckpointSaverHook(
            checkpoint_dir,
            save_secs=save_secs,
            # Following the model's saves, the wrapped hook's own timer must never fire (a
            # step count never reached costs no clock read per step, unlike infinite secs).
            save_steps=_NEVER if save_steps is None and save_secs is None else save_steps,
            saver=Saver(max_to_keep, None, latest_filename=latest_filename),
            checkpoint_basename=basename,
            max_pending=max_pending,
            policy=policy,
            stop_grace_period_secs=stop_grace_period_secs,
            clock=clock,
            storage=storage,
        )
        self.checkpoint_dir = self._saver_hook.checkpoint_dir
        self._follower: _FollowSaves | None = None
        self._session: SessionLike | None = None
        self._input_session: _InputSession | None = None
        self._input_context: SessionRunContext | None = None
        self._created_step: int | None = None
        self._restored_step: int | None = None
        self._ended = False

    def __repr__(self) -> str:
        schedule = (
            f"save_steps={self.save_steps}"
            if self.save_steps is not None
            else f"save_secs={self.save_secs}"
            if self.save_secs is not None
            else "following the model's saves"
            if self._follower is not None
            else "no schedule"
        )
        return (
            f"CheckpointInputPipelineHook({self.checkpoint_dir!r}, "
            f"{self.checkpoint_prefix}.ckpt, {schedule}, iterators={sorted(self._iterators)})"
        )

    @property
    def manager(self) -> CheckpointManager | None:
        """The CheckpointManager writing the input checkpoints, while the session is open."""
        return self._saver_hook.manager

    @property
    def restored_step(self) -> int | None:
        """The step of the input checkpoint restored when the session was last created (or
        recovered); None when there was none to restore."""
        return self._restored_step

    def saver_listener(self) -> CheckpointSaverListener:
        """Return the listener that makes this hook save when the model's hook saves.

        Pass it in the ``listeners`` of the session's ``CheckpointSaverHook``: before each
        of the model's saves (periodic and final; not the one made when a session starts,
        which this hook makes or restores itself), the input of the same step is saved and
        made durable, so a listed model checkpoint always has its input checkpoint.
        ``MonitoredTrainingSession`` does this for a hook given without a schedule.

        Returns:
            The same listener each time.

        Raises:
            ValueError: the hook has a schedule of its own.
        """
        if self.save_steps is not None or self.save_secs is not None:
            raise ValueError(
                f"{self!r} saves on its own schedule; create it without save_steps= and "
                "save_secs= to save whenever the model's CheckpointSaverHook saves"
            )
        if self._follower is None:
            self._follower = _FollowSaves(self)
        return self._follower

    # -- the hook -----------------------------------------------------------------------------

    async def begin(self) -> None:
        """Check that the hook knows when to save; forget any earlier session.

        Raises:
            ValueError: no schedule, and no ``saver_listener()`` was asked for.
        """
        if self.save_steps is None and self.save_secs is None and self._follower is None:
            raise ValueError(
                "CheckpointInputPipelineHook has no schedule: pass save_steps= or save_secs=, "
                "or pass hook.saver_listener() to the session's CheckpointSaverHook "
                "(MonitoredTrainingSession does so when it saves checkpoints)"
            )
        self._session = self._input_session = self._input_context = None
        self._created_step = self._restored_step = None
        self._ended = False
        await self._saver_hook.begin()

    async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Restore the iterators for the session's step; save them if there was nothing to
        restore.

        Raises:
            ValueError: the input checkpoint holds other iterators than this hook's, or an
                iterator refuses its state (data of another length, another kind).
            CheckpointError: the input checkpoint cannot be read.
        """
        follower = self._follower
        if follower is not None and self._saver_hook.manager is None:  # a new session
            if not follower.begun:
                raise ValueError(
                    f"{self!r} has no schedule and no CheckpointSaverHook of this session "
                    "calls its saver_listener(): pass listeners=[hook.saver_listener()] to "
                    "that hook, or give this one save_steps= or save_secs="
                )
            follower.begun = False  # the next session's CheckpointSaverHook sets it again
        input_session = _InputSession(session, self._iterators)
        manager = await self._saver_hook.open_manager(input_session, coord)
        step = session.global_step
        restored = await self._restore(manager, step)
        self._session, self._input_session = session, input_session
        # One context for every step: the wrapped hook reads only its session (its stop
        # requests go through coord), and a step then costs no allocation here.
        self._input_context = SessionRunContext(SessionRunArgs(), input_session)
        self._created_step = step
        if restored is None:
            await self._saver_hook.save(input_session, step)

    def after_run(
        self, run_context: SessionRunContext, run_values: SessionRunValues
    ) -> Coroutine[Any, Any, None] | None:
        """Save if the schedule triggers (never when following the model's saves); raise a
        failed background write."""
        return self._saver_hook.after_run(created(self._input_context, self), run_values)

    async def end(self, session: SessionLike) -> None:
        """Save the last step unless it was saved, and wait for every input write."""
        input_session = created(self._input_session, self)
        self._ended = True
        await self._saver_hook.end(input_session)

    # -- restoring and following --------------------------------------------------------------

    async def _restore(self, manager: CheckpointManager, step: int) -> int | None:
        await manager.wait()  # after a recovery: what was being written is the newest
        steps = manager.all_steps()
        where = os.path.join(self.checkpoint_dir, self.latest_filename)
        if not steps:
            self._restored_step = None
            if step:
                logger.warning(
                    "No input checkpoint is listed in %s, but the model resumes at step %d: "
                    "the input starts from its beginning.",
                    where,
                    step,
                )
            return None
        chosen = step if step in steps else steps[-1]
        if chosen != step:
            consequence = "repeats the items" if chosen < step else "skips the items"
            logger.warning(
                "No input checkpoint of step %d (the model's) is listed in %s (it lists "
                "steps %s); restoring step %d instead: the input %s of steps %d to %d.",
                step,
                where,
                steps,
                chosen,
                consequence,
                min(chosen, step) + 1,
                max(chosen, step),
            )
        tree = await manager.restore(chosen)
        self._load(tree, f"{self.checkpoint_dir}/{self.checkpoint_prefix}.ckpt-{chosen}")
        self._restored_step = chosen
        return chosen

    def _load(self, tree: StateTree, source: str) -> None:
        names = sorted(self._iterators)
        saved = sorted(tree) if isinstance(tree, dict) else None
        if saved != names:
            raise ValueError(
                f"{source} holds the state of the iterators {saved}, but this hook has "
                f"{names}: pass the same iterators (a list keeps their order, a dict their "
                "names), or another checkpoint_prefix to start a new input"
            )
        for name, iterator in self._iterators.items():
            try:
                iterator.load_state_dict(tree[name])
            except ValueError as exc:
                exc.add_note(f"while restoring iterator {name!r} from {source}")
                raise

    async def _follow(self, session: SessionLike, step: int) -> None:
        # Not the model's save when a session starts (this hook's after_create_session
        # restores or saves that step itself), nor after this hook's end() saved the last.
        if self._ended or session is not self._session or step == self._created_step:
            return
        assert self._input_session is not None
        manager = self.manager
        assert manager is not None
        await self._saver_hook.save(self._input_session, step)
        # Durable before the model's snapshot of this step is taken, so before it is listed.
        await manager.wait()


def input_pipeline_listeners(hooks: Iterable[SessionRunHook]) -> list[CheckpointSaverListener]:
    """Return the ``saver_listener()`` of every input pipeline hook without a schedule.

    For ``MonitoredTrainingSession``: handed to the model's ``CheckpointSaverHook``, they
    make those hooks save the input with each model checkpoint.
    """
    return [
        hook.saver_listener()
        for hook in hooks
        if isinstance(hook, CheckpointInputPipelineHook)
        and hook.save_steps is None
        and hook.save_secs is None
    ]
