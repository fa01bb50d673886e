"""Every ``examples/*.py`` runs as a user runs it, in a fresh directory, with small arguments.

A service runs until it is stopped: its own tests start, drive and stop it (``SERVICES``).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import pytest
from support import checkpoint_files, verify_exit

from asyncckpt import Saver, get_checkpoint_state, latest_checkpoint
from asyncckpt.cli import main as cli_main

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))

# Small arguments for each example; a new example must add its own here.
ARGS: dict[str, list[str]] = {
    "train_numpy.py": ["--dir", "train", "--last-step", "60", "--save-steps", "20"],
    "listener_upload.py": ["--dir", "up", "--remote", "remote", "--max-steps", "300"],
    "resume_input.py": ["--dir", "inp", "--items", "30", "--kill-at", "9"],
    "train_torch.py": ["--dir", "torch", "--last-step", "30", "--save-steps", "10"],
    "train_jax.py": ["--dir", "jax", "--last-step", "30", "--save-steps", "10"],
    "train_torch_ddp.py": ["--ckpt", "ddp", "--steps", "8", "--save-steps", "2"],
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


# -- examples/train_torch_ddp.py: two ranks, one shard each ------------------------------------

DDP: Final = "train_torch_ddp.py"
DDP_STEPS: Final = 16
DDP_TIMEOUT: Final = 60.0
Losses = dict[tuple[int, int], float]  # (rank, step) -> loss


def ddp_command(directory: Path, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES_DIR / DDP), "--ckpt", str(directory),
            "--steps", str(DDP_STEPS), "--save-steps", "2", *args]  # fmt: skip


@contextlib.contextmanager
def ddp_job(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The launcher in a session of its own: on the way out, whatever is left of it and its
    ranks is killed, so a failing test leaves no rank behind."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as job:
        try:
            yield job
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)


def ddp_records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def ddp_losses(records: list[dict[str, Any]]) -> Losses:
    return {(r["rank"], r["step"]): r["loss"] for r in records if "loss" in r}


def ddp_starts(records: list[dict[str, Any]]) -> dict[int, int]:
    return {r["rank"]: r["start"] for r in records if "start" in r}


def stopped(records: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return sorted((r["rank"], r["stopped"], r["latest"]) for r in records if "stopped" in r)


def run_ddp(directory: Path, *args: str) -> list[dict[str, Any]]:
    with ddp_job(ddp_command(directory, *args)) as job:
        stdout, stderr = job.communicate(timeout=DDP_TIMEOUT)
    assert job.returncode == 0, stderr
    assert stderr == ""
    return ddp_records(stdout)


def read_records_until(
    job: subprocess.Popen[str], done: Callable[[list[dict[str, Any]]], bool]
) -> tuple[list[dict[str, Any]], str]:
    """The job's records up to the first one after which ``done``, and the output read past
    it; by the deadline."""
    assert job.stdout is not None
    # Straight from the pipe: a select() on a buffered file misses lines already buffered.
    fd, pending = job.stdout.fileno(), b""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + DDP_TIMEOUT
    while not done(seen):
        if b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            seen.append(json.loads(line))
            continue
        readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert readable, f"the job did not get there in {DDP_TIMEOUT:g} s: {seen[-3:]}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the job ended before it got there: {seen[-3:]}"
        pending += chunk
    return seen, pending.decode()


def steps_of(ranks_and_steps: Losses, first: int, last: int) -> list[tuple[int, int]]:
    assert sorted(ranks_and_steps) == [(r, s) for r in (0, 1) for s in range(first, last + 1)]
    return sorted(ranks_and_steps)


@pytest.fixture(scope="module")
def ddp_unbroken(tmp_path_factory: pytest.TempPathFactory) -> Losses:
    """Each rank's loss at every step of a job run from 0 to DDP_STEPS, never interrupted."""
    pytest.importorskip("torch")
    records = run_ddp(tmp_path_factory.mktemp("ddp") / "ckpt")
    assert ddp_starts(records) == {0: 0, 1: 0}
    losses = ddp_losses(records)
    steps_of(losses, 1, DDP_STEPS)
    # Each rank trains on batches of its own.
    assert all(losses[0, step] != losses[1, step] for step in range(1, DDP_STEPS + 1))
    return losses


@pytest.mark.slow
def test_ddp_job_stopped_and_resumed_prints_the_unbroken_losses(
    tmp_path: Path, ddp_unbroken: Losses
) -> None:
    directory = tmp_path / "ckpt"
    first = run_ddp(directory, "--stop-at", "8")
    assert ddp_starts(first) == {0: 0, 1: 0}
    assert stopped(first) == [(0, 8, 8), (1, 8, 8)]  # (rank, stopped at, latest checkpoint)
    losses = ddp_losses(first)
    assert {k: ddp_unbroken[k] for k in steps_of(losses, 1, 8)} == losses

    second = run_ddp(directory)
    assert ddp_starts(second) == {0: 8, 1: 8}
    losses = ddp_losses(second)
    assert {k: ddp_unbroken[k] for k in steps_of(losses, 9, DDP_STEPS)} == losses
    assert stopped(second) == [(0, DDP_STEPS, DDP_STEPS), (1, DDP_STEPS, DDP_STEPS)]

    state = get_checkpoint_state(directory)
    assert state is not None
    assert state.names == tuple(f"model.ckpt-{step}" for step in (12, 14, 16))  # max_to_keep=3
    # Rank 0's shard holds the model (replicated) and each rank its own optimizer partition:
    # together, the AdamW state of every parameter once.
    shards = sorted(directory.glob(f"model.ckpt-{DDP_STEPS}.rank*-of-2.*"))
    assert [path.name.split(".")[2] for path in shards] == ["rank0-of-2", "rank1-of-2"]
    trees = [anyio.run(Saver().restore, str(path)) for path in shards]
    assert [sorted(tree) for tree in trees] == [
        ["model", "opt", "rng", "step"],
        ["opt", "rng", "step"],
    ]
    partitions = [len(tree["opt"]["state"]) for tree in trees]
    assert all(partitions)
    assert sum(partitions) == 4  # two Linear layers: two weights, two biases
    assert verify_exit(directory) == 0


@pytest.mark.slow
def test_ddp_job_with_a_killed_rank_ends_and_resumes_with_the_unbroken_losses(
    tmp_path: Path, ddp_unbroken: Losses
) -> None:
    directory = tmp_path / "ckpt"

    def kill_now(seen: list[dict[str, Any]]) -> bool:
        # Mid-run, with a checkpoint to resume from: there is something to get back.
        last = seen[-1] if seen else {}
        return (
            last.get("rank") == 1
            and last.get("step", 0) >= 5
            and bool(latest_checkpoint(directory))
        )

    # 0.1 s per step: the job is still running when the kill lands.
    with ddp_job(ddp_command(directory, "--step-seconds", "0.1")) as job:
        seen, unread = read_records_until(job, kill_now)
        pids = {record["rank"]: record["pid"] for record in seen if "pid" in record}
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=DDP_TIMEOUT)
    stdout = unread + stdout
    # The launcher saw rank 1 die, stopped rank 0 and exited: nothing waits for the dead rank.
    assert job.returncode == 1, stderr
    assert "rank 1 failed" in stderr
    assert "SIGKILL" in stderr
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    printed = ddp_losses(seen + ddp_records(stdout))
    last_printed = max(step for rank, step in printed if rank == 1)
    assert last_printed < DDP_STEPS
    assert all(loss == ddp_unbroken[key] for key, loss in printed.items())
    state = get_checkpoint_state(directory)
    assert state is not None
    latest = int(state.names[-1].rsplit("-", 1)[1])

    resumed = run_ddp(directory)
    # Both ranks went on from the latest checkpoint the killed job committed.
    assert ddp_starts(resumed) == {0: latest, 1: latest}
    assert 0 < latest <= last_printed
    losses = ddp_losses(resumed)
    assert {k: ddp_unbroken[k] for k in steps_of(losses, latest + 1, DDP_STEPS)} == losses
    assert latest_checkpoint(directory) == str(directory / f"model.ckpt-{DDP_STEPS}")
    assert verify_exit(directory) == 0
