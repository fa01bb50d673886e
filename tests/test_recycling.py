"""Recycled files and their readers: a restore gets the step it asked for, or a clear error.

A manager recycles: the checkpoint retention retires is renamed to a spare temporary file that
the next save overwrites in place (its inode is reused: the tests check ``st_ino`` to prove
recycling still happens). A reader that has the retired file open or mapped, in this process
or another, must keep its contents; one that opens it while it is being made a spare gets
``CheckpointNotFoundError``. Every interleaving is produced deterministically: a stalled
storage call, a reader paused between its header and its arrays, or (for the instant between
the reader's open and its lock, where no storage operation is probed) a profile hook that runs
the writer's retirement just before the reader's ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import numpy as np
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from support import TEMP_MARKER, WrappedReadFile, checkpoint_files, temp_files, until

from asyncckpt import CheckpointManager, CheckpointNotFoundError, Saver
from asyncckpt._storage import LocalStorage
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path
    from types import FrameType

    from asyncckpt._storage import ReadFile

pytestmark = pytest.mark.anyio

# 1 MiB of float32: big enough that a reused file really holds the new step's bytes.
_VALUES = 1 << 18
_RETIRED = "retired by retention while being opened"


def state(step: int) -> dict[str, Any]:
    """A state whose every value is ``step``."""
    return {"w": np.full(_VALUES, float(step), np.float32), "step": step}


async def save(manager: CheckpointManager, step: int) -> None:
    await manager.save(state(step), step)
    await manager.wait()


def inode(directory: Path, step: int) -> int:
    return os.stat(directory / f"model.ckpt-{step}").st_ino


def assert_holds(tree: Any, step: int) -> None:
    """``tree`` is ``state(step)``: every one of its values says ``step``."""
    assert tree["step"] == step
    np.testing.assert_array_equal(tree["w"], np.full(_VALUES, float(step), np.float32))


class Gate(FaultyStorage):
    """Local files whose streaming restores stop before reading their arrays (after the open
    and the header) until ``go`` is set; ``paused`` is set once one stopped there."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = anyio.Event()
        self.go = anyio.Event()

    async def pause(self) -> None:
        self.paused.set()
        await self.go.wait()

    @contextlib.asynccontextmanager
    async def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> AsyncIterator[ReadFile]:
        async with super().open_for_read(path, limiter=limiter) as file:
            yield _GatedFile(file, self)


class _GatedFile(WrappedReadFile):
    def __init__(self, file: ReadFile, gate: Gate) -> None:
        super().__init__(file)
        self._gate = gate

    async def before(self, what: str) -> None:
        if what == "arrays":  # the arrays' reads (and checks) run on threads through here
            await self._gate.pause()


# -- a mapping in this process -------------------------------------------------------------------


@pytest.mark.slow
async def test_a_mapped_restore_keeps_its_step_while_retention_goes_on(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await save(manager, 1)
        mapped = await manager.restore(step=1, mmap=True)
        await save(manager, 2)  # retires 1: mapped, so deleted rather than made the spare
        await save(manager, 3)  # a new file (no spare); retires 2, which becomes the spare
        assert_holds(mapped, 1)
        assert checkpoint_files(tmp_path) == ["model.ckpt-3"]
        ino_2 = os.stat(tmp_path / temp_files(tmp_path)[0]).st_ino
        await save(manager, 4)  # recycling is still on: 4 overwrote the spare that 2 was
        assert inode(tmp_path, 4) == ino_2
        assert_holds(mapped, 1)

        # A mapping holds its file for as long as it lives, and no longer.
        del mapped
        gc.collect()
        again = await manager.restore(step=4, mmap=True)
        assert_holds(again, 4)
        ino_4 = inode(tmp_path, 4)
        del again
        gc.collect()
        await save(manager, 5)  # retires 4: no longer mapped, so it is the spare
        await save(manager, 6)
        assert inode(tmp_path, 6) == ino_4
        assert_holds(await manager.restore(step=6), 6)


# -- a mapping in another process ----------------------------------------------------------------

# Maps the checkpoint argv[1], says what it holds, waits for a line, says again.
_CHILD = """
import sys
import anyio
from asyncckpt import Saver

async def main():
    tree = await Saver().restore(sys.argv[1], mmap=True)
    w = tree["w"]
    print("mapped", tree["step"], w.min(), w.max(), flush=True)
    sys.stdin.readline()
    print("after", tree["step"], w.min(), w.max(), flush=True)

anyio.run(main)
"""


async def _drain(stream: anyio.abc.ByteReceiveStream | None) -> bytes:
    assert stream is not None
    out = b""
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            out += await stream.receive()
    return out


@pytest.mark.slow
async def test_a_mapping_in_another_process_keeps_its_step(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await save(manager, 1)
        await save(manager, 2)  # 1 is the spare now: the next retirement would recycle
        argv = [sys.executable, "-c", _CHILD, str(tmp_path / "model.ckpt-2")]
        # Every wait bounded: a cancelled exit of the block kills the child.
        with anyio.fail_after(30):
            async with await anyio.open_process(argv) as child:
                assert child.stdin is not None
                assert child.stdout is not None
                lines = BufferedByteReceiveStream(child.stdout)
                try:
                    mapped = await lines.receive_until(b"\n", 1000)
                except anyio.IncompleteRead:  # pragma: no cover - only when the test fails
                    pytest.fail((await _drain(child.stderr)).decode())
                assert mapped == b"mapped 2 2.0 2.0"
                await save(manager, 3)  # retires 2, mapped by the child: deleted instead
                await save(manager, 4)  # a new file would overwrite 2 if it were the spare
                await child.stdin.send(b"\n")
                after = await lines.receive_until(b"\n", 1000)
                errors = await _drain(child.stderr)
                assert await child.wait() == 0, errors.decode()
        assert (after, errors) == (b"after 2 2.0 2.0", b"")
        assert_holds(await manager.restore(step=4), 4)


# -- a streaming restore --------------------------------------------------------------------------


async def test_an_open_checkpoint_is_read_whole_while_retention_goes_on(tmp_path: Path) -> None:
    gate = Gate()
    async with CheckpointManager(tmp_path, max_to_keep=1) as manager:
        await save(manager, 1)
        await save(manager, 2)  # 1 is the spare: the next retirement would recycle
        result: list[Any] = []

        async def restore() -> None:
            result.append(await Saver(storage=gate).restore(tmp_path / "model.ckpt-2"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(restore)
                await gate.paused.wait()  # open, its header read; its arrays not yet
                await save(manager, 3)  # retires 2, held open: deleted instead
                await save(manager, 4)  # would overwrite 2 if it had been made the spare
                gate.go.set()
        # Its own bytes, which match the checksums its header holds (on the old code: a
        # misleading CheckpointCorruptedError, the arrays being 4's under 2's header).
        assert_holds(result[0], 2)

        # A finished streaming restore holds nothing: its file is recycled again.
        assert_holds(await Saver().restore(tmp_path / "model.ckpt-4"), 4)
        ino_4 = inode(tmp_path, 4)
        await save(manager, 5)
        await save(manager, 6)
        assert inode(tmp_path, 6) == ino_4


@pytest.mark.parametrize("use_mmap", [False, True], ids=["streamed", "mapped"])
async def test_a_checkpoint_opened_while_being_made_the_spare_is_refused(
    tmp_path: Path, storage: FaultyStorage, use_mmap: bool
) -> None:
    gate = Gate()
    path = tmp_path / "model.ckpt-1"
    async with CheckpointManager(tmp_path, max_to_keep=1, storage=storage) as manager:
        await save(manager, 1)
        # The writer retiring 1 stops just before its rename: it holds the file locked.
        stall = storage.stall("rename", match=".model.ckpt-1" + TEMP_MARKER)
        await manager.save(state(2), 2)
        await stall.wait_reached()
        outcome: list[BaseException | Any] = []

        async def restore() -> None:
            try:
                tree = await Saver(storage=gate).restore(path, mmap=use_mmap)
                if use_mmap:
                    await gate.pause()  # the mapping lives on while the writer goes on
                outcome.append(tree)
            except CheckpointNotFoundError as exc:
                outcome.append(exc)

        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(restore)
                    await until(lambda: bool(outcome) or gate.paused.is_set())
                    stall.release()  # the rename; then 3 overwrites the spare
                    await manager.wait()
                    await save(manager, 3)
                    assert temp_files(tmp_path) != []  # 2 is the spare: recycling is on
                    gate.go.set()
        finally:
            stall.release()
        (error,) = outcome
        assert isinstance(error, CheckpointNotFoundError), error
        assert error.path == str(path)
        assert _RETIRED in str(error)
        assert "restore a newer checkpoint" in str(error)


# -- the instant between the reader's open and its lock ----------------------------------------


@contextlib.contextmanager
def before_flock(action: Callable[[], None]) -> Iterator[list[bool]]:
    """Run ``action`` once, in this thread, just before its next call of ``fcntl.flock``.

    No storage operation is probed between a reader's open and its lock: a profile hook (which
    replaces nothing, and sees C calls as they start) is the only way in.
    """
    done: list[bool] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call" and arg is fcntl.flock and not done:
            done.append(True)
            action()  # profile hooks do not see the calls they make themselves

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield done
    finally:
        sys.setprofile(previous)


@pytest.mark.parametrize("now", ["gone", "another file"])
def test_a_name_retired_between_the_open_and_the_lock_is_refused(tmp_path: Path, now: str) -> None:
    storage = LocalStorage()
    path = str(tmp_path / "model.ckpt-1")
    storage.write_atomic(path, [b"step 1 " * 1000])

    def retire() -> None:
        # The writer's whole retirement: the reader has opened the file but not locked it.
        spare = storage.remove_files([path], keep_spare=True)
        assert spare is not None  # it could lock the file, and made it the spare
        if now == "another file":
            storage.write_atomic(path, [b"step 1, saved again " * 100])

    with before_flock(retire) as done, pytest.raises(CheckpointNotFoundError) as caught:
        storage.open_mmap(path)
    assert done  # the old code takes no lock: it maps the retired file
    assert caught.value.path == path
    assert _RETIRED in str(caught.value)
