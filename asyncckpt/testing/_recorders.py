"""RecordingHook and RecordingListener: hooks and listeners that log their calls in order."""

from __future__ import annotations

from .._hooks import (
    CheckpointSaverListener,
    CoordinatorLike,
    SessionLike,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

__all__ = ["RecordingHook", "RecordingListener"]

Call = tuple[str, "int | None"]
SharedLog = list[tuple[str, str, "int | None"]]


class _Recorder:
    """``calls`` of one object, mirrored as ``(name, method, step)`` into a shared log."""

    def __init__(self, name: str, log: SharedLog | None, stop_at: int | None) -> None:
        self.name = name
        self.calls: list[Call] = []
        self._log = log
        self._stop_at = stop_at

    def _record(self, method: str, step: int | None) -> None:
        self.calls.append((method, step))
        if self._log is not None:
            self._log.append((self.name, method, step))

    def _stop_due(self, step: int) -> bool:
        return self._stop_at is not None and step >= self._stop_at


class RecordingHook(_Recorder, SessionRunHook):
    """A hook that records every call as ``(method, global_step)`` in ``calls``.

    ``before_run`` records the step before the run, ``after_run`` the step after it. With
    ``log`` (a list shared by several hooks and listeners), each call is also appended there
    as ``(name, method, step)``, so a test can assert the interleaving. ``fetches`` and
    ``feed_dict`` are requested on every step; ``stop_at`` requests a stop in ``after_run``
    once the global step reaches it.
    """

    def __init__(
        self,
        name: str = "hook",
        *,
        log: SharedLog | None = None,
        fetches: object = None,
        feed_dict: dict[str, object] | None = None,
        stop_at: int | None = None,
    ) -> None:
        super().__init__(name, log, stop_at)
        self.results: list[object] = []
        self._args = (
            SessionRunArgs(fetches, feed_dict) if fetches is not None or feed_dict else None
        )

    def begin(self) -> None:
        """Record ``("begin", None)``."""
        self._record("begin", None)

    def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
        """Record ``("after_create_session", step)``."""
        self._record("after_create_session", session.global_step)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Record ``("before_run", step before the run)``."""
        self._record("before_run", run_context.session.global_step)
        return self._args

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Record ``("after_run", step after the run)`` and keep ``run_values.results``."""
        step = run_context.session.global_step
        self._record("after_run", step)
        self.results.append(run_values.results)
        if self._stop_due(step):
            run_context.request_stop()

    def end(self, session: SessionLike) -> None:
        """Record ``("end", step)``."""
        self._record("end", session.global_step)


class RecordingListener(_Recorder, CheckpointSaverListener):
    """A listener that records ``(method, step)`` in ``calls`` (``begin`` with None).

    ``stop_at``: ``after_save`` returns True from that step on. ``log`` as for
    ``RecordingHook``.
    """

    def __init__(
        self,
        name: str = "listener",
        *,
        log: SharedLog | None = None,
        stop_at: int | None = None,
    ) -> None:
        super().__init__(name, log, stop_at)

    def begin(self) -> None:
        """Record ``("begin", None)``."""
        self._record("begin", None)

    def before_save(self, session: SessionLike, global_step_value: int) -> None:
        """Record ``("before_save", step)``."""
        self._record("before_save", global_step_value)

    def after_save(self, session: SessionLike, global_step_value: int) -> bool:
        """Record ``("after_save", step)``; True once ``stop_at`` is reached."""
        self._record("after_save", global_step_value)
        return self._stop_due(global_step_value)

    def end(self, session: SessionLike, global_step_value: int) -> None:
        """Record ``("end", step)``."""
        self._record("end", global_step_value)
