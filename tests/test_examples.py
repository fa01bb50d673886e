"""Every ``examples/*.py`` runs as a user runs it, in a fresh directory, with small arguments.

A service runs until it is stopped: its own tests start, drive and stop it (``SERVICES``).
"""

from __future__ import annotations

import filecmp
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from support import checkpoint_files

from asyncckpt import Saver, get_checkpoint_state, latest_checkpoint
from asyncckpt.cli import main as cli_main

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))

# Small arguments for each example; a new example must add its own here.
ARGS: dict[str, list[str]] = {
    "train_numpy.py": ["--dir", "train", "--last-step", "60", "--save-steps", "20"],
    "listener_upload.py": ["--dir", "up", "--remote", "remote", "--max-steps", "300"],
    "resume_input.py": ["--dir", "inp", "--items", "30", "--kill-at", "9"],
    "train_torch.py": ["--dir", "torch", "--last-step", "30", "--save-steps", "10"],
    "train_jax.py": ["--dir", "jax", "--last-step", "30", "--save-steps", "10"],
}
# Services run until they are stopped; each has its own tests, which start, drive and stop it.
SERVICES: dict[str, str] = {"service_snapshot.py": "tests/test_service_example.py"}


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), *ARGS[name]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_example_has_arguments() -> None:
    assert EXAMPLES, "no examples found"
    assert not set(ARGS) & set(SERVICES)
    assert sorted([*ARGS, *SERVICES]) == [path.name for path in EXAMPLES]
    root = EXAMPLES_DIR.parent
    assert all((root / tests).is_file() for tests in SERVICES.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", [path for path in EXAMPLES if path.name in ARGS], ids=lambda path: path.name
)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    result = run_example(example.name, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def run_with(name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run example ``name`` with these arguments instead of its small default ones."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_train_numpy_second_run_resumes_where_the_first_stopped(tmp_path: Path) -> None:
    directory = tmp_path / "train"
    first = run_with(
        "train_numpy.py", tmp_path, "--dir", "train", "--last-step", "60", "--save-steps", "20"
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "starting at step 0"
    assert "stopped at step 60," in first.stdout
    assert latest_checkpoint(directory) == str(directory / "model.ckpt-60")

    second = run_with(
        "train_numpy.py", tmp_path, "--dir", "train", "--last-step", "120", "--save-steps", "20"
    )
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    lines = second.stdout.splitlines()
    assert lines[0] == "starting at step 60"
    assert lines[-1].startswith("stopped at step 120,")
    assert lines[-1].endswith(f"latest checkpoint {os.path.join('train', 'model.ckpt-120')}")
    assert latest_checkpoint(directory) == str(directory / "model.ckpt-120")
    # The first run's state went on: 60 (saved again at the start), 80, 100, then 120.
    state = get_checkpoint_state(directory)
    assert state is not None
    assert state.names[-4:] == tuple(f"model.ckpt-{step}" for step in (60, 80, 100, 120))
    tree = anyio.run(Saver().restore, latest_checkpoint(directory))
    assert isinstance(tree, dict)
    assert tree["weights"].shape == tree["momentum"].shape == (32,)
    assert cli_main(["verify", str(directory)], out=io.StringIO()) == 0


def upload_run(result: subprocess.CompletedProcess[str]) -> tuple[list[str], int, list[int]]:
    """A clean run of listener_upload.py: its lines, the step it stopped at, the uploads."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    stopped = re.fullmatch(r"stopped at step (\d+)", lines[-1])
    assert stopped, result.stdout
    uploaded = [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+): uploaded", line))]
    return lines, int(stopped.group(1)), uploaded


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["block", "skip"])
def test_listener_upload_slower_than_the_save_interval(tmp_path: Path, policy: str) -> None:
    # Saves every 25 steps of microseconds, uploads of 0.2 s, one checkpoint kept locally:
    # retention must wait for each upload, and the policy decides about the saves meanwhile.
    result = run_with(
        "listener_upload.py", tmp_path, "--dir", "up", "--remote", "remote",
        "--max-steps", "1000000", "--upload-seconds", "0.2", "--keep", "1", "--policy", policy,
    )  # fmt: skip
    _lines, last_step, uploaded = upload_run(result)
    assert uploaded[0] == 0
    assert uploaded[-1] == last_step
    if policy == "block":
        # Every save was taken and uploaded: the loop waited for the listener.
        assert uploaded[:-1] == list(range(0, 25 * (len(uploaded) - 1), 25))
    else:
        # The loop ran on and dropped the saves it had no room for.
        assert uploaded == sorted(uploaded)
        assert all(step % 25 == 0 for step in uploaded[:-1])
    remote, local = tmp_path / "remote", tmp_path / "up"
    assert sorted(os.listdir(remote)) == sorted(f"model.ckpt-{step}" for step in set(uploaded))
    assert cli_main(["verify", str(remote)], out=io.StringIO()) == 0
    # Retention caught up at the close: one checkpoint kept, the last, listed and on disk.
    assert checkpoint_files(local) == [f"model.ckpt-{last_step}"]
    state = get_checkpoint_state(local)
    assert state is not None
    assert state.paths() == [str(local / f"model.ckpt-{last_step}")]


@pytest.mark.slow
def test_listener_upload_copies_every_checkpoint_and_stops_early(tmp_path: Path) -> None:
    max_steps = 20_000
    result = run_with(
        "listener_upload.py", tmp_path, "--dir", "up", "--remote", "remote",
        "--max-steps", str(max_steps),
    )  # fmt: skip
    lines, last_step, uploaded = upload_run(result)
    # The listener decided to stop after an evaluation; the loop stopped at a step boundary
    # after that (the listener runs in the background), long before max_steps.
    decisions = [
        int(m.group(1)) for line in lines if (m := re.match(r"step (\d+): no improv", line))
    ]
    assert decisions
    assert decisions[0] <= last_step < max_steps
    assert lines[-2] == f"done at step {last_step}; uploaded {len(uploaded)} checkpoints"
    # Every save was uploaded, in order, the final one (made in end()) included.
    assert uploaded == sorted(uploaded)
    assert uploaded[0] == 0
    assert uploaded[-1] == last_step
    assert all(step % 25 == 0 for step in uploaded[:-1])
    remote, local = tmp_path / "remote", tmp_path / "up"
    assert sorted(os.listdir(remote)) == sorted(f"model.ckpt-{step}" for step in uploaded)
    # The copies are the checkpoints: identical to those still kept locally, and whole.
    kept = checkpoint_files(local)
    assert kept
    for name in kept:
        assert filecmp.cmp(local / name, remote / name, shallow=False)
    assert cli_main(["verify", str(remote)], out=io.StringIO()) == 0
    assert latest_checkpoint(local) == str(local / f"model.ckpt-{last_step}")


@pytest.mark.slow
def test_resume_input_continues_the_killed_runs_input(tmp_path: Path) -> None:
    result = run_example("resume_input.py", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "run 1: killed (SIGKILL) after step 9"
    resumed = re.fullmatch(r"run 2: resumed at step (\d+), ran to step 30 \(.*\)", lines[1])
    assert resumed is not None
    assert int(resumed.group(1)) in (4, 8)  # a model checkpoint's step (every 4 steps)
    assert lines[-1].endswith("every item once per epoch, no gap, no repeat")
    directory = tmp_path / "inp"
    assert latest_checkpoint(directory) == str(directory / "model.ckpt-30")
    assert latest_checkpoint(directory, "checkpoint_input") == str(directory / "input.ckpt-30")
    assert cli_main(["verify", str(directory)], out=io.StringIO()) == 0
