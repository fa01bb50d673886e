"""PyTorch leaves: a CPU tensor as a numpy view of its data, a CUDA tensor as a
``DeviceTensor``, and a numpy array as a tensor.

Owns the map between torch's dtypes and numpy's (bfloat16 and float8 through ml_dtypes), and
the torch calls a snapshot makes to copy tensors off a CUDA device (``CudaCopier``,
``host_array``): only this module may import torch. Which tensors are copied, into which
pooled buffers, and when anyone waits for them, is the snapshot's. Saving never imports
torch: a tensor exists only if its owner imported torch already. Restoring a tensor leaf
imports it by its fixed name. Knows nothing of files or snapshots.
"""

from __future__ import annotations

import functools
import math
import sys
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeGuard

import numpy as np

from ._dtypes import extension_dtype, extension_name

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

__all__ = [
    "CudaCopier",
    "DeviceTensor",
    "distributed_store",
    "fill_tensor",
    "host_array",
    "host_tensor",
    "is_tensor",
    "is_torch_generator",
    "tensor_leaf",
    "tensor_stand_in",
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
    return _shared_dtype(dtype)


def _shared_dtype(dtype: torch.dtype) -> np.dtype[Any] | None:
    name = str(dtype).removeprefix("torch.")
    return np.dtype(name) if name in _SHARED_DTYPES else None


class DeviceTensor(NamedTuple):
    """A tensor leaf in device memory, for the snapshot to copy off its device.

    ``tensor`` is detached, strided, its conjugate and negative views resolved; ``dtype`` is
    numpy's dtype for it (ml_dtypes' for bfloat16 and float8) and ``shape`` its shape: the
    array the copy becomes. A named tuple, as cheap to build as the tree's other leaves.
    """

    tensor: torch.Tensor
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


def tensor_leaf(
    tensor: torch.Tensor, path: str, device_types: frozenset[str]
) -> np.ndarray[Any, Any] | DeviceTensor:
    """Return a numpy view of a CPU tensor's data, without copying (``requires_grad`` too);
    a tensor on a device of ``device_types`` (those the snapshot copies off) as a
    ``DeviceTensor``.

    Raises:
        TypeError: the tensor is on another device (the message says what to do), not
            strided (sparse), or of a dtype no numpy dtype holds; bfloat16 and float8 need
            ml_dtypes.
    """
    import torch

    data = tensor.detach()
    device = data.device.type
    on_device = device in device_types
    if device != "cpu" and not on_device:
        raise TypeError(_device_advice(device, path, device_types))
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
    else:
        dtype = _shared_dtype(data.dtype)
        if dtype is None:
            raise TypeError(
                f"cannot save the {data.dtype} tensor at {path}: no numpy dtype holds it; "
                "convert it with .to() to one that does"
            )
    if on_device:
        # Its bits are copied as they are, into host memory viewed as the same torch dtype:
        # no dtype conversion, so bfloat16 and float8 need no integer stand-in here.
        return DeviceTensor(data, dtype, tuple(data.shape))
    if name is not None:
        _dtype, integer = _torch_extensions()[name]
        return data.view(integer).numpy().view(dtype)
    return data.numpy()


def _device_advice(device: str, path: str, device_types: frozenset[str]) -> str:
    taken = " and ".join(sorted({"cpu", *device_types}))
    meta = (
        "a meta tensor holds no data: materialize it first (module.to_empty(device=...), "
        "then load or initialize it); "
        if device == "meta"
        else ""
    )
    return (
        f"cannot save the {device} tensor at {path}: {meta}a snapshot takes {taken} tensors "
        "only; move others with .cpu() first (docs/FRAMEWORKS.md)"
    )


# -- copying tensors off a CUDA device --------------------------------------------------------


def host_array(
    shape: tuple[int, ...], dtype: np.dtype[Any], *, pinned: bool
) -> np.ndarray[Any, Any]:
    """Return an uninitialised array of ``dtype`` and ``shape`` over a uint8 CPU tensor, in
    pinned (page-locked) memory if ``pinned``; blocking, for a worker thread.

    The array's chain of bases ends in that tensor, which keeps the memory alive and which
    ``host_tensor`` finds again to copy into: a device copies into pinned memory with
    direct memory access, asynchronously, where pageable memory would be staged and would
    block the host.

    Raises:
        RuntimeError: ``pinned`` and torch sees no CUDA device (pinned memory needs one).
    """
    import torch

    if pinned and not torch.cuda.is_available():
        # Only a CUDA tensor asks for pinned memory, and a torch without CUDA holds none.
        raise RuntimeError(
            "pinned host memory needs a CUDA device, and torch sees none "
            "(torch.cuda.is_available() is False)"
        )
    host = torch.empty(dtype.itemsize * math.prod(shape), dtype=torch.uint8, pin_memory=pinned)
    return host.numpy().view(dtype).reshape(shape)


def host_tensor(array: np.ndarray[Any, Any], like: torch.Tensor) -> torch.Tensor:
    """Return the tensor under an array ``host_array`` made, viewed as ``like``'s dtype and
    shape (so a copy into it moves bits, never converts them).

    It is the allocation itself, not a tensor made from the array's pointer: torch's pinned
    memory allocator then knows of the copies into it, and reuses its memory only once they
    are done, even when the snapshot drops the buffer first.
    """
    import torch

    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, torch.Tensor):
        raise TypeError("host_tensor() takes arrays that host_array() made")
    return base.view(like.dtype).view(like.shape)


class CudaCopier:
    """The torch calls behind a snapshot of CUDA tensors: one side stream per device, made on
    first use and reused, on which each snapshot's tensors are copied into pinned buffers.

    Owned by one snapshot pool (so its streams live as long as the pool's buffers).
    """

    __slots__ = ("_streams",)

    device_types: ClassVar[frozenset[str]] = frozenset({"cuda"})

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def pinned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """A pinned host array for a device to copy into (blocking: for a worker thread)."""
        return host_array(shape, dtype, pinned=True)

    def start(  # pragma: no cover - needs a CUDA device
        self, copies: Sequence[tuple[np.ndarray[Any, Any], DeviceTensor]]
    ) -> Callable[[], None]:
        """Enqueue a non-blocking copy of each tensor into its buffer (made by ``pinned``)
        and return the blocking wait for all of them (for a worker thread).

        Each device's copies read what its current stream was given before this call, and
        the work that stream is given afterwards waits for them.
        """
        by_device: dict[torch.device, list[tuple[np.ndarray[Any, Any], torch.Tensor]]] = {}
        for buffer, leaf in copies:
            by_device.setdefault(leaf.tensor.device, []).append((buffer, leaf.tensor))
        events = [self._copy_on_side_stream(device, pairs) for device, pairs in by_device.items()]
        return functools.partial(_synchronize, events)

    def _copy_on_side_stream(  # pragma: no cover - needs a CUDA device
        self, device: torch.device, pairs: list[tuple[np.ndarray[Any, Any], torch.Tensor]]
    ) -> torch.cuda.Event:
        import torch

        side = self._streams.get(device)
        if side is None:
            # Untyped in torch's annotations.
            side = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        current = torch.cuda.current_stream(device)
        # The copies must read what the training code has enqueued up to the snapshot (its
        # last optimizer step): the side stream starts after it.
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for buffer, tensor in pairs:
                host_tensor(buffer, tensor).copy_(tensor, non_blocking=True)
                # Made on the current stream, read on the side one: without this the caching
                # allocator could hand the memory of a tensor freed meanwhile (a temporary
                # resolve_conj made, or one the trainer drops) to new work before it is read.
                tensor.record_stream(side)
        # A blocking event: the worker thread that waits for it sleeps rather than spins.
        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        event.record(side)
        # Work the loop enqueues while the save waits for the copy (another task's in-place
        # update) must not overwrite a tensor before the copy has read it.
        current.wait_event(event)
        return event


def _synchronize(events: list[torch.cuda.Event]) -> None:  # pragma: no cover - needs CUDA
    for event in events:
        event.synchronize()


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


def distributed_store(timeout: float) -> tuple[int, int, Any]:
    """This process's rank and world size in ``torch.distributed``, and a ``TCPStore`` that
    rank 0 starts for the caller alone (blocking; every rank must call it at the same point,
    as any process group is made).

    A gloo group of its own carries the store's address from rank 0 to the others, once: the
    training group never carries anything. The store listens on ``MASTER_ADDR`` (else this
    host's name) at a free port.

    Raises:
        RuntimeError: torch.distributed is not available or not initialized.
    """
    import datetime
    import os
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "TorchDistributedCoordinator needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (or use "
            "asyncckpt.StorageCoordinator(rank, world_size) without torch)"
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    wait = datetime.timedelta(seconds=timeout)
    group = dist.new_group(backend="gloo", timeout=wait)
    address: list[Any] = [None, None]
    server = None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        server = dist.TCPStore(  # type: ignore[attr-defined]  # torch's stubs omit it
            host, 0, world_size, is_master=True, timeout=wait, wait_for_workers=False
        )
        address = [host, server.port]
    dist.broadcast_object_list(address, src=0, group=group)
    store = server or dist.TCPStore(  # type: ignore[attr-defined]
        address[0], address[1], world_size, is_master=False, timeout=wait
    )
    return rank, world_size, store
