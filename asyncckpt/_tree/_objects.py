"""Objects saved through their state: ``state_dict()`` objects and random generators.

Owns how each kind gives its state and takes it back: ``state_dict()`` /
``load_state_dict()`` (PyTorch modules, optimizers, schedulers, resumable iterators), numpy's
``Generator``, bit generators and ``RandomState``, ``torch.Generator`` and ``random.Random``.
A checkpoint stores only the state; restoring without ``into=`` returns it as a tree, since
nothing is ever constructed from what a file names. Knows nothing of files or snapshots.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._core._types import SupportsStateDict
from ._torch import is_torch_generator

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["StateAccess", "state_access"]


class StateAccess(NamedTuple):
    """How one kind of object gives its state (``get``) and takes it back (``load``)."""

    get: Callable[[Any], Any]
    load: Callable[[Any, Any], object]


def _state_dict(obj: SupportsStateDict) -> Any:
    return obj.state_dict()


def _load_state_dict(obj: SupportsStateDict, state: Any) -> None:
    obj.load_state_dict(state)


def _generator_state(generator: np.random.Generator) -> Any:
    return generator.bit_generator.state


def _load_generator_state(generator: np.random.Generator, state: Any) -> None:
    generator.bit_generator.state = state


def _bit_generator_state(bits: np.random.BitGenerator) -> Any:
    return bits.state


def _load_bit_generator_state(bits: np.random.BitGenerator, state: Any) -> None:
    bits.state = state


def _random_state(legacy: np.random.RandomState) -> Any:
    return legacy.get_state(legacy=False)


def _load_random_state(legacy: np.random.RandomState, state: Any) -> None:
    legacy.set_state(state)


def _torch_generator_state(generator: Any) -> Any:
    return generator.get_state()  # a uint8 CPU tensor, whatever the generator's device


def _load_torch_generator_state(generator: Any, state: Any) -> None:
    generator.set_state(state)


def _python_random_state(generator: random.Random) -> Any:
    return generator.getstate()


def _load_python_random_state(generator: random.Random, state: Any) -> None:
    generator.setstate(state)


_STATE_DICT = StateAccess(_state_dict, _load_state_dict)
_NUMPY_GENERATOR = StateAccess(_generator_state, _load_generator_state)
_BIT_GENERATOR = StateAccess(_bit_generator_state, _load_bit_generator_state)
_RANDOM_STATE = StateAccess(_random_state, _load_random_state)
_TORCH_GENERATOR = StateAccess(_torch_generator_state, _load_torch_generator_state)
_PYTHON_RANDOM = StateAccess(_python_random_state, _load_python_random_state)


def state_access(value: object) -> StateAccess | None:
    """Return how ``value`` gives and takes its state; None if it is not saved that way."""
    # state_dict() first: it is the object's own word on what its state is.
    if isinstance(value, SupportsStateDict):
        return _STATE_DICT
    if isinstance(value, np.random.Generator):
        return _NUMPY_GENERATOR
    if isinstance(value, np.random.BitGenerator):
        return _BIT_GENERATOR
    if isinstance(value, np.random.RandomState):
        return _RANDOM_STATE
    if is_torch_generator(value):
        return _TORCH_GENERATOR
    # SystemRandom reads the OS's entropy and has no state to save.
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):
        return _PYTHON_RANDOM
    return None
