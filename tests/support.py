"""Helpers shared by several test modules (not a test module itself)."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import numpy as np

from asyncckpt import Saver
from asyncckpt.cli import main as cli_main

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from asyncckpt._storage import ReadFile
    from asyncckpt.testing import FaultyStorage

# Part of every temporary file's name, ``.<final name>.asyncckpt-tmp-<random>`` (spelled out
# here, not imported: it is what a directory holds on disk).
TEMP_MARKER: Final = ".asyncckpt-tmp-"

# The storage calls of a save into a directory holding one older checkpoint, with
# max_to_keep=1: the checkpoint file (open, write the arrays, write the header that holds
# their checksums, fsync, rename, fsync_dir), the state file (open, write, fsync, rename,
# fsync_dir), then the retirement of the older checkpoint (a manager renames it to a
# temporary name, for its next save to overwrite in place; then fsync_dir).
SAVE_OPS: Final = [
    "open", "write", "write", "fsync", "rename", "fsync_dir",
    "open", "write", "fsync", "rename", "fsync_dir",
    "rename", "fsync_dir",
]  # fmt: skip
STATE_FILE_FIRST_CALL: Final = 6

Fields = dict[int, list[Any]]
CKPT_FILE: Final = re.compile(r"model\.ckpt-(\d+)$")


def written_steps(storage: FaultyStorage) -> list[int]:
    """Steps whose checkpoint file was committed (renamed into place), in order."""
    return [
        int(match.group(1))
        for op, path in storage.calls
        if op == "rename" and (match := CKPT_FILE.search(path))
    ]


def stepped_state(step: int, version: int = 0) -> dict[str, Any]:
    """A small state tree whose every value says which step (and version of it) it is."""
    return {
        "w": np.arange(5, dtype=np.float32) + step + version / 10,
        "step": step,
        "version": version,
    }


async def assert_restores(path: str, step: int, version: int = 0) -> None:
    """The checkpoint at ``path`` restores to ``stepped_state(step, version)``."""
    tree = await Saver().restore(path)
    expected = stepped_state(step, version)
    np.testing.assert_array_equal(tree["w"], expected["w"])
    assert (tree["step"], tree["version"]) == (step, version)


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether anything, even a dangling symlink, is at ``path``."""
    return os.path.lexists(path)


def checkpoint_files(directory: str | os.PathLike[str]) -> list[str]:
    """The names of the checkpoint files (``model.ckpt-<step>``) in ``directory``, sorted."""
    return sorted(name for name in os.listdir(directory) if name.startswith("model.ckpt-"))


def temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """The names of the temporary files in ``directory`` (a write in progress or abandoned)."""
    return [name for name in os.listdir(directory) if TEMP_MARKER in name]


def verify_exit(directory: Path) -> int:
    """Exit status of ``asyncckpt verify DIR`` (its report discarded)."""
    return cli_main(["verify", str(directory)], out=io.StringIO())


def task_ids() -> set[int]:
    """The ids of the tasks running now (to check that none is left behind)."""
    return {task.id for task in anyio.get_running_tasks()}


async def all_tasks_blocked() -> None:
    """``anyio.wait_all_tasks_blocked()``, without its 0.1 s polls on asyncio.

    On asyncio anyio sleeps 0.1 s whenever another task can still run, as a task spawned a
    moment ago can; a few checkpoints first let such tasks reach what they wait for.
    """
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate()`` holds (worker threads progress meanwhile)."""
    with anyio.fail_after(5):
        while not predicate():
            await anyio.lowlevel.checkpoint()


def make_state() -> dict[str, Any]:
    """A small training state: weights and a step counter."""
    return {"w": np.zeros(4), "step": 0}


def step_fn(state: dict[str, Any]) -> dict[str, float]:
    """One training step on ``make_state()``: every weight and the counter go up by one."""
    state["w"] += 1.0
    state["step"] += 1
    return {"loss": float(state["w"][0])}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def parse_protobuf(buf: bytes) -> Fields:
    """Split a protobuf message into its fields: varints as int, the rest as raw bytes.

    Written from the wire format (TB_FORMAT.md §3), independently of the encoder under test.
    """
    fields: Fields = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            assert wire == 2, f"unexpected wire type {wire}"
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        fields.setdefault(key >> 3, []).append(value)
    assert pos == len(buf), "a field runs past the end of the message"
    return fields


def signal_when_ready(argv: list[str], ready: str, signum: int, timeout: float = 30) -> str:
    """Run ``argv``, send ``signum`` once it printed the line ``ready``, and return the rest
    of its output, asserting that it exited 0 with nothing on stderr (every wait bounded)."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            readable, _, _ = select.select([process.stdout], [], [], timeout)
            assert readable, f"{argv[1]} printed nothing within {timeout} s"
            assert process.stdout.readline() == ready + "\n"
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:  # pragma: no cover - only when the test fails
                process.kill()
    assert process.returncode == 0, stderr
    assert stderr == ""
    return stdout


class WrappedReadFile:
    """An open checkpoint that forwards to another, awaiting ``before(what)`` first at each
    of its awaits: ``"read"`` (a positional read) and ``"arrays"`` (a thread's pass over its
    arrays). Tests override ``before`` to count, cancel or pause a restore there."""

    def __init__(self, file: ReadFile) -> None:
        self._file = file

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def size(self) -> int:
        return self._file.size

    async def before(self, what: str) -> None:
        """Runs before each await of the restore (no checkpoint of its own)."""

    def read_into_sync(self, offset: int, views: list[memoryview]) -> int:
        return self._file.read_into_sync(offset, views)

    async def read(self, offset: int, size: int) -> bytes:
        await self.before("read")
        return await self._file.read(offset, size)

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        await self.before("arrays")
        return await self._file.run_sync(fn, *args)
