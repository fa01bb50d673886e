"""PyTorch leaves: a CPU tensor as a numpy view of its data, and a numpy array as a tensor.

Owns the map between torch's dtypes and numpy's (bfloat16 and float8 through ml_dtypes).
Saving never imports torch: a tensor exists only if its owner imported torch already.
Restoring a tensor leaf imports it by its fixed name. Knows nothing of files or snapshots.
"""

from __future__ import annotations

import functools
import sys
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import numpy as np

from ._dtypes import extension_dtype, extension_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "fill_tensor",
    "is_tensor",
    "is_torch_generator",
    "tensor_stand_in",
    "tensor_to_numpy",
    "to_tensor",
]

# torch dtypes numpy has, by the name both give them (numpy's ``dtype.name``).
_SHARED_DTYPES: Final = frozenset(
    {
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)

# torch dtypes numpy lacks and ml_dtypes has, under the same name in both, with the integer
# dtype of the same size that carries their bits across (torch.from_numpy and .numpy() know
# only numpy's own dtypes).
_THROUGH_INTEGERS: Final = MappingProxyType(
    {
        "bfloat16": "int16",
        "float8_e4m3fn": "uint8",
        "float8_e4m3fnuz": "uint8",
        "float8_e5m2": "uint8",
        "float8_e5m2fnuz": "uint8",
        "float8_e8m0fnu": "uint8",
    }
)


def _loaded() -> bool:
    # Only the owner of a tensor imports torch; a numpy-only program never pays for it.
    return sys.modules.get("torch") is not None


def is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a ``torch.Tensor`` (False without importing torch)."""
    if not _loaded():
        return False
    import torch

    return isinstance(value, torch.Tensor)


def is_torch_generator(value: object) -> TypeGuard[torch.Generator]:
    """Whether ``value`` is a ``torch.Generator`` (False without importing torch)."""
    if not _loaded():
        return False
    import torch

    return isinstance(value, torch.Generator)


@functools.cache
def _torch_extensions() -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """ml_dtypes name -> (torch's dtype of that name, the integer dtype its bits travel as)."""
    import torch

    table = {}
    for name, integer in _THROUGH_INTEGERS.items():
        dtype = getattr(torch, name, None)  # a fixed name; older torch versions lack some
        if isinstance(dtype, torch.dtype):
            table[name] = (dtype, getattr(torch, integer))
    return table


@functools.cache
def _extension_names() -> dict[torch.dtype, str]:
    return {dtype: name for name, (dtype, _integer) in _torch_extensions().items()}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any] | None:
    """numpy's dtype for a torch dtype; None when there is none (or ml_dtypes is missing)."""
    name = _extension_names().get(dtype)
    if name is not None:
        return extension_dtype(name)
    name = str(dtype).removeprefix("torch.")
    return np.dtype(name) if name in _SHARED_DTYPES else None


def tensor_to_numpy(tensor: torch.Tensor, path: str) -> np.ndarray[Any, Any]:
    """Return a numpy view of a CPU tensor's data, without copying (``requires_grad`` too).

    Raises:
        TypeError: the tensor is not on the CPU (move it with ``.cpu()``; copying device
            memory belongs to the snapshot and is not built yet), not strided (sparse), or
            of a dtype no numpy dtype holds; bfloat16 and float8 need ml_dtypes.
    """
    import torch

    data = tensor.detach()
    if data.device.type != "cpu":
        raise TypeError(
            f"cannot save the {data.device.type} tensor at {path}: asyncckpt saves CPU "
            "tensors only for now; move it with .cpu() first (docs/FRAMEWORKS.md)"
        )
    if data.layout != torch.strided:
        raise TypeError(
            f"cannot save the {data.layout} tensor at {path}: only strided tensors are "
            "saved; convert it with .to_dense()"
        )
    data = data.resolve_conj().resolve_neg()
    name = _extension_names().get(data.dtype)
    if name is not None:
        dtype = extension_dtype(name)
        if dtype is None:
            raise TypeError(
                f"cannot save the {name} tensor at {path}: numpy holds {name} only through "
                "the ml_dtypes package: pip install ml_dtypes"
            )
        _dtype, integer = _torch_extensions()[name]
        return data.view(integer).numpy().view(dtype)
    if _numpy_dtype(data.dtype) is None:
        raise TypeError(
            f"cannot save the {data.dtype} tensor at {path}: no numpy dtype holds it; "
            "convert it with .to() to one that does"
        )
    return data.numpy()


def _writable_native(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # torch.from_numpy warns on read-only arrays (mapped files) and refuses a foreign byte
    # order; arrays read from a file into fresh memory are neither, and are shared as is.
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array if array.flags.writeable else array.copy()


def _from_numpy(array: np.ndarray[Any, Any]) -> torch.Tensor | None:
    """The tensor sharing ``array``'s memory (or a copy's); None if torch has no such dtype."""
    import torch

    name = extension_name(array.dtype)
    if name is not None:
        if name not in _torch_extensions():
            return None
        dtype, _integer = _torch_extensions()[name]
        bits = _writable_native(array).view(np.dtype(_THROUGH_INTEGERS[name]))
        return torch.from_numpy(bits).view(dtype)
    if array.dtype.name not in _SHARED_DTYPES:
        return None
    return torch.from_numpy(_writable_native(array))


def to_tensor(array: np.ndarray[Any, Any]) -> Any:
    """Return ``array`` as a CPU tensor; ``array`` itself when torch is not installed or has
    no such dtype (a tensor leaf of a checkpoint read without torch comes back as numpy)."""
    try:
        import torch  # noqa: F401 - whether it can be imported is the question
    except ImportError:
        return array
    tensor = _from_numpy(array)
    return array if tensor is None else tensor


def tensor_stand_in(tensor: torch.Tensor, path: str, source: str) -> np.ndarray[Any, Any]:
    """Return a read-only, memory-less numpy array of ``tensor``'s dtype and shape.

    It lets a tensor in ``into=`` be checked against the checkpoint like a numpy array
    (same checks, same messages) while its data is filled by ``fill_tensor``.

    Raises:
        ValueError: no numpy dtype holds the tensor's dtype.
    """
    dtype = _numpy_dtype(tensor.dtype)
    if dtype is None:
        raise ValueError(
            f"{source}: at {path} into= holds a {tensor.dtype} tensor, which a checkpoint "
            "cannot hold (bfloat16 and float8 need ml_dtypes: pip install ml_dtypes)"
        )
    return np.broadcast_to(np.empty((), dtype), tuple(tensor.shape))


def fill_tensor(live: torch.Tensor, array: np.ndarray[Any, Any]) -> Any:
    """Copy ``array`` into ``live`` (any device) if they agree in dtype and shape, and return
    it; otherwise return ``array`` as a new tensor."""
    import torch

    # numpy reads a None dtype as float64: compare only with a dtype numpy has.
    expected = _numpy_dtype(live.dtype)
    if expected is not None and expected == array.dtype and tuple(live.shape) == array.shape:
        source = _from_numpy(array)
        if source is not None:
            # copy_ under no_grad fills parameters too, and bumps the tensor's version as
            # autograd expects of an in-place change.
            with torch.no_grad():
                live.copy_(source)
            return live
    return to_tensor(array)
