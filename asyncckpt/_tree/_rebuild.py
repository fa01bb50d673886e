"""Restoring a tree: check ``into=`` against a checkpoint's spec, then rebuild the tree.

Owns what ``into=`` decides: which of its arrays are read into in place, which of its
containers, tensors and objects are updated, and which types the restored tree takes (into='s,
never a type a file names). Knows nothing of files: the caller reads the arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._containers import live_child, live_keys, rebuild_mapping, rebuild_tuple
from ._jax import is_jax_array, jax_stand_in, to_jax
from ._objects import state_access
from ._spec import format_path
from ._torch import fill_tensor, is_tensor, tensor_stand_in, to_tensor

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core._types import StateTree
    from ._spec import Spec, TreePath

__all__ = ["build", "check_into_array", "match_into"]


def match_into(
    spec: Spec, into: StateTree, source: str, root: TreePath = ()
) -> dict[int, np.ndarray[Any, Any]]:
    """Check that ``into`` has the checkpoint's structure; return the arrays to check and
    fill in place, by array index.

    ``root`` is where ``spec`` and ``into`` are in the whole tree (a subtree ``paths=``
    names), for the messages.

    Tensors and jax arrays of ``into`` are returned as read-only stand-ins of their dtype
    and shape: ``check_into_array`` checks them like numpy arrays, and the tree's rebuild
    fills the tensors (and replaces the immutable jax arrays). Objects saved through their
    state are not looked into: the rebuild gives them the checkpoint's state, matched
    against their current one where it fits (a fresh optimizer's state is still empty).

    Raises:
        ValueError: the structures differ; the message names the path and the difference.
    """
    targets: dict[int, np.ndarray[Any, Any]] = {}
    _match(spec, into, root, targets, source)
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
    if tag in ("a", "T", "J"):
        target = _array_target(live, where, source)
        if target is not None:
            targets[node[1]] = target
    elif tag == "o":
        if state_access(live) is None:
            raise ValueError(
                f"{source}: at {where} the checkpoint holds an object's state (state_dict() "
                f"or a random generator) but into= holds {type(live).__name__}"
            )
    elif tag == "d":
        keys = live_keys(live)
        if keys is None:
            raise ValueError(
                f"{source}: at {where} the checkpoint holds a dict "
                f"but into= holds {type(live).__name__}"
            )
        saved_keys = [key for key, _ in node[1]]
        present = set(keys)
        missing = [k for k in saved_keys if k not in present]
        saved = set(saved_keys)
        unexpected = [k for k in keys if k not in saved]
        if missing or unexpected:
            raise ValueError(
                f"{source}: at {where} keys differ from into=: missing from into= "
                f"{missing}, not in the checkpoint {unexpected}"
            )
        for key, child in node[1]:
            _match(child, live_child(live, key), (*path, key), targets, source)
    elif tag in ("l", "t"):
        if not isinstance(live, list | tuple) or len(live) != len(node[1]):
            raise ValueError(
                f"{source}: at {where} the checkpoint holds a sequence of "
                f"{len(node[1])} items but into= holds {_describe(live)}"
            )
        for i, child in enumerate(node[1]):
            _match(child, live[i], (*path, i), targets, source)


def _array_target(live: object, where: str, source: str) -> np.ndarray[Any, Any] | None:
    """The array to check an array leaf of ``into`` by: itself, a framework array's
    stand-in, or None for an ``__array__`` object (replaced by the checkpoint's array)."""
    if isinstance(live, np.ndarray):
        return live
    if is_tensor(live):
        return tensor_stand_in(live, where, source)
    if is_jax_array(live):
        return jax_stand_in(live)
    if hasattr(live, "__array__") and not isinstance(live, type):
        return None
    raise ValueError(
        f"{source}: at {where} the checkpoint holds an array but into= holds {type(live).__name__}"
    )


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
    """Rebuild the tree from a validated spec and its arrays (and ``into``, which passed
    ``match_into`` for this spec).

    With ``into``, the tree takes ``into``'s containers and leaves wherever they fit: its
    dicts, lists and other MutableMappings are updated in place, its tuples, namedtuples,
    Mappings and dataclasses rebuilt as their own types; its numpy arrays and torch
    tensors of the same dtype and shape are filled in place (others are replaced), its jax
    arrays replaced by jax arrays on the same devices; its objects get their rebuilt state
    (``load_state_dict``). Where ``into`` has nothing that fits, values come back as the
    checkpoint holds them: dicts, lists, tuples, numpy arrays, and torch tensors and jax
    arrays when torch or jax can be imported.
    """
    return _build(spec, arrays, into, True)


def _build(node: Spec, arrays: Sequence[np.ndarray[Any, Any]], live: Any, matched: bool) -> Any:
    # ``live`` is into='s counterpart of ``node``, None where there is none (a None in into=
    # has nothing to reuse either). ``matched``: match_into checked its structure, dtypes
    # and shapes; inside an object's state nothing was, and everything is checked here.
    tag = node[0]
    if tag == "a":
        array = arrays[node[1]]
        return array if live is None else _array_leaf(tag, array, live, matched)
    if tag == "T" or tag == "J":
        return _array_leaf(tag, arrays[node[1]], live, matched)
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
        return _build_dict(node[1], arrays, live, matched)
    if tag in ("l", "t"):
        return _build_sequence(tag, node[1], arrays, live, matched)
    # "o": the object's state is rebuilt against its current one, then handed to it.
    access = state_access(live) if live is not None else None
    if access is None:
        return _build(node[1], arrays, None, False)
    access.load(live, _build(node[1], arrays, access.get(live), False))
    return live


def _array_leaf(tag: str, array: np.ndarray[Any, Any], live: Any, matched: bool) -> Any:
    """An array leaf as ``into`` holds it (filled in place where dtype and shape agree), or
    as the checkpoint does when ``into`` holds no array there."""
    if isinstance(live, np.ndarray):
        if live is array:  # read straight into it
            return live
        if live.flags.writeable and (
            matched or (live.dtype == array.dtype and live.shape == array.shape)
        ):
            np.copyto(live, array)
            return live
        return array
    if is_tensor(live):
        return fill_tensor(live, array)
    if is_jax_array(live):
        return to_jax(array, like=live)
    if tag == "T":
        return to_tensor(array)
    if tag == "J":
        return to_jax(array)
    return array


def _build_dict(
    items: list[list[Any]], arrays: Sequence[np.ndarray[Any, Any]], live: Any, matched: bool
) -> Any:
    if live is None:
        return {key: _build(child, arrays, None, matched) for key, child in items}
    if matched and isinstance(live, dict):  # the common case: updated in place
        for key, child in items:
            live[key] = _build(child, arrays, live[key], matched)
        return live
    keys = live_keys(live)
    if keys is not None and len(keys) == len(items):
        present = set(keys)
        if all(key in present for key, _ in items):
            built = {
                key: _build(child, arrays, live_child(live, key), matched) for key, child in items
            }
            return rebuild_mapping(live, built)
    # A different structure (inside an object's state: a fresh optimizer has no state yet):
    # the checkpoint's dict, still filling what into= holds under the keys both have.
    present = set(keys) if keys is not None else set()
    return {
        key: _build(child, arrays, live_child(live, key) if key in present else None, matched)
        for key, child in items
    }


def _build_sequence(
    tag: str,
    children: list[Any],
    arrays: Sequence[np.ndarray[Any, Any]],
    live: Any,
    matched: bool,
) -> Any:
    if isinstance(live, list | tuple) and len(live) == len(children):
        items = [_build(child, arrays, live[i], matched) for i, child in enumerate(children)]
        if isinstance(live, list):
            live[:] = items
            return live
        return rebuild_tuple(live, items)
    items = [_build(child, arrays, None, matched) for child in children]
    return tuple(items) if tag == "t" else items
