"""Containers beyond dict, list and tuple: other Mappings, dataclasses, namedtuples.

Owns how they are read (a Mapping's items and a dataclass's fields, saved as a dict; a
namedtuple is a tuple) and how ``into=``'s own types are rebuilt around restored items. A
file never names a type, so without ``into=`` they come back as dicts and tuples. Knows
nothing of files or arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["field_items", "live_child", "live_keys", "rebuild_mapping", "rebuild_tuple"]


def _is_dataclass_instance(value: object) -> TypeGuard[DataclassInstance]:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def field_items(value: object) -> Iterable[tuple[Any, Any]] | None:
    """Return the items of a Mapping that is no dict, or a dataclass instance's fields (each
    as ``(name, value)``); None for anything else."""
    if isinstance(value, Mapping):
        return value.items()
    if _is_dataclass_instance(value):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return None


def live_keys(live: object) -> list[Any] | None:
    """Return the keys ``live`` offers a saved dict: a Mapping's keys, a dataclass's field
    names; None when it is neither."""
    if isinstance(live, Mapping):
        return list(live)
    if _is_dataclass_instance(live):
        return [f.name for f in dataclasses.fields(live)]
    return None


def live_child(live: Any, key: Any) -> Any:
    """Return the item of ``live`` (a Mapping or a dataclass) that ``key`` names."""
    return live[key] if isinstance(live, Mapping) else getattr(live, key)


def rebuild_mapping(live: Any, items: dict[Any, Any]) -> Any:
    """Return ``items`` (restored for ``live``'s keys) in ``live``'s own type.

    A dict or other MutableMapping is updated in place and returned; a dataclass is copied
    with ``dataclasses.replace`` (fields with ``init=False`` are then the dataclass's own
    business); another Mapping is ``type(live)(items)``, or a plain dict when its type
    cannot be built from one.
    """
    if isinstance(live, MutableMapping):
        for key, value in items.items():
            live[key] = value
        return live
    if not isinstance(live, Mapping):
        init = {f.name: items[f.name] for f in dataclasses.fields(live) if f.init}
        return dataclasses.replace(live, **init)
    mapping_type: Any = type(live)  # Mapping itself declares no constructor
    try:
        return mapping_type(items)
    except TypeError:
        return items  # a Mapping type with another constructor: as without into=


def rebuild_tuple(live: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """Return ``items`` as a tuple of ``live``'s type: a namedtuple through its ``_make``,
    another tuple subclass through its constructor (a plain tuple when that fails)."""
    if type(live) is tuple:
        return tuple(items)
    # A namedtuple's documented constructor from an iterable (the underscore only keeps it
    # clear of field names).
    make = getattr(type(live), "_make", None)
    if make is not None:
        rebuilt: tuple[Any, ...] = make(items)
        return rebuilt
    try:
        return type(live)(items)
    except TypeError:
        return tuple(items)
