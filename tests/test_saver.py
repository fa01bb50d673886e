"""Saver: names, retention, the state file, argument checks, and cancellation of a save."""

from __future__ import annotations

import math
import os
import re
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import numpy as np
import pytest
from support import assert_restores, exists, stepped_state, temp_files

from asyncckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointState,
    Saver,
    get_checkpoint_state,
    latest_checkpoint,
)
from asyncckpt._checkpoint import _file
from asyncckpt._checkpoint._state_file import format_state, lock_name, parse_state
from asyncckpt._storage import LocalStorage, _local
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def on_disk(directory: Path) -> list[int]:
    """The steps of the checkpoint files in ``directory``, sorted."""
    names = os.listdir(directory)
    return sorted(int(n.rsplit("-", 1)[1]) for n in names if n.startswith("model.ckpt-"))


def listed(directory: Path) -> list[int]:
    """The steps the state file lists, oldest first."""
    state = get_checkpoint_state(directory)
    assert state is not None
    return [int(n.rsplit("-", 1)[1]) for n in state.names]


class WallClock:
    """A settable wall clock for ``Saver(clock=...)``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpts"


# -- names ------------------------------------------------------------------------------------


async def test_save_returns_the_checkpoint_path(ckpt_dir: Path) -> None:
    saver = Saver()
    prefix = ckpt_dir / "model.ckpt"  # a PathLike is accepted; a str comes back
    path = await saver.save(stepped_state(7), prefix, global_step=7)
    assert path == f"{prefix}-7"
    assert latest_checkpoint(ckpt_dir) == path
    assert Saver.latest_checkpoint(ckpt_dir) == path
    await assert_restores(path, 7)
    assert await saver.save(stepped_state(8), prefix, global_step=np.int64(8)) == f"{prefix}-8"


async def test_save_without_a_step_writes_the_prefix_itself(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "final")
    path = await Saver().save(stepped_state(3), prefix)
    assert path == prefix
    assert latest_checkpoint(ckpt_dir) == prefix
    await assert_restores(prefix, 3)


# -- retention --------------------------------------------------------------------------------


async def test_max_to_keep_keeps_the_newest(ckpt_dir: Path) -> None:
    saver = Saver(max_to_keep=2)
    prefix = str(ckpt_dir / "model.ckpt")
    for step in range(1, 6):
        await saver.save(stepped_state(step), prefix, global_step=step)
        assert on_disk(ckpt_dir) == listed(ckpt_dir) == list(range(max(1, step - 1), step + 1))
    assert saver.last_checkpoints(ckpt_dir) == [f"{prefix}-4", f"{prefix}-5"]
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-5"
    await assert_restores(f"{prefix}-4", 4)


@pytest.mark.parametrize("max_to_keep", [None, 0])
async def test_max_to_keep_none_or_zero_keeps_all(ckpt_dir: Path, max_to_keep: int | None) -> None:
    saver = Saver(max_to_keep=max_to_keep)
    for step in range(1, 8):
        await saver.save(stepped_state(step), str(ckpt_dir / "model.ckpt"), global_step=step)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == list(range(1, 8))


async def test_saving_a_step_again_moves_it_to_the_end(ckpt_dir: Path) -> None:
    saver = Saver(max_to_keep=2)
    prefix = str(ckpt_dir / "model.ckpt")
    for step in (1, 2, 3):
        await saver.save(stepped_state(step), prefix, global_step=step)
    await saver.save(stepped_state(2, version=1), prefix, global_step=2)
    assert listed(ckpt_dir) == [3, 2]  # no duplicate, newest last
    assert on_disk(ckpt_dir) == [2, 3]
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-2"
    await assert_restores(f"{prefix}-2", 2, version=1)
    await saver.save(stepped_state(4), prefix, global_step=4)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [2, 4]  # 3 is now the oldest


async def test_keep_checkpoint_every_n_hours_preserves_one_per_period(ckpt_dir: Path) -> None:
    """TensorFlow 2's rule: a checkpoint leaving the list stays on disk, unlisted, when
    ``timestamp - period >= last_preserved``; last_preserved starts at the Saver's creation."""
    clock = WallClock(0.0)
    saver = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1, clock=clock)
    prefix = str(ckpt_dir / "model.ckpt")
    # (save time, checkpoints on disk afterwards); each save pushes the previous one out.
    timeline = [
        (1000.0, [1]),
        (2000.0, [2]),  # 1 (t=1000) is within an hour of creation (t=0): deleted
        (3600.0, [3]),  # 2 (t=2000): deleted
        (4000.0, [3, 4]),  # 3 (t=3600) is exactly one hour after t=0: preserved
        (7200.0, [3, 5]),  # 4 (t=4000) is only 400 s after the last preserved: deleted
        (7201.0, [3, 5, 6]),  # 5 (t=7200) is one hour after 3: preserved
        (8000.0, [3, 5, 7]),  # 6 (t=7201): deleted
    ]
    for step, (now, expected) in enumerate(timeline, start=1):
        clock.now = now
        await saver.save(stepped_state(step), prefix, global_step=step)
        assert on_disk(ckpt_dir) == expected, f"after saving step {step} at t={now}"
        assert listed(ckpt_dir) == [step]  # preserved checkpoints are not listed
    state = get_checkpoint_state(ckpt_dir)
    assert state is not None
    assert state.last_preserved_timestamp == 7200.0
    await assert_restores(f"{prefix}-3", 3)  # a preserved checkpoint is a whole checkpoint

    # A restarted Saver (created at t=9000) continues from the persisted last_preserved
    # (t=7200), not from its own creation time.
    clock.now = 9000.0
    restarted = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1, clock=clock)
    clock.now = 10800.0
    await restarted.save(stepped_state(8), prefix, global_step=8)
    assert on_disk(ckpt_dir) == [3, 5, 8]  # 7 (t=8000): deleted
    clock.now = 11000.0
    await restarted.save(stepped_state(9), prefix, global_step=9)
    # 8 (t=10800) is one hour after 7200: preserved (it would not be after 9000).
    assert on_disk(ckpt_dir) == [3, 5, 8, 9]


async def test_keep_every_n_hours_without_max_to_keep_deletes_nothing(ckpt_dir: Path) -> None:
    clock = WallClock(0.0)
    saver = Saver(max_to_keep=None, keep_checkpoint_every_n_hours=1, clock=clock)
    for step in range(1, 5):
        clock.now = step * 10.0
        await saver.save(stepped_state(step), str(ckpt_dir / "model.ckpt"), global_step=step)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [1, 2, 3, 4]


async def test_smaller_max_to_keep_removes_all_surplus_at_once(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    everything = Saver(max_to_keep=None)
    for step in range(1, 6):
        await everything.save(stepped_state(step), prefix, global_step=step)
    # Unlike TensorFlow, which deletes one surplus checkpoint per save, all of them go now.
    await Saver(max_to_keep=2).save(stepped_state(6), prefix, global_step=6)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [5, 6]


async def test_a_restarted_saver_continues_retention(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    before = Saver(max_to_keep=2)
    for step in (1, 2):
        await before.save(stepped_state(step), prefix, global_step=step)

    after = Saver(max_to_keep=2)  # a new process, reading the state file
    assert after.last_checkpoints(ckpt_dir) == [f"{prefix}-1", f"{prefix}-2"]
    await after.save(stepped_state(3), prefix, global_step=3)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [2, 3]


async def test_another_savers_checkpoints_are_not_clobbered(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    ours, theirs = Saver(max_to_keep=3), Saver(max_to_keep=3)
    await ours.save(stepped_state(1), prefix, global_step=1)
    await theirs.save(stepped_state(2), prefix, global_step=2)  # between two of our saves
    await ours.save(stepped_state(3), prefix, global_step=3)
    assert listed(ckpt_dir) == [1, 2, 3]
    assert ours.last_checkpoints(ckpt_dir) == [f"{prefix}-{s}" for s in (1, 2, 3)]
    await theirs.save(stepped_state(4), prefix, global_step=4)
    await ours.save(stepped_state(5), prefix, global_step=5)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [3, 4, 5]


# -- the state file ---------------------------------------------------------------------------


async def test_latest_checkpoint_without_a_state_file(ckpt_dir: Path) -> None:
    assert latest_checkpoint(ckpt_dir) is None  # the directory does not even exist
    assert get_checkpoint_state(ckpt_dir) is None
    await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=1)
    os.unlink(ckpt_dir / "checkpoint")
    assert latest_checkpoint(ckpt_dir) is None  # files alone are not a listing


async def test_state_file_is_tensorflow_text_format(ckpt_dir: Path) -> None:
    clock = WallClock(100.0)
    saver = Saver(clock=clock)
    for step, now in ((1, 1000.5), (2, 2000.25)):
        clock.now = now
        await saver.save(stepped_state(step), str(ckpt_dir / "model.ckpt"), global_step=step)
    lines = (ckpt_dir / "checkpoint").read_text().splitlines()
    assert lines[:-1] == [
        'model_checkpoint_path: "model.ckpt-2"',
        'all_model_checkpoint_paths: "model.ckpt-1"',
        'all_model_checkpoint_paths: "model.ckpt-2"',
        "all_model_checkpoint_timestamps: 1000.5",
        "all_model_checkpoint_timestamps: 2000.25",
        "last_preserved_timestamp: 100.0",
    ]
    # A comment, which TensorFlow's text-format parser skips.
    assert re.fullmatch(r"# crc32c: [0-9a-f]{8}", lines[-1])
    assert get_checkpoint_state(ckpt_dir) == CheckpointState(
        directory=str(ckpt_dir),
        names=("model.ckpt-1", "model.ckpt-2"),
        timestamps=(1000.5, 2000.25),
        last_preserved_timestamp=100.0,
    )


async def test_state_file_written_by_tensorflow_is_read(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    for step in (10, 20):
        await Saver().save(stepped_state(step), prefix, global_step=step)
    # As TensorFlow writes it with relative paths: no checksum, no timestamps.
    (ckpt_dir / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-20"\n'
        'all_model_checkpoint_paths: "model.ckpt-10"\n'
        'all_model_checkpoint_paths: "model.ckpt-20"\n'
    )
    assert latest_checkpoint(ckpt_dir) == f"{prefix}-20"
    state = get_checkpoint_state(ckpt_dir)
    assert state is not None
    assert state.names == ("model.ckpt-10", "model.ckpt-20")
    assert state.last_preserved_timestamp is None
    # Retention continues from TensorFlow's list.
    await Saver(max_to_keep=2).save(stepped_state(30), prefix, global_step=30)
    assert on_disk(ckpt_dir) == listed(ckpt_dir) == [20, 30]


def test_state_file_with_tensorflow_timestamps_is_read(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt-1").write_bytes(b"x")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-1"\n'
        'all_model_checkpoint_paths: "model.ckpt-1"\n'
        "all_model_checkpoint_timestamps: 1612345678.123456\n"
        "last_preserved_timestamp: 1.6e+09\n"
    )
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert state.timestamps == (1612345678.123456,)
    assert state.last_preserved_timestamp == 1.6e9
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-1")


ESCAPING_NAMES = ["../x", "/etc/passwd", "a/b", "..", ".", "", "a\x00b", 'a"b', "a\\b", "a\nb"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
@pytest.mark.parametrize("field", ["model_checkpoint_path", "all_model_checkpoint_paths"])
def test_state_file_names_must_stay_in_the_directory(tmp_path: Path, name: str, field: str) -> None:
    (tmp_path / "model.ckpt-1").write_bytes(b"x")
    lines = ['all_model_checkpoint_paths: "model.ckpt-1"', f'{field}: "{name}"']
    (tmp_path / "checkpoint").write_bytes("\n".join(lines).encode() + b"\n")
    with pytest.raises(CheckpointFormatError) as info:
        latest_checkpoint(tmp_path)
    assert info.value.path == str(tmp_path / "checkpoint")
    with pytest.raises(CheckpointFormatError):
        get_checkpoint_state(tmp_path)


def test_every_single_bit_flip_in_a_state_file_is_caught() -> None:
    state = CheckpointState(
        directory="/d",
        names=("model.ckpt-1", "model.ckpt-2"),
        timestamps=(1000.5, 2000.25),
        last_preserved_timestamp=0.0,
    )
    data = format_state(state)
    body_end = data.rindex(b"# crc32c")
    for index in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[index] ^= 1 << bit
            try:
                parsed = parse_state(bytes(flipped), "/d", "/d/checkpoint")
            except CheckpointCorruptedError:
                continue
            except CheckpointFormatError:
                # Only a flip that breaks the checksum line itself can get past the checksum
                # to the parser, which then rejects the line.
                assert index >= body_end - 1, (index, bit)
                continue
            # Accepted only when the flip did not change what the file says (it hit the
            # comment, or turned the final newline into other whitespace).
            assert parsed == state, (index, bit)
            assert index >= body_end, (index, bit)


async def test_flipped_byte_in_the_state_file_on_disk(ckpt_dir: Path) -> None:
    saver = Saver()
    prefix = str(ckpt_dir / "model.ckpt")
    for step in (1, 2):
        await saver.save(stepped_state(step), prefix, global_step=step)
    state_file = ckpt_dir / "checkpoint"
    state_file.write_bytes(state_file.read_bytes().replace(b"ckpt-2", b"ckpt-1", 1))
    damaged = state_file.read_bytes()

    with pytest.raises(CheckpointCorruptedError) as info:
        latest_checkpoint(ckpt_dir)
    assert info.value.path == str(state_file)
    assert info.value.part == "state file"
    assert "checksum mismatch" in str(info.value)
    # A damaged listing is never overwritten by a later save: it is reported.
    with pytest.raises(CheckpointCorruptedError):
        await Saver().save(stepped_state(3), prefix, global_step=3)
    assert state_file.read_bytes() == damaged
    assert on_disk(ckpt_dir) == [1, 2]


async def test_state_file_naming_a_missing_checkpoint(ckpt_dir: Path) -> None:
    prefix = str(ckpt_dir / "model.ckpt")
    for step in (1, 2):
        await Saver().save(stepped_state(step), prefix, global_step=step)
    os.unlink(f"{prefix}-2")  # removed by hand
    with pytest.raises(CheckpointNotFoundError) as info:
        latest_checkpoint(ckpt_dir)
    assert info.value.path == f"{prefix}-2"
    assert "missing" in str(info.value)
    assert "asyncckpt prune" in str(info.value)  # what to do about it


async def test_state_file_that_is_a_symlink(ckpt_dir: Path, tmp_path: Path) -> None:
    await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=1)
    os.rename(ckpt_dir / "checkpoint", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", ckpt_dir / "checkpoint")
    with pytest.raises(CheckpointError, match="symlink") as info:
        latest_checkpoint(ckpt_dir)
    assert info.value.path == str(ckpt_dir / "checkpoint")


async def test_state_file_that_is_a_directory(ckpt_dir: Path) -> None:
    (ckpt_dir / "checkpoint").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a regular file") as info:
        latest_checkpoint(ckpt_dir)
    assert info.value.path == str(ckpt_dir / "checkpoint")


def test_huge_state_file(tmp_path: Path) -> None:
    with open(tmp_path / "checkpoint", "wb") as file:
        file.truncate(16 * 1024 * 1024 + 1)  # sparse: cheap to make
    with pytest.raises(CheckpointFormatError, match="larger than any real one"):
        latest_checkpoint(tmp_path)


async def test_custom_latest_filename(ckpt_dir: Path) -> None:
    saver = Saver(latest_filename="checkpoint_input")
    path = await saver.save(stepped_state(1), str(ckpt_dir / "input"), global_step=1)
    assert not (ckpt_dir / "checkpoint").exists()
    assert latest_checkpoint(ckpt_dir) is None
    assert latest_checkpoint(ckpt_dir, "checkpoint_input") == path


def test_each_state_file_has_its_own_lock() -> None:
    assert lock_name("checkpoint") == ".asyncckpt.lock"  # the lock every release has used
    assert lock_name("checkpoint_input") == ".asyncckpt.checkpoint_input.lock"


async def test_savers_of_two_state_files_keep_their_own_lists(ckpt_dir: Path) -> None:
    model, data = Saver(max_to_keep=2), Saver(max_to_keep=2, latest_filename="checkpoint_input")
    for step in (1, 2, 3):
        await model.save(stepped_state(step), str(ckpt_dir / "model.ckpt"), global_step=step)
        await data.save({"position": step}, str(ckpt_dir / "input.ckpt"), global_step=step)
    assert [os.path.basename(p) for p in model.last_checkpoints(ckpt_dir)] == [
        "model.ckpt-2",
        "model.ckpt-3",
    ]
    assert [os.path.basename(p) for p in data.last_checkpoints(ckpt_dir)] == [
        "input.ckpt-2",
        "input.ckpt-3",
    ]
    assert sorted(n for n in os.listdir(ckpt_dir) if ".ckpt-" in n) == [
        "input.ckpt-2",
        "input.ckpt-3",
        "model.ckpt-2",
        "model.ckpt-3",
    ]


# -- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_to_keep": -1}, ValueError, "max_to_keep must be >= 0"),
        ({"max_to_keep": True}, TypeError, "max_to_keep must be an int"),
        ({"max_to_keep": "5"}, TypeError, "max_to_keep must be an int"),
        ({"max_to_keep": 2.0}, TypeError, "max_to_keep must be an int"),
        ({"keep_checkpoint_every_n_hours": 0}, ValueError, "pass None"),
        ({"keep_checkpoint_every_n_hours": -1.5}, ValueError, "must be positive"),
        ({"keep_checkpoint_every_n_hours": math.nan}, ValueError, "must be positive"),
        ({"keep_checkpoint_every_n_hours": "1"}, TypeError, "number of hours"),
        ({"keep_checkpoint_every_n_hours": True}, TypeError, "number of hours"),
        ({"latest_filename": "a/b"}, ValueError, "without a directory"),
        ({"latest_filename": "../checkpoint"}, ValueError, "without a directory"),
        ({"latest_filename": ".."}, ValueError, "without a directory"),
        ({"latest_filename": ""}, ValueError, "must be a file name"),
        ({"latest_filename": ".asyncckpt.lock"}, ValueError, "must not start with '.'"),
    ],
)
def test_saver_argument_checks(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Saver(**kwargs)


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (-1, ValueError, "global_step must be in [0, 2**63), not -1"),
        (2**64, ValueError, "global_step must be in [0, 2**63)"),
        (True, TypeError, "global_step must be an int, not bool"),
        (1.0, TypeError, "global_step must be an int, not float"),
        ("3", TypeError, "global_step must be an int, not str"),
    ],
)
async def test_global_step_checks(
    ckpt_dir: Path, step: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        await Saver().save(stepped_state(1), str(ckpt_dir / "model.ckpt"), global_step=step)
    assert not exists(ckpt_dir)  # checked before anything touches the disk


@pytest.mark.parametrize(
    "metadata",
    [{"a": object()}, {"a": np.float32(1.0)}, {"a": (1, 2)}, {1: "x"}, [("a", 1)]],
    ids=["object", "numpy-scalar", "tuple", "int-key", "not-a-dict"],
)
async def test_metadata_must_be_plain(ckpt_dir: Path, metadata: Any) -> None:
    with pytest.raises(TypeError, match="metadata must"):
        await Saver().save(stepped_state(1), str(ckpt_dir / "m"), global_step=1, metadata=metadata)
    assert not exists(ckpt_dir)


async def test_plain_metadata_is_accepted(ckpt_dir: Path) -> None:
    metadata = {"loss": 0.5, "tags": ["a", "b"], "nested": {"ok": None}, "raw": b"\x00"}
    path = await Saver().save(
        stepped_state(1), str(ckpt_dir / "m"), global_step=1, metadata=metadata
    )
    await assert_restores(path, 1)


@pytest.mark.parametrize("name", ["checkpoint", ".hidden"])
async def test_checkpoint_name_cannot_collide_with_the_state_file(
    ckpt_dir: Path, name: str
) -> None:
    with pytest.raises(ValueError, match="collides"):
        await Saver().save(stepped_state(1), str(ckpt_dir / name))


async def test_restore_none_says_to_check_latest_checkpoint(ckpt_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"latest_checkpoint\(dir\)"):
        await Saver().restore(latest_checkpoint(ckpt_dir))


async def test_second_concurrent_save_into_one_directory(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    saver = Saver(storage=storage)
    first, other = tmp_path / "first", tmp_path / "other"
    stall = storage.stall("rename", match="model.ckpt-1")
    async with anyio.create_task_group() as tg:
        tg.start_soon(saver.save, stepped_state(1), str(first / "model.ckpt"), 1)
        try:
            await stall.wait_reached()
            with pytest.raises(RuntimeError, match="already running; await it"):
                await saver.save(stepped_state(2), str(first / "model.ckpt"), global_step=2)
            # Saves into another directory are independent.
            await saver.save(stepped_state(3), str(other / "model.ckpt"), global_step=3)
        finally:
            stall.release()
    assert listed(first) == [1]
    assert listed(other) == [3]
    await saver.save(stepped_state(2), str(first / "model.ckpt"), global_step=2)  # now it's fine
    assert listed(first) == [1, 2]


# -- cancellation -----------------------------------------------------------------------------


class CancelAtCall(FaultyStorage):
    """Once armed, call ``cancel`` on the event loop while the ``index``-th storage call from
    then on is being made; ``armed_calls`` are the calls made since."""

    def __init__(self) -> None:
        super().__init__()
        self._first = 0
        self._at: int | None = None
        self._cancel: Callable[[], None] = lambda: None
        self._loop_thread = threading.get_ident()
        self._token = anyio.lowlevel.current_token()

    def arm(self, index: int, cancel: Callable[[], None]) -> None:
        self._first = len(self.calls)
        self._at = self._first + index
        self._cancel = cancel

    @property
    def armed_calls(self) -> list[tuple[str, str]]:
        return self.calls[self._first :]

    def check(self, op: str, path: str) -> None:
        super().check(op, path)
        if len(self.calls) - 1 == self._at:
            if threading.get_ident() == self._loop_thread:
                self._cancel()
            else:
                anyio.from_thread.run_sync(self._cancel, token=self._token)


def _shape(calls: list[tuple[str, str]], directory: Path) -> list[tuple[str, str]]:
    """Storage calls as (op, path in the directory), the random part of temp names blanked."""
    return [
        (op, re.sub(r"tmp-[0-9a-f]+$", "tmp-*", os.path.relpath(p, directory))) for op, p in calls
    ]


async def _saved_once(directory: Path, storage: FaultyStorage | None = None) -> tuple[Saver, str]:
    saver = Saver(max_to_keep=1, storage=storage)  # the save of step 2 also deletes step 1
    prefix = str(directory / "model.ckpt")
    await saver.save(stepped_state(1), prefix, global_step=1)
    return saver, prefix


@pytest.mark.slow  # a directory, two saves, a restore and a verify for each of ~14 calls
async def test_cancel_during_each_storage_call_of_a_save(tmp_path: Path) -> None:
    reference = FaultyStorage()
    saver, prefix = await _saved_once(tmp_path / "reference", reference)
    first_call = len(reference.calls)  # the calls of the save of step 2 only
    with reference:
        await saver.save(stepped_state(2), prefix, global_step=2)
    calls = _shape(reference.calls[first_call:], tmp_path / "reference")
    state_write = next(
        i for i, (op, name) in enumerate(calls) if op == "open" and name.startswith(".checkpoint")
    )
    assert {op for op, _ in calls} >= {"read", "open", "write", "fsync", "rename", "unlink"}

    for index, (op, name) in enumerate(calls):
        directory = tmp_path / f"cancel-{index}"
        observed = CancelAtCall()
        saver, prefix = await _saved_once(directory, observed)
        state_before = (directory / "checkpoint").read_bytes()
        returned = False
        with anyio.CancelScope() as scope:
            observed.arm(index, scope.cancel)
            with observed:
                await saver.save(stepped_state(2), prefix, global_step=2)
                returned = True
            await anyio.lowlevel.checkpoint()
        where = f"cancelled during call {index}: {op} {name}"
        assert scope.cancelled_caught, where  # never swallowed
        assert _shape(observed.armed_calls, directory)[: index + 1] == calls[: index + 1], where
        assert temp_files(directory) == [], where
        if index < state_write:
            # Before the state file is written, a cancelled save leaves the directory as it
            # was: no new checkpoint file, the state file untouched, step 1 the latest.
            assert not returned, where
            assert (directory / "checkpoint").read_bytes() == state_before, where
            assert on_disk(directory) == [1], where
            assert latest_checkpoint(directory) == f"{prefix}-1", where
            await assert_restores(f"{prefix}-1", 1)
        else:
            # The state file is written in one worker-thread call that a cancellation waits
            # for; from then on the save is committed and its retention finishes too.
            assert on_disk(directory) == listed(directory) == [2], where
            assert latest_checkpoint(directory) == f"{prefix}-2", where
            await assert_restores(f"{prefix}-2", 2)
        # The directory lock was released: another Saver can save here.
        await Saver().save(stepped_state(3), prefix, global_step=3)


async def test_cancel_before_a_save_starts(ckpt_dir: Path) -> None:
    saver, prefix = await _saved_once(ckpt_dir)
    state_before = (ckpt_dir / "checkpoint").read_bytes()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await saver.save(stepped_state(2), prefix, global_step=2)
    assert scope.cancelled_caught
    assert (ckpt_dir / "checkpoint").read_bytes() == state_before
    assert on_disk(ckpt_dir) == [1]
    assert temp_files(ckpt_dir) == []
    await saver.save(stepped_state(2), prefix, global_step=2)  # the Saver is not left busy
    assert listed(ckpt_dir) == [2]


async def test_cancel_stops_a_large_write_between_pieces(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One storage for both saves of this Saver: unarmed for the reference, then armed.
    observed = CancelAtCall()
    saver, prefix = await _saved_once(ckpt_dir, observed)
    # Writes go out in batches of up to 64 MiB; smaller batches keep the test small.
    monkeypatch.setattr(_local, "_CHUNK_BYTES", 2**20)
    big = {name: np.full(300_000, 1.0) for name in "abcdefghijkl"}  # 2.4 MB arrays, 1 MiB batches
    first_call = len(observed.calls)  # the calls of the save of step 2 only
    with observed:
        await saver.save(big, prefix, global_step=2)
    reference = observed.calls[first_call:]
    total_writes = sum(op == "write" for op, _ in reference)

    first_write = next(i for i, (op, _) in enumerate(reference) if op == "write")
    with anyio.CancelScope() as scope, observed:
        observed.arm(first_write, scope.cancel)
        await saver.save(big, prefix, global_step=3)
    assert scope.cancelled_caught
    writes = sum(op == "write" for op, _ in observed.armed_calls)
    # The whole write is one worker-thread call: the loop hands the cancellation to it, and
    # it stops at the next batch after it sees that (a few more may go out in between); the
    # remaining batches and the header are never written.
    assert total_writes >= 10
    assert 1 <= writes < total_writes
    assert listed(ckpt_dir) == [2]
    assert on_disk(ckpt_dir) == [2]
    assert temp_files(ckpt_dir) == []


@pytest.mark.parametrize("into", [False, True], ids=["fresh", "into"])
async def test_a_restore_read_in_many_batches_by_several_tasks_checks_every_batch(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    # Large files are read by one task per core in batches; small batches and a fixed task
    # count make this small file take the same path.
    monkeypatch.setattr(_file, "_READ_BATCH_BYTES", 1000)
    monkeypatch.setattr(_file, "_read_threads", lambda: 3)
    state = {"a": np.arange(3000, dtype=np.float64), "b": np.arange(7, dtype=np.int8), "c": 1}
    path = await Saver().save(state, str(ckpt_dir / "model.ckpt"), global_step=1)
    target = {"a": np.zeros(3000), "b": np.zeros(7, np.int8), "c": 0} if into else None
    restored = await Saver().restore(path, target)
    np.testing.assert_array_equal(restored["a"], state["a"])
    np.testing.assert_array_equal(restored["b"], state["b"])
    header = await _file.read_header(LocalStorage(), path)
    with open(path, "r+b") as file:  # noqa: ASYNC230 - a test's small file
        file.seek(header.arrays[0].offset + 20_000)  # in a late batch of array "a"
        flipped = file.read(1)[0] ^ 1
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([flipped]))
    with pytest.raises(CheckpointCorruptedError, match=r"array 0 \('a'\).*checksum mismatch"):
        await Saver().restore(path, target)


@pytest.mark.anyio
async def test_two_damaged_arrays_read_in_parallel_raise_one_error(tmp_path: Path) -> None:
    # Each reader task checks its share; both failing must still surface as one error (the
    # fuzzer found an ExceptionGroup escaping here), the other named in a note.
    state = {"a": np.ones(4 << 20, np.float32), "b": np.full(4 << 20, 2.0, np.float32)}
    path = await Saver().save(state, str(tmp_path / "model.ckpt"), global_step=1)
    data = bytearray((tmp_path / "model.ckpt-1").read_bytes())
    data[-1] ^= 0xFF  # inside "b"
    data[len(data) // 2 - 64] ^= 0xFF  # inside "a"
    (tmp_path / "model.ckpt-1").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match="corrupted array"):
        await Saver().restore(path)
