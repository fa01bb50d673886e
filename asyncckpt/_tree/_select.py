"""Restoring part of a tree: the subtrees ``paths=`` names, or only what ``into=`` holds.

Owns which parts of a checkpoint's spec a restore reads (each with its counterpart in
``into=``), which arrays those parts refer to, and how the parts are put back together.
Knows nothing of files: the caller reads only the arrays the parts refer to.

A part's spec is the checkpoint's own (array indices unchanged), cut to what was asked, so
``match_into`` and ``build`` work on it as on a whole spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ._containers import live_child, live_keys
from ._rebuild import build
from ._spec import ARRAY_TAGS, format_path

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from .._core._types import StateTree
    from ._spec import Key, Spec, TreePath

__all__ = [
    "Part",
    "array_indices",
    "build_parts",
    "check_selection",
    "graft",
    "is_within",
    "present",
    "select",
    "without",
]


class Part(NamedTuple):
    """One subtree a restore reads: where it is, its spec, and ``into=``'s counterpart (None
    without ``into=``)."""

    path: TreePath
    spec: Spec
    live: Any


def check_selection(paths: Sequence[str] | None, partial: bool, into: StateTree) -> None:
    """Check ``paths=`` and ``partial=`` before anything is read.

    Raises:
        TypeError: ``paths`` is a single string, or holds something else than strings.
        ValueError: ``paths`` is empty or holds an empty path; ``partial`` without ``into``.
    """
    if partial and into is None:
        raise ValueError("partial=True fills only what into= holds: pass into= too")
    if paths is None:
        return
    if isinstance(paths, str | bytes):
        raise TypeError(f"paths= takes a list of tree paths: paths=[{paths!r}]")
    if not paths:
        raise ValueError("paths= is empty: pass paths=None to restore the whole tree")
    for path in paths:
        if not isinstance(path, str):
            raise TypeError(f"paths= holds {type(path).__name__}, not a tree path (str)")
        if not path.strip("/"):
            raise ValueError(f"paths= holds {path!r}: pass paths=None for the whole tree")


def select(
    spec: Spec,
    *,
    paths: Sequence[str] | None,
    into: StateTree,
    partial: bool,
    source: str,
) -> list[Part]:
    """Return the parts of the checkpoint (``spec``) a restore reads.

    Without ``paths``, the whole tree is one part. With it, each named subtree is one (a
    path inside another named one adds nothing), matched against ``into``'s item at the
    same path. With ``partial``, each part is cut to what ``into`` holds.

    Raises:
        KeyError: a path is not in the checkpoint; the message lists its top-level keys.
        ValueError: ``into`` has no item at a path; a path runs through an object saved
            through its state while ``into`` is given; with ``partial``, ``into`` holds
            entries the checkpoint lacks (all are named).
    """
    if paths is None:
        parts = [Part((), spec, into)]
    else:
        found = [_find(spec, path, into, source) for path in paths]
        keys = {part.path for part in found}
        parts = []
        for part in found:
            if part.path in keys and not any(part.path[:n] in keys for n in range(len(part.path))):
                parts.append(part)
                keys.discard(part.path)  # the same path twice: read once
    if not partial:
        return parts
    extra: list[str] = []
    parts = [Part(p.path, _prune(p.spec, p.live, p.path, extra), p.live) for p in parts]
    if extra:
        raise ValueError(
            f"{source}: into= holds entries the checkpoint does not: {extra}; remove them "
            "from into= (partial=True fills only entries both have)"
        )
    return parts


def array_indices(parts: Sequence[Part]) -> list[int]:
    """Return the indices of the arrays the parts refer to, in file order."""
    found: list[int] = []
    stack = [part.spec for part in parts]
    while stack:
        node = stack.pop()
        tag = node[0]
        if tag in ARRAY_TAGS:
            found.append(node[1])
        elif tag == "d":
            stack.extend(child for _key, child in node[1])
        elif tag in ("l", "t"):
            stack.extend(node[1])
        elif tag == "o":
            stack.append(node[1])
    return sorted(set(found))


def build_parts(parts: Sequence[Part], arrays: Sequence[np.ndarray[Any, Any]]) -> StateTree:
    """Rebuild each part (as ``build`` does, with its ``into=`` counterpart) and put them
    together: the whole tree when the one part is the root, otherwise nested dicts holding
    only the parts, keyed as the checkpoint keys them (a list's items by their int index)."""
    if len(parts) == 1 and not parts[0].path:
        return build(parts[0].spec, arrays, parts[0].live)
    tree: dict[Key, Any] = {}
    for part in parts:
        node = tree
        for key in part.path[:-1]:
            node = node.setdefault(key, {})
        node[part.path[-1]] = build(part.spec, arrays, part.live)
    return tree


def _find(spec: Spec, text: str, into: StateTree, source: str) -> Part:
    """The part at ``text`` (``"layers/0/w"``), and ``into``'s item there."""
    node, live = spec, into
    path: list[Key] = []
    for segment in text.strip("/").split("/"):
        while node[0] == "o":  # an object's state adds no key to paths
            if into is not None:
                raise ValueError(
                    f"{source}: paths= names {text!r}, inside the object saved at "
                    f"{format_path(tuple(path))}; with into=, name the object itself"
                )
            node = node[1]
        tag = node[0]
        key, child = _child(node, segment)
        if child is None:
            where = f" under {format_path(tuple(path))!r}" if path else ""
            raise KeyError(
                f"{source}: {text!r} is not in the checkpoint (no {segment!r}{where}); "
                f"its top-level keys are {_top_keys(spec)}"
            )
        path.append(key)
        node = child
        if into is not None:
            live = _live_child(live, tag, key)
            if live is _MISSING:
                raise ValueError(
                    f"{source}: paths= names {text!r}, but into= has no item at "
                    f"{format_path(tuple(path))}"
                )
    return Part(tuple(path), node, live)


_MISSING: Any = object()


def _live_child(live: Any, tag: str, key: Key) -> Any:
    if tag == "d":
        keys = live_keys(live)
        return live_child(live, key) if keys is not None and key in keys else _MISSING
    if isinstance(live, list | tuple) and isinstance(key, int) and key < len(live):
        return live[key]
    return _MISSING


def _child(node: Spec, segment: str) -> tuple[Key, Spec | None]:
    """The key and child of a container node named by one path segment (None: no such)."""
    tag = node[0]
    if tag == "d":
        for key, child in node[1]:
            if key == segment:
                return key, child
        for key, child in node[1]:  # an int key, written as digits
            if isinstance(key, int) and str(key) == segment:
                return key, child
    elif tag in ("l", "t") and segment.isdigit() and int(segment) < len(node[1]):
        return int(segment), node[1][int(segment)]
    return segment, None


def _top_keys(spec: Spec) -> list[Key]:
    node = spec
    while node[0] == "o":
        node = node[1]
    if node[0] == "d":
        return [key for key, _ in node[1]]
    if node[0] in ("l", "t"):
        return list(range(len(node[1])))
    return []


def _prune(node: Spec, live: Any, path: TreePath, extra: list[str]) -> Spec:
    """``node`` cut to the entries ``live`` holds; entries of ``live`` it lacks go to
    ``extra``. Where ``live`` differs in kind, ``node`` stays whole and ``match_into``
    reports the difference; objects saved through their state stay whole."""
    tag = node[0]
    if tag == "d":
        keys = live_keys(live)
        if keys is None:
            return node
        saved = {key for key, _ in node[1]}
        extra.extend(format_path((*path, key)) for key in keys if key not in saved)
        present = set(keys)
        return [
            "d",
            [
                [key, _prune(child, live_child(live, key), (*path, key), extra)]
                for key, child in node[1]
                if key in present
            ],
        ]
    if tag in ("l", "t") and isinstance(live, list | tuple) and len(live) == len(node[1]):
        return [
            tag,
            [_prune(child, live[i], (*path, i), extra) for i, child in enumerate(node[1])],
        ]
    return node


def _segments(text: str) -> tuple[str, ...]:
    return tuple(text.strip("/").split("/"))


def is_within(text: str, paths: Sequence[str]) -> bool:
    """Whether the tree path ``text`` is one of ``paths`` or inside one of them."""
    segments = _segments(text)
    return any(segments[: len(p)] == p for p in map(_segments, paths))


def present(spec: Spec, paths: Sequence[str]) -> list[str]:
    """Those of ``paths`` that a checkpoint's spec holds (through objects' state too)."""
    found = []
    for text in paths:
        node: Spec | None = spec
        for segment in _segments(text):
            while node is not None and node[0] == "o":
                node = node[1]
            if node is None:
                break
            node = _child(node, segment)[1]
        if node is not None:
            found.append(text)
    return found


def without(tree: StateTree, paths: Sequence[str], source: str) -> StateTree:
    """``tree`` without the subtrees at ``paths`` (a rank's own part of a state whose
    ``paths`` rank 0 alone saves). Containers on the way are copied as dicts; the rest is
    shared, not copied. A path that is not in ``tree`` is fine (nothing to leave out).

    Raises:
        TypeError: a container on the way to a path is not a Mapping.
    """
    if not paths:
        return tree
    return _without(tree, [_segments(p) for p in paths], (), source)


def _without(node: Any, cut: list[tuple[str, ...]], at: tuple[str, ...], source: str) -> Any:
    if not isinstance(node, Mapping):
        raise TypeError(
            f"{source}: replicated= names {['/'.join(c) for c in cut]}, but the state at "
            f"{format_path(at)} is a {type(node).__name__}: replicated paths must lead "
            "through dicts (or Mappings)"
        )
    kept: dict[Any, Any] = {}
    for key, value in node.items():
        below = [c[1:] for c in cut if c[0] == str(key)]
        if any(not c for c in below):
            continue
        kept[key] = _without(value, below, (*at, str(key)), source) if below else value
    return kept


def graft(tree: StateTree, parts: Mapping[str, Any]) -> StateTree:
    """``tree`` (nested dicts at the paths) with each value of ``parts`` put at its path:
    what ``without`` left out, read back from rank 0's shard."""
    if not parts:
        return tree
    root: Any = dict(tree) if isinstance(tree, Mapping) else {}
    for text, value in parts.items():
        *ancestors, last = _segments(text)
        node = root
        for segment in ancestors:
            child = node.get(segment)
            node[segment] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[last] = value
    return root
