"""Peer libraries measured on the same state: each returns timing closures or a skip reason.

Synchronous peers (PEERS): every save ends with an fsync of the file it wrote, so "save" is
comparable to asyncckpt's durable time; every load materialises all arrays in memory.

Asynchronous peers (ASYNC_PEERS, async_peer_figures): orbax-checkpoint's AsyncCheckpointer on
numpy and on jax CPU arrays, and torch.distributed.checkpoint.async_save, each timed for stall
(until save returns and the state may change), durable (until the save is committed; both fsync
their data files, neither the directory after the final rename) and restore (every array loaded).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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


# An async driver: save(path) starts a save and returns once the caller may go on (the state may
# then change) with a wait() for "committed"; restore(path) loads every array.
AsyncDriver = tuple["Callable[[str], Callable[[], object]]", "Callable[[str], None]"]


@contextlib.contextmanager
def _orbax(state: State, as_jax: bool) -> Iterator[AsyncDriver]:
    """orbax-checkpoint's AsyncCheckpointer with its StandardCheckpointHandler.

    save() copies numpy arrays before it returns (jax arrays are immutable: nothing to copy).
    Durability, as traced: tensorstore fsyncs the array data, the OCDBT manifests and their
    directories; orbax's own _METADATA, _CHECKPOINT_METADATA and commit_success.txt are not
    fsynced, nor is the parent after the final rename of the temporary directory.
    """
    ocp = importlib.import_module("orbax.checkpoint")
    jax = importlib.import_module("jax")
    tree: dict[str, Any] = {k: jax.device_put(v) for k, v in state.items()} if as_jax else state
    checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    wait: Callable[[], object] = checkpointer.wait_until_finished
    try:

        def save(path: str) -> Callable[[], object]:
            checkpointer.save(path, args=ocp.args.StandardSave(tree))
            return wait

        def restore(path: str) -> None:
            # New arrays shaped like the tree (orbax has no restore into given buffers).
            jax.block_until_ready(checkpointer.restore(path, args=ocp.args.StandardRestore(tree)))

        yield save, restore
    finally:
        checkpointer.close()


@contextlib.contextmanager
def _dcp(state: State, workdir: str) -> Iterator[AsyncDriver]:
    """torch.distributed.checkpoint.async_save in a one-process gloo group (a FileStore: no port).

    async_save stages (copies) the tensors before it returns the future; the FileSystemWriter
    fsyncs its data file and .metadata (sync_files=True by default), then renames .metadata into
    place without an fsync of the directory. dcp.load reads into the preallocated tensors.
    """
    torch = importlib.import_module("torch")
    dist = importlib.import_module("torch.distributed")
    dcp = importlib.import_module("torch.distributed.checkpoint")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}  # same bytes, no copy
    into = {k: torch.empty_like(v) for k, v in tensors.items()}
    store = dist.FileStore(os.path.join(workdir, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:

        def save(path: str) -> Callable[[], object]:
            future = dcp.async_save(tensors, checkpoint_id=path)
            wait: Callable[[], object] = future.result
            return wait

        def restore(path: str) -> None:
            dcp.load(into, checkpoint_id=path)

        yield save, restore
    finally:
        dist.destroy_process_group()


ASYNC_PEERS: dict[
    str, tuple[str, Callable[[State, str], contextlib.AbstractContextManager[AsyncDriver]]]
] = {
    "orbax (numpy)": ("orbax.checkpoint", lambda state, _workdir: _orbax(state, as_jax=False)),
    "orbax (jax)": ("orbax.checkpoint", lambda state, _workdir: _orbax(state, as_jax=True)),
    "dcp.async_save": ("torch.distributed.checkpoint", _dcp),
}


def _measure(driver: AsyncDriver, workdir: str, repeats: int) -> dict[str, list[float]]:
    """stall (save returns), durable (save -> committed) and restore; the first round warms up.

    Each save gets a fresh directory (neither peer overwrites one); the previous one is deleted
    outside the timed region.
    """
    save, restore = driver
    out: dict[str, list[float]] = {"stall_s": [], "durable_s": [], "restore_s": []}
    for i in range(repeats + 1):
        path = os.path.join(workdir, f"save{i}")
        start = time.perf_counter()
        wait = save(path)
        returned = time.perf_counter()
        wait()
        committed = time.perf_counter()
        restore(path)
        restored = time.perf_counter()
        shutil.rmtree(path)
        if i:
            out["stall_s"].append(returned - start)
            out["durable_s"].append(committed - start)
            out["restore_s"].append(restored - committed)
    return out


def async_peer_figures(
    state: State, workdir: str, repeats: int
) -> dict[str, dict[str, list[float]] | str]:
    """Each async peer's samples of stall_s / durable_s / restore_s, or "skipped: <reason>"."""
    out: dict[str, dict[str, list[float]] | str] = {}
    for n, (peer, (module, make)) in enumerate(ASYNC_PEERS.items()):
        reason = available(module)
        if reason:
            out[peer] = f"skipped: {reason}"
            continue
        directory = os.path.join(workdir, f"async-peer{n}")
        os.makedirs(directory)
        try:
            with make(state, directory) as driver:
                out[peer] = _measure(driver, directory, repeats)
        except Exception as exc:
            out[peer] = f"skipped: failed ({type(exc).__name__}: {exc})"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return out


def tensorboardx_scalars(logdir: str, count: int) -> tuple[float, float] | str:
    """(caller seconds per add_scalar, scalars/s written until flush) or a skip reason."""
    reason = available("tensorboardX")
    if reason:
        return f"skipped: {reason}"
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
