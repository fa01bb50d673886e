"""Fetch resolution and feed merging for one step: pure, sync logic."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

__all__ = ["merge_feeds", "resolve_fetches"]


def resolve_fetches(
    fetches: Any, outputs: Mapping[str, Any], global_step: int, *, all_if_none: bool = False
) -> Any:
    """Resolve output names in a (nested) fetch structure against the step's outputs.

    A name, a list, a tuple or a dict of them, nested as you like; each structure comes back
    with its type (a namedtuple, an ``OrderedDict`` or a ``defaultdict`` too; a mapping that
    is not a dict comes back as a dict). ``"global_step"`` is the session's step counter
    after the run. ``None`` is None, or every output with ``all_if_none`` (what a caller of
    ``run()`` gets).

    Raises:
        KeyError: an unknown name; the message lists the outputs that exist.
        TypeError: a fetch that is not a name or a structure of names.
    """
    if fetches is None:
        return dict(outputs) if all_if_none else None
    if fetches is Ellipsis:
        return dict(outputs)
    if isinstance(fetches, str):
        if fetches == "global_step":
            return global_step
        try:
            return outputs[fetches]
        except KeyError:
            raise KeyError(
                f"no step output named {fetches!r}; the step returned "
                f"{sorted(outputs)} (and 'global_step' is always available)"
            ) from None
    if isinstance(fetches, list | tuple):
        items = [resolve_fetches(f, outputs, global_step) for f in fetches]
        if hasattr(fetches, "_fields"):  # a namedtuple takes its fields one by one
            return type(fetches)(*items)
        return type(fetches)(items)
    if isinstance(fetches, Mapping):
        resolved = {key: resolve_fetches(f, outputs, global_step) for key, f in fetches.items()}
        if isinstance(fetches, defaultdict):
            return defaultdict(fetches.default_factory, resolved)
        if isinstance(fetches, dict) and type(fetches) is not dict:
            return type(fetches)(resolved)  # OrderedDict and other dict subclasses
        return resolved
    raise TypeError(
        f"fetches must be output names (str) or lists, tuples or dicts of them, not "
        f"{type(fetches).__name__}"
    )


def merge_feeds(
    user_feeds: Mapping[str, Any] | None, hook_feeds: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """Merge the caller's feeds with every hook's; the same input fed twice is an error.

    Raises:
        RuntimeError: two hooks, or a hook and the caller, feed the same input (TensorFlow's
            rule).
    """
    merged: dict[str, Any] = {}
    for feeds in hook_feeds:
        conflicts = sorted(set(feeds) & set(merged))
        if conflicts:
            raise RuntimeError(f"Same tensor is fed by two hooks. Conflict(s): {conflicts}")
        merged.update(feeds)
    if user_feeds:
        conflicts = sorted(set(user_feeds) & set(merged))
        if conflicts:
            raise RuntimeError(
                f"Same tensor is fed by a SessionRunHook and user. Conflict(s): {conflicts}"
            )
        merged.update(user_feeds)
    return merged
