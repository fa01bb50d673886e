"""SummarySaverHook, StepCounterHook's summaries, CheckpointSaverHook's SessionLog events,
and the summaries MonitoredTrainingSession writes by default (TF_SEMANTICS 1J, items 72-73).

Driven through real sessions on both backends. The event files are read back with a small
protobuf reader written here from the wire format (TB_FORMAT.md §3), so these tests need no
TensorBoard; ``test_summary_writer.py`` checks what TensorBoard's own loaders make of them.
Time comes from ``FakeClock``s advanced between runs, as TensorFlow's tests mock
``time.time``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from support import parse_protobuf as parse

from asyncckpt import (
    ChiefSessionCreator,
    MonitoredSession,
    MonitoredTrainingSession,
    PreemptedError,
    Scaffold,
    SessionLog,
    SessionRunHook,
    StepCounterHook,
    StopAtStepHook,
    SummarySaverHook,
    SummaryWriter,
    latest_checkpoint,
    summary,
)
from asyncckpt._hooks._summary import summary_writer_for
from asyncckpt._summary._records import iter_records
from asyncckpt.testing import FakeClock

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from asyncckpt._hooks._base import CoordinatorLike, SessionLike

pytestmark = pytest.mark.anyio

# -- reading event files (TB_FORMAT.md §3-4) -------------------------------------------------------


@dataclass
class Events:
    """The events of one directory's files, in file order."""

    files: list[str] = field(default_factory=list)
    summaries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """``(step, {tag: value})`` per summary event: scalars as float, text as str,
    histograms as ``[k, 3]`` rows, images as ``(width, height)``."""
    logs: list[tuple[int, SessionLog, str]] = field(default_factory=list)
    """``(step, status, checkpoint_path)`` per SessionLog event."""
    order: list[tuple[str, int]] = field(default_factory=list)
    """``("summary" | status name, step)`` for every event after the file version."""

    def steps(self, tag: str) -> list[int]:
        return [step for step, values in self.summaries if tag in values]

    def values(self, tag: str) -> list[tuple[int, Any]]:
        return [(step, values[tag]) for step, values in self.summaries if tag in values]


def _decode_value(value: bytes) -> tuple[str, Any]:
    fields = parse(value)
    tensor = parse(fields[8][0])
    name = parse(parse(fields[9][0])[1][0])[1][0].decode()  # metadata.plugin_data.plugin_name
    tag = fields[1][0].decode()
    if name == "scalars":
        return tag, struct.unpack("<f", tensor[5][0])[0]
    if name == "text":
        return tag, tensor[8][0].decode()
    if name == "histograms":
        rows = np.frombuffer(tensor[4][0], "<f8") if 4 in tensor else np.zeros(0)
        return tag, rows.reshape(-1, 3).tolist()
    assert name == "images", name
    return tag, (int(tensor[8][0]), int(tensor[8][1]))


def read_events(directory: str | os.PathLike[str]) -> Events:
    """The events of every file in ``directory`` (none if it does not exist)."""
    events = Events()
    if not os.path.isdir(directory):
        return events
    names = sorted(name for name in os.listdir(directory) if "tfevents" in name)
    for name in names:
        events.files.append(name)
        with open(os.path.join(directory, name), "rb") as file:
            records = list(iter_records(file.read()))
        first = parse(records[0])
        assert first[3] == [b"brain.Event:2"], "the first event of a file is its version"
        for record in records[1:]:
            fields = parse(record)
            step = fields.get(2, [0])[0]
            if 5 in fields:
                values = dict(_decode_value(value) for value in parse(fields[5][0])[1])
                events.summaries.append((step, values))
                events.order.append(("summary", step))
            else:
                log = parse(fields[7][0])
                status = SessionLog(log[1][0])
                events.logs.append((step, status, log.get(2, [b""])[0].decode()))
                events.order.append((status.name, step))
    return events


# -- helpers ---------------------------------------------------------------------------------------


def new_state() -> dict[str, Any]:
    return {"w": np.zeros(2)}


def counting_step(state: dict[str, Any], **feeds: Any) -> dict[str, Any]:
    """One step: ``loss`` is the global step this step completes (also after a restore)."""
    state["w"] += 1
    step = float(state["w"][0])
    return {
        "loss": step,
        "double": 2 * step,
        "accuracy": np.float32(step / 100),
        "count": np.int64(step),
        "zero_d": np.array(step * 3),
        "done": False,
        "flag": np.bool_(True),
        "name": "not a number",
        "weights": np.full(4, step),
        "nothing": None,
    }


def monitored(
    hooks: Sequence[SessionRunHook],
    step_fn: Callable[..., Any] = counting_step,
    *,
    checkpoint_dir: Path | None = None,
) -> MonitoredSession:
    creator = ChiefSessionCreator(new_state(), step_fn, checkpoint_dir=checkpoint_dir)
    return MonitoredSession(creator, hooks=hooks)


async def run(
    sess: MonitoredSession, runs: int, *, clock: FakeClock | None = None, secs: float = 0.0
) -> None:
    """The user's loop: ``runs`` runs, moving ``clock`` on by ``secs`` after each."""
    for _ in range(runs):
        await sess.run()
        if clock is not None:
            clock.advance(secs)


# -- the schedule (TF_SEMANTICS 69-72) ------------------------------------------------------------


async def test_save_steps_8_over_30_runs_writes_at_1_9_17_25(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op="loss")
    async with monitored([hook]) as sess:
        await run(sess, 30)
    events = read_events(tmp_path)
    assert events.values("loss") == [(1, 1.0), (9, 9.0), (17, 17.0), (25, 25.0)]
    assert [step for step, _ in events.summaries] == [1, 9, 17, 25]


async def test_a_list_of_two_ops_writes_both_at_each_trigger(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op=["loss", "double"])
    async with monitored([hook]) as sess:
        await run(sess, 30)
    assert read_events(tmp_path).summaries == [
        (step, {"loss": step, "double": 2.0 * step}) for step in (1, 9, 17, 25)
    ]


async def test_save_secs_half_a_second_with_half_a_second_per_run_writes_every_step(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    hook = SummarySaverHook(save_secs=0.5, output_dir=tmp_path, summary_op="loss", clock=clock)
    async with monitored([hook]) as sess:
        await run(sess, 4, clock=clock, secs=0.5)
    assert read_events(tmp_path).steps("loss") == [1, 2, 3, 4]


async def test_save_secs_9_with_3_1_seconds_per_run_writes_at_1_4_7(tmp_path: Path) -> None:
    clock = FakeClock()
    hook = SummarySaverHook(save_secs=9, output_dir=tmp_path, summary_op="loss", clock=clock)
    async with monitored([hook]) as sess:
        await run(sess, 8, clock=clock, secs=3.1)
    assert read_events(tmp_path).steps("loss") == [1, 4, 7]


async def test_session_log_start_comes_first_on_the_first_step(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=2, output_dir=tmp_path, summary_op="loss")
    async with monitored([hook]) as sess:
        await run(sess, 4)
    events = read_events(tmp_path)
    assert events.order == [("START", 1), ("summary", 1), ("summary", 3)]
    assert events.logs == [(1, SessionLog.START, "")]


async def test_a_recovery_writes_session_log_start_again(tmp_path: Path) -> None:
    # After a recovery the hook starts afresh: START at the first step run again, then a
    # summary there (TensorBoard's Python loader drops what the lost steps wrote).
    preempted = [False]

    def step(state: dict[str, Any]) -> dict[str, Any]:
        if state["w"][0] == 5 and not preempted[0]:
            preempted[0] = True
            raise PreemptedError("lost the worker")
        return counting_step(state)

    hook = SummarySaverHook(save_steps=4, output_dir=tmp_path / "logs", summary_op="loss")
    async with MonitoredTrainingSession(
        new_state(),
        step,
        checkpoint_dir=tmp_path,
        save_checkpoint_steps=3,
        save_summaries_steps=None,
        log_step_count_steps=None,
        hooks=[hook, StopAtStepHook(last_step=10)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    events = read_events(tmp_path / "logs")
    assert len(events.files) == 1  # one session, one writer, recovered or not
    # Checkpoint 3 was restored: steps 4 and 5 run again.
    assert events.order == [
        ("START", 1),
        ("summary", 1),
        ("summary", 5),
        ("START", 4),
        ("summary", 4),
        ("summary", 8),
    ]


async def test_end_flushes_a_writer_it_does_not_own(tmp_path: Path) -> None:
    async with SummaryWriter(tmp_path, flush_secs=3600) as writer:
        hook = SummarySaverHook(save_steps=1, summary_writer=writer, summary_op="loss")
        async with monitored([hook]) as sess:
            await run(sess, 3)
            assert hook.summary_writer is writer
        # Still open (the caller owns it), and end() made every summary visible.
        assert read_events(tmp_path).steps("loss") == [1, 2, 3]
        await writer.add_scalar("loss", 10.0, 10)
    assert read_events(tmp_path).steps("loss") == [1, 2, 3, 10]


async def test_the_hook_begins_afresh_in_each_session(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=10, output_dir=tmp_path, summary_op="loss")
    for _ in range(2):
        async with monitored([hook]) as sess:
            await run(sess, 3)
    events = read_events(tmp_path)
    assert len(events.files) == 2  # a writer per session
    assert events.order == [("START", 1), ("summary", 1)] * 2


# -- what summary_op may be ------------------------------------------------------------------------


async def written(
    tmp_path: Path, runs: int = 1, *, step_fn: Callable[..., Any] = counting_step, **kwargs: Any
) -> list[tuple[int, dict[str, Any]]]:
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, **kwargs)
    async with monitored([hook], step_fn) as sess:
        await run(sess, runs)
    return read_events(tmp_path).summaries


async def test_an_output_name_writes_that_output_by_its_kind(tmp_path: Path) -> None:
    assert await written(tmp_path / "number", summary_op="count") == [(1, {"count": 1.0})]
    assert await written(tmp_path / "zero_d", summary_op="zero_d") == [(1, {"zero_d": 3.0})]
    assert await written(tmp_path / "text", summary_op="name") == [(1, {"name": "not a number"})]
    histogram = await written(tmp_path / "array", summary_op="weights")
    assert histogram == [(1, {"weights": [[1.0, 1.0, 0.0]] * 29 + [[1.0, 1.0, 4.0]]})]


async def test_an_output_may_hold_summary_values(tmp_path: Path) -> None:
    def step(state: dict[str, Any]) -> dict[str, Any]:
        state["w"] += 1
        return {
            "one": summary.text("notes", "hello"),
            "several": [summary.scalar("a", 1.0), summary.image("img", np.zeros((2, 3)), "HW")],
        }

    assert await written(tmp_path, step_fn=step, summary_op=["one", "several"]) == [
        (1, {"notes": "hello", "a": 1.0, "img": (3, 2)})
    ]


async def test_global_step_is_a_name_too(tmp_path: Path) -> None:
    assert await written(tmp_path, 2, summary_op=["global_step", "loss"]) == [
        (1, {"global_step": 1.0, "loss": 1.0}),
        (2, {"global_step": 2.0, "loss": 2.0}),
    ]


async def test_a_callable_gets_the_outputs_and_returns_summary_values(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def op(outputs: Any) -> list[summary.SummaryValue]:
        seen.append(sorted(outputs))
        return [summary.scalar("loss/x10", outputs["loss"] * 10), summary.text("t", "x")]

    assert await written(tmp_path, 2, summary_op=op) == [
        (1, {"loss/x10": 10.0, "t": "x"}),
        (2, {"loss/x10": 20.0, "t": "x"}),
    ]
    assert seen == [sorted(counting_step(new_state()))] * 2  # every output, no global_step


async def test_a_callable_may_return_one_value_or_a_mapping(tmp_path: Path) -> None:
    assert await written(
        tmp_path / "one", summary_op=lambda outputs: summary.scalar("only", outputs["loss"])
    ) == [(1, {"only": 1.0})]
    assert await written(
        tmp_path / "mapping",
        summary_op=lambda outputs: {"loss": outputs["loss"], "hist": np.ones(2), "note": "hi"},
    ) == [(1, {"loss": 1.0, "hist": [[1.0, 1.0, 0.0]] * 29 + [[1.0, 1.0, 2.0]], "note": "hi"})]
    assert await written(tmp_path / "empty", summary_op=lambda outputs: []) == []


async def test_a_scaffold_without_summary_op_writes_every_numeric_scalar_output(
    tmp_path: Path,
) -> None:
    # TensorFlow's merge_all: numbers and 0-d numeric arrays; not bools, text, arrays, None.
    assert await written(tmp_path, 2, scaffold=Scaffold()) == [
        (
            1,
            {"loss": 1.0, "double": 2.0, "accuracy": np.float32(0.01), "count": 1.0, "zero_d": 3.0},
        ),
        (
            2,
            {"loss": 2.0, "double": 4.0, "accuracy": np.float32(0.02), "count": 2.0, "zero_d": 6.0},
        ),
    ]


async def test_a_scaffold_summary_op_is_used(tmp_path: Path) -> None:
    assert await written(tmp_path, scaffold=Scaffold(summary_op=["double"])) == [
        (1, {"double": 2.0})
    ]


@pytest.mark.parametrize(
    ("summary_op", "message"),
    [
        (42, "summary_op must be an output name, a list of names, or a callable"),
        (["loss", 3], "summary_op must be an output name, a list of names, or a callable"),
        (b"loss", "summary_op must be an output name, a list of names, or a callable"),
    ],
)
def test_summary_op_of_the_wrong_type_is_refused_at_construction(
    tmp_path: Path, summary_op: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op=summary_op)


@pytest.mark.parametrize(
    ("summary_op", "message"),
    [
        ("done", "cannot summarize output 'done' of type bool"),
        ("nothing", "cannot summarize output 'nothing' of type NoneType"),
        (lambda outputs: None, "cannot summarize output 'summary_op' of type NoneType"),
        (lambda outputs: {"x": object()}, "cannot summarize output 'x' of type object"),
        (lambda outputs: [summary.scalar("a", 1.0), 2.0], "of type list"),
    ],
)
async def test_what_cannot_be_summarized_raises_type_error_from_the_run(
    tmp_path: Path, summary_op: Any, message: str
) -> None:
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op=summary_op)
    with pytest.raises(TypeError, match=message):
        async with monitored([hook]) as sess:
            await run(sess, 1)


async def test_an_unknown_output_name_raises_key_error_from_the_run(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="lost")
    with pytest.raises(KeyError, match="no step output named 'lost'"):
        async with monitored([hook]) as sess:
            await run(sess, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"save_steps": 1, "output_dir": "d"},
            "Exactly one of scaffold or summary_op should be set.",
        ),
        (
            {"save_steps": 1, "output_dir": "d", "summary_op": "loss", "scaffold": Scaffold()},
            "Exactly one of scaffold or summary_op should be set.",
        ),
        ({"save_steps": 1, "summary_op": "loss"}, "pass output_dir= \\(or an open summary_writer="),
        ({"output_dir": "d", "summary_op": "loss"}, "Either every_secs or every_steps"),
        (
            {"save_steps": 1, "save_secs": 1.0, "output_dir": "d", "summary_op": "loss"},
            "Can not provide both every_secs and every_steps",
        ),
        ({"save_steps": 0, "output_dir": "d", "summary_op": "loss"}, "every_steps must be"),
    ],
)
def test_summary_saver_hook_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SummarySaverHook(**kwargs)


def test_summary_saver_hook_repr_names_its_directory_and_schedule(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op="loss")
    assert repr(hook).startswith(f"SummarySaverHook(output_dir={str(tmp_path)!r}, timer=")
    assert hook.summary_writer is None  # known once a session is created


# -- StepCounterHook (TF_SEMANTICS 73) ------------------------------------------------------------


async def test_step_counter_every_10_steps_over_30_runs_writes_at_11_and_21(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    hook = StepCounterHook(every_n_steps=10, output_dir=tmp_path, clock=clock)
    async with monitored([hook]) as sess:
        for number in range(1, 31):
            await sess.run()
            clock.advance(0.5 if number <= 10 else 0.25)
    # The first trigger (step 1) only arms; each rate is over the steps since the last.
    assert read_events(tmp_path).values("global_step/sec") == [(11, 2.0), (21, 4.0)]


async def test_step_counter_writes_to_a_given_writer(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SummaryWriter(tmp_path) as writer:
        hook = StepCounterHook(every_n_steps=1, summary_writer=writer, clock=clock)
        async with monitored([hook]) as sess:
            await run(sess, 3, clock=clock, secs=0.125)
    assert read_events(tmp_path).values("global_step/sec") == [(2, 8.0), (3, 8.0)]


# -- writers shared within a session --------------------------------------------------------------


async def test_hooks_of_a_session_share_one_writer_per_directory(tmp_path: Path) -> None:
    clock = FakeClock()
    saver = SummarySaverHook(save_steps=2, output_dir=tmp_path, summary_op="loss", clock=clock)
    counter = StepCounterHook(every_n_steps=2, output_dir=tmp_path / ".", clock=clock)
    other = SummarySaverHook(save_steps=3, output_dir=tmp_path / "other", summary_op="double")
    async with monitored([counter, saver, other]) as sess:
        await run(sess, 4, clock=clock, secs=1.0)
        assert saver.summary_writer is counter.summary_writer  # the same normalized path
        assert other.summary_writer is not saver.summary_writer
    events = read_events(tmp_path)
    assert len(events.files) == 1
    assert events.order == [
        ("START", 1),
        ("summary", 1),
        ("summary", 3),
        ("summary", 3),
    ]
    assert events.summaries[1:3] == [(3, {"global_step/sec": 1.0}), (3, {"loss": 3.0})]
    assert read_events(tmp_path / "other").steps("double") == [1, 4]
    # The session owned the writers: closed with it.
    assert saver.summary_writer is not None
    with pytest.raises(RuntimeError, match="the SummaryWriter is closed"):
        await saver.summary_writer.add_scalar("late", 1.0, 100)


async def test_summary_writer_for_returns_one_open_writer_per_directory(tmp_path: Path) -> None:
    writers: list[SummaryWriter] = []

    class Opener(SessionRunHook):
        async def after_create_session(self, session: SessionLike, coord: CoordinatorLike) -> None:
            first = await summary_writer_for(coord, tmp_path / "a")
            writers.append(first)
            writers.append(await summary_writer_for(coord, f"{tmp_path}/b/../a/"))
            writers.append(await summary_writer_for(coord, tmp_path / "b"))
            await first.add_scalar("x", 1.0, 1)

    async with monitored([Opener()]):
        assert writers[0] is writers[1]
        assert writers[0] is not writers[2]
    async with monitored([Opener()]):
        assert writers[3] is not writers[0]  # another session: another writer
    assert [len(read_events(tmp_path / name).files) for name in ("a", "b")] == [2, 2]
    assert read_events(tmp_path / "a").steps("x") == [1, 1]


# -- CheckpointSaverHook and MonitoredTrainingSession ---------------------------------------------


async def test_checkpoint_saver_hook_writes_session_log_checkpoint_after_each_save(
    tmp_path: Path,
) -> None:
    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        checkpoint_dir=tmp_path,
        save_checkpoint_steps=4,
        save_summaries_steps=None,
        log_step_count_steps=None,
        hooks=[StopAtStepHook(last_step=10)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    events = read_events(tmp_path)
    assert events.summaries == []
    assert events.logs == [
        (step, SessionLog.CHECKPOINT, str(tmp_path / f"model.ckpt-{step}"))
        for step in (0, 4, 8, 10)
    ]
    assert latest_checkpoint(tmp_path) == events.logs[-1][2]


async def test_monitored_training_session_writes_every_numeric_scalar_by_default(
    tmp_path: Path,
) -> None:
    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        checkpoint_dir=tmp_path,
        save_checkpoint_steps=5,
        save_summaries_steps=5,
        log_step_count_steps=5,
        hooks=[StopAtStepHook(last_step=12)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    events = read_events(tmp_path)
    assert len(events.files) == 1  # summaries, rates and checkpoint logs share one file
    for tag in ("loss", "double", "accuracy", "count", "zero_d"):
        assert events.steps(tag) == [1, 6, 11], tag
    assert events.values("loss") == [(1, 1.0), (6, 6.0), (11, 11.0)]
    assert [step for step, _ in events.values("global_step/sec")] == [6, 11]
    assert {tag for _, values in events.summaries for tag in values} == {
        "loss",
        "double",
        "accuracy",
        "count",
        "zero_d",
        "global_step/sec",
    }
    assert [step for step, status, _ in events.logs if status == SessionLog.START] == [1]
    # Logged as each checkpoint becomes durable (in the background), in save order.
    assert [step for step, status, _ in events.logs if status == SessionLog.CHECKPOINT] == [
        0,
        5,
        10,
        12,
    ]


async def test_monitored_training_session_summary_dir_and_turning_summaries_off(
    tmp_path: Path,
) -> None:
    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        checkpoint_dir=tmp_path / "ckpt",
        summary_dir=tmp_path / "logs",
        save_checkpoint_steps=100,
        save_summaries_steps=2,
        log_step_count_steps=None,
        scaffold=Scaffold(summary_op="loss"),
        hooks=[StopAtStepHook(last_step=4)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    assert read_events(tmp_path / "logs").summaries == [(1, {"loss": 1.0}), (3, {"loss": 3.0})]
    # The checkpoint hook logs to its own directory.
    assert [status for _, status, _ in read_events(tmp_path / "ckpt").logs] == [
        SessionLog.CHECKPOINT
    ] * 2

    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        checkpoint_dir=tmp_path / "quiet",
        save_checkpoint_steps=None,
        save_summaries_steps=None,
        log_step_count_steps=None,
        hooks=[StopAtStepHook(last_step=4)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    assert read_events(tmp_path / "quiet").files == []


async def test_a_non_chief_writes_no_summaries(tmp_path: Path) -> None:
    async with MonitoredTrainingSession(
        new_state(),
        counting_step,
        is_chief=False,
        checkpoint_dir=tmp_path,
        save_summaries_steps=1,
        hooks=[StopAtStepHook(last_step=3)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    assert read_events(tmp_path).files == []


async def test_a_resumed_session_announces_the_restart_at_its_first_step(
    tmp_path: Path,
) -> None:
    # Session 1 writes summaries to step 7 and dies with checkpoint 4; session 2 restores 4:
    # START at 5 tells TensorBoard to drop the dead session's points from step 5 on.
    class Crash(Exception):
        pass

    def dying(state: dict[str, Any]) -> dict[str, Any]:
        if state["w"][0] == 7:
            raise Crash
        return counting_step(state)

    async def session(step_fn: Callable[..., Any], last_step: int) -> None:
        async with MonitoredTrainingSession(
            new_state(),
            step_fn,
            checkpoint_dir=tmp_path,
            save_checkpoint_steps=4,
            save_summaries_steps=1,
            log_step_count_steps=None,
            scaffold=Scaffold(summary_op="loss"),
            hooks=[StopAtStepHook(last_step=last_step)],
        ) as sess:
            while not sess.should_stop():
                await sess.run()

    with pytest.raises(Crash):
        await session(dying, 100)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-4")
    await session(counting_step, 9)
    events = read_events(tmp_path)
    assert len(events.files) == 2
    summaries = [entry for entry in events.order if entry[0] in ("summary", "START")]
    assert summaries == [
        ("START", 1),
        *(("summary", step) for step in range(1, 8)),
        ("START", 5),
        *(("summary", step) for step in range(5, 10)),
    ]


async def test_writing_never_blocks_the_loop_on_disk(tmp_path: Path) -> None:
    # A smoke test of the async path: steps that await keep running while summaries are
    # written in the background, and every summary is there at the end.
    async def step(state: dict[str, Any]) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return counting_step(state)

    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="loss")
    with anyio.fail_after(5):
        async with monitored([hook], step) as sess:
            await run(sess, 50)
    assert read_events(tmp_path).steps("loss") == list(range(1, 51))
