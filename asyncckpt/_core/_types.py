"""Type aliases and protocols shared by every layer; imports nothing from the package."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import Buffer as Buffer  # collections.abc.Buffer is 3.12+

__all__ = ["MaybeAwaitable", "StateTree", "SupportsStateDict"]

T = TypeVar("T")

MaybeAwaitable: TypeAlias = T | Awaitable[T]
"""What a hook or listener method returns: a value, or an awaitable of it."""

StateTree: TypeAlias = Any
"""A tree of dicts (str or int keys), lists and tuples (also other Mappings, dataclasses and
namedtuples) whose leaves are numpy arrays and scalars (ml_dtypes' dtypes included), torch
tensors, jax arrays, objects with ``__array__``, bool, int, float, complex, str, bytes or
None; or objects with ``state_dict()`` / ``load_state_dict()`` and random generators (numpy,
torch, ``random.Random``), saved through their state (docs/FRAMEWORKS.md).

Spelled as ``Any`` on purpose: a recursive union would make users cast every access into a
restored tree, and the tree is validated at run time (``TypeError`` naming the bad leaf).
"""


@runtime_checkable
class SupportsStateDict(Protocol):
    """An object whose state is saved through ``state_dict()`` and restored through
    ``load_state_dict()`` (PyTorch modules and optimizers, resumable iterators)."""

    def state_dict(self) -> Any:
        """Return the object's state as a tree."""

    def load_state_dict(self, state_dict: Any, /) -> Any:
        """Replace the object's state with a tree that ``state_dict()`` returned."""
