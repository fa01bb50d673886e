"""JAX leaves: a ``jax.Array`` as a numpy array of its data, and a numpy array as a jax one.

Saving never imports jax: a jax array exists only if its owner imported jax already.
Restoring a jax leaf imports it by its fixed name. Knows nothing of files or snapshots.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

if TYPE_CHECKING:
    import jax

__all__ = ["is_jax_array", "jax_stand_in", "jax_to_numpy", "to_jax"]


def is_jax_array(value: object) -> TypeGuard[jax.Array]:
    """Whether ``value`` is a ``jax.Array`` (False without importing jax)."""
    if sys.modules.get("jax") is None:
        return False
    import jax

    return isinstance(value, jax.Array)


def jax_to_numpy(value: jax.Array, where: str) -> np.ndarray[Any, Any]:
    """Return the array's data as numpy: a read-only view of jax's buffer when it is on the
    host (a transfer otherwise).

    The snapshot copies it like any array it does not own: holding the view while the
    checkpoint is written would keep the buffer alive, and jax then silently skips
    donating it to the next step (``donate_argnums``), costing memory and a copy there.

    Raises:
        TypeError: a typed PRNG key array (its dtype names an implementation, not bits).
    """
    import jax
    import jax.numpy as jnp

    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"cannot save the typed PRNG key at {where}: save jax.random.key_data(key) "
            "instead, and rebuild the key with jax.random.wrap_key_data after a restore"
        )
    return np.asarray(value)


def jax_stand_in(live: jax.Array) -> np.ndarray[Any, Any]:
    """Return a read-only, memory-less numpy array of ``live``'s dtype and shape, so that a
    jax array in ``into=`` is checked against the checkpoint like a numpy array."""
    return np.broadcast_to(np.empty((), np.dtype(live.dtype)), tuple(live.shape))


def to_jax(array: np.ndarray[Any, Any], like: Any = None) -> Any:
    """Return ``array`` as a jax array, on ``like``'s devices when ``like`` is a jax array of
    its dtype and shape; ``array`` itself when jax is not installed or cannot hold its dtype
    exactly (float64 without ``jax_enable_x64`` is never narrowed in silence)."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return array
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype:
        return array
    if (
        is_jax_array(like)
        and np.dtype(like.dtype) == array.dtype
        and tuple(like.shape) == array.shape
    ):
        return jax.device_put(array, like.sharding)
    return jnp.asarray(array)
