"""``examples/service_snapshot.py`` as a user runs it: a uvicorn process on loopback.

Each test starts the example (``--port 0``: it prints the URL it serves on), drives it with
``http.client`` from this process, stops it with a signal and reads what it left with a
CheckpointManager. Every wait is bounded; a service still running at the end is killed.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import numpy as np
import pytest

from asyncckpt import CheckpointManager, get_checkpoint_state, latest_checkpoint
from asyncckpt.cli import main as cli_main

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.slow

EXAMPLE: Final = Path(__file__).resolve().parent.parent / "examples" / "service_snapshot.py"
DIM: Final = 64  # the example's floats per table row
TIMEOUT: Final = 10.0  # for the service to start, or to stop


class Service:
    """One run of the example: its process, the URL it serves on, its log."""

    def __init__(self, directory: Path, log: Path, *args: str) -> None:
        self.log_path = log
        with log.open("wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--dir", str(directory), "--port", "0", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.host, self.port = "", 0

    def wait_until_serving(self) -> None:
        """Read the host and port from the line the service prints once it serves."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"^serving on http://([\d.]+):(\d+)$", self.log(), re.MULTILINE)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                return
            if self.process.poll() is not None:
                pytest.fail(f"the service exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        pytest.fail(f"no 'serving on' line within {TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str) -> tuple[int, Any]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def update(self) -> int:
        """POST one update; return the version the service acknowledged."""
        status, body = self.request("POST", "/update")
        assert status == 200, body
        version = body["version"]
        assert isinstance(version, int)
        return version

    def get(self, path: str) -> dict[str, Any]:
        status, body = self.request("GET", path)
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send ``signum``; return the exit status (the service must exit in time)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {TIMEOUT} s after {signum.name}:\n{self.log()}")


@contextlib.contextmanager
def service(directory: Path, log: Path, *args: str) -> Iterator[Service]:
    """Start the example; at the end kill it if a failed test left it running."""
    running = Service(directory, log, *args)
    try:
        running.wait_until_serving()
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait(timeout=TIMEOUT)


def update_until(
    svc: Service, condition: Callable[[dict[str, Any]], bool], what: str, *, limit: int = 300
) -> tuple[list[int], dict[str, Any]]:
    """POST updates, reading the statistics after each, until ``condition(statistics)``
    (at most ``limit`` updates and 5 s); return the acknowledged versions and the last
    statistics."""
    versions: list[int] = []
    deadline = time.monotonic() + 5.0
    while len(versions) < limit and time.monotonic() < deadline:
        versions.append(svc.update())
        stats = svc.statistics()
        if condition(stats):
            return versions, stats
        time.sleep(0.005)  # a client's pace: the saves every 0.1 s see several updates
    pytest.fail(f"not {what} after {len(versions)} updates: {svc.statistics()}\n{svc.log()}")


def statistics_until(
    svc: Service, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Read the statistics, with no update, until ``condition(statistics)`` (at most 5 s)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        stats = svc.statistics()
        if condition(stats):
            return stats
        time.sleep(0.01)
    pytest.fail(f"not {what} within 5 s: {svc.statistics()}\n{svc.log()}")


async def restore_all(directory: Path) -> dict[int, dict[str, Any]]:
    """Every kept checkpoint's tree, by step, read by a read-only manager."""
    async with CheckpointManager(directory, read_only=True) as reader:
        trees = {}
        for step in reader.all_steps():
            tree = await reader.restore(step)
            assert isinstance(tree, dict)
            trees[step] = tree
        return trees


async def restore_latest(directory: Path) -> tuple[int, dict[str, Any]]:
    """The newest checkpoint's step and tree, read while the service may write more (the
    read-only manager reads again if the writer retires it meanwhile)."""
    async with CheckpointManager(directory, read_only=True) as reader:
        tree = await reader.restore()
        step = reader.latest_step()  # the one it read: restore() reads the state file
        assert step is not None
        assert isinstance(tree, dict)
        return step, tree


def check_labelled_by_its_version(step: int, tree: dict[str, Any]) -> None:
    """The contents are those of ``step`` updates: version, table and counters agree."""
    assert tree["version"] == step
    # Each update adds 1.0 to one row of the table and 1 to one counter.
    assert float(np.sum(tree["table"], dtype=np.float64)) == step * DIM
    assert sum(int(counter.sum()) for counter in tree["counters"]) == step


def test_serves_while_it_saves_and_labels_each_checkpoint_by_its_contents(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "svc"
    with service(directory, tmp_path / "log", "--save-secs", "0.1") as svc:
        reserved = svc.statistics()
        versions, stats = update_until(
            svc, lambda s: s["written"] >= 3 and (s["latest_step"] or 0) > 0, "saved thrice"
        )
        # Every update was acknowledged once, in order, while the saves went on.
        assert versions == list(range(1, len(versions) + 1))
        assert stats["failed"] == 0
        assert stats["last_error"] is None
        assert stats["max_pending"] == 0
        assert stats["pending"] <= 1
        assert stats["latest_durable_time"] is not None
        assert stats["last_write_secs"] is not None
        # reserve() made every buffer before serving: the saves allocated none.
        assert reserved["buffers_allocated"] > 0
        assert stats["buffers_allocated"] == reserved["buffers_allocated"]
        assert stats["bytes_allocated"] >= 4 * 2**20
        # Another process reads the newest checkpoint while the service writes more.
        step, tree = anyio.run(restore_latest, directory)
        assert 0 < step <= versions[-1]
        check_labelled_by_its_version(step, tree)
        assert svc.stop() == 0
    log = svc.log()
    assert re.search(r"INFO:asyncckpt: saving checkpoint for step \d+ into ", log)
    assert re.search(r"INFO:asyncckpt: checkpoint \S+ is durable \(", log)
    kept = anyio.run(restore_all, directory)
    assert len(kept) <= 3  # max_to_keep=3
    assert max(kept) == versions[-1]
    for step, tree in kept.items():
        check_labelled_by_its_version(step, tree)


def make_state_file_a_directory(directory: Path) -> None:
    """Replace the state file by a directory: the writer's rename over it then fails."""
    state_file = directory / "checkpoint"
    deadline = time.monotonic() + 5.0
    while True:  # the writer may replace the file between the unlink and the mkdir
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        try:
            state_file.mkdir()
        except FileExistsError:
            assert time.monotonic() < deadline
            continue
        return


def test_a_failed_write_is_logged_and_the_service_goes_on(tmp_path: Path) -> None:
    directory = tmp_path / "svc"
    with service(directory, tmp_path / "log", "--save-secs", "0.1") as svc:
        before, _ = update_until(svc, lambda s: s["written"] >= 1, "saved once")
        make_state_file_a_directory(directory)
        during, failing = update_until(svc, lambda s: s["failed"] >= 2, "failed twice")
        assert "Is a directory" in failing["last_error"]
        assert "the previous checkpoint is still the latest" in failing["last_error"]
        assert re.search(
            r"^ERROR:asyncckpt: .*Is a directory.*; checkpointing goes on$", svc.log(), re.M
        )
        # While the directory is there every write fails, and the service retries: the
        # failures grow, nothing more is written, the latest stays what it was.
        more, still = update_until(svc, lambda s: s["failed"] > failing["failed"], "retried")
        assert still["written"] == failing["written"]
        assert still["latest_step"] == failing["latest_step"]
        assert (directory / "checkpoint").is_dir()
        # The state file's place is free again: the next saves are written and listed.
        (directory / "checkpoint").rmdir()
        after, recovered = update_until(
            svc,
            lambda s: (
                s["written"] >= still["written"] + 2 and s["latest_step"] > still["latest_step"]
            ),
            "written again",
        )
        versions = [*before, *during, *more, *after]
        assert versions == list(range(1, len(versions) + 1))  # every request succeeded
        assert latest_checkpoint(directory) == str(
            directory / f"model.ckpt-{recovered['latest_step']}"
        )
        assert svc.stop() == 0
    kept = anyio.run(restore_all, directory)
    assert max(kept) == after[-1]
    for step, tree in kept.items():
        check_labelled_by_its_version(step, tree)
    assert cli_main(["verify", str(directory)], out=io.StringIO()) == 0


def test_sigterm_saves_exactly_the_acknowledged_updates_and_a_restart_restores_them(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "svc"
    updates = 50
    # Saves every 0.05 s: the stop is likely to come while one is being written, and the
    # last save must be taken after it, never dropped.
    with service(directory, tmp_path / "log1", "--save-secs", "0.05") as first:
        assert [first.update() for _ in range(updates)] == list(range(1, updates + 1))
        assert first.stop(signal.SIGTERM) == 0
    assert latest_checkpoint(directory) == str(directory / f"model.ckpt-{updates}")
    last = anyio.run(restore_all, directory)
    check_labelled_by_its_version(updates, last[updates])

    # What `asyncckpt ls` shows of the directory the service left.
    out = io.StringIO()
    assert cli_main(["ls", "--json", str(directory)], out=out) == 0
    listing = json.loads(out.getvalue())
    state = get_checkpoint_state(directory)
    assert state is not None
    assert [row["name"] for row in listing["checkpoints"]] == list(state.names)
    assert listing["latest"] == f"model.ckpt-{updates}"
    assert listing["checkpoints"][-1]["step"] == updates
    assert len(listing["checkpoints"]) <= 3  # the example keeps three
    out = io.StringIO()
    assert cli_main(["ls", str(directory)], out=out) == 0
    assert out.getvalue().splitlines()[-1].split()[0] == str(updates)
    assert out.getvalue().splitlines()[-1].endswith(f"model.ckpt-{updates}  (latest)")

    # A second start restores it before serving, and goes on from there; Ctrl-C stops it.
    with service(directory, tmp_path / "log2", "--save-secs", "0.05") as second:
        health = second.get("/health")
        assert health == {"status": "ok", "version": updates, "latest_step": updates}
        assert f"INFO:service: restored version {updates}" in second.log()
        more = [second.update() for _ in range(10)]
        assert more == list(range(updates + 1, updates + 11))
        assert second.stop(signal.SIGINT) == 0
    assert latest_checkpoint(directory) == str(directory / f"model.ckpt-{updates + 10}")
    kept = anyio.run(restore_all, directory)
    for step, tree in kept.items():
        check_labelled_by_its_version(step, tree)
    assert max(kept) == updates + 10
    assert cli_main(["verify", str(directory)], out=io.StringIO()) == 0


def test_a_stop_whose_last_save_fails_exits_1(tmp_path: Path) -> None:
    directory = tmp_path / "svc"
    with service(directory, tmp_path / "log", "--save-secs", "0.1") as svc:
        statistics_until(svc, lambda s: s["latest_step"] == 0, "saved version 0")
        make_state_file_a_directory(directory)
        assert svc.update() == 1
        assert svc.stop() == 1
    log = svc.log()
    assert "ERROR:service: version 1 was not saved (the newest checkpoint is step 0)" in log
    assert not (directory / "model.ckpt-1").exists()
