"""Checkpoints on object stores through the public API: a URL is all it takes.

Every test runs on ``memory://`` and on a real S3 server (moto's, on 127.0.0.1: the
``s3_url`` fixture), on asyncio and trio.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest

from asyncckpt import (
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriteError,
    Saver,
    latest_checkpoint,
)
from asyncckpt._storage import resolve_storage
from asyncckpt._storage._object import ObjectStorage
from asyncckpt.cli import main as cli_main
from asyncckpt.testing import FaultyStorage

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(params=["memory", "s3"])
def remote_dir(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh prefix on ``memory://`` or on the local S3 server."""
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        yield f"memory://tests/{prefix}"
    else:
        yield f"{request.getfixturevalue('s3_url')}/{prefix}"


def model(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "w": np.full((256, 256), step, np.float32),
        "layers": [np.arange(100, dtype=np.int64) + step for _ in range(3)],
    }


def assert_model(tree: Any, step: int) -> None:
    assert tree["step"] == step
    np.testing.assert_array_equal(tree["w"], np.full((256, 256), step, np.float32))
    for layer in tree["layers"]:
        np.testing.assert_array_equal(layer, np.arange(100, dtype=np.int64) + step)


def cli(*argv: str) -> tuple[int, str]:
    """Run the command line (a blocking call: from a worker thread in async tests)."""
    out = io.StringIO()
    status = cli_main(list(argv), out)
    return status, out.getvalue()


async def async_cli(*argv: str) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(lambda: cli(*argv))


async def test_a_manager_saves_keeps_and_restores_on_a_url(remote_dir: str) -> None:
    async with CheckpointManager(remote_dir, max_to_keep=2) as manager:
        for step in (1, 2, 3):
            await manager.save(model(step), step)
        await manager.wait()
        assert manager.all_steps() == [2, 3]
        assert_model(await manager.restore(), 3)
        into = model(0)
        restored = await manager.restore(step=2, into=into)
        assert restored["w"] is into["w"]  # filled in place from ranged reads
        assert_model(restored, 2)
        assert (await manager.metadata()).step == 3
        with pytest.raises(ValueError, match="mmap=True needs a local checkpoint"):
            await manager.restore(mmap=True)
    # A new writer continues the list; the retired checkpoint is gone from the store.
    async with CheckpointManager(remote_dir, max_to_keep=2) as manager:
        assert manager.latest_step() == 3
        await manager.save(model(4), 4)
    assert latest_checkpoint(remote_dir) == f"{remote_dir}/model.ckpt-4"
    status, out = await async_cli("ls", "--json", remote_dir)
    assert status == 0
    listed = json.loads(out)
    assert [c["step"] for c in listed["checkpoints"]] == [3, 4]


async def test_a_second_writer_on_a_prefix_is_locked_out(remote_dir: str) -> None:
    async with CheckpointManager(remote_dir) as first:
        await first.save(model(1), 1)
        with pytest.raises(CheckpointLockedError):
            async with CheckpointManager(remote_dir):
                pass
        # Readers need no lock.
        async with CheckpointManager(remote_dir, read_only=True) as reader:
            await first.wait()
            assert_model(await reader.restore(), 1)
    async with CheckpointManager(remote_dir) as second:  # released at the close
        assert second.latest_step() == 1


async def test_an_idle_manager_keeps_its_lease_and_a_second_writer_out() -> None:
    url = f"memory://tests/lease-{uuid.uuid4().hex[:8]}"
    async with CheckpointManager(url, storage=ObjectStorage(url, lease_secs=0.3)) as first:
        await anyio.sleep(1.0)  # three leases long, and no save to renew it
        with pytest.raises(CheckpointLockedError, match="another writer holds"):
            async with CheckpointManager(url, storage=ObjectStorage(url, lease_secs=0.3)):
                pass
        await first.save(model(1), 1)
        await first.wait()
        assert first.statistics().failed == 0


async def test_a_new_writer_sweeps_old_unlisted_checkpoints_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a writer killed between a checkpoint's upload and the state file leaves: an
    # unlisted checkpoint object. The next writer removes it once it is older than the grace
    # period (a writer that lost its lease may still be uploading a young one).
    url = f"memory://tests/sweep-{uuid.uuid4().hex[:8]}"
    storage = resolve_storage(url)
    async with CheckpointManager(url) as manager:
        await manager.save(model(1), 1)
    for name in ("model.ckpt-2", "input.ckpt-2"):
        await anyio.to_thread.run_sync(storage.write_atomic, f"{url}/{name}", [b"left over"])

    def names() -> list[str]:
        return sorted(n for n in storage.list_names(url) if ".ckpt-" in n)

    async with CheckpointManager(url) as manager:
        assert manager.all_steps() == [1]
    assert names() == ["input.ckpt-2", "model.ckpt-1", "model.ckpt-2"]  # young: kept
    monkeypatch.setattr("asyncckpt._checkpoint._directory.UNLISTED_GRACE_SECS", -1.0)
    async with CheckpointManager(url) as manager:
        assert_model(await manager.restore(), 1)
    # Only this writer's prefix: another basename's files belong to another writer.
    assert names() == ["input.ckpt-2", "model.ckpt-1"]


async def test_a_saver_on_a_url_names_and_restores_like_on_disk(remote_dir: str) -> None:
    saver = Saver(max_to_keep=1)
    first = await saver.save(model(5), f"{remote_dir}/model.ckpt", global_step=5)
    assert first == f"{remote_dir}/model.ckpt-5"
    await saver.save(model(6), f"{remote_dir}/model.ckpt", global_step=6)
    latest = saver.latest_checkpoint(remote_dir)
    assert latest == f"{remote_dir}/model.ckpt-6"
    assert_model(await saver.restore(latest), 6)
    with pytest.raises(CheckpointNotFoundError):
        await saver.restore(first)  # retired by max_to_keep=1
    assert (await saver.metadata(latest)).step == 6


async def test_the_command_line_verifies_inspects_and_prunes_a_url(remote_dir: str) -> None:
    async with CheckpointManager(remote_dir, max_to_keep=None) as manager:
        for step in (1, 2, 3):
            await manager.save(model(step), step)
    assert (await async_cli("verify", remote_dir))[0] == 0
    status, out = await async_cli("inspect", f"{remote_dir}/model.ckpt-2")
    assert status == 0
    assert "step 2," in out
    assert "[2] array int64 [100]" in out
    assert (await async_cli("prune", remote_dir, "--keep", "1"))[0] == 0
    assert latest_checkpoint(remote_dir) == f"{remote_dir}/model.ckpt-3"
    async with CheckpointManager(remote_dir, read_only=True) as reader:
        assert reader.all_steps() == [3]


def latest_step_of(directory: str) -> int | None:
    latest = latest_checkpoint(directory)
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def test_a_training_run_on_s3_is_killed_and_resumes_from_it(s3_url: str) -> None:
    # README's trainer, pointed at s3://: SIGKILL once it has saved a few checkpoints, then
    # run it again: it starts from the newest one, and the command line verifies them all.
    directory = f"{s3_url}/train-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, str(_EXAMPLES / "train_numpy.py"), "--dir", directory]
    trainer = subprocess.Popen(
        [*command, "--last-step", "1000000", "--save-steps", "20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (latest_step_of(directory) or 0) < 100:
            assert trainer.poll() is None, trainer.communicate(timeout=30)[1]
            assert time.monotonic() < deadline, "the trainer saved nothing past step 100"
            time.sleep(0.05)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.communicate(timeout=30)
    killed_at = latest_step_of(directory)
    assert killed_at is not None
    resumed = subprocess.run(
        [*command, "--last-step", str(killed_at + 40), "--save-steps", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"starting at step {killed_at}\n" in resumed.stdout
    assert latest_step_of(directory) == killed_at + 40
    status, _out = cli("verify", directory)
    assert status == 0


async def save_ops(directory: str) -> list[tuple[str, str]]:
    """The storage requests of a second save (with max_to_keep=1) on ``directory``."""
    with FaultyStorage(resolve_storage(directory)) as faults:
        async with CheckpointManager(directory, max_to_keep=1, storage=faults) as manager:
            await manager.save(model(1), 1)
            await manager.wait()
            first = len(faults.calls)
            await manager.save(model(2), 2)
            await manager.wait()
            return faults.calls[first:]


@pytest.mark.parametrize("fault", [errno.EIO, errno.ECONNRESET])
async def test_a_fault_at_every_request_of_a_save_loses_nothing(
    remote_dir: str, fault: int
) -> None:
    # Each request of a save fails in turn: the previous checkpoint stays the latest (or,
    # once the state file is written, the new one is), whole, and nothing partial is listed.
    ops = await save_ops(f"{remote_dir}/probe")
    # "rename": the instant an object becomes visible (before its PUT or its completion).
    committed_at = ops.index(("rename", f"{remote_dir}/probe/checkpoint"))
    for index, (op, path) in enumerate(ops):
        directory = f"{remote_dir}/fault-{index}"
        name = os.path.basename(path)
        skip = sum(1 for o, p in ops[:index] if (o, os.path.basename(p)) == (op, name))
        with FaultyStorage(resolve_storage(directory)) as faults:
            async with CheckpointManager(directory, max_to_keep=1, storage=faults) as manager:
                await manager.save(model(1), 1)
                await manager.wait()
                faults.fail(op, fault, match=name, skip=skip)  # type: ignore[arg-type]
                await manager.save(model(2), 2)
                with contextlib.suppress(CheckpointWriteError):
                    await manager.wait()
        expected = 2 if index > committed_at else 1
        async with CheckpointManager(directory, read_only=True) as reader:
            assert reader.latest_step() == expected, (index, op, path)
            assert_model(await reader.restore(), expected)
        status, _out = await async_cli("verify", directory)
        assert status == 0, (index, op, path)
