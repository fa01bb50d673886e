"""SIGKILL a process saving every step at random instants: no checkpoint is lost or mixed.

A short run of the harness in ``benchmarks/crash.py`` (``python -m benchmarks.crash
--kills 200`` for the long one): after every kill the latest checkpoint passes ``asyncckpt
verify``, restores, holds one step, never goes back and is at least the last step reported
durable, and the next manager removes every temporary file. The child alternates event loops
on the same directory, so each resumes what the other wrote.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import anyio
import numpy as np
import pytest

from asyncckpt import CheckpointManager
from benchmarks.crash import check_directory, run_crashes, run_trainer_kills

if TYPE_CHECKING:
    from pathlib import Path

BACKENDS = ("asyncio", "trio") if importlib.util.find_spec("trio") is not None else ("asyncio",)


@pytest.mark.slow
def test_sigkill_at_random_instants_never_loses_or_mixes_a_checkpoint(tmp_path: Path) -> None:
    summary = run_crashes(
        10, seed=7, backends=BACKENDS, startup_fraction=0.2, directory=str(tmp_path)
    )
    assert summary.problems == []
    assert summary.kills == 10
    assert summary.losses == summary.inconsistent == summary.temp_files_left == 0
    assert summary.max_step > 0  # the children did save


@pytest.mark.slow
def test_sigkill_of_a_plain_step_trainer_loses_about_one_save_interval(tmp_path: Path) -> None:
    # A plain def step that never yields, saving every 10 steps: each kill finds the
    # directory sound and resumes from a checkpoint within about one interval of where it
    # was (the goal is an interval plus the write, two steps here; the test allows an
    # interval of slack for a loaded machine, the benchmark reports the figure).
    result = run_trainer_kills(6, save_steps=10, backends=BACKENDS, directory=str(tmp_path))
    assert result.problems == []
    assert len(result.steps_lost) == 6
    assert result.max_lost <= 2 * result.save_steps


def test_the_check_reports_a_checkpoint_that_mixes_two_steps(tmp_path: Path) -> None:
    async def save_mixed() -> None:
        async with CheckpointManager(tmp_path) as manager:
            await manager.save({"a": np.full(3, 4), "b": np.full(2, 5)}, 4)

    anyio.run(save_mixed)
    latest, temps, problems = anyio.run(check_directory, str(tmp_path))
    assert (latest, temps) == (4, 0)
    assert problems == ["checkpoint of step 4 holds steps [4, 5]"]
