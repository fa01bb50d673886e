"""Small helpers every layer may use; imports nothing above the base modules."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

__all__ = ["call_maybe_async", "single_exception"]

T = TypeVar("T")


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the one real error in a task group's exception group, else the group itself.

    Cancellations that merely accompany a real error are dropped, as trio's
    ``raise_single_exception_from_group`` does; a group of only cancellations yields one.
    """
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    real = [exc for exc in leaves if not isinstance(exc, cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return group


async def call_maybe_async(fn: Callable[..., T | Awaitable[T]], *args: Any) -> T:
    """Call ``fn`` and await its result only if it is awaitable (plain or async callbacks)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result  # type: ignore[no-any-return]
    return result
