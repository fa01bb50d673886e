"""State trees: flatten into a spec plus array leaves, check a target tree, rebuild.

Owns what a tree may contain and how it is encoded as plain msgpack-ready values (the spec).
Knows nothing of files, headers or scheduling.

A spec node is a list whose first item is a tag:

    ["n"]  None               ["b", bool]          ["i", int]        ["I", "decimal"] (>64 bits)
    ["f", float]              ["c", re, im]        ["s", str]
    ["a", k]  array k         ["g", k]  numpy scalar stored as 0-d array k
    ["y", k]  bytes stored as uint8 array k
    ["d", [[key, node], ...]] dict (str or int keys, order kept)
    ["l", [node, ...]]        ["t", [node, ...]]   list, tuple
    ["o", node]               an object saved through state_dict()
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

import numpy as np

from ._core._errors import CheckpointFormatError
from ._core._types import StateTree, SupportsStateDict

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "MAX_DEPTH",
    "AddLeaf",
    "ArrayLeaf",
    "build",
    "byte_view",
    "check_into_array",
    "flatten",
    "format_path",
    "match_into",
]

MAX_DEPTH: Final = 200
"""Deepest nesting saved or loaded; deeper trees are refused before Python's recursion limit.

Every dict, list, tuple and state_dict() object on the way from the root counts one level.
"""

_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64
_MAX_BIGINT_DIGITS: Final = 4300  # Python's own int/str conversion limit
_BIGINT_DIGITS: Final = re.compile(rf"-?[0-9]{{1,{_MAX_BIGINT_DIGITS}}}")

Key = str | int
TreePath = tuple[Key, ...]
Spec = list[Any]


def format_path(path: TreePath) -> str:
    """Return a tree path as users write it: ``params/layers/0/w`` (``<root>`` when empty)."""
    return "/".join(str(key) for key in path) if path else "<root>"


def byte_view(array: np.ndarray[Any, Any]) -> memoryview:
    """Return the bytes of a C-contiguous array as a flat, writable-if-the-array-is view."""
    try:
        # The buffer protocol is three times faster than numpy's views, which counts with
        # thousands of small arrays; it refuses datetimes and empty multi-dimensional arrays.
        return array.data.cast("B")
    except (ValueError, TypeError):
        flat = array.reshape(-1)
        return (flat.view(np.uint8) if flat.dtype.itemsize else np.empty(0, np.uint8)).data


class ArrayLeaf(NamedTuple):
    """One array leaf of a flattened tree: its path and C-contiguous bytes (in a snapshot,
    bytes that will not change until the snapshot is released).

    A named tuple: a snapshot of thousands of small arrays makes one per array per save,
    and a frozen dataclass costs several times more to build.
    """

    path: TreePath
    array: np.ndarray[Any, Any]


AddLeaf: TypeAlias = "Callable[[TreePath, np.ndarray[Any, Any]], int]"
"""Receives each array leaf (and bytes, and numpy scalars, as arrays) of a tree being
flattened; returns the index the spec refers to it by."""


def flatten(tree: StateTree, add_leaf: AddLeaf) -> Spec:
    """Return the spec of ``tree``, handing each array leaf to ``add_leaf`` in order.

    Raises:
        TypeError: a leaf or key cannot be saved; the message names its path.
    """
    return _Flattener(add_leaf).node(tree, (), set(), 0)


class _Flattener:
    __slots__ = ("_add_leaf",)

    def __init__(self, add_leaf: AddLeaf) -> None:
        self._add_leaf = add_leaf

    def _leaf(self, tag: str, path: TreePath, array: np.ndarray[Any, Any]) -> Spec:
        return [tag, self._add_leaf(path, array)]

    def node(self, value: object, path: TreePath, parents: set[int], depth: int) -> Spec:
        # depth counts containers and state_dict() objects (an object adds no path key).
        if depth > MAX_DEPTH:
            raise TypeError(f"tree deeper than {MAX_DEPTH} levels at {format_path(path)}")
        # numpy first: np.float64 is also a float, np.bool_ is not a bool.
        if isinstance(value, np.ndarray):
            _check_dtype(value.dtype, path)
            return self._leaf("a", path, value)
        if isinstance(value, np.generic):
            _check_dtype(value.dtype, path)
            return self._leaf("g", path, np.asarray(value))
        if value is None:
            return ["n"]
        if isinstance(value, bool):
            return ["b", value]
        if isinstance(value, int):
            if _INT64_MIN <= value < _UINT64_END:
                return ["i", int(value)]
            return ["I", _bigint_digits(value, path)]
        if isinstance(value, float):
            return ["f", float(value)]
        if isinstance(value, complex):
            return ["c", value.real, value.imag]
        if isinstance(value, str):
            return ["s", _check_text(str(value), path, "string")]
        if isinstance(value, bytes):
            return self._leaf("y", path, np.frombuffer(value, np.uint8))
        if isinstance(value, dict | list | tuple):
            if id(value) in parents:
                raise TypeError(f"cannot save a tree that contains itself, at {format_path(path)}")
            parents = parents | {id(value)}
            if isinstance(value, dict):
                items = []
                for key, child in value.items():
                    items.append(
                        [_check_key(key, path), self.node(child, (*path, key), parents, depth + 1)]
                    )
                return ["d", items]
            children = [
                self.node(child, (*path, i), parents, depth + 1) for i, child in enumerate(value)
            ]
            return ["t" if isinstance(value, tuple) else "l", children]
        if isinstance(value, SupportsStateDict):
            if id(value) in parents:
                raise TypeError(
                    f"cannot save a tree that contains itself, at {format_path(path)} "
                    f"({type(value).__name__}.state_dict() returns an object on the way to it)"
                )
            state = value.state_dict()
            return ["o", self.node(state, path, parents | {id(value)}, depth + 1)]
        raise TypeError(
            f"cannot save {type(value).__name__} at {format_path(path)}: leaves must be numpy "
            "arrays, numbers, str, bytes or None, or objects with state_dict()/load_state_dict()"
        )


def _check_key(key: object, path: TreePath) -> Key:
    if isinstance(key, str):
        return _check_text(key, path, "dict key")
    if isinstance(key, int) and not isinstance(key, bool) and _INT64_MIN <= key < _UINT64_END:
        return int(key)
    raise TypeError(
        f"cannot save dict key {key!r} ({type(key).__name__}) at {format_path(path)}: keys "
        f"must be str or int in [-2**63, 2**64)"
    )


def _check_text(text: str, path: TreePath, what: str) -> str:
    # msgpack stores UTF-8; a lone surrogate (os.fsdecode's escapes) has no UTF-8 form.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"cannot save {what} {text!r} at {format_path(path)}: it is not valid Unicode "
            f"({exc.reason}); encode it to bytes first"
        ) from None
    return text


def _bigint_digits(value: int, path: TreePath) -> str:
    # The reader's limit is fixed, whatever sys.set_int_max_str_digits() says here.
    try:
        digits = str(int(value))
    except ValueError:  # over sys.get_int_max_str_digits() digits
        digits = ""
    if not _BIGINT_DIGITS.fullmatch(digits):
        raise TypeError(
            f"cannot save an int of more than {_MAX_BIGINT_DIGITS} digits at "
            f"{format_path(path)}; store it as bytes"
        )
    return digits


def _check_dtype(dtype: np.dtype[Any], path: TreePath) -> None:
    if dtype.hasobject:
        raise TypeError(
            f"cannot save an object array at {format_path(path)}: checkpoints never pickle; "
            "convert it to a numeric, string or bytes dtype"
        )
    if dtype.fields is not None:
        try:
            dtype.descr  # noqa: B018 - the header stores it; numpy refuses some layouts
        except ValueError as exc:
            raise TypeError(
                f"cannot save the structured dtype at {format_path(path)}: {exc}; "
                "reorder its fields by offset"
            ) from None


# -- rebuilding ------------------------------------------------------------------------------


def _bad(source: str, path: TreePath, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(source, f"invalid tree at {format_path(path)}: {what}")


def iter_array_refs(spec: object, source: str) -> Iterator[tuple[TreePath, str, int]]:
    """Yield ``(path, tag, index)`` for every array reference in a spec, validating it."""
    stack: list[tuple[object, TreePath, int]] = [(spec, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(source, path, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise _bad(source, path, "malformed node")
        tag, args = node[0], node[1:]
        if tag in ("a", "g", "y"):
            if len(args) != 1 or type(args[0]) is not int:
                raise _bad(source, path, "malformed array reference")
            yield path, tag, args[0]
        elif tag == "d":
            if len(args) != 1 or not isinstance(args[0], list):
                raise _bad(source, path, "malformed dict")
            pending = []
            for item in args[0]:
                if not isinstance(item, list) or len(item) != 2:
                    raise _bad(source, path, "malformed dict item")
                key, child = item
                if isinstance(key, bool) or not isinstance(key, str | int):
                    raise _bad(source, path, f"dict key of type {type(key).__name__}")
                pending.append((child, (*path, key), depth + 1))
            stack.extend(reversed(pending))
        elif tag in ("l", "t"):
            if len(args) != 1 or not isinstance(args[0], list):
                raise _bad(source, path, "malformed sequence")
            stack.extend(reversed([(c, (*path, i), depth + 1) for i, c in enumerate(args[0])]))
        elif tag == "o":
            if len(args) != 1:
                raise _bad(source, path, "malformed object")
            stack.append((args[0], path, depth + 1))
        elif not _scalar_ok(tag, args):
            raise _bad(source, path, f"unknown or malformed leaf {tag!r}")


def _scalar_ok(tag: str, args: list[Any]) -> bool:
    match tag, args:
        case "n", []:
            return True
        case "b", [bool()]:
            return True
        case "i", [int()]:
            return not isinstance(args[0], bool)
        case "I", [str() as digits]:
            return _BIGINT_DIGITS.fullmatch(digits) is not None
        case "f", [float()]:
            return True
        case "c", [float(), float()]:
            return True
        case "s", [str()]:
            return True
    return False


def match_into(spec: Spec, into: StateTree, source: str) -> dict[int, np.ndarray[Any, Any]]:
    """Check that ``into`` has the checkpoint's structure; return the arrays to fill in place.

    Only writable C-contiguous arrays of the same dtype and shape are filled in place; other
    array leaves of ``into`` are replaced (or copied into) when the tree is rebuilt.

    Raises:
        ValueError: the structures differ; the message names the path and the difference.
    """
    targets: dict[int, np.ndarray[Any, Any]] = {}
    _match(spec, into, (), targets, source)
    return targets


def _match(
    node: Spec,
    live: object,
    path: TreePath,
    targets: dict[int, np.ndarray[Any, Any]],
    source: str,
) -> None:
    tag = node[0]
    where = format_path(path)
    if tag == "o":
        if not isinstance(live, SupportsStateDict):
            raise ValueError(
                f"{source}: at {where} the checkpoint holds a state_dict() object "
                f"but into= holds {type(live).__name__}"
            )
        _match(node[1], live.state_dict(), path, targets, source)
    elif tag == "d":
        if not isinstance(live, dict):
            raise ValueError(
                f"{source}: at {where} the checkpoint holds a dict "
                f"but into= holds {type(live).__name__}"
            )
        saved_keys = [key for key, _ in node[1]]
        missing = [k for k in saved_keys if k not in live]
        saved = set(saved_keys)
        unexpected = [k for k in live if k not in saved]
        if missing or unexpected:
            raise ValueError(
                f"{source}: at {where} keys differ from into=: missing from into= "
                f"{missing}, not in the checkpoint {unexpected}"
            )
        for key, child in node[1]:
            _match(child, live[key], (*path, key), targets, source)
    elif tag in ("l", "t"):
        if not isinstance(live, list | tuple) or len(live) != len(node[1]):
            raise ValueError(
                f"{source}: at {where} the checkpoint holds a sequence of "
                f"{len(node[1])} items but into= holds {_describe(live)}"
            )
        for i, child in enumerate(node[1]):
            _match(child, live[i], (*path, i), targets, source)
    elif tag == "a":
        if not isinstance(live, np.ndarray):
            raise ValueError(
                f"{source}: at {where} the checkpoint holds an array "
                f"but into= holds {type(live).__name__}"
            )
        targets[node[1]] = live


def _describe(value: object) -> str:
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


def check_into_array(
    index: int,
    live: np.ndarray[Any, Any],
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    path: str,
    source: str,
) -> bool:
    """Return whether array ``index`` can be read straight into ``live``.

    Raises:
        ValueError: ``live`` has another dtype or shape than the saved array.
    """
    if live.dtype != dtype or live.shape != shape:
        raise ValueError(
            f"{source}: array {index} at {path} is {dtype}{list(shape)} in the checkpoint but "
            f"{live.dtype}{list(live.shape)} in into=; pass into=None to get fresh arrays"
        )
    return bool(live.flags.writeable and live.flags.c_contiguous)


def build(spec: Spec, arrays: Sequence[np.ndarray[Any, Any]], into: StateTree = None) -> StateTree:
    """Rebuild the tree from a validated spec and its arrays.

    With ``into``, dicts and lists of ``into`` are updated in place, arrays that were not
    read in place are copied into, and ``load_state_dict`` is called on objects; the
    returned tree is ``into`` itself wherever ``into`` could be updated.
    """
    return _build(spec, arrays, into, into is not None)


def _build(node: Spec, arrays: Sequence[np.ndarray[Any, Any]], live: Any, fill: bool) -> Any:
    tag = node[0]
    if tag == "a":
        array = arrays[node[1]]
        if fill and isinstance(live, np.ndarray) and live is not array and live.flags.writeable:
            np.copyto(live, array)
            return live
        return array
    if tag == "g":
        return arrays[node[1]][()]
    if tag == "y":
        return arrays[node[1]].tobytes()
    if tag == "n":
        return None
    if tag in ("b", "i", "f", "s"):
        return node[1]
    if tag == "I":
        return int(node[1])
    if tag == "c":
        return complex(node[1], node[2])
    if tag == "d":
        if fill:
            for key, child in node[1]:
                live[key] = _build(child, arrays, live[key], fill)
            return live
        return {key: _build(child, arrays, None, fill) for key, child in node[1]}
    if tag in ("l", "t"):
        children = node[1]
        if fill and isinstance(live, list) and tag == "l":
            live[:] = [_build(c, arrays, live[i], fill) for i, c in enumerate(children)]
            return live
        items = [_build(c, arrays, live[i] if fill else None, fill) for i, c in enumerate(children)]
        return tuple(items) if tag == "t" else items
    # "o": the object's state is rebuilt (in place where possible) and handed to it.
    if fill:
        live.load_state_dict(_build(node[1], arrays, live.state_dict(), fill))
        return live
    return _build(node[1], arrays, None, fill)
