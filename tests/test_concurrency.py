"""Many concurrent savers on one CheckpointManager, and two processes on one directory.

Twenty tasks save distinct steps at once while the writer is held in a disk write
(``FaultyStorage.stall()``), so the queue is full for all of them. Under every policy each
attempt is accounted for exactly once: written, skipped (``save`` returned False) or replaced
(its outcome says ``written=False``); the written steps are exactly the accepted ones minus
the replaced ones; nothing is lost silently. A second process opening a directory a manager
holds gets ``CheckpointLockedError`` naming the holder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import anyio
import numpy as np
import pytest
from support import stepped_state, written_steps

from asyncckpt import CheckpointLockedError, CheckpointManager, SaveOutcome, latest_checkpoint

if TYPE_CHECKING:
    from pathlib import Path

    from asyncckpt._checkpoint._manager import Policy
    from asyncckpt.testing import FaultyStorage

pytestmark = pytest.mark.anyio

_SAVERS = 20
_MAX_PENDING = 2


@pytest.mark.parametrize("policy", ["block", "skip", "replace"])
async def test_concurrent_saves_are_each_written_skipped_or_replaced(
    tmp_path: Path, storage: FaultyStorage, policy: Policy
) -> None:
    stall = storage.stall("fsync", match="model.ckpt-0")
    returned: dict[int, bool] = {}
    outcomes: list[SaveOutcome] = []

    async def save(manager: CheckpointManager, step: int) -> None:
        returned[step] = await manager.save(stepped_state(step), step)

    async with CheckpointManager(
        tmp_path, max_to_keep=None, max_pending=_MAX_PENDING, policy=policy, storage=storage
    ) as manager:
        manager.add_done_callback(outcomes.append)
        with anyio.fail_after(5):
            await manager.save(stepped_state(0), 0)
            await stall.wait_reached()  # the writer is held: the queue fills up
            async with anyio.create_task_group() as tg:
                for step in range(1, _SAVERS + 1):
                    tg.start_soon(save, manager, step)
                await anyio.wait_all_tasks_blocked()
                stats = manager.statistics()
                assert stats.pending == 1 + _MAX_PENDING  # one held, the queue full
                if policy == "block":
                    assert len(returned) == _MAX_PENDING  # the others wait for room
                else:
                    assert len(returned) == _SAVERS  # nobody waits
                stall.release()
            await manager.wait()
        stats = manager.statistics()
        steps = manager.all_steps()

    attempts = _SAVERS + 1
    accepted = {0} | {step for step, ok in returned.items() if ok}
    skipped = {step for step, ok in returned.items() if not ok}
    replaced = {o.step for o in outcomes if not o.written}
    written = {o.step for o in outcomes if o.written}
    assert len(returned) == _SAVERS
    assert (stats.written, stats.skipped, stats.replaced) == (
        len(written),
        len(skipped),
        len(replaced),
    )
    assert stats.written + stats.skipped + stats.replaced == attempts
    assert (stats.failed, stats.pending) == (0, 0)
    # Every accepted save settles exactly once; the written ones are on disk and listed.
    assert sorted(o.step for o in outcomes) == sorted(accepted)
    assert written == accepted - replaced
    assert sorted(steps) == sorted(written)
    # Written in the order they settled; the last written is the latest (which step that is
    # depends on the order the racing tasks ran, which trio deliberately varies).
    assert written_steps(storage) == [o.step for o in outcomes if o.written]
    assert latest_checkpoint(tmp_path) == str(tmp_path / f"model.ckpt-{written_steps(storage)[-1]}")
    if policy == "block":
        assert written == set(range(attempts))
    elif policy == "skip":
        assert len(written) == 1 + _MAX_PENDING
        assert len(skipped) == _SAVERS - _MAX_PENDING
    else:
        # The first waiting snapshot stays; the newest slot is replaced by each later save.
        assert len(written) == 1 + _MAX_PENDING
        assert len(replaced) == _SAVERS - _MAX_PENDING
    for step in written:  # each file holds its own step's state
        async with CheckpointManager(tmp_path, max_to_keep=None) as reader:
            tree = await reader.restore(step)
        assert tree["step"] == step
        np.testing.assert_array_equal(tree["w"], stepped_state(step)["w"])


_HOLD_MANAGER = textwrap.dedent(
    """
    import sys
    import anyio
    from asyncckpt import CheckpointManager

    async def main() -> None:
        async with CheckpointManager(sys.argv[1]) as manager:
            await manager.save({"step": 1}, 1)
            await manager.wait()
            print("holding", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_a_second_process_gets_a_clear_locked_error(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    process = await anyio.open_process(
        [sys.executable, "-c", _HOLD_MANAGER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    async with process:
        assert process.stdout is not None
        assert process.stdin is not None
        with anyio.fail_after(20):
            output = b""
            while b"\n" not in output:
                output += await process.stdout.receive()
        assert output == b"holding\n"
        second = CheckpointManager(directory)
        with pytest.raises(CheckpointLockedError) as caught:
            await second.__aenter__()
        message = str(caught.value)
        assert f"pid {process.pid}" in message
        assert "another writer holds" in message
        assert str(directory) in message
        assert os.listdir(directory).count("model.ckpt-1") == 1  # the holder's file untouched
        await process.stdin.aclose()  # the holder leaves its block and releases the lock
        with anyio.fail_after(20):
            assert await process.wait() == 0
    async with CheckpointManager(directory) as manager:  # now free
        assert manager.latest_step() == 1
        await manager.save({"step": 2}, 2)
    assert latest_checkpoint(directory) == str(directory / "model.ckpt-2")
