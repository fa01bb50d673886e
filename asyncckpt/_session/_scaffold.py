"""Scaffold: what a training session is built from besides the state (TensorFlow's names)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from .._checkpoint import Saver
    from .._hooks import SessionLike

__all__ = ["InitFn", "Scaffold", "SummaryOp"]

InitFn: TypeAlias = "Callable[[Scaffold, SessionLike], Awaitable[None] | None]"
SummaryOp: TypeAlias = "str | Sequence[str] | Callable[[Mapping[str, Any]], Any]"


class Scaffold:
    """The pieces a session is built from, as TensorFlow's ``tf.train.Scaffold``.

    Args:
        init_fn: ``init_fn(scaffold, session)``, plain or async, called when no checkpoint
            was restored (a fresh start): initialize ``session.state`` there.
        saver: a ``Saver`` whose retention settings (``max_to_keep``,
            ``keep_checkpoint_every_n_hours``) the checkpoint hook uses.
        summary_op: what summaries to write (an output name, a list of names, or a callable
            of the step outputs); None means every numeric scalar output of the step.
    """

    def __init__(
        self,
        init_fn: InitFn | None = None,
        saver: Saver | None = None,
        summary_op: SummaryOp | None = None,
    ) -> None:
        if init_fn is not None and not callable(init_fn):
            raise TypeError("init_fn must be callable as init_fn(scaffold, session)")
        self.init_fn = init_fn
        self.saver = saver
        self.summary_op = summary_op

    def __repr__(self) -> str:
        return f"Scaffold(init_fn={self.init_fn!r}, saver={self.saver!r})"
