"""Sharded checkpoints of real multi-process jobs: every rank a process (tests/
distributed_worker.py) that all-reduces over a gloo training group and saves through a
TorchDistributedCoordinator, or shares only an S3 bucket through a StorageCoordinator.

Every process has a timeout; a test that would hang fails instead."""

from __future__ import annotations

import json
import os
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
        began = time.monotonic()
        os.kill(stalled.pid, signal.SIGKILL)
        stalled.communicate(timeout=PROCESS_TIMEOUT)
        (chief,) = results_of(processes[:1])
        assert time.monotonic() - began < 3 + 30  # the timeout, plus a loaded machine's slack
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
