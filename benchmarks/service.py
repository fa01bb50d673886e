"""Service benchmark: how long a save blocks a serving event loop, first and warm, and its memory.

A service keeps its state in memory (by default a 512 MiB float32 table and 1,000 counter
arrays of 4 KiB) and saves it while it serves. What its requests feel is how long a save
blocks the event loop: a ticker task sleeps 1 ms in a loop, and the largest lateness of its
wake-ups during a ``save()`` call (``loop lag``) is reported beside the manager's own
``statistics().last_stall_secs`` (``stall``).

For ``max_pending`` 0 and 1, three child processes each, every one fresh (a first save meets
memory the process never touched, and the peak RSS is the process's own), which differ in
their first save:

- ``callable``: a callable step and nothing reserved (missing buffers are made in a worker
  thread, then copied into);
- ``int``: an int step and nothing reserved (buffers allocated on the loop: the old path, for
  contrast);
- ``reserved``: ``await manager.reserve(state)`` first (its duration, off the loop, and the
  loop's lag during it are reported), then a callable step.

Then every child makes ``warm`` saves into warm buffers (each waits until the previous one is
durable), and ``overlaps`` pairs of saves whose second starts 1 ms after the first returns,
while the first's write runs (callable steps; whether the write was still running is
recorded); last, it reports its peak RSS (VmHWM) and its RSS once the state existed.

Figures per ``max_pending``: ``first_stall_callable``, ``first_stall_int``,
``first_stall_reserved``, ``reserve``, ``warm_stall`` (over the warm saves of the three
children), ``second_stall`` (the first overlapping save of the ``callable`` child: the first
that may need a second set of buffers) and ``second_stall_reserved`` (of the ``reserved``
child), ``peak_rss``. Targets (issue 14): the first and the second stall at most 1.2 x the
warm stall, by the manager's figure and by the loop's lag; peak RSS minus the RSS with the
state at most the snapshots the manager may hold (max_pending + 1) + 64 MiB (the issue's
target is max_pending=0: state + one snapshot + 64 MiB). Children run one after another,
``settle_secs`` apart: memory a process freed goes back to the host gradually on these
machines (freed 2 GiB: mostly still cheap to touch 3 s later, fresh again after 10-20 s), so
the next child meets fresh memory, as a service starting on a quiet host does; each child
reports how long building its state took (about 2.7 s per GiB when the memory was fresh).

Usage::

    python -m benchmarks.service                      # full size, about three minutes
    python -m benchmarks.service --smoke              # 32 MiB + 100 counters, a few seconds
    python -m benchmarks.service --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Any, Final

import anyio
import anyio.abc
import numpy as np

from asyncckpt import CheckpointManager, SaveOutcome

from ._report import targets_table, write_report

__all__ = [
    "FIRST_SAVES",
    "FULL",
    "MAX_PENDINGS",
    "SMOKE",
    "ServiceSize",
    "main",
    "markdown",
    "run_service",
    "targets",
]

MiB: Final = 1024 * 1024
TICK_SECS: Final = 0.001
"""The ticker's sleep: a request that awaits something this short feels the loop's lag."""
STALL_RATIO: Final = 1.2
"""Target: first and second stalls at most this times the warm stall."""
RSS_SLACK_MIB: Final = 64
"""Target: peak RSS at most state + the snapshots the manager may hold + this."""
FIRST_SAVES: Final = ("callable", "int", "reserved")
MAX_PENDINGS: Final = (0, 1)
ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSize:
    """The state a child serves, and how many saves of each kind it makes."""

    table_rows: int
    table_cols: int = 1024
    counters: int
    counter_bytes: int = 4096
    warm_saves: int
    overlaps: int
    idle_secs: float
    """How long each child's ticker runs before the manager opens (the idle lag)."""
    settle_secs: float
    """Pause between children: memory a process freed goes back to the host within some
    10-20 s (after 3 s most of a freed 2 GiB was still cheap to touch, after 10-20 s not)."""
    timeout_secs: float
    """Longest a child may run before it is killed and the benchmark fails."""
    jobs: int = 1
    """Children run at once. Above 1 (the smoke run, for speed) they compete for the cores
    and for memory, and no longer meet fresh memory: the shape of the report, not figures."""

    @property
    def table_bytes(self) -> int:
        return self.table_rows * self.table_cols * 4

    @property
    def state_bytes(self) -> int:
        return self.table_bytes + self.counters * self.counter_bytes


FULL: Final = ServiceSize(
    table_rows=131_072,  # x 1024 float32 = 512 MiB
    counters=1000,
    warm_saves=5,
    overlaps=3,
    idle_secs=0.5,
    settle_secs=15.0,
    timeout_secs=300.0,
)
SMOKE: Final = ServiceSize(
    table_rows=8192,  # 32 MiB
    counters=100,
    warm_saves=3,
    overlaps=2,
    idle_secs=0.05,
    settle_secs=0.0,
    timeout_secs=60.0,
    jobs=2,
)


# -- the child ----------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in bytes; ru_maxrss where there is none."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Ticker:
    """A task that sleeps ``TICK_SECS`` in a loop and records when each sleep began and woke.

    A tick is late from when it was due (began + ``TICK_SECS``) until it woke: the loop was
    busy meanwhile. The lag of a window is the longest such lateness within it (clipped to
    the window, so a block just after a window is not charged to it). Kept in
    ``array("d")``, a few hundred KiB for a whole child (it counts in the child's RSS).
    """

    def __init__(self) -> None:
        self._began = array("d")
        self._woke = array("d")
        self._settling: list[tuple[float, anyio.Event]] = []

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            began = time.perf_counter()
            await anyio.sleep(TICK_SECS)
            self._began.append(began)
            self._woke.append(time.perf_counter())
            if self._settling:
                for after, event in self._settling:
                    if began > after:
                        event.set()
                self._settling = [(a, e) for a, e in self._settling if not e.is_set()]

    async def settle(self) -> None:
        """Return once a tick that began after this call has woken (every tick asleep
        during an earlier window is recorded)."""
        event = anyio.Event()
        self._settling.append((time.perf_counter(), event))
        await event.wait()

    def lateness(self, start: float, end: float) -> np.ndarray[Any, np.dtype[np.float64]]:
        """How late each tick was within ``[start, end]`` (ticks late in it only)."""
        due = np.array(self._began, dtype=np.float64) + TICK_SECS
        woke = np.array(self._woke, dtype=np.float64)
        late = np.minimum(woke, end) - np.maximum(due, start)
        return late[late > 0]

    def lag(self, start: float, end: float) -> float:
        late = self.lateness(start, end)
        return float(late.max()) if late.size else 0.0


class _Service:
    """The service's state and its version (the step its saves are labelled with)."""

    def __init__(self, size: ServiceSize) -> None:
        self.state: dict[str, Any] = {
            # np.full writes every page: the state is resident before the baseline RSS.
            "table": np.full((size.table_rows, size.table_cols), 1.0, np.float32),
            "counters": {
                f"c{i:04d}": np.zeros(size.counter_bytes // 4, np.int32)
                for i in range(size.counters)
            },
        }
        self.version = 0

    def handle(self) -> None:
        """A request: it changes the state, and the version with it."""
        self.version += 1
        self.state["table"][self.version % len(self.state["table"])] += 1.0
        counters = self.state["counters"]
        counters[f"c{self.version % len(counters):04d}"][0] += 1

    def step(self) -> int:
        return self.version


async def _timed_save(
    manager: CheckpointManager, service: _Service, *, int_step: bool = False
) -> dict[str, Any]:
    service.handle()
    step = service.version
    began = time.perf_counter()
    accepted = await manager.save(service.state, step if int_step else service.step)
    returned = time.perf_counter()
    return {
        "step": step,
        "accepted": accepted,
        "began": began,
        "returned": returned,
        "call_s": returned - began,
        "stall_s": manager.statistics().last_stall_secs,
    }


async def _child(config: dict[str, Any]) -> dict[str, Any]:
    size = ServiceSize(**config["size"])
    max_pending: int = config["max_pending"]
    first: str = config["first"]
    rss_before_state = _status_bytes("VmRSS")
    began = time.perf_counter()
    service = _Service(size)
    state_build_s = time.perf_counter() - began  # about 2.7 s per GiB if the memory was fresh
    rss_with_state = _status_bytes("VmRSS")
    state_bytes = sum(
        a.nbytes for a in [service.state["table"], *service.state["counters"].values()]
    )
    ticker = _Ticker()
    durable: dict[int, float] = {}

    def on_done(outcome: SaveOutcome) -> None:
        if outcome.written:
            durable[outcome.step] = time.perf_counter()

    reserve: dict[str, Any] | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(ticker.run)
        idle_began = time.perf_counter()
        await anyio.sleep(size.idle_secs)
        idle = ticker.lateness(idle_began, time.perf_counter())
        async with CheckpointManager(
            config["directory"], max_to_keep=1, max_pending=max_pending
        ) as manager:
            manager.add_done_callback(on_done)
            if first == "reserved":
                began = time.perf_counter()
                await manager.reserve(service.state)
                returned = time.perf_counter()
                reserve = {
                    "began": began,
                    "returned": returned,
                    "secs": returned - began,
                    "bytes_allocated": manager.statistics().bytes_allocated,
                }
            first_save = await _timed_save(manager, service, int_step=first == "int")
            await manager.wait()
            warm = []
            for _ in range(size.warm_saves):
                warm.append(await _timed_save(manager, service))
                await manager.wait()
            overlaps = []
            for _ in range(size.overlaps):
                lead = await _timed_save(manager, service)
                await anyio.sleep(TICK_SECS)  # the writer picks the lead's snapshot up
                second = await _timed_save(manager, service)
                overlaps.append({"lead": lead, "second": second})
                await manager.wait()
            stats = manager.statistics()
        await ticker.settle()
        tg.cancel_scope.cancel()

    def finish(record: dict[str, Any]) -> dict[str, Any]:
        done = durable.get(record["step"])
        record["loop_lag_s"] = ticker.lag(record["began"], record["returned"])
        record["write_s"] = None if done is None else done - record["returned"]
        record["write_loop_lag_s"] = None if done is None else ticker.lag(record["returned"], done)
        return record

    for record in (first_save, *warm):
        finish(record)
    for pair in overlaps:
        finish(pair["lead"])
        finish(pair["second"])
        # The lead's write still ran when the second save was called.
        pair["overlapped"] = durable.get(pair["lead"]["step"], 0.0) > pair["second"]["began"]
    if reserve is not None:
        reserve["loop_lag_s"] = ticker.lag(reserve["began"], reserve["returned"])
    return {
        "max_pending": max_pending,
        "first": first,
        "state_bytes": state_bytes,
        "snapshot_bytes": state_bytes,  # every array is writable: a snapshot copies them all
        "rss_before_state": rss_before_state,
        "rss_with_state": rss_with_state,
        "state_build_s": state_build_s,
        "peak_rss": _status_bytes("VmHWM"),
        "idle_lag_s": {
            "median": float(np.median(idle)) if idle.size else 0.0,
            "max": float(idle.max()) if idle.size else 0.0,
        },
        "reserve": reserve,
        "first_save": first_save,
        "warm": warm,
        "overlaps": overlaps,
        "buffers_allocated": stats.buffers_allocated,
        "bytes_allocated": stats.bytes_allocated,
        "max_stall_s": stats.max_stall_secs,
        "written": stats.written,
    }


# -- the parent ---------------------------------------------------------------------------------


def _run_child(size: ServiceSize, max_pending: int, first: str, directory: str) -> dict[str, Any]:
    config = {
        "size": asdict(size),
        "max_pending": max_pending,
        "first": first,
        "directory": directory,
    }
    command = [sys.executable, "-m", "benchmarks.service", "--child", json.dumps(config)]
    try:
        out = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=size.timeout_secs,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped the child
        raise RuntimeError(
            f"service child (max_pending={max_pending}, first={first}) did not finish within "
            f"{size.timeout_secs:.0f} s; stderr: {exc.stderr!r}"
        ) from exc
    if out.returncode != 0:
        raise RuntimeError(
            f"service child (max_pending={max_pending}, first={first}) exited with "
            f"{out.returncode}: {out.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _figure(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("stall_s", "loop_lag_s", "call_s", "write_s", "write_loop_lag_s", "overlapped")
    return {key: record[key] for key in keys if key in record}


def _aggregate(max_pending: int, children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    warm = [record for child in children.values() for record in child["warm"]]
    warm_stall = _summary([r["stall_s"] for r in warm])
    warm_lag = _summary([r["loop_lag_s"] for r in warm])
    snapshot = children["callable"]["snapshot_bytes"]
    over = {
        first: (child["peak_rss"] - child["rss_with_state"]) / MiB
        for first, child in children.items()
    }
    reserved = children["reserved"]
    assert reserved["reserve"] is not None
    figures: dict[str, Any] = {
        "first_stall_callable": _figure(children["callable"]["first_save"]),
        "first_stall_int": _figure(children["int"]["first_save"]),
        "first_stall_reserved": _figure(reserved["first_save"]),
        "reserve": {
            "secs": reserved["reserve"]["secs"],
            "loop_lag_s": reserved["reserve"]["loop_lag_s"],
            "allocated_MiB": reserved["reserve"]["bytes_allocated"] / MiB,
        },
        "warm_stall": {
            "saves": len(warm),
            "stall_s": warm_stall,
            "loop_lag_s": warm_lag,
            "write_loop_lag_s": _summary([r["write_loop_lag_s"] for r in warm]),
            "write_s": _summary([r["write_s"] for r in warm]),
        },
        "second_stall": _figure(children["callable"]["overlaps"][0]["second"])
        | {"overlapped": children["callable"]["overlaps"][0]["overlapped"]},
        "second_stall_reserved": _figure(reserved["overlaps"][0]["second"])
        | {"overlapped": reserved["overlaps"][0]["overlapped"]},
        "second_stall_all": [
            _figure(pair["second"]) | {"overlapped": pair["overlapped"], "child": first}
            for first, child in children.items()
            for pair in child["overlaps"]
        ],
        "idle_lag_max_s": max(child["idle_lag_s"]["max"] for child in children.values()),
        "peak_rss": {
            "state_MiB": children["callable"]["state_bytes"] / MiB,
            "snapshot_MiB": snapshot / MiB,
            "rss_with_state_MiB": {f: c["rss_with_state"] / MiB for f, c in children.items()},
            "peak_MiB": {f: c["peak_rss"] / MiB for f, c in children.items()},
            "over_state_MiB": over,
            "worst_over_state_MiB": max(over.values()),
            "limit_MiB": (max_pending + 1) * snapshot / MiB + RSS_SLACK_MIB,
        },
        "sets_allocated": {
            first: child["bytes_allocated"] / snapshot for first, child in children.items()
        },
        "state_build_s_per_GiB": {
            first: child["state_build_s"] * 1024 * MiB / child["state_bytes"]
            for first, child in children.items()
        },
    }
    ratios: dict[str, float] = {}
    for name in (
        "first_stall_callable",
        "first_stall_int",
        "first_stall_reserved",
        "second_stall",
        "second_stall_reserved",
    ):
        ratios[f"{name} / warm_stall"] = figures[name]["stall_s"] / warm_stall["median"]
        ratios[f"{name} loop lag / warm loop lag"] = figures[name]["loop_lag_s"] / max(
            warm_lag["median"], 1e-9
        )
    return {"figures": figures, "ratios": ratios, "children": children}


def run_service(
    *,
    smoke: bool = False,
    directory: str | None = None,
    size: ServiceSize | None = None,
) -> dict[str, Any]:
    """Run the children for every ``max_pending`` and first save; return the report.

    Raises:
        RuntimeError: a child failed or did not finish within ``size.timeout_secs``.
    """
    size = size or (SMOKE if smoke else FULL)
    began = time.monotonic()
    report: dict[str, Any] = {
        "size": asdict(size) | {"state_bytes": size.state_bytes},
        "backend": "asyncio",
        "tick_secs": TICK_SECS,
    }
    runs = [(max_pending, first) for max_pending in MAX_PENDINGS for first in FIRST_SAVES]
    with tempfile.TemporaryDirectory(prefix="asyncckpt-service-", dir=directory) as work:

        def run(index: int) -> dict[str, Any]:
            max_pending, first = runs[index]
            if index and size.jobs == 1:
                time.sleep(size.settle_secs)
            where = os.path.join(work, f"mp{max_pending}-{first}")
            try:
                return _run_child(size, max_pending, first, where)
            finally:
                shutil.rmtree(where, ignore_errors=True)

        with concurrent.futures.ThreadPoolExecutor(size.jobs) as pool:
            results = list(pool.map(run, range(len(runs))))
    for max_pending in MAX_PENDINGS:
        children = {
            first: result
            for (mp, first), result in zip(runs, results, strict=True)
            if mp == max_pending
        }
        report[f"max_pending={max_pending}"] = _aggregate(max_pending, children)
    report["seconds"] = round(time.monotonic() - began, 2)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets, each with the measured value, the limit and met / missed."""
    out: list[dict[str, Any]] = []
    for max_pending in MAX_PENDINGS:
        case = f"service, max_pending={max_pending}"
        entry = report[f"max_pending={max_pending}"]
        ratios, figures = entry["ratios"], entry["figures"]
        for name, what in (
            ("first_stall_callable", "first save, callable step"),
            ("first_stall_reserved", "first save after reserve()"),
            ("second_stall", "save during a write"),
            ("second_stall_reserved", "save during a write, after reserve()"),
        ):
            for key, label in (
                (f"{name} / warm_stall", "stall"),
                (f"{name} loop lag / warm loop lag", "loop lag"),
            ):
                value = ratios[key]
                out.append(
                    {
                        "case": case,
                        "target": f"{what}: {label} / warm {label} <= {STALL_RATIO}",
                        "value": value,
                        "limit": STALL_RATIO,
                        "met": value <= STALL_RATIO,
                    }
                )
        rss = figures["peak_rss"]
        sets = "one snapshot" if max_pending == 0 else f"{max_pending + 1} snapshots"
        out.append(
            {
                "case": case,
                "target": f"peak RSS - RSS with state (MiB) <= {sets} + {RSS_SLACK_MIB} MiB",
                "value": rss["worst_over_state_MiB"],
                "limit": rss["limit_MiB"],
                "met": rss["worst_over_state_MiB"] <= rss["limit_MiB"],
            }
        )
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _span(figure: dict[str, float]) -> str:
    return f"{figure['median'] * 1e3:.1f} [{figure['min'] * 1e3:.1f}, {figure['max'] * 1e3:.1f}]"


def markdown(report: dict[str, Any], *, with_targets: bool = True) -> str:
    """The figures as a Markdown table (milliseconds), with the ratios to the warm save, and
    (``with_targets``) the table of targets."""
    size = report["size"]
    lines = [
        f"Service: a {size['table_rows'] * size['table_cols'] * 4 / MiB:.0f} MiB float32 table "
        f"+ {size['counters']} counters of {size['counter_bytes'] // 1024} KiB "
        f"({size['state_bytes'] / MiB:.1f} MiB), {report['backend']}; each kind of first save "
        f"in a fresh process ({size['jobs']} at a time, {size['settle_secs']:.0f} s apart), "
        f"{report['seconds']:.0f} s in all. Milliseconds. stall: "
        "`statistics().last_stall_secs`; loop lag: the largest lateness of a 1 ms sleep loop "
        "during the `save()` call; call: how long `save()` took (it may await); write lag: "
        "the loop's largest lag while that save's write ran. Warm: saves into warm buffers, "
        "each after the previous one is durable, over the three processes.",
        "",
        "| max_pending | figure | stall | loop lag | call | write lag | stall / warm | "
        "lag / warm lag |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for max_pending in MAX_PENDINGS:
        entry = report[f"max_pending={max_pending}"]
        figures, ratios = entry["figures"], entry["ratios"]
        for name, what in (
            ("first_stall_callable", "first save, callable step"),
            ("first_stall_int", "first save, int step (old path)"),
            ("first_stall_reserved", "first save after reserve()"),
            ("second_stall", "save during a write (no reserve)"),
            ("second_stall_reserved", "save during a write, after reserve()"),
        ):
            fig = figures[name]
            if "overlapped" in fig and not fig["overlapped"]:
                what += " (the write had finished: no overlap)"
            lines.append(
                f"| {max_pending} | {what} | {_ms(fig['stall_s'])} | {_ms(fig['loop_lag_s'])} | "
                f"{_ms(fig['call_s'])} | {_ms(fig['write_loop_lag_s'])} | "
                f"{ratios[f'{name} / warm_stall']:.2f} | "
                f"{ratios[f'{name} loop lag / warm loop lag']:.2f} |"
            )
        warm = figures["warm_stall"]

        lines.append(
            f"| {max_pending} | warm save (median [min, max] of {warm['saves']}) | "
            f"{_span(warm['stall_s'])} | {_span(warm['loop_lag_s'])} | | "
            f"{_span(warm['write_loop_lag_s'])} | 1 | 1 |"
        )
        reserve = figures["reserve"]
        lines.append(
            f"| {max_pending} | reserve(), off the loop ({reserve['allocated_MiB']:.0f} MiB) | "
            f"| {_ms(reserve['loop_lag_s'])} | {_ms(reserve['secs'])} | | | |"
        )
        later = [pair for pair in figures["second_stall_all"] if pair["overlapped"]]
        if later:
            lines.append(
                f"| {max_pending} | every save during a write ({len(later)}, all children) | "
                f"{_span(_summary([p['stall_s'] for p in later]))} | "
                f"{_span(_summary([p['loop_lag_s'] for p in later]))} | | | | |"
            )
        rss = figures["peak_rss"]
        over = ", ".join(f"{k} {v:.0f}" for k, v in rss["over_state_MiB"].items())
        lines.append(
            f"| {max_pending} | peak RSS - RSS with state, MiB ({over}; limit "
            f"{rss['limit_MiB']:.0f}) | | | | | | |"
        )
        sets = ", ".join(f"{k} {v:.2f}" for k, v in figures["sets_allocated"].items())
        lines.append(
            f"| {max_pending} | buffer sets allocated ({sets}; reserve makes "
            f"{max_pending + 1}) | | | | | | |"
        )
        build = ", ".join(f"{k} {v:.2f}" for k, v in figures["state_build_s_per_GiB"].items())
        lines.append(
            f"| {max_pending} | building the state, s per GiB ({build}; about 2.7 when the "
            "memory is fresh) | | | | | | |"
        )
    idle = max(report[f"max_pending={m}"]["figures"]["idle_lag_max_s"] for m in MAX_PENDINGS)
    lines += [
        "",
        f"Largest loop lag with nothing to do (before the manager opened): {_ms(idle)} ms.",
    ]
    if not with_targets:
        return "\n".join(lines) + "\n"
    lines += targets_table(targets(report))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the service benchmark and print the JSON report (or run one child)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="32 MiB + 100 counters")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = anyio.run(_child, json.loads(args.child))
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    report = run_service(smoke=args.smoke, directory=args.workdir)
    report["targets"] = targets(report)
    write_report(report, args.json_path, args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
