"""The public test kit: ``FaultyStorage.stall()`` and the ``StorageStall`` it returns.

Most tests make storage calls the way asyncckpt does, ``FaultyStorage.check()`` in a worker
thread, so that each rule of the kit is seen on its own; one drives a real ``Saver``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

from asyncckpt import Saver
from asyncckpt.testing import FaultyStorage, StorageOp, local_s3

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

_SHORT_LIMIT = 0.02  # for the tests of what happens when a limit runs out


async def call_in_thread(faults: FaultyStorage, op: str, path: str) -> None:
    """Make a storage call as asyncckpt does: in a worker thread."""
    await anyio.to_thread.run_sync(faults.check, op, path)


async def test_a_saver_is_held_in_the_stalled_call_until_released(tmp_path: Path) -> None:
    saved: list[str] = []

    async def save() -> None:
        saved.append(await saver.save({"w": np.zeros(3)}, tmp_path / "model.ckpt", 1))

    with anyio.fail_after(5), FaultyStorage() as faults:
        saver = Saver(storage=faults)
        stall = faults.stall("fsync", match="model.ckpt-1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(save)
            op, path = await stall.wait_reached()
            await anyio.wait_all_tasks_blocked()
            assert saved == []  # held in the fsync of the checkpoint's temp file
            assert op == "fsync"
            assert ".model.ckpt-1.asyncckpt-tmp-" in path
            assert stall.call == (op, path)
            assert faults.calls[-1] == (op, path)  # recorded as soon as it was reached
            assert not await anyio.Path(tmp_path / "model.ckpt-1").exists()
            stall.release()
    assert saved == [str(tmp_path / "model.ckpt-1")]
    assert [op for op, _path in faults.calls].count("fsync") == 2  # the state file's, unheld


async def test_skip_lets_matching_calls_through_first() -> None:
    with anyio.fail_after(5), FaultyStorage() as faults:
        stall = faults.stall("write", skip=2)
        await call_in_thread(faults, "write", "a")
        await call_in_thread(faults, "fsync", "a")  # another op: not counted
        await call_in_thread(faults, "write", "b")
        assert stall.call is None
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_in_thread, faults, "write", "c")
            assert await stall.wait_reached() == ("write", "c")
            stall.release()
        await call_in_thread(faults, "write", "d")  # a stall holds one call only
    assert faults.calls == [
        ("write", "a"), ("fsync", "a"), ("write", "b"), ("write", "c"), ("write", "d"),
    ]  # fmt: skip


async def test_match_and_op_pick_the_call() -> None:
    with anyio.fail_after(5), FaultyStorage() as faults:
        stall = faults.stall("rename", match="model.ckpt-2")
        await call_in_thread(faults, "rename", "/d/model.ckpt-1")
        await call_in_thread(faults, "open", "/d/.model.ckpt-2.asyncckpt-tmp-0")
        any_op = faults.stall(match="checkpoint")
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_in_thread, faults, "rename", "/d/model.ckpt-2")
            tg.start_soon(call_in_thread, faults, "read", "/d/checkpoint")
            assert await stall.wait_reached() == ("rename", "/d/model.ckpt-2")
            assert await any_op.wait_reached() == ("read", "/d/checkpoint")
            stall.release()
            any_op.release()


async def test_a_call_is_held_by_the_earliest_ready_stall_only() -> None:
    with anyio.fail_after(5), FaultyStorage() as faults:
        first, second = faults.stall("fsync"), faults.stall("fsync")
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_in_thread, faults, "fsync", "a")
            assert await first.wait_reached() == ("fsync", "a")
            assert second.call is None
            tg.start_soon(call_in_thread, faults, "fsync", "b")
            assert await second.wait_reached() == ("fsync", "b")
            first.release()
            second.release()


async def test_released_before_reached_the_call_passes_without_waiting() -> None:
    with anyio.fail_after(5), FaultyStorage() as faults:
        stall = faults.stall("unlink")
        stall.release()
        stall.release()  # idempotent
        await call_in_thread(faults, "unlink", "x")
        assert await stall.wait_reached() == ("unlink", "x")


async def test_a_fail_rule_still_applies_to_the_held_call() -> None:
    errors: list[OSError] = []

    async def fsync() -> None:
        try:
            await call_in_thread(faults, "fsync", "a")
        except OSError as exc:
            errors.append(exc)

    with anyio.fail_after(5), FaultyStorage() as faults:
        stall = faults.stall("fsync")
        faults.fail("fsync", errno.ENOSPC)
        async with anyio.create_task_group() as tg:
            tg.start_soon(fsync)
            await stall.wait_reached()
            await anyio.wait_all_tasks_blocked()
            assert errors == []  # held: it has not failed yet
            stall.release()
    assert [error.errno for error in errors] == [errno.ENOSPC]


async def test_exit_releases_every_stall() -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            with FaultyStorage() as faults:
                held = faults.stall("write")
                never = faults.stall("rename")
                tg.start_soon(call_in_thread, faults, "write", "a")
                await held.wait_reached()
            # The block ended without release(): the held thread goes on, nothing fails.
        with pytest.raises(RuntimeError, match="block ended before"):
            await never.wait_reached()


async def test_wait_reached_fails_when_no_call_comes() -> None:
    with FaultyStorage() as faults:
        stall = faults.stall("fsync", match="model.ckpt-9", limit_secs=_SHORT_LIMIT)
        await call_in_thread(faults, "fsync", "model.ckpt-1")
        with pytest.raises(TimeoutError, match=r"no storage call reached StorageStall\(op='fsync'"):
            await stall.wait_reached()


async def test_a_held_call_never_released_fails_then_the_block_fails() -> None:
    message = r"StorageStall\(op='open'.*never released the held call within 0.02 s"
    # The held call raises, and so does the block on exit (if the code swallowed the first).
    with pytest.raises(RuntimeError, match=message), FaultyStorage() as faults:  # noqa: PT012
        faults.stall("open", limit_secs=_SHORT_LIMIT)
        with pytest.raises(RuntimeError, match=message):
            await call_in_thread(faults, "open", "a")
        assert faults.calls == [("open", "a")]


async def test_a_call_on_the_event_loop_thread_cannot_be_held() -> None:
    with FaultyStorage() as faults:
        stall = faults.stall("read")
        with pytest.raises(RuntimeError, match="runs on the event loop thread"):
            faults.check("read", "/d/checkpoint")  # as a sync API such as latest_checkpoint()
        with pytest.raises(RuntimeError, match="runs on the event loop thread"):
            await stall.wait_reached()
        await call_in_thread(faults, "read", "/d/checkpoint")  # refused once: not armed again


@pytest.mark.parametrize(
    ("op", "kwargs", "error", "message"),
    [
        ("sync", {}, ValueError, "op must be one of"),
        ("fsync", {"skip": -1}, ValueError, "skip must be >= 0"),
        ("fsync", {"skip": True}, TypeError, "skip must be an int, not bool"),
        ("fsync", {"limit_secs": 0}, ValueError, "limit_secs must be a positive"),
        ("fsync", {"limit_secs": float("inf")}, ValueError, "limit_secs must be a positive"),
    ],
)
def test_stall_validates_its_arguments(
    op: StorageOp, kwargs: dict[str, float], error: type[Exception], message: str
) -> None:
    with FaultyStorage() as faults, pytest.raises(error, match=message):
        faults.stall(op, **kwargs)  # type: ignore[arg-type]


def test_local_s3_serves_a_bucket_and_restores_the_environment() -> None:
    pytest.importorskip("moto.server")
    obstore = pytest.importorskip("obstore")
    before = os.environ.get("AWS_ENDPOINT_URL")
    seen: list[str] = []

    def watch(app: Any) -> Any:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            seen.append(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}")
            return app(environ, start_response)

        return wrapped

    with local_s3("kit-bucket", environment={"ASYNCCKPT_KIT": "on"}, middleware=watch) as s3:
        assert s3.url == "s3://kit-bucket"
        assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
        assert os.environ["ASYNCCKPT_KIT"] == "on"
        store = obstore.store.from_url(s3.url)
        obstore.put(store, "a", b"bytes")
        assert bytes(obstore.get(store, "a").bytes()) == b"bytes"
    assert "PUT /kit-bucket/a" in seen
    assert os.environ.get("AWS_ENDPOINT_URL") == before
    assert "ASYNCCKPT_KIT" not in os.environ
