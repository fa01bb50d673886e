"""Sharded checkpoints of real multi-process jobs: every rank a process (tests/
distributed_worker.py) that all-reduces over a gloo training group and saves through a
TorchDistributedCoordinator, or shares only an S3 bucket through a StorageCoordinator.

Every process has a timeout; a test that would hang fails instead."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
PROCESS_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ranks(directory: str, world_size: int, *extra: str, per_rank: Any = None) -> list[Any]:
    port = free_port()
    processes = []
    for rank in range(world_size):
        arguments = [
            sys.executable, WORKER, directory, "--rank", str(rank), "--world-size",
            str(world_size), "--port", str(port), *extra,
            *(per_rank(rank) if per_rank else ()),
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def results_of(processes: list[Any]) -> list[dict[str, Any]]:
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=PROCESS_TIMEOUT)
            assert process.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def run_ranks(directory: str, world_size: int, *extra: str, per_rank: Any = None) -> list[Any]:
    return results_of(start_ranks(directory, world_size, *extra, per_rank=per_rank))


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_gloo_job_saves_one_committed_checkpoint_per_step(
    tmp_path: Path, world_size: int
) -> None:
    results = run_ranks(str(tmp_path), world_size, "--steps", "1,2,3")
    for rank, result in enumerate(results):
        assert result["outcomes"] == [{"step": s, "ok": True} for s in (1, 2, 3)]
        assert result["latest"] == 3
        assert result["restored"] == {"w": 3.0, "m": 30.0 + rank, "rank": rank}
    manifests = sorted(n for n in os.listdir(tmp_path) if n.startswith("model.ckpt-"))
    assert [n for n in manifests if ".rank" not in n] == ["model.ckpt-2", "model.ckpt-3"]
    assert len([n for n in manifests if ".rank" in n]) == 2 * world_size
    # A restart (a new job, a new store) restores every rank's own shard of the latest step.
    for rank, result in enumerate(run_ranks(str(tmp_path), world_size, "--restore-only")):
        assert result["opened_latest"] == 3
        assert result["restored"] == {"w": 3.0, "m": 30.0 + rank, "rank": rank}


def test_a_rank_whose_write_fails_fails_that_step_on_every_rank(tmp_path: Path) -> None:
    results = run_ranks(
        str(tmp_path), 2, "--steps", "1,2,3",
        per_rank=lambda rank: ["--fail-step", "2"] if rank == 1 else [],
    )  # fmt: skip
    for result in results:
        outcomes = result["outcomes"]
        assert [o["ok"] for o in outcomes] == [True, False, True]
        assert "No space left on device" in outcomes[1]["error"]
        assert result["latest"] == 3
    assert "step 2 was not committed: rank 1 failed" in results[0]["outcomes"][1]["error"]


def test_ranks_that_save_different_steps_commit_nothing(tmp_path: Path) -> None:
    chief, other = run_ranks(
        str(tmp_path), 2, "--steps", "1", "--timeout", "60",
        per_rank=lambda rank: ["--step-offset", "1"] if rank == 1 else [],
    )  # fmt: skip
    # Judged from both reports (a wait for the timeout would say "reported no shard").
    assert "rank 1 saved step 2 where rank 0 saved 1" in chief["outcomes"][0]["error"]
    assert "rank 0 saved step 1 where rank 1 saved 2" in other["outcomes"][0]["error"]
    assert chief["latest"] is None
    assert other["latest"] is None


def test_a_rank_killed_mid_save_fails_the_save_within_the_timeout(tmp_path: Path) -> None:
    processes = start_ranks(
        str(tmp_path), 2, "--steps", "1,2", "--timeout", "3",
        per_rank=lambda rank: ["--stall-step", "2"] if rank == 1 else [],
    )  # fmt: skip
    stalled = processes[1]
    try:
        assert stalled.stdout is not None
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while "STALLED" not in stalled.stdout.readline():
            assert time.monotonic() < deadline
            assert stalled.poll() is None
        os.kill(stalled.pid, signal.SIGKILL)
        stalled.communicate(timeout=PROCESS_TIMEOUT)
        (chief,) = results_of(processes[:1])  # within PROCESS_TIMEOUT: the wait is bounded
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert chief["outcomes"][0] == {"step": 1, "ok": True}
    assert chief["outcomes"][1]["ok"] is False
    assert "rank 1 reported no shard within 3 s" in chief["outcomes"][1]["error"]
    assert chief["latest"] == 1
    # The restart restores step 1 on both ranks; the killed rank's temporary file is gone.
    for rank, result in enumerate(run_ranks(str(tmp_path), 2, "--restore-only")):
        assert result["restored"] == {"w": 1.0, "m": 10.0 + rank, "rank": rank}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".model.ckpt-2")]


def test_ranks_sharing_only_a_bucket_save_and_restore(s3_url: str) -> None:
    url = f"{s3_url}/distributed-{os.getpid()}-{time.monotonic_ns()}"
    results = run_ranks(url, 2, "--coordinator", "storage", "--steps", "1,2")
    for rank, result in enumerate(results):
        assert result["outcomes"] == [{"step": 1, "ok": True}, {"step": 2, "ok": True}]
        assert result["restored"] == {"w": 2.0, "m": 20.0 + rank, "rank": rank}
    restarted = run_ranks(url, 2, "--coordinator", "storage", "--restore-only")
    assert [r["opened_latest"] for r in restarted] == [2, 2]


def test_a_stop_on_one_rank_of_a_gloo_job_stops_both_after_the_same_step(tmp_path: Path) -> None:
    results = run_ranks(
        str(tmp_path), 2, "--session",
        per_rank=lambda rank: ["--last-step", "5"] if rank == 1 else [],
    )  # fmt: skip
    assert [(r["start"], r["final"]) for r in results] == [(0, 5), (0, 5)]
    # The final save is one committed checkpoint; the restart resumes both ranks there.
    resumed = run_ranks(
        str(tmp_path), 2, "--session",
        per_rank=lambda rank: ["--last-step", "7"] if rank == 0 else [],
    )  # fmt: skip
    for rank, result in enumerate(resumed):
        assert (result["start"], result["final"]) == (5, 7)
        assert (result["w"], result["m"]) == (7.0, 70.0 + rank)


def test_a_sigterm_to_one_rank_stops_both_and_saves_one_checkpoint(tmp_path: Path) -> None:
    processes = start_ranks(str(tmp_path), 2, "--session", "--step-secs", "0.05")
    signalled = processes[1]
    assert signalled.stdout is not None
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while "STEP 3" not in signalled.stdout.readline():
        assert time.monotonic() < deadline
        assert signalled.poll() is None
    os.kill(signalled.pid, signal.SIGTERM)
    chief, other = results_of(processes)
    assert chief["final"] == other["final"] >= 3
    resumed = run_ranks(str(tmp_path), 2, "--session", "--last-step", str(chief["final"] + 1))
    assert [r["start"] for r in resumed] == [chief["final"]] * 2


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_gloo_job_checkpoints_to_a_bucket(s3_url: str, world_size: int) -> None:
    url = f"{s3_url}/gloo-{os.getpid()}-{time.monotonic_ns()}"
    for rank, result in enumerate(run_ranks(url, world_size, "--steps", "1,2")):
        assert result["outcomes"] == [{"step": 1, "ok": True}, {"step": 2, "ok": True}]
        assert result["restored"] == {"w": 2.0, "m": 20.0 + rank, "rank": rank}


def test_kill_9_of_every_rank_at_any_instant_leaves_a_consistent_latest(tmp_path: Path) -> None:
    """The crash harness with 2 ranks: both are SIGKILLed at a random instant of a run that
    saves every step, again and again; after each kill the latest committed checkpoint
    verifies and every rank restores the same step from it."""
    rng = random.Random(17)
    steps = ",".join(str(s) for s in range(1, 40))
    for _round in range(4):
        processes = start_ranks(str(tmp_path), 2, "--steps", steps, "--timeout", "10")
        time.sleep(rng.uniform(1.0, 3.0))  # torch's import and the first saves
        for process in processes:
            os.kill(process.pid, signal.SIGKILL)
        for process in processes:
            process.communicate(timeout=PROCESS_TIMEOUT)
        verify = subprocess.run(
            [sys.executable, "-m", "asyncckpt", "verify", str(tmp_path)],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        restored = run_ranks(str(tmp_path), 2, "--restore-only", "--timeout", "10")
        latest = {r["opened_latest"] for r in restored}
        assert len(latest) == 1
        if None not in latest:
            (step,) = latest
            for rank, result in enumerate(restored):
                assert result["restored"] == {
                    "w": float(step),
                    "m": step * 10.0 + rank,
                    "rank": rank,
                }
