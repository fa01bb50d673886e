"""The spec of a tree: flatten a tree into it plus array leaves, and validate a read one.

Owns what a tree may contain and how it is encoded as plain msgpack-ready values. Knows
nothing of files, headers or scheduling; framework leaves are the framework modules' part.

A spec node is a list whose first item is a tag:

    ["n"]  None               ["b", bool]          ["i", int]        ["I", "decimal"] (>64 bits)
    ["f", float]              ["c", re, im]        ["s", str]
    ["a", k]  array k         ["g", k]  numpy scalar stored as 0-d array k
    ["y", k]  bytes stored as uint8 array k
    ["T", k]  torch.Tensor stored as array k       ["J", k]  jax.Array stored as array k
    ["d", [[key, node], ...]] dict (str or int keys, order kept); also Mappings, dataclasses
    ["l", [node, ...]]        ["t", [node, ...]]   list, tuple (namedtuples too)
    ["o", node]               an object saved through its state (state_dict(), generators)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

import numpy as np

from .._core._errors import CheckpointFormatError
from ._containers import field_items
from ._dtypes import extension_name
from ._jax import is_jax_array, jax_to_numpy
from ._objects import state_access
from ._torch import DeviceTensor, is_tensor, tensor_leaf

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from .._core._types import StateTree

__all__ = [
    "ARRAY_TAGS",
    "MAX_DEPTH",
    "AddDeviceLeaf",
    "AddLeaf",
    "ArrayLeaf",
    "DeviceLeaves",
    "Key",
    "Spec",
    "TreePath",
    "byte_view",
    "flatten",
    "format_path",
    "iter_array_refs",
]

MAX_DEPTH: Final = 200
"""Deepest nesting saved or loaded; deeper trees are refused before Python's recursion limit.

Every dict, list, tuple, Mapping, dataclass and object saved through its state on the way
from the root counts one level.
"""

ARRAY_TAGS: Final = frozenset({"a", "g", "y", "T", "J"})
"""The tags whose node refers to an array of the header: ``[tag, index]``."""

_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64
_MAX_BIGINT_DIGITS: Final = 4300  # Python's own int/str conversion limit
_BIGINT_DIGITS: Final = re.compile(rf"-?[0-9]{{1,{_MAX_BIGINT_DIGITS}}}")
_NONE: Final[frozenset[str]] = frozenset()
_BUILTIN: Final = 1  # dtype.isbuiltin of numpy's plain dtypes (float32, not '>f8' or 'S3')

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
        # thousands of small arrays; it refuses datetimes, ml_dtypes' dtypes and empty
        # multi-dimensional arrays.
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
"""Receives each array leaf (and bytes, numpy scalars, CPU tensors and jax arrays, as numpy
arrays) of a tree being flattened; returns the index the spec refers to it by. Arrays that
view memory someone else may change must be copied by the receiver before it returns."""

AddDeviceLeaf: TypeAlias = "Callable[[TreePath, DeviceTensor], int]"
"""Receives each tensor in device memory, as ``AddLeaf`` receives arrays; the receiver
copies it off its device."""


class DeviceLeaves(NamedTuple):
    """Where ``flatten`` hands tensors that live on a device: the device types (``"cuda"``)
    whose tensors the receiver copies, and the receiver. Tensors on other devices are
    refused (CPU tensors go to ``AddLeaf`` unless ``"cpu"`` is listed)."""

    types: frozenset[str]
    add: AddDeviceLeaf


def flatten(tree: StateTree, add_leaf: AddLeaf, devices: DeviceLeaves | None = None) -> Spec:
    """Return the spec of ``tree``, handing each array leaf to ``add_leaf`` in order, and
    each tensor on a device of ``devices.types`` to ``devices.add`` (in the same order).

    Raises:
        TypeError: a leaf or key cannot be saved; the message names its path.
    """
    return _Flattener(add_leaf, devices).node(tree, (), set(), 0)


class _Flattener:
    __slots__ = ("_add_leaf", "_devices")

    def __init__(self, add_leaf: AddLeaf, devices: DeviceLeaves | None) -> None:
        self._add_leaf = add_leaf
        self._devices = devices

    def _leaf(self, tag: str, path: TreePath, array: np.ndarray[Any, Any]) -> Spec:
        return [tag, self._add_leaf(path, array)]

    def node(self, value: object, path: TreePath, parents: set[int], depth: int) -> Spec:
        # depth counts containers and objects (an object adds no path key).
        if depth > MAX_DEPTH:
            raise TypeError(f"tree deeper than {MAX_DEPTH} levels at {format_path(path)}")
        # numpy first: np.float64 is also a float, np.bool_ is not a bool.
        if type(value) is np.ndarray:
            _check_dtype(value.dtype, path)
            return self._leaf("a", path, value)
        if isinstance(value, np.ndarray):
            return self._leaf("a", path, _plain_array(value, path))
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
        if isinstance(value, dict):
            return self._dict(value, value.items(), path, parents, depth)
        if isinstance(value, list | tuple):
            parents = _enter(value, path, parents)
            children = [
                self.node(child, (*path, i), parents, depth + 1) for i, child in enumerate(value)
            ]
            return ["t" if isinstance(value, tuple) else "l", children]
        return self._other(value, path, parents, depth)

    def _dict(
        self,
        value: object,
        items: Iterable[tuple[Any, Any]],
        path: TreePath,
        parents: set[int],
        depth: int,
    ) -> Spec:
        parents = _enter(value, path, parents)
        nodes = []
        for key, child in items:
            nodes.append(
                [_check_key(key, path), self.node(child, (*path, key), parents, depth + 1)]
            )
        return ["d", nodes]

    def _other(self, value: object, path: TreePath, parents: set[int], depth: int) -> Spec:
        """Flatten what is neither numpy nor a builtin: framework arrays, objects saved
        through their state, Mappings and dataclasses, and objects with ``__array__``."""
        if is_tensor(value):
            devices = self._devices
            leaf = tensor_leaf(value, format_path(path), devices.types if devices else _NONE)
            _check_dtype(leaf.dtype, path)
            if isinstance(leaf, DeviceTensor):
                assert devices is not None  # a tensor is a DeviceTensor on a listed device only
                return ["T", devices.add(path, leaf)]
            return self._leaf("T", path, leaf)
        if is_jax_array(value):
            array = jax_to_numpy(value, format_path(path))
            _check_dtype(array.dtype, path)
            return self._leaf("J", path, array)
        access = state_access(value)
        if access is not None:
            if id(value) in parents:
                raise TypeError(
                    f"cannot save a tree that contains itself, at {format_path(path)} "
                    f"({type(value).__name__}'s state holds an object on the way to it)"
                )
            state = access.get(value)
            return ["o", self.node(state, path, parents | {id(value)}, depth + 1)]
        items = field_items(value)
        if items is not None:
            return self._dict(value, items, path, parents, depth)
        if hasattr(value, "__array__") and not isinstance(value, type):
            array = np.asarray(value)
            _check_dtype(array.dtype, path)
            return self._leaf("a", path, array)
        raise TypeError(
            f"cannot save {type(value).__name__} at {format_path(path)}: leaves must be numpy "
            "arrays, torch tensors, jax arrays, numbers, str, bytes or None, in dicts, lists, "
            "tuples, Mappings or dataclasses; or objects with state_dict()/load_state_dict()"
        )


def _enter(container: object, path: TreePath, parents: set[int]) -> set[int]:
    """Return ``parents`` with ``container``, refusing a container already on the way."""
    if id(container) in parents:
        raise TypeError(f"cannot save a tree that contains itself, at {format_path(path)}")
    return parents | {id(container)}


def _plain_array(array: np.ndarray[Any, Any], path: TreePath) -> np.ndarray[Any, Any]:
    """The plain ndarray of a subclass's data (np.matrix, np.memmap ...); masks are refused.

    Raises:
        TypeError: a masked array (its mask would be lost).
    """
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(
            f"cannot save the masked array at {format_path(path)}: its mask would be lost; "
            "save its .data and np.ma.getmaskarray() as two arrays"
        )
    _check_dtype(array.dtype, path)
    return array.view(np.ndarray)


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
    # Plain numeric dtypes stop here: two attribute reads per array, as for numpy alone.
    if dtype.isbuiltin != _BUILTIN:
        _check_unusual_dtype(dtype, path)


def _check_unusual_dtype(dtype: np.dtype[Any], path: TreePath) -> None:
    """Check a dtype that is structured, flexible, byte-swapped or another package's."""
    if dtype.fields is not None:
        try:
            dtype.descr  # noqa: B018 - the header stores it; numpy refuses some layouts
        except ValueError as exc:
            raise TypeError(
                f"cannot save the structured dtype at {format_path(path)}: {exc}; "
                "reorder its fields by offset"
            ) from None
        for field_dtype, *_offset in dtype.fields.values():
            if field_dtype.base.isbuiltin != _BUILTIN:
                _check_field_dtype(field_dtype.base, path)
    elif dtype.isbuiltin == 2 and extension_name(dtype) is None:  # another package's type
        raise TypeError(
            f"cannot save the {dtype} array at {format_path(path)}: a checkpoint holds "
            "numpy's dtypes and the ml_dtypes ones docs/FORMAT.md lists"
        )


def _check_field_dtype(dtype: np.dtype[Any], path: TreePath) -> None:
    # A structured dtype travels as numpy's descr, where an ml_dtypes field is raw void.
    if dtype.fields is None and extension_name(dtype) is not None:
        raise TypeError(
            f"cannot save the structured dtype at {format_path(path)}: its {dtype} field "
            "would lose its type; save that field as an array of its own"
        )
    _check_unusual_dtype(dtype, path)


# -- validating a spec read from a file ------------------------------------------------------


def _bad(source: str, path: TreePath, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(source, f"invalid tree at {format_path(path)}: {what}")


def iter_array_refs(spec: object, source: str) -> Iterator[tuple[TreePath, str, int]]:
    """Yield ``(path, tag, index)`` for every array reference in a spec, validating it.

    Raises:
        CheckpointFormatError: the spec is malformed; the message names the tree path.
    """
    stack: list[tuple[object, TreePath, int]] = [(spec, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(source, path, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise _bad(source, path, "malformed node")
        tag, args = node[0], node[1:]
        if tag in ARRAY_TAGS:
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
