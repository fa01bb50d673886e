"""Recovery a user can do without reading the code: a damaged state file or latest checkpoint
is an error that names the file and the repair, never a silent restart at step 0; with
``on_corrupt="fallback"`` the newest intact checkpoint is restored, with a WARNING naming the
bad one, and the run goes on from there."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from support import assert_restores, checkpoint_files, stepped_state

from asyncckpt import (
    CheckpointCorruptedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointReadError,
    MonitoredTrainingSession,
    Saver,
    get_checkpoint_state,
    latest_checkpoint,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


async def save_steps(directory: Path, steps: list[int]) -> None:
    async with CheckpointManager(directory) as manager:
        for step in steps:
            await manager.save(stepped_state(step), step)


def damage(path: Path) -> None:
    """Flip the last byte of the file (array data: only a full verify catches it)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- a damaged state file ---------------------------------------------------------------------


async def test_an_empty_state_file_is_an_error_that_names_the_repair(tmp_path: Path) -> None:
    await save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoint").write_bytes(b"")  # truncated by a crash of the file system
    repair = f"`asyncckpt prune {tmp_path} --keep 5`"
    with pytest.raises(CheckpointCorruptedError, match="the file is empty") as opened:
        async with CheckpointManager(tmp_path):
            pass
    assert opened.value.part == "state file"
    assert repair in str(opened.value)
    with pytest.raises(CheckpointCorruptedError, match="the file is empty"):
        latest_checkpoint(tmp_path)
    # A session does not start over at step 0 beside the checkpoints it cannot see.
    with pytest.raises(CheckpointCorruptedError, match="the file is empty"):
        async with MonitoredTrainingSession(
            stepped_state(0), lambda state: None, checkpoint_dir=tmp_path
        ):
            pass  # pragma: no cover
    assert checkpoint_files(tmp_path) == ["model.ckpt-1", "model.ckpt-2"]


# -- a listed latest checkpoint that is missing ---------------------------------------------------


async def test_a_missing_latest_fails_the_open_or_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await save_steps(tmp_path, [1, 2, 3])
    (tmp_path / "model.ckpt-3").unlink()
    missing = "lists it as the latest checkpoint, but it is missing"
    with pytest.raises(CheckpointNotFoundError, match=missing) as opened:
        async with CheckpointManager(tmp_path):
            pass
    assert 'on_corrupt="fallback"' in str(opened.value)
    async with CheckpointManager(tmp_path, on_corrupt="fallback") as manager:
        assert manager.latest_step() == 2
        assert manager.all_steps() == [1, 2]
        tree = await manager.restore()
        assert tree["step"] == 2
    assert any("model.ckpt-3" in w and "missing" in w for w in warnings_of(caplog))


# -- a corrupted latest checkpoint ----------------------------------------------------------------


async def test_manager_restore_falls_back_to_the_newest_intact_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "model.ckpt-3")
    damage(tmp_path / "model.ckpt-2")
    async with CheckpointManager(tmp_path) as manager:
        with pytest.raises(CheckpointCorruptedError, match=r"model\.ckpt-3"):
            await manager.restore()
        assert manager.latest_step() == 3  # "raise" changes nothing
        into = stepped_state(0)
        tree = await manager.restore(into=into, on_corrupt="fallback")
        assert tree is into
        np.testing.assert_array_equal(into["w"], stepped_state(1)["w"])
        assert into["step"] == 1
        # The two that could not be restored are unlisted (their files stay, for verify),
        # so the run continues from step 1 and its next save is the latest.
        assert manager.latest_step() == 1
        assert manager.all_steps() == [1]
        await manager.save(stepped_state(2, version=1), 2)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-2")
    await assert_restores(str(tmp_path / "model.ckpt-2"), 2, version=1)
    assert checkpoint_files(tmp_path) == ["model.ckpt-1", "model.ckpt-2", "model.ckpt-3"]
    skipped = [w for w in warnings_of(caplog) if w.startswith("cannot restore")]
    assert [w.split(", ")[0] for w in skipped] == [
        f"cannot restore {tmp_path / 'model.ckpt-3'}",
        f"cannot restore {tmp_path / 'model.ckpt-2'}",
    ]


async def test_fallback_with_nothing_intact_raises_the_newest_error(tmp_path: Path) -> None:
    await save_steps(tmp_path, [1, 2])
    damage(tmp_path / "model.ckpt-1")
    damage(tmp_path / "model.ckpt-2")
    async with CheckpointManager(tmp_path, on_corrupt="fallback") as manager:
        with pytest.raises(CheckpointCorruptedError, match=r"model\.ckpt-2") as raised:
            await manager.restore()
        assert manager.all_steps() == [1, 2]  # nothing unlisted when nothing restored
    assert "none of the 2 checkpoints could be restored" in "".join(raised.value.__notes__)


async def test_saver_restore_falls_back_to_an_older_listed_checkpoint(tmp_path: Path) -> None:
    await save_steps(tmp_path, [1, 2])
    damage(tmp_path / "model.ckpt-2")
    path = str(tmp_path / "model.ckpt-2")
    with pytest.raises(CheckpointCorruptedError):
        await Saver().restore(path)
    tree = await Saver().restore(path, on_corrupt="fallback")
    assert tree["step"] == 1
    assert get_checkpoint_state(tmp_path) is not None  # a Saver's restore changes nothing
    assert latest_checkpoint(tmp_path) == path


async def test_a_session_resumes_from_the_newest_intact_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def step_fn(state: dict[str, Any]) -> None:
        state["w"] += 1.0
        state["step"] += 1

    await save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "model.ckpt-3")

    def session(**kwargs: Any) -> MonitoredTrainingSession:
        return MonitoredTrainingSession(
            stepped_state(0),
            step_fn,
            checkpoint_dir=tmp_path,
            save_checkpoint_steps=1,
            save_summaries_steps=None,
            log_step_count_steps=None,
            **kwargs,
        )

    with pytest.raises(CheckpointCorruptedError, match=r"model\.ckpt-3"):
        async with session():
            pass  # pragma: no cover
    async with session(on_corrupt="fallback") as sess:
        assert sess.global_step == 2
        assert sess.state["step"] == 2
        await sess.run()
        await sess.run()
    assert sess.global_step == 4
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-4")
    await assert_restores(str(tmp_path / "model.ckpt-4"), 4)
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    # 3 was re-saved from the resumed run, whole this time.
    assert state.names[-3:] == ("model.ckpt-2", "model.ckpt-3", "model.ckpt-4")
    await assert_restores(str(tmp_path / "model.ckpt-3"), 3)
    assert any("cannot restore" in w and "model.ckpt-3" in w for w in warnings_of(caplog))


def test_on_corrupt_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='on_corrupt must be "raise" or "fallback"'):
        CheckpointManager(tmp_path, on_corrupt="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='on_corrupt must be "raise" or "fallback"'):
        MonitoredTrainingSession({}, lambda state: None, on_corrupt="skip")  # type: ignore[arg-type]


async def test_a_checkpoint_dir_that_is_a_file_is_a_read_error_saying_so(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(CheckpointReadError, match="a directory on its path is a file"):
        async with MonitoredTrainingSession(
            stepped_state(0), lambda state: None, checkpoint_dir=tmp_path / "run"
        ):
            pass  # pragma: no cover
