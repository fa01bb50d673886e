"""SummaryWriter: event files, the bounded queue, step order, and what TensorBoard reads back.

Writers get a fixed clock, so every event is deterministic and the files are compared byte for
byte with ``encode_event`` (whose bytes ``test_summary_proto.py`` pins). Disk writes are held
with ``FaultyStorage.stall()`` to test backpressure and cancellation mid-write without a
sleep; the flush timer is tested on trio's ``MockClock``.

The ``tensorboard`` tests read the logdirs with TensorBoard's own loaders: the Python one
(``EventMultiplexer`` with unlimited size guidance behind ``MultiplexerDataProvider``, the
plugin-data path ``tensorboard --load_fast=false`` serves) and, where the
``tensorboard-data-server`` binary is installed, the Rust one that plain ``tensorboard
--logdir`` uses. The Rust server runs as TensorBoard's ``server_ingester`` runs it (``--port 0
--port-file --die-after-stdin``), bound to 127.0.0.1, loading once, keeping every sample, and
is queried over gRPC through TensorBoard's own ``GrpcDataProvider``; every step of it is
bounded in time and the process is always reaped. Both loaders must show exactly the points
written: every run, tag, step and value, including across a resumed session (also README's
stop and resume of ``examples/train_numpy.py``, its second run's clock set back or not: event
files sort in creation order whatever the clock says).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from support import all_tasks_blocked, exists

from asyncckpt import (
    CheckpointWriteError,
    MonitoredTrainingSession,
    SessionLog,
    StopAtStepHook,
    SummaryWriter,
    latest_checkpoint,
    summary,
)
from asyncckpt._storage import LocalStorage
from asyncckpt._summary._proto import encode_event, encode_png, histogram_buckets, session_log
from asyncckpt._summary._records import iter_records
from asyncckpt.testing import FakeClock

if TYPE_CHECKING:
    from collections.abc import Callable

    from asyncckpt.testing import FaultyStorage

pytestmark = pytest.mark.anyio

WALL = 1_795_210_956.5  # every event of a writer on a FakeClock(WALL) carries this time

# -- helpers --------------------------------------------------------------------------------------


def header(wall_time: float = WALL) -> bytes:
    """The first event of every file."""
    return encode_event(
        wall_time=wall_time, file_version="brain.Event:2", source_writer="asyncckpt"
    )


def scalar_event(tag: str, value: float, step: int, wall_time: float = WALL) -> bytes:
    return encode_event(wall_time=wall_time, step=step, values=[summary.scalar(tag, value)])


def log_event(status: SessionLog, step: int, path: str = "") -> bytes:
    return encode_event(wall_time=WALL, step=step, session_log=session_log(status, path))


def records(path: str | os.PathLike[str]) -> list[bytes]:
    """Every event in the file, each record's CRCs checked (a torn record fails the test)."""
    return list(iter_records(Path(path).read_bytes()))


def event_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if "tfevents" in path.name)


def writer(directory: Path, **kwargs: Any) -> SummaryWriter:
    return SummaryWriter(directory, clock=FakeClock(WALL), **kwargs)


# -- the file -------------------------------------------------------------------------------------


def test_file_name_pattern(tmp_path: Path) -> None:
    plain = SummaryWriter(tmp_path, clock=FakeClock(1_795_210_956.9))
    suffixed = SummaryWriter(tmp_path / "run", filename_suffix=".v2", clock=FakeClock(7.0))
    host, pid = re.escape(socket.gethostname()), os.getpid()
    assert re.fullmatch(
        rf"events\.out\.tfevents\.1795210956\.{host}\.{pid}\.\d+", os.path.basename(plain.path)
    )
    assert re.fullmatch(
        rf"events\.out\.tfevents\.0000000007\.{host}\.{pid}\.\d+\.v2",
        os.path.basename(suffixed.path),
    )
    assert os.path.dirname(suffixed.path) == str(tmp_path / "run")
    assert plain.logdir == str(tmp_path)


def test_file_names_sort_in_creation_order(tmp_path: Path) -> None:
    # TensorBoard reads a run's files in name order: a resumed session's file must come after
    # the file of the session it resumed, also when the counter goes from 9 to 10.
    names = [os.path.basename(writer(tmp_path).path) for _ in range(12)]
    assert len(set(names)) == 12
    assert sorted(names) == names


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_queue": 0}, ValueError, "max_queue must be >= 1"),
        ({"max_queue": True}, TypeError, "max_queue must be an int"),
        ({"flush_secs": 0}, ValueError, "flush_secs must be > 0"),
        ({"flush_secs": math.nan}, ValueError, "flush_secs must be > 0"),
        ({"filename_suffix": f"x{os.sep}y"}, ValueError, "path separator"),
    ],
)
def test_writer_arguments_are_checked_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SummaryWriter(tmp_path, **kwargs)


async def test_the_first_record_is_the_file_version_and_is_on_disk_at_once(
    tmp_path: Path,
) -> None:
    async with writer(tmp_path / "new" / "run") as w:
        # Flushed on open: TensorBoard takes the run's start time from it.
        assert records(w.path) == [header()]
        assert event_files(tmp_path / "new" / "run") == [Path(w.path)]
    assert records(w.path) == [header()]


async def test_every_kind_of_event_is_written_in_order(tmp_path: Path) -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    async with writer(tmp_path) as w:
        await w.add_scalar("loss", 0.25, step=1)
        await w.add_histogram("weights", [1.0, 2.0, 4.0], step=1, bins=3)
        await w.add_text("notes", "**bold**", step=1)
        await w.add_image("sample", np.moveaxis(pixels, -1, 0), step=1, dataformats="CHW")
        await w.add_summary([summary.scalar("a", 1.0), summary.scalar("b", 2.0)], step=2)
        await w.add_summary(summary.text("notes", "again"), step=2)
        await w.add_scalar("loss", 0.5, step=3, wall_time=12.5)
        await w.add_session_log(SessionLog.CHECKPOINT, 3, checkpoint_path="/ckpt/model-3")
        await w.add_session_log(SessionLog.STOP, 3, msg="done")
        await w.add_summary([], step=4)  # nothing to write
    assert records(w.path) == [
        header(),
        scalar_event("loss", 0.25, 1),
        encode_event(wall_time=WALL, step=1, values=[summary.histogram("weights", [1, 2, 4], 3)]),
        encode_event(wall_time=WALL, step=1, values=[summary.text("notes", "**bold**")]),
        encode_event(wall_time=WALL, step=1, values=[summary.image("sample", pixels)]),
        encode_event(
            wall_time=WALL, step=2, values=[summary.scalar("a", 1.0), summary.scalar("b", 2.0)]
        ),
        encode_event(wall_time=WALL, step=2, values=[summary.text("notes", "again")]),
        scalar_event("loss", 0.5, 3, wall_time=12.5),
        log_event(SessionLog.CHECKPOINT, 3, "/ckpt/model-3"),
        encode_event(wall_time=WALL, step=3, session_log=session_log(SessionLog.STOP, msg="done")),
    ]
    assert "events_written=9" in repr(w)  # the file version not counted


async def test_flush_makes_everything_written_so_far_visible(tmp_path: Path) -> None:
    async with writer(tmp_path, max_queue=1000, flush_secs=3600) as w:
        for step in range(25):
            await w.add_scalar("loss", step / 4, step)
        with anyio.fail_after(5):
            await w.flush()
        assert records(w.path) == [header()] + [scalar_event("loss", s / 4, s) for s in range(25)]
        await w.add_scalar("loss", 9.0, 25)
        with anyio.fail_after(5):
            await w.flush()
        assert records(w.path)[-1] == scalar_event("loss", 9.0, 25)


async def test_two_writers_of_one_directory_write_two_files(tmp_path: Path) -> None:
    async with writer(tmp_path) as first, writer(tmp_path) as second:
        await first.add_scalar("loss", 1.0, 1)
        await second.add_scalar("loss", 2.0, 1)  # another file: its own step order
    assert event_files(tmp_path) == sorted([Path(first.path), Path(second.path)])
    assert records(first.path)[1:] == [scalar_event("loss", 1.0, 1)]
    assert records(second.path)[1:] == [scalar_event("loss", 2.0, 1)]


@pytest.mark.parametrize(
    "later_clock", [WALL + 0.4, WALL - 3600.0], ids=["same second", "clock set back"]
)
async def test_a_later_event_file_sorts_after_those_in_the_directory(
    tmp_path: Path, later_clock: float
) -> None:
    # As with two processes, which only their pids tell apart: the later writer is made
    # first, so that its counter sorts it first too; only the files already there can tell.
    later = SummaryWriter(tmp_path, clock=FakeClock(later_clock))
    earlier = writer(tmp_path)
    async with earlier:
        await earlier.add_scalar("loss", 1.0, 1)
    async with later:
        await later.add_scalar("loss", 2.0, 2)
    async with writer(tmp_path) as last:
        pass
    assert event_files(tmp_path) == [Path(earlier.path), Path(later.path), Path(last.path)]
    secs = [path.name.split(".")[3] for path in event_files(tmp_path)]
    assert secs == ["1795210956", "1795210957", "1795210958"]


class ListedStorage(LocalStorage):
    """Local files, but directories list as ``names``; records the threads that listed."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names
        self.listed: list[tuple[str, int]] = []

    def list_names(self, directory: str) -> list[str]:
        self.listed.append((directory, threading.get_ident()))
        return self.names


async def test_the_event_file_name_counts_only_the_event_files_listed(tmp_path: Path) -> None:
    storage = ListedStorage(
        [
            "checkpoint",
            "model.ckpt-9999999999",
            "events.out.tfevents.1795299999.otherhost.7.000000",  # the latest event file
            "events.out.tfevents.1795200000.otherhost.8.000000.v2",
            "events.out.tfevents.1795250000",
            "events.out.tfevents.99999999999.h.1.000000",  # not 10 digits: not TensorBoard's
            "events.out.tfevents.18952999999",
            "events.out.tfevents.x.h.1.000000",
            "old.events.out.tfevents.1999999999.h.1.000000",
            "events.out.tfevents.1999999999x",
        ]
    )
    async with writer(tmp_path / "run", storage=storage) as w:
        pass
    assert os.path.basename(w.path).startswith("events.out.tfevents.1795300000.")
    assert event_files(tmp_path / "run") == [Path(w.path)]
    # Through the writer's storage, once, in a worker thread (never on the event loop).
    assert [directory for directory, _ in storage.listed] == [str(tmp_path / "run")]
    assert storage.listed[0][1] != threading.get_ident()
    async with writer(tmp_path / "missing") as w:  # a new directory: the clock's second
        pass
    assert os.path.basename(w.path).startswith("events.out.tfevents.1795210956.")


class UnlistableStorage(LocalStorage):
    """Local files in directories that cannot be listed, as the kernel refuses it."""

    def list_names(self, directory: str) -> list[str]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)


async def test_a_directory_that_cannot_be_listed_fails_the_enter(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError, match=r"Permission denied .* creating the event"):
        async with writer(tmp_path, storage=UnlistableStorage()):
            pass  # pragma: no cover
    assert event_files(tmp_path) == []


# -- what TensorBoard would drop is refused -------------------------------------------------------


async def test_steps_must_increase_per_tag(tmp_path: Path) -> None:
    async with writer(tmp_path) as w:
        await w.add_scalar("loss", 1.0, 5)
        for step in (5, 4, 0):
            with pytest.raises(ValueError, match=f"step {step} for tag 'loss' is not after step 5"):
                await w.add_scalar("loss", 2.0, step)
        with pytest.raises(ValueError, match="'loss' is not after step 5"):
            await w.add_summary([summary.scalar("other", 1.0), summary.scalar("loss", 1.0)], 5)
        await w.add_scalar("other", 3.0, 2)  # each tag has its own order
        await w.add_text("loss", "a tag is a tag, whatever its kind", 6)
        with pytest.raises(ValueError, match="not after step 6"):
            await w.add_histogram("loss", [1.0], 6)
    assert records(w.path)[1:] == [
        scalar_event("loss", 1.0, 5),
        scalar_event("other", 3.0, 2),
        encode_event(
            wall_time=WALL,
            step=6,
            values=[summary.text("loss", "a tag is a tag, whatever its kind")],
        ),
    ]


async def test_session_log_start_allows_steps_from_its_step_on(tmp_path: Path) -> None:
    async with writer(tmp_path) as w:
        for step in range(1, 8):
            await w.add_scalar("loss", float(step), step)
        await w.add_scalar("lr", 0.1, 3)
        await w.add_session_log(SessionLog.START, 5)  # a restart from step 5
        with pytest.raises(ValueError, match="step 4 for tag 'loss' is not after step 4"):
            await w.add_scalar("loss", 4.5, 4)  # before the restart: still refused
        await w.add_scalar("loss", 50.0, 5)
        with pytest.raises(ValueError, match="step 5 for tag 'loss' is not after step 5"):
            await w.add_scalar("loss", 51.0, 5)
        with pytest.raises(ValueError, match="step 3 for tag 'lr' is not after step 3"):
            await w.add_scalar("lr", 0.2, 3)  # lr had nothing at or after 5
        await w.add_session_log(SessionLog.START, 0)
        await w.add_scalar("lr", 0.3, 0)
        await w.add_session_log(SessionLog.CHECKPOINT, 0)  # other statuses change nothing
        with pytest.raises(ValueError, match="step 0 for tag 'lr'"):
            await w.add_scalar("lr", 0.4, 0)
    assert records(w.path)[1:] == [
        *(scalar_event("loss", float(step), step) for step in range(1, 8)),
        scalar_event("lr", 0.1, 3),
        log_event(SessionLog.START, 5),
        scalar_event("loss", 50.0, 5),
        log_event(SessionLog.START, 0),
        scalar_event("lr", 0.3, 0),
        log_event(SessionLog.CHECKPOINT, 0),
    ]


async def test_a_tag_twice_in_one_event_is_refused(tmp_path: Path) -> None:
    async with writer(tmp_path) as w:
        with pytest.raises(ValueError, match="a tag may appear once per event"):
            await w.add_summary([summary.scalar("a", 1.0), summary.histogram("a", [1.0])], 1)
        await w.add_scalar("a", 1.0, 1)  # the refused event claimed no step
    assert records(w.path)[1:] == [scalar_event("a", 1.0, 1)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_non_finite_wall_times_are_refused(tmp_path: Path, bad: float) -> None:
    clock = FakeClock(WALL)
    async with SummaryWriter(tmp_path, clock=clock) as w:
        with pytest.raises(ValueError, match="wall_time must be finite"):
            await w.add_scalar("loss", 1.0, 1, wall_time=bad)
        with pytest.raises(ValueError, match="wall_time must be finite"):
            await w.add_session_log(SessionLog.START, 1, wall_time=bad)
        clock.now = bad  # a clock gone wrong
        with pytest.raises(ValueError, match="wall_time must be finite"):
            await w.add_text("notes", "x", 1)
        await w.add_scalar("loss", 1.0, 1, wall_time=3.0)
    assert records(w.path)[1:] == [scalar_event("loss", 1.0, 1, wall_time=3.0)]


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (-1, ValueError, "step must be >= 0"),
        (2**63, ValueError, r"step must be < 2\*\*63 \(an int64\)"),
        (1.0, TypeError, "step must be an int, not float"),
        (True, TypeError, "step must be an int, not bool"),
    ],
)
async def test_steps_are_checked(
    tmp_path: Path, step: Any, error: type[Exception], message: str
) -> None:
    async with writer(tmp_path) as w:
        with pytest.raises(error, match=message):
            await w.add_scalar("loss", 1.0, step)
        with pytest.raises(error, match=message):
            await w.add_session_log(SessionLog.START, step)
    assert records(w.path) == [header()]


async def test_add_summary_takes_summary_values_only(tmp_path: Path) -> None:
    async with writer(tmp_path) as w:
        with pytest.raises(TypeError, match="must be SummaryValue objects"):
            await w.add_summary([summary.scalar("a", 1.0), 2.0], 1)  # type: ignore[list-item]
        with pytest.raises(ValueError, match="is not a valid SessionLog"):
            await w.add_session_log(7, 1)  # type: ignore[arg-type]
    assert records(w.path) == [header()]


# -- lifecycle ------------------------------------------------------------------------------------


async def test_lifecycle_errors_and_idempotent_close(tmp_path: Path) -> None:
    w = writer(tmp_path)
    assert repr(w).endswith("new events_written=0>")
    with pytest.raises(RuntimeError, match="not open: use `async with SummaryWriter"):
        await w.add_scalar("loss", 1.0, 1)
    async with w:
        assert " open " in repr(w)
        with pytest.raises(RuntimeError, match="can be entered only once"):
            await w.__aenter__()
        await w.add_scalar("loss", 1.0, 1)
        await w.close()  # TensorFlow's name; leaving the block then does nothing more
        with pytest.raises(RuntimeError, match="the SummaryWriter is closed"):
            await w.add_scalar("loss", 2.0, 2)
        with pytest.raises(RuntimeError, match="the SummaryWriter is closed"):
            await w.flush()
    await w.aclose()
    assert repr(w) == f"<SummaryWriter {w.path!r} closed events_written=1>"
    with pytest.raises(RuntimeError, match="can be entered only once"):
        await w.__aenter__()
    assert records(w.path) == [header(), scalar_event("loss", 1.0, 1)]


async def test_a_file_that_cannot_be_created_fails_the_enter(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the run directory should be")
    with pytest.raises(CheckpointWriteError, match="while creating the event file") as caught:
        async with writer(tmp_path / "taken"):
            pass  # pragma: no cover
    assert str(tmp_path / "taken") in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


async def test_a_failing_first_write_fails_the_enter_and_closes_the_file(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    storage.fail("write", errno.ENOSPC, match="tfevents", times=None)
    w = writer(tmp_path, storage=storage)
    with pytest.raises(CheckpointWriteError, match=r"No space left .* writing the event file"):
        await w.__aenter__()
    assert not exists(w.path)  # no event file, rather than an empty one
    with pytest.raises(RuntimeError, match="the SummaryWriter is not open"):
        await w.add_scalar("loss", 1.0, 1)


async def test_a_failing_write_later_ends_the_block_with_that_error(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    w = writer(tmp_path, storage=storage)

    async def block() -> None:
        async with w:
            storage.fail("write", errno.ENOSPC, match="tfevents")
            await w.add_scalar("loss", 1.0, 1)
            with anyio.fail_after(5):
                await w.flush()  # the writer task fails: the block is cancelled here
            raise AssertionError("not reached")  # pragma: no cover

    with pytest.raises(CheckpointWriteError, match="No space left") as caught:
        await block()
    assert caught.type is CheckpointWriteError  # itself, not wrapped in an ExceptionGroup
    assert isinstance(caught.value.__cause__, OSError)
    assert records(w.path)[0] == header()  # and no torn record


async def test_a_flush_waiting_elsewhere_raises_when_the_writer_fails(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # The owner's block ends with the disk error; a flush() waiting in another task learns
    # that its events did not reach the disk, instead of waiting forever.
    failures: list[CheckpointWriteError] = []

    async def own(*, task_status: anyio.abc.TaskStatus[SummaryWriter]) -> None:
        try:
            async with writer(tmp_path, storage=storage) as w:
                task_status.started(w)
                await anyio.sleep_forever()
        except CheckpointWriteError as error:
            failures.append(error)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            w = await tg.start(own)
            storage.fail("write", errno.ENOSPC, match="tfevents", times=None)
            await w.add_scalar("loss", 1.0, 1)
            with pytest.raises(RuntimeError, match="stopped before this flush was done"):
                await w.flush()
    assert [failure.__cause__.errno for failure in failures] == [errno.ENOSPC]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="the SummaryWriter is closed"):
        await w.add_scalar("loss", 2.0, 2)


# -- backpressure, close and cancellation ---------------------------------------------------------


async def test_a_full_queue_blocks_until_the_disk_catches_up(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    accepted: list[int] = []

    async def add(w: SummaryWriter, step: int) -> None:
        await w.add_scalar("loss", float(step), step)
        accepted.append(step)

    async with writer(tmp_path, max_queue=2, storage=storage) as w:
        stall = storage.stall("write", match="tfevents")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await add(w, 0)
                tg.start_soon(w.flush)
                await stall.wait_reached()  # the writer is held in a disk write
                await add(w, 1)
                await add(w, 2)  # the queue (max_queue=2) is now full
                tg.start_soon(add, w, 3)
                await all_tasks_blocked()
                assert accepted == [0, 1, 2]  # add_scalar(3) waits for room
                stall.release()
            assert accepted == [0, 1, 2, 3]
            await w.flush()
            assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(4)]


async def test_callers_waiting_for_room_are_written_in_the_order_they_called(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # Each add claims its step when it is called: were a later one written first, TensorBoard
    # would take the earlier step for a restart and drop points.
    async with writer(tmp_path, max_queue=1, storage=storage) as w:
        stall = storage.stall("write", match="tfevents")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await w.add_scalar("loss", 0.0, 0)
                tg.start_soon(w.flush)
                await stall.wait_reached()  # the writer is held in a disk write
                await w.add_scalar("loss", 1.0, 1)  # fills the queue (max_queue=1)
                for step in range(2, 7):
                    tg.start_soon(w.add_scalar, "loss", float(step), step)
                    await all_tasks_blocked()  # waiting for room, in this order
                stall.release()
            await w.flush()
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(7)]


async def test_a_full_queue_costs_no_disk_write_until_a_flush(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # The writer keeps what it takes in memory: callers of a full queue wait for it to move
    # events there, not for the disk, and events reach the OS (and TensorBoard) on a flush.
    async with writer(tmp_path, max_queue=1, flush_secs=3600, storage=storage) as w:
        writes = storage.calls.count(("write", w.path))
        with anyio.fail_after(5):
            for step in range(50):
                await w.add_scalar("loss", float(step), step)
            await all_tasks_blocked()
            assert storage.calls.count(("write", w.path)) == writes
            assert records(w.path) == [header()]
            await w.flush()
        assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(50)]


async def test_much_data_goes_to_the_file_without_waiting_for_a_flush(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # What the writer holds in memory is bounded (256 KiB), whatever flush_secs is.
    text = "x" * 100_000
    async with writer(tmp_path, flush_secs=3600, storage=storage) as w:
        stall = storage.stall("write", match="tfevents")
        with anyio.fail_after(5):
            for step in range(3):
                await w.add_text("notes", text, step)
            await stall.wait_reached()  # no flush() was called
            stall.release()
            await w.flush()
    assert records(w.path)[1:] == [
        encode_event(wall_time=WALL, step=s, values=[summary.text("notes", text)]) for s in range(3)
    ]


async def test_closing_writes_every_accepted_event(tmp_path: Path) -> None:
    async with writer(tmp_path, max_queue=3, flush_secs=3600) as w:
        for step in range(40):
            await w.add_scalar("loss", float(step), step)
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(40)]


async def test_an_outer_cancel_loses_no_accepted_event(tmp_path: Path) -> None:
    with anyio.CancelScope() as scope:
        async with writer(tmp_path, max_queue=3) as w:
            for step in range(40):
                await w.add_scalar("loss", float(step), step)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(40)]


async def test_an_exception_in_the_block_loses_no_accepted_event(tmp_path: Path) -> None:
    w = writer(tmp_path, max_queue=3)

    async def block() -> None:
        async with w:
            for step in range(40):
                await w.add_scalar("loss", float(step), step)
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom") as caught:
        await block()
    assert caught.type is KeyError  # itself, not wrapped in an ExceptionGroup
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(40)]


async def test_a_cancel_while_a_write_is_held_waits_for_it_and_loses_nothing(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # The owner of the writer is cancelled while the disk holds a write, with accepted events
    # queued behind it and one more add waiting for room: closing waits for the disk
    # (shielded) and writes every accepted event; the waiting add was not accepted, and says so.
    owner = anyio.CancelScope()
    accepted: list[int] = []
    refused: list[str] = []

    async def own(*, task_status: anyio.abc.TaskStatus[SummaryWriter]) -> None:
        with owner:
            async with writer(tmp_path, max_queue=2, storage=storage) as w:
                task_status.started(w)
                await anyio.sleep_forever()

    async def add(w: SummaryWriter, step: int) -> None:
        try:
            await w.add_scalar("loss", float(step), step)
        except RuntimeError as error:
            refused.append(str(error))
        else:
            accepted.append(step)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            w = await tg.start(own)
            stall = storage.stall("write", match="tfevents")
            await add(w, 0)
            tg.start_soon(w.flush)
            await stall.wait_reached()  # the writer is held in a disk write
            await add(w, 1)
            await add(w, 2)  # the queue (max_queue=2) is full
            tg.start_soon(add, w, 3)
            await all_tasks_blocked()
            owner.cancel()
            await all_tasks_blocked()
            # Waiting for the disk: the held event counts once the disk takes it.
            assert repr(w).endswith("closed events_written=0>")
            assert refused == ["the SummaryWriter closed before this call was accepted"]
            stall.release()
    assert owner.cancelled_caught
    assert accepted == [0, 1, 2]
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(3)]


async def test_a_cancelled_add_is_not_written_and_gives_its_step_back(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    async def add_until_cancelled(w: SummaryWriter, tag: str, step: int) -> None:
        with anyio.CancelScope() as scope:
            cancels.append(scope)
            await w.add_scalar(tag, float(step), step)
            raise AssertionError("accepted while the queue is full")  # pragma: no cover

    cancels: list[anyio.CancelScope] = []
    async with writer(tmp_path, max_queue=1, storage=storage) as w:
        stall = storage.stall("write", match="tfevents")
        with anyio.fail_after(5):
            try:
                async with anyio.create_task_group() as tg:
                    await w.add_scalar("loss", 0.0, 0)
                    tg.start_soon(w.flush)
                    await stall.wait_reached()  # the writer is held in a disk write
                    await w.add_scalar("loss", 1.0, 1)  # fills the queue (max_queue=1)
                    tg.start_soon(add_until_cancelled, w, "loss", 2)
                    tg.start_soon(add_until_cancelled, w, "new", 0)
                    await all_tasks_blocked()  # steps claimed, waiting for room
                    tg.start_soon(w.add_scalar, "loss", 3.0, 3)  # claims 3 after 2
                    await all_tasks_blocked()
                    for scope in cancels:
                        scope.cancel()
                    await all_tasks_blocked()
                    stall.release()
            finally:
                stall.release()
            await w.add_scalar("new", 0.5, 0)  # never written: its first step is free again
            with pytest.raises(ValueError, match="step 2 for tag 'loss' is not after step 3"):
                await w.add_scalar("loss", 2.5, 2)  # 3 was accepted since
    assert records(w.path)[1:] == [
        scalar_event("loss", 0.0, 0),
        scalar_event("loss", 1.0, 1),
        scalar_event("loss", 3.0, 3),
        scalar_event("new", 0.5, 0),
    ]


async def test_concurrent_adds_for_one_step_are_refused_while_the_first_waits(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # The step is claimed when the event is checked, not when the queue takes it.
    refused: list[str] = []

    async def add(w: SummaryWriter, value: float, step: int) -> None:
        try:
            await w.add_scalar("loss", value, step)
        except ValueError as error:
            refused.append(str(error))

    async with writer(tmp_path, max_queue=1, storage=storage) as w:
        stall = storage.stall("write", match="tfevents")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await w.add_scalar("loss", 0.0, 0)
                tg.start_soon(w.flush)
                await stall.wait_reached()  # the writer is held in a disk write
                await w.add_scalar("loss", 1.0, 1)  # fills the queue (max_queue=1)
                tg.start_soon(add, w, 2.0, 2)  # waits for room
                await all_tasks_blocked()
                await add(w, 2.1, 2)
                await add(w, 1.5, 1)
                assert len(refused) == 2
                assert "step 2 for tag 'loss' is not after step 2" in refused[0]
                stall.release()
    assert records(w.path)[1:] == [scalar_event("loss", float(s), s) for s in range(3)]


def _trio_mock_clock() -> list[Any]:
    try:
        from trio.testing import MockClock
    except ImportError:  # pragma: no cover - trio is a test extra
        return []
    # autojump: the clock jumps to the next deadline as soon as every task waits.
    return [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mockclock")]


@pytest.mark.parametrize("anyio_backend", _trio_mock_clock())
async def test_the_flush_timer_hands_events_to_the_os_every_flush_secs(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    # Only flushes reach the OS (the file is buffered), so the held "write" is the flush.
    async with writer(tmp_path, flush_secs=30, storage=storage) as w:
        opened = anyio.current_time()
        stall = storage.stall("write", match="tfevents")
        await w.add_scalar("loss", 1.0, 1)
        await stall.wait_reached()  # no fail_after: it would be the next deadline to jump to
        assert anyio.current_time() - opened == pytest.approx(30)
        assert records(w.path) == [header()]  # held: not in the file yet
        stall.release()
        await w.flush()
        assert records(w.path) == [header(), scalar_event("loss", 1.0, 1)]


# -- TensorBoard's loaders ---------------------------------------------------------------------

View = dict[tuple[str, str, str], list[tuple[int, Any]]]
"""What a loader shows: ``(run, plugin, tag)`` -> ``[(step, value), ...]`` in step order."""

ALL = 1_000_000  # a downsample size beyond any series here: read every point


def _value(plugin: str, datum: Any, read_blob: Callable[[str], bytes]) -> Any:
    if plugin == "scalars":
        return "nan" if math.isnan(datum.value) else datum.value
    if plugin == "histograms":
        return datum.numpy.tolist()
    if plugin == "text":
        return datum.numpy.item().decode()
    return tuple(read_blob(blob.blob_key) for blob in datum.values)


def provider_view(provider: Any) -> tuple[set[str], View]:
    """Runs and points a TensorBoard ``DataProvider`` serves for the four dashboards."""
    context = pytest.importorskip("tensorboard.context")
    ctx = context.RequestContext()
    runs = {run.run_name for run in provider.list_runs(ctx, experiment_id="")}
    view: View = {}

    def read_blob(key: str) -> bytes:
        return bytes(provider.read_blob(ctx, blob_key=key))

    reads = [
        ("scalars", provider.read_scalars),
        ("histograms", provider.read_tensors),
        ("text", provider.read_tensors),
        ("images", provider.read_blob_sequences),
    ]
    for plugin, read in reads:
        for run, tags in read(ctx, experiment_id="", plugin_name=plugin, downsample=ALL).items():
            for tag, data in tags.items():
                view[(run, plugin, tag)] = [
                    (datum.step, _value(plugin, datum, read_blob)) for datum in data
                ]
    return runs, view


def python_view(logdir: Path) -> tuple[set[str], View]:
    """The Python loader: plugin_event_accumulator with unlimited size guidance."""
    multiplexer_module = pytest.importorskip(
        "tensorboard.backend.event_processing.plugin_event_multiplexer"
    )
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.plugin_event_accumulator"
    )
    data_provider = pytest.importorskip("tensorboard.backend.event_processing.data_provider")
    multiplexer = multiplexer_module.EventMultiplexer(size_guidance={accumulator.TENSORS: 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return provider_view(data_provider.MultiplexerDataProvider(multiplexer, str(logdir)))


def _query_rust(port: int) -> tuple[set[str], View]:
    grpc = pytest.importorskip("grpc")
    grpc_provider = pytest.importorskip("tensorboard.data.grpc_provider")
    address = f"127.0.0.1:{port}"
    # Loopback only; never through a proxy named in the environment.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        provider = grpc_provider.GrpcDataProvider(address, grpc_provider.make_stub(channel))
        return provider_view(provider)


async def rust_view(logdir: Path) -> tuple[set[str], View]:
    """The Rust loader (``tensorboard-data-server``), loading once and keeping every point."""
    data_server = pytest.importorskip("tensorboard_data_server")
    binary = data_server.server_binary()
    if binary is None:  # pragma: no cover - no binary for this platform
        pytest.skip("tensorboard-data-server has no binary for this platform")
    port_file = logdir.parent / f"{logdir.name}.port"
    args = [
        binary,
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        "--port=0",
        f"--port-file={port_file}",
        "--reload=once",
        "--samples-per-plugin=scalars=all,histograms=all,text=all,images=all",
        "--die-after-stdin",  # closing its stdin ends it, whatever happens here
        "--verbose",  # it logs "Finished load cycle" once the logdir is loaded
    ]
    log = bytearray()
    with anyio.fail_after(20):
        async with await anyio.open_process(args) as server:
            assert server.stderr is not None
            assert server.stdin is not None
            try:
                async for chunk in server.stderr:
                    log += chunk
                    if b"Finished load cycle" in log:
                        break
                else:
                    raise AssertionError(f"the data server exited: {log.decode()}")
                port = int(await anyio.Path(port_file).read_text())
                async with anyio.create_task_group() as tg:

                    async def drain() -> None:  # keep its stderr pipe from filling up
                        async for chunk in server.stderr:  # type: ignore[union-attr]
                            log.extend(chunk)

                    tg.start_soon(drain)
                    found = await anyio.to_thread.run_sync(
                        _query_rust, port, abandon_on_cancel=True
                    )
                    tg.cancel_scope.cancel()
                assert b"WARN" not in log, log.decode()
                assert b"ERROR" not in log, log.decode()
                return found
            finally:
                with anyio.CancelScope(shield=True):  # the server exits; the block reaps it
                    await server.stdin.aclose()


@pytest.fixture(params=["python", pytest.param("rust", marks=pytest.mark.slow)])
def loader(request: pytest.FixtureRequest) -> Callable[[Path], Any]:
    """Read a logdir with one of TensorBoard's two loaders (an awaitable callable)."""
    pytest.importorskip("tensorboard")
    if request.param == "python":

        async def python(logdir: Path) -> tuple[set[str], View]:
            return await anyio.to_thread.run_sync(python_view, logdir)

        return python
    pytest.importorskip("tensorboard_data_server")
    return rust_view


def as_float32(value: float) -> Any:
    """A scalar as the loaders show it (NaN as "nan", so that views compare equal)."""
    if math.isnan(value):
        return "nan"
    with np.errstate(over="ignore"):  # beyond float32: infinite
        return float(np.float64(value).astype(np.float32))


async def write_every_kind(logdir: Path) -> tuple[set[str], View]:
    """Write each kind, in several runs, and return what a loader should show."""
    expected: View = {}

    def expect(run: str, plugin: str, tag: str, step: int, value: Any) -> None:
        expected.setdefault((run, plugin, tag), []).append((step, value))

    rng = np.random.default_rng(11)
    async with (
        SummaryWriter(logdir) as root,
        SummaryWriter(logdir / "train") as train,
        SummaryWriter(logdir / "eval" / "nested") as nested,
    ):
        for step in [*range(12), 2**33]:  # 12 points: more than the default samples kept
            loss = 1 / (step + 1)
            await train.add_summary([summary.scalar("loss", loss), summary.scalar("lr", 0.1)], step)
            expect("train", "scalars", "loss", step, as_float32(loss))
            expect("train", "scalars", "lr", step, as_float32(0.1))
            weights = rng.normal(size=64) * (step % 5 + 1)
            await train.add_histogram("layer/weights", weights, step)
            expect(
                "train", "histograms", "layer/weights", step, histogram_buckets(weights).tolist()
            )
            await train.add_text("notes", f"step **{step}** ✓", step)
            expect("train", "text", "notes", step, f"step **{step}** ✓")
            pixels = rng.integers(0, 256, (3, 4, 1 + step % 4), np.uint8)
            await nested.add_image("samples/一", pixels, step)
            expect("eval/nested", "images", "samples/一", step, (b"4", b"3", encode_png(pixels)))
        gray = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
        await root.add_image("gray", gray, 0, dataformats="HW")
        gray_png = encode_png(np.rint(gray * 255).astype(np.uint8)[:, :, None])
        expect(".", "images", "gray", 0, (b"3", b"2", gray_png))
        for step, value in enumerate([math.inf, -math.inf, math.nan, 1e39, -0.0, 3e-39]):
            await root.add_scalar("extremes", value, step)
            expect(".", "scalars", "extremes", step, as_float32(value))
        await root.add_histogram("empty", [], 0, bins=2)
        expect(".", "histograms", "empty", 0, [[0.0, 0.0, 0.0]] * 2)
        await root.add_histogram("constant", [2.5] * 4, 0, bins=2)
        expect(".", "histograms", "constant", 0, [[2.5, 2.5, 0.0], [2.5, 2.5, 4.0]])
        await root.add_text("blank", "", 0)
        expect(".", "text", "blank", 0, "")
    return {".", "train", "eval/nested"}, expected


@pytest.mark.tensorboard
async def test_tensorboard_shows_every_tag_step_and_value(
    tmp_path: Path, loader: Callable[[Path], Any]
) -> None:
    logdir = tmp_path / "logs"
    expected_runs, expected = await write_every_kind(logdir)
    runs, view = await loader(logdir)
    assert runs == expected_runs
    assert view == expected


async def write_two_sessions(logdir: Path) -> View:
    """Two writers in turn, as a session and the session resumed from step 5 write."""
    async with SummaryWriter(logdir) as first:
        await first.add_session_log(SessionLog.START, 0)
        for step in range(10):
            await first.add_summary(
                [summary.scalar("loss", 100 + step), summary.text("log", f"first {step}")], step
            )
    async with SummaryWriter(logdir) as second:
        await second.add_session_log(SessionLog.START, 5)
        for step in range(5, 13):
            await second.add_summary(
                [summary.scalar("loss", 200 + step), summary.text("log", f"second {step}")], step
            )
    steps = [(step, 100 + step if step < 5 else 200 + step) for step in range(13)]
    return {
        (".", "scalars", "loss"): [(step, float(value)) for step, value in steps],
        (".", "text", "log"): [
            (step, f"{'first' if step < 5 else 'second'} {step}") for step, _ in steps
        ],
    }


@pytest.mark.tensorboard
async def test_tensorboard_shows_one_point_per_step_after_a_resume(
    tmp_path: Path, loader: Callable[[Path], Any]
) -> None:
    # The Python loader drops the points at and after a later SessionLog.START; rustboard
    # drops the points of a tag at and after a step that goes back. Either way, one point
    # per step, the resumed session's from step 5 on.
    logdir = tmp_path / "logs"
    expected = await write_two_sessions(logdir)
    runs, view = await loader(logdir)
    assert runs == {"."}
    assert view == expected


# -- TensorBoard and the training session ----------------------------------------------------------


class Crash(Exception):
    """The job dies (not a recoverable error: the session ends, no final save)."""


def training_step(session_index: int, crash_at: int | None = None) -> Callable[..., Any]:
    def step(state: dict[str, Any]) -> dict[str, Any]:
        number = int(state["w"][0]) + 1
        if number == crash_at:
            raise Crash(f"died before step {number}")
        state["w"] += 1
        return {
            "loss": 1000.0 * session_index + number,  # which session wrote a point
            "accuracy": np.float32(number / 64),
            "tokens": np.int64(number * 10),
            "name": "not a number",
            "done": False,
            "weights": np.ones(3),
        }

    return step


async def train(
    directory: Path, session_index: int, last_step: int, crash_at: int | None = None
) -> None:
    async with MonitoredTrainingSession(
        {"w": np.zeros(1)},
        training_step(session_index, crash_at),
        checkpoint_dir=directory,
        save_checkpoint_steps=8,
        save_summaries_steps=1,
        log_step_count_steps=5,
        hooks=[StopAtStepHook(last_step=last_step)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()


@pytest.mark.tensorboard
async def test_a_resumed_training_session_shows_one_point_per_step(
    tmp_path: Path, loader: Callable[[Path], Any]
) -> None:
    # The first session writes summaries up to step 20 and dies; its last checkpoint is 16.
    # The second restores 16 and runs to 30: TensorBoard must show steps 17-20 once, from it.
    logdir = tmp_path / "job"
    with pytest.raises(Crash):
        await train(logdir, 1, last_step=100, crash_at=21)
    assert latest_checkpoint(logdir) == str(logdir / "model.ckpt-16")
    await train(logdir, 2, last_step=30)
    assert len(event_files(logdir)) == 2

    runs, view = await loader(logdir)
    assert runs == {"."}
    # With no summary_op, every numeric scalar output, and StepCounterHook's rate.
    assert set(view) == {
        (".", "scalars", tag) for tag in ("loss", "accuracy", "tokens", "global_step/sec")
    }
    session = {step: 1 if step <= 16 else 2 for step in range(1, 31)}
    assert view[(".", "scalars", "loss")] == [(s, 1000.0 * session[s] + s) for s in range(1, 31)]
    assert view[(".", "scalars", "accuracy")] == [(s, as_float32(s / 64)) for s in range(1, 31)]
    assert view[(".", "scalars", "tokens")] == [(s, float(s * 10)) for s in range(1, 31)]
    # Armed on each session's first step, then every 5 steps.
    assert [step for step, _ in view[(".", "scalars", "global_step/sec")]] == [6, 11, 16, 22, 27]


@pytest.mark.tensorboard
@pytest.mark.slow
async def test_the_loaders_agree_on_a_training_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("tensorboard_data_server")
    logdir = tmp_path / "job"
    with pytest.raises(Crash):
        await train(logdir, 1, last_step=100, crash_at=21)
    await train(logdir, 2, last_step=30)
    python = await anyio.to_thread.run_sync(python_view, logdir)
    assert await rust_view(logdir) == python  # global_step/sec values included


TRAIN_NUMPY = Path(__file__).resolve().parent.parent / "examples" / "train_numpy.py"
# Runs a script with its wall clock an hour behind, as after a clock set back between two
# runs: the resumed run's file then sorts first unless the writer looks at the directory
# (which the pids of two runs in one second, not chosen by a test, may or may not do).
CLOCK_SET_BACK = (
    "import runpy, sys, time; real = time.time; time.time = lambda: real() - 3600; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_train_numpy(directory: Path, last_step: int, *python: str) -> None:
    result = subprocess.run(
        [sys.executable, *python, str(TRAIN_NUMPY), "--dir", str(directory),
         "--last-step", str(last_step)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[0] == f"starting at step {last_step - 200}"


@pytest.fixture(scope="module", params=["chained", "clock set back"])
def stopped_and_resumed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """README's ``train_numpy.py --last-step 200 && train_numpy.py --last-step 400``: the
    second run (its clock set back, or not) resumes the first in the same directory."""
    directory = tmp_path_factory.mktemp("resumed") / "train"
    run_train_numpy(directory, 200)
    run_train_numpy(directory, 400, *(["-c", CLOCK_SET_BACK] if request.param != "chained" else []))
    return directory


@pytest.mark.tensorboard
@pytest.mark.slow
async def test_tensorboard_shows_both_runs_of_the_readme_resume(
    tmp_path: Path, stopped_and_resumed: Path, loader: Callable[[Path], Any]
) -> None:
    # Both runs may start in one second, and the second's pid may be the smaller: its file
    # must still sort last, or TensorBoard shows the first run's points only (issue 14).
    logdir = tmp_path / "train"
    shutil.copytree(stopped_and_resumed, logdir)
    first, resumed = event_files(logdir)
    assert first.name.split(".")[3] < resumed.name.split(".")[3]
    runs, view = await loader(logdir)
    assert runs == {"."}
    # Summaries on each run's first step (1, then 201), then every 25 steps: 8 per run.
    steps = [*range(1, 200, 25), *range(201, 400, 25)]
    assert {key: [step for step, _ in points] for key, points in view.items()} == {
        (".", "scalars", "loss"): steps,
        (".", "histograms", "weights"): steps,
        (".", "text", "notes"): steps,
        (".", "images", "weights_image"): steps,
        (".", "scalars", "global_step/sec"): [101, 301],  # every 100 steps of each run
    }
