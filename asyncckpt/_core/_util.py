"""Small helpers every layer may use; imports nothing above the base modules."""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = [
    "call_maybe_async",
    "check_int",
    "raise_first_exception",
    "raise_single_exception",
    "single_exception",
    "usable_cores",
]

T = TypeVar("T")


def _leaves(
    group: BaseExceptionGroup[BaseException],
) -> tuple[list[BaseException], list[BaseException]]:
    """The group's exceptions, flattened in order: ``(all of them, the real errors)``."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    return leaves, [exc for exc in leaves if not isinstance(exc, cancelled)]


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the one real error in a task group's exception group, else the group itself.

    Cancellations that merely accompany a real error are dropped, as trio's
    ``raise_single_exception_from_group`` does; a group of only cancellations yields one.
    """
    leaves, real = _leaves(group)
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return group


def raise_single_exception(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise ``single_exception(group)`` as itself: its own cause kept, the group hidden."""
    exc = single_exception(group)
    raise exc from exc.__cause__


def raise_first_exception(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the first real error of tasks that each did a share of one job (the readers of
    one file): as itself, with a note naming the others, never as a group."""
    leaves, real = _leaves(group)
    first = real[0] if real else leaves[0]
    if len(real) > 1:
        first.add_note(f"{len(real) - 1} more: " + "; ".join(str(exc) for exc in real[1:]))
    raise first from first.__cause__


async def call_maybe_async(fn: Callable[..., T | Awaitable[T]], *args: Any) -> T:
    """Call ``fn`` and await its result only if it is awaitable (plain or async callbacks)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        TypeError: not an int.
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return value


def usable_cores() -> int:
    """How many cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
