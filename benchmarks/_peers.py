"""Peer libraries measured on the same state: each returns timing closures or a skip reason.

Every save ends with an fsync of the file it wrote, so "save" is comparable to asyncckpt's
durable time; every load materialises all arrays in memory.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

State = dict[str, np.ndarray[Any, Any]]
Pair = tuple["Callable[[], None]", "Callable[[], None]"]


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pickle(state: State, path: str) -> Pair:
    def save() -> None:
        with open(path, "wb") as file:
            pickle.dump(state, file, protocol=pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())

    def load() -> None:
        with open(path, "rb") as file:
            pickle.load(file)

    return save, load


def _savez(state: State, path: str) -> Pair:
    def save() -> None:
        with open(path, "wb") as file:
            np.savez(file, **state)  # type: ignore[arg-type]
            file.flush()
            os.fsync(file.fileno())

    def load() -> None:
        with np.load(path) as data:
            for key in data.files:
                data[key]

    return save, load


def _safetensors(state: State, path: str) -> Pair:
    st = importlib.import_module("safetensors.numpy")

    def save() -> None:
        st.save_file(state, path)
        _fsync_path(path)

    def load() -> None:
        st.load_file(path)

    return save, load


def _torch(state: State, path: str) -> Pair:
    torch = importlib.import_module("torch")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}  # same bytes, no copy

    def save() -> None:
        with open(path, "wb") as file:
            torch.save(tensors, file)
            file.flush()
            os.fsync(file.fileno())

    def load() -> None:
        torch.load(path, weights_only=True)

    return save, load


PEERS: dict[str, tuple[str | None, Callable[[State, str], Pair]]] = {
    "pickle": (None, _pickle),
    "np.savez": (None, _savez),
    "safetensors": ("safetensors.numpy", _safetensors),
    "torch.save": ("torch", _torch),
}


def available(module: str | None) -> str | None:
    """None when ``module`` imports, else the reason it does not."""
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


def async_peers_skipped() -> dict[str, str]:
    """orbax-checkpoint and torch.distributed.checkpoint.async_save: attempted only if importable.

    Neither is measured yet: when importable, the reason says so instead of a figure.
    """
    out: dict[str, str] = {}
    reason = available("orbax.checkpoint")
    out["orbax-checkpoint"] = (
        f"skipped: {reason} (needs jax; not installed for this run)"
        if reason
        else "skipped: importable, but no driver written yet"
    )
    reason = available("torch.distributed.checkpoint")
    if reason is None:
        dcp = importlib.import_module("torch.distributed.checkpoint")
        reason = None if hasattr(dcp, "async_save") else "torch has no dcp.async_save"
    out["torch.distributed.checkpoint.async_save"] = (
        f"skipped: {reason}"
        if reason
        else "skipped: importable, but needs an initialised process group; no driver written yet"
    )
    return out


def tensorboardx_scalars(logdir: str, count: int) -> tuple[float, float] | str:
    """(caller seconds per add_scalar, scalars/s written until flush) or a skip reason."""
    reason = available("tensorboardX")
    if reason:
        return f"skipped: {reason}"
    import time

    tbx = importlib.import_module("tensorboardX")
    writer = tbx.SummaryWriter(logdir=logdir, max_queue=10, flush_secs=120)
    try:
        start = time.perf_counter()
        for i in range(count):
            writer.add_scalar("loss", float(i), i)
        called = time.perf_counter() - start
        writer.flush()
        written = time.perf_counter() - start
    finally:
        writer.close()
    return called / count, count / written
