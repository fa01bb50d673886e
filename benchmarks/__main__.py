"""Measure asyncckpt against the physical floors and against peer libraries, in one run.

Every figure is the median of ``--repeats`` runs with min and max; every comparison is a ratio
to a floor or a peer measured in the same run (absolute times are not comparable across runs).
Results: JSON on stdout or ``--json PATH``, and Markdown tables with ``--markdown PATH``.

Floors: ``copy_1t`` / ``copy_all`` (np.copyto into preallocated buffers, one thread / all cores
through a thread pool), ``write+fsync`` (the bytes written sequentially to one file, fsynced),
``readinto_warm`` / ``readinto_cold`` (read back into preallocated arrays from the page cache /
after posix_fadvise(DONTNEED)).

Peers (each "skipped: <reason>" when not importable): pickle, np.savez, safetensors.numpy,
torch.save; tensorboardX add_scalar against asyncckpt's SummaryWriter.add_scalar.

The loop: the per-step cost of MonitoredTrainingSession with nothing in flight, over a bare
loop; and the steps a SIGKILL costs a plain-step trainer against its save interval
(``benchmarks/crash.py``'s ``run_trainer_kills``, on asyncio and trio in turn).

The service (``benchmarks/service.py``): how long the first save, a warm save and a save made
while a write runs block a serving event loop (the manager's stall and a 1 ms ticker's lag),
and the peak RSS, for max_pending 0 and 1, each first save in a fresh process.

Object stores (``benchmarks/remote.py``): save and restore on a local S3 server (moto's, on
127.0.0.1, started for the run) against obstore's raw put / get of the same bytes and DCP's
FsspecWriter / FsspecReader, with each figure's requests and the server's time per request.

Several ranks (``benchmarks/distributed.py``, only with ``--distributed``: off by default, the
run is long already): 2 gloo ranks on this machine, 256 MiB each, saving to one directory;
asyncckpt's stall and durable against DCP's ``async_save`` and against a copy and a
write+fsync of each rank's bytes, all in one run of fresh rank processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

import asyncckpt

from . import _peers, distributed, remote, service
from ._floors import copy_all_floor
from ._report import version_of, write_report
from .crash import run_trainer_kills

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MiB = 1024 * 1024
GiB = 1024 * MiB
State = dict[str, np.ndarray[Any, Any]]

# name -> groups of (count, bytes per array)
CASES: dict[str, list[tuple[int, int]]] = {
    "256MiB": [(64, 256 * MiB // 64)],
    "1GiB": [(64, GiB // 64)],
    "many-small": [(10_000, 4096), (4, 16 * MiB)],
}
SMOKE_CASES: dict[str, list[tuple[int, int]]] = {
    "smoke-1MiB": [(8, MiB // 8)],
    "smoke-small": [(100, 4096), (2, 64 * 1024)],
}


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _state(groups: list[tuple[int, int]]) -> State:
    rng = np.random.default_rng(0)
    return {
        f"g{group}_{i:05d}": rng.standard_normal(max(nbytes // 4, 1), dtype=np.float32)
        for group, (count, nbytes) in enumerate(groups)
        for i in range(count)
    }


def _drop_cache(path: str) -> None:
    """Make ``path`` cold: fsync (dirty pages are not dropped), then POSIX_FADV_DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _drop_tree(directory: str) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            _drop_cache(os.path.join(root, name))


def _floor_copy(state: State) -> Callable[[], None]:
    buffers = {k: np.empty_like(v) for k, v in state.items()}

    def run() -> None:
        for key, value in state.items():
            np.copyto(buffers[key], value)

    return run


def _floor_write(state: State, path: str) -> Callable[[], None]:
    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for value in state.values():
                os.write(fd, value.data)
            os.fsync(fd)
        finally:
            os.close(fd)

    return run


def _floor_read(state: State, path: str) -> Callable[[], None]:
    targets = [np.empty_like(v) for v in state.values()]

    def run() -> None:
        with open(path, "rb", buffering=0) as file:
            for target in targets:
                file.readinto(target.data)

    return run


def _time_sync(
    fn: Callable[[], None], repeats: int, setup: Callable[[], None] | None = None
) -> list[float]:
    fn()  # warm: page cache, buffers
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


async def _time_async(
    fn: Callable[[], Awaitable[None]], repeats: int, setup: Callable[[], None] | None = None
) -> list[float]:
    await fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return samples


async def _save_loop(
    directory: str, state: State, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(durable, stall): save -> wait, and the time save() itself blocked the loop."""
    stalls: list[float] = []
    step = 0
    async with asyncckpt.CheckpointManager(directory, max_to_keep=2) as manager:

        async def durable() -> None:
            nonlocal step
            step += 1
            start = time.perf_counter()
            await manager.save(state, step)
            stalls.append(time.perf_counter() - start)
            await manager.wait()

        samples = await _time_async(durable, repeats)
    return _summary(samples), _summary(stalls[1:])


def _rss(groups: list[tuple[int, int]], workdir: str, runs: int) -> dict[str, Any]:
    spec = ",".join(f"{c}:{n}" for c, n in groups)
    samples: list[dict[str, int]] = []
    for i in range(runs):
        directory = os.path.join(workdir, f"rss{i}")
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks._rss", spec, directory],
            check=True,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        samples.append(json.loads(out.stdout))
    # Target: peak <= S + one snapshot + 64 MiB above the interpreter's own RSS.
    over = [(s["peak"] - s["rss_before_state"] - 2 * s["state"]) / MiB for s in samples]
    return {
        "runs": runs,
        "state_MiB": samples[0]["state"] / MiB,
        "peak_MiB": _summary([s["peak"] / MiB for s in samples]),
        "rss_before_state_MiB": _summary([s["rss_before_state"] / MiB for s in samples]),
        "peak_minus_base_minus_2S_MiB": _summary(over),
    }


async def _case(
    name: str,
    groups: list[tuple[int, int]],
    repeats: int,
    workdir: str,
    pool: concurrent.futures.ThreadPoolExecutor,
    rss_runs: int,
) -> dict[str, Any]:
    state = _state(groups)
    total = sum(v.nbytes for v in state.values())
    raw_path = os.path.join(workdir, "raw.bin")
    r: dict[str, Any] = {"case": name, "bytes": total, "arrays": len(state)}
    t: dict[str, dict[str, float]] = {}
    t["copy_1t"] = _summary(_time_sync(_floor_copy(state), repeats))
    t["copy_all"] = _summary(_time_sync(copy_all_floor(state.values(), pool), repeats))
    t["write+fsync"] = _summary(_time_sync(_floor_write(state, raw_path), repeats))
    read = _floor_read(state, raw_path)
    t["readinto_warm"] = _summary(_time_sync(read, repeats))
    t["readinto_cold"] = _summary(_time_sync(read, repeats, lambda: _drop_cache(raw_path)))
    os.remove(raw_path)

    directory = os.path.join(workdir, name)
    t["durable"], t["stall"] = await _save_loop(directory, state, repeats)
    async with asyncckpt.CheckpointManager(directory, max_to_keep=2) as manager:
        into = {k: np.empty_like(v) for k, v in state.items()}

        async def restore_into() -> None:
            await manager.restore(into=into)

        async def restore_mmap() -> None:
            await manager.restore(mmap=True, verify=False)

        t["restore_into_warm"] = _summary(await _time_async(restore_into, repeats))
        t["restore_into_cold"] = _summary(
            await _time_async(restore_into, repeats, lambda: _drop_tree(directory))
        )
        t["restore_mmap"] = _summary(await _time_async(restore_mmap, repeats))

    readonly = {k: v.copy() for k, v in state.items()}
    for value in readonly.values():
        value.flags.writeable = False
    ro_durable, t["stall_readonly"] = await _save_loop(directory + "-ro", readonly, repeats)
    del readonly, ro_durable

    peers: dict[str, Any] = {}
    for peer, (module, make) in _peers.PEERS.items():
        reason = _peers.available(module)
        if reason:
            peers[peer] = f"skipped: {reason}"
            continue
        path = os.path.join(workdir, f"peer-{peer}")
        try:
            save, load = make(state, path)
            peers[peer] = {
                "save_fsync_s": _summary(_time_sync(save, repeats)),
                "load_s": _summary(_time_sync(load, repeats)),
            }
        except Exception as exc:
            peers[peer] = f"skipped: failed ({type(exc).__name__}: {exc})"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    async_peers: dict[str, Any] = {
        peer: figures
        if isinstance(figures, str)
        else {key: _summary(samples) for key, samples in figures.items()}
        for peer, figures in _peers.async_peer_figures(state, workdir, repeats).items()
    }
    r["seconds"] = t
    r["peers"] = peers
    r["async_peers"] = async_peers
    r["rss"] = _rss(groups, workdir, rss_runs)

    def ratio(a: str, b: str) -> float:
        return float(t[a]["median"] / t[b]["median"])

    ratios = {
        "stall / copy_all": ratio("stall", "copy_all"),
        "stall / copy_1t": ratio("stall", "copy_1t"),
        "stall_readonly ms per GiB": t["stall_readonly"]["median"] * 1e3 * GiB / total,
        "durable / write+fsync": ratio("durable", "write+fsync"),
        "restore_into_warm / readinto_warm": ratio("restore_into_warm", "readinto_warm"),
        "restore_into_cold / readinto_cold": ratio("restore_into_cold", "readinto_cold"),
    }
    for peer, figures in peers.items():
        if isinstance(figures, dict):
            ratios[f"durable / {peer} save"] = (
                t["durable"]["median"] / figures["save_fsync_s"]["median"]
            )
            ratios[f"restore_into_warm / {peer} load"] = (
                t["restore_into_warm"]["median"] / figures["load_s"]["median"]
            )
    for peer, figures in async_peers.items():
        if isinstance(figures, str):
            continue
        # jax arrays are immutable (orbax copies nothing before save returns): the like-for-like
        # stall is asyncckpt's on a read-only state.
        stall = "stall_readonly" if "jax" in peer else "stall"
        for ours, theirs in (
            (stall, "stall"),
            ("durable", "durable"),
            ("restore_into_warm", "restore"),
        ):
            ratios[f"{ours} / {peer} {theirs}"] = (
                t[ours]["median"] / figures[f"{theirs}_s"]["median"]
            )
    r["ratios"] = ratios
    return r


class _AfterRunHook(asyncckpt.SessionRunHook):
    def __init__(self) -> None:
        self.calls = 0

    def after_run(self, run_context: Any, run_values: Any) -> None:
        self.calls += 1


async def _step_overhead(steps: int, repeats: int, workdir: str) -> dict[str, Any]:
    """Per-step cost of MonitoredTrainingSession (default hooks + one after_run hook)."""
    state = {"w": np.zeros(4, dtype=np.float32)}

    async def step_fn(state: State) -> None:
        return None

    bare: list[float] = []
    session: list[float] = []
    for i in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        for _ in range(steps):
            await step_fn(state)
        bare_s = time.perf_counter() - start
        async with asyncckpt.MonitoredTrainingSession(
            state,
            step_fn,
            checkpoint_dir=os.path.join(workdir, f"mts{i}"),
            save_checkpoint_steps=10**9,
            save_checkpoint_secs=None,
            save_summaries_steps=10**9,
            save_summaries_secs=None,
            hooks=[_AfterRunHook()],
        ) as sess:
            await sess.run()  # the first step writes the starting checkpoint and summaries
            start = time.perf_counter()
            for _ in range(steps):
                await sess.run()
            session_s = time.perf_counter() - start
        if i:
            bare.append(bare_s / steps * 1e6)
            session.append(session_s / steps * 1e6)
    return {
        "steps": steps,
        "bare_us": _summary(bare),
        "session_us": _summary(session),
        "overhead_us": _summary([s - b for s, b in zip(session, bare, strict=True)]),
    }


async def _trainer_kills(kills: int, workdir: str) -> dict[str, Any]:
    """Steps a SIGKILL costs a plain-step trainer (``benchmarks/crash.py``), both loops."""
    backends = ("asyncio", "trio") if importlib.util.find_spec("trio") else ("asyncio",)
    result = await anyio.to_thread.run_sync(
        partial(run_trainer_kills, kills, backends=backends, directory=workdir)
    )
    return {"max_lost": result.max_lost, "median_lost": result.median_lost, **asdict(result)}


async def _scalars(count: int, repeats: int, workdir: str) -> dict[str, Any]:
    """add_scalar caller cost (us) and scalars/s written until flush: asyncckpt vs tensorboardX.

    After each asyncckpt run, TensorBoard's own reader (``EventFileLoader``, where tensorboard
    is installed) must read back every scalar, at its step, with its value: else this raises.
    """
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        EventFileLoader = None

    def read_back(path: str) -> None:
        assert EventFileLoader is not None
        points = [
            (event.step, value.tensor.float_val[0])
            for event in EventFileLoader(path).Load()
            for value in event.summary.value
            if value.tag == "loss"
        ]
        if points != [(j, float(np.float32(j))) for j in range(count)]:
            raise RuntimeError(
                f"TensorBoard's EventFileLoader read {len(points)} points from {path}, not the "
                f"{count} scalars written at steps 0 to {count - 1}"
            )

    calls: list[float] = []
    rates: list[float] = []
    for i in range(repeats + 1):
        async with asyncckpt.SummaryWriter(os.path.join(workdir, f"sw{i}")) as writer:
            start = time.perf_counter()
            for j in range(count):
                await writer.add_scalar("loss", float(j), j)
            called = time.perf_counter() - start
            await writer.flush()
            written = time.perf_counter() - start
        if EventFileLoader is not None:
            await anyio.to_thread.run_sync(read_back, writer.path)
        if i:
            calls.append(called / count * 1e6)
            rates.append(count / written)
    out: dict[str, Any] = {
        "count": count,
        "asyncckpt": {
            "caller_us": _summary(calls),
            "scalars_per_s": _summary(rates),
            "read_back": True if EventFileLoader is not None else "skipped: no tensorboard",
        },
    }
    tbx_calls: list[float] = []
    tbx_rates: list[float] = []
    for i in range(repeats + 1):
        result = _peers.tensorboardx_scalars(os.path.join(workdir, f"tbx{i}"), count)
        if isinstance(result, str):
            out["tensorboardX"] = result
            return out
        if i:
            tbx_calls.append(result[0] * 1e6)
            tbx_rates.append(result[1])
    out["tensorboardX"] = {"caller_us": _summary(tbx_calls), "scalars_per_s": _summary(tbx_rates)}
    out["ratios"] = {
        "caller asyncckpt / tensorboardX": statistics.median(calls) / statistics.median(tbx_calls),
        "written/s asyncckpt / tensorboardX": statistics.median(rates)
        / statistics.median(tbx_rates),
    }
    return out


async def _remote(smoke: bool, repeats: int) -> dict[str, Any] | str:
    """Save and restore on a local S3 server against obstore's raw requests (remote.py)."""
    reason = remote.unavailable()
    if reason:
        return f"skipped: {reason}"
    return await remote.run_remote(
        smoke=smoke, repeats=remote.SMOKE_REPEATS if smoke else min(repeats, remote.REPEATS)
    )


async def _distributed(smoke: bool, repeats: int, workdir: str) -> dict[str, Any] | str:
    """Two gloo ranks against DCP's async_save (distributed.py)."""
    reason = distributed.unavailable()
    if reason:
        return f"skipped: {reason}"
    return await anyio.to_thread.run_sync(
        partial(
            distributed.run_distributed,
            mib=4 if smoke else distributed.MIB,
            repeats=1 if smoke else min(repeats, distributed.REPEATS),
            directory=workdir,
        )
    )


async def _service(smoke: bool, workdir: str) -> dict[str, Any]:
    """Save stalls (first, warm, during a write) and peak RSS of a service (service.py)."""
    return await anyio.to_thread.run_sync(
        partial(service.run_service, smoke=smoke, directory=workdir)
    )


def _machine() -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as file:
            model = next(
                (line.split(":", 1)[1].strip() for line in file if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{platform.machine()} {model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"{platform.platform()}"
    )


def _fmt(figure: dict[str, float], scale: float = 1.0, digits: int = 4) -> str:
    return (
        f"{figure['median'] * scale:.{digits}f} "
        f"[{figure['min'] * scale:.{digits}f}, {figure['max'] * scale:.{digits}f}]"
    )


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, the limit and met / missed."""
    out: list[dict[str, Any]] = []

    def add(case: str, target: str, value: float, limit: float, strict: bool = False) -> None:
        met = value < limit if strict else value <= limit
        out.append({"case": case, "target": target, "value": value, "limit": limit, "met": met})

    for case in report["cases"]:
        name, ratios, t = case["case"], case["ratios"], case["seconds"]
        many = case["arrays"] > 1000
        add(name, "stall / copy_all <= 1.1", ratios["stall / copy_all"], 1.1)
        add(name, "read-only stall <= 5 ms/GiB", ratios["stall_readonly ms per GiB"], 5.0)
        if many:
            add(name, "durable / write+fsync <= 1.5", ratios["durable / write+fsync"], 1.5)
        else:
            add(name, "durable / write+fsync <= 1.15", ratios["durable / write+fsync"], 1.15)
        for temp in ("warm", "cold"):
            key = f"restore_into_{temp} / readinto_{temp}"
            add(name, f"{key} <= 1.15", ratios[key], 1.15)
        if case["bytes"] == GiB:
            add(name, "mmap restore of 1 GiB <= 20 ms", t["restore_mmap"]["median"] * 1e3, 20.0)
        rss = case["rss"]["peak_minus_base_minus_2S_MiB"]["median"]
        add(name, "peak RSS - base - 2S <= 64 MiB", rss, 64.0)
        # Below each async peer measured in the same run (skipped peers set no target).
        for peer, figures in case["async_peers"].items():
            if isinstance(figures, str):
                continue
            for key in (f"stall / {peer} stall", f"stall_readonly / {peer} stall"):
                if key in ratios:
                    add(name, f"{key} < 1 (stall below {peer})", ratios[key], 1.0, strict=True)
            key = f"durable / {peer} durable"
            add(name, f"{key} < 1 (durable below {peer})", ratios[key], 1.0, strict=True)
    step = report["step_overhead"]["overhead_us"]["median"]
    add("-", "per-step overhead, nothing in flight <= 2 us", step, 2.0)
    kills = report["kills"]
    add(
        "-",
        f"steps lost per kill <= save interval + 2 ({kills['save_steps']} + 2)",
        kills["max_lost"],
        kills["save_steps"] + 2,
    )
    sc = report["scalars"]["asyncckpt"]
    add("-", "add_scalar caller cost <= 3 us", sc["caller_us"]["median"], 3.0)
    rate = sc["scalars_per_s"]["median"]
    out.append(
        {
            "case": "-",
            "target": "scalars written >= 150,000 /s",
            "value": rate,
            "limit": 150_000.0,
            "met": rate >= 150_000,
        }
    )
    if "service" in report:
        out.extend(service.targets(report["service"]))
    if isinstance(report.get("remote"), dict):
        out.extend(remote.targets(report["remote"]))
    if isinstance(report.get("distributed"), dict):
        out.extend(distributed.targets(report["distributed"]))
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        f"{report['repeats']} repeats per figure (median [min, max]); seconds unless stated.",
        "",
        "| case | figure | seconds | ratios |",
        "| --- | --- | --- | --- |",
    ]
    for case in report["cases"]:
        for key, figure in case["seconds"].items():
            ratio = "; ".join(
                f"{k.split(' / ', 1)[1]}: {v:.2f}"
                for k, v in case["ratios"].items()
                if k.split(" / ")[0] == key and " / " in k
            )
            if key == "stall_readonly":
                per_gib = f"{case['ratios']['stall_readonly ms per GiB']:.2f} ms per GiB"
                ratio = f"{per_gib}; {ratio}" if ratio else per_gib
            lines.append(f"| {case['case']} | {key} | {_fmt(figure)} | {ratio} |")
        for peer, figures in case["peers"].items():
            if isinstance(figures, str):
                lines.append(f"| {case['case']} | {peer} | {figures} | |")
                continue
            for what, key in (("save+fsync", "save_fsync_s"), ("load", "load_s")):
                lines.append(f"| {case['case']} | {peer} {what} | {_fmt(figures[key])} | |")
        for peer, figures in case["async_peers"].items():
            if isinstance(figures, str):
                lines.append(f"| {case['case']} | {peer} | {figures} | |")
                continue
            lines.extend(
                f"| {case['case']} | {peer} {what} | {_fmt(figures[f'{what}_s'])} | |"
                for what in ("stall", "durable", "restore")
            )
        rss = case["rss"]
        lines.append(
            f"| {case['case']} | peak RSS (MiB, {rss['runs']} runs; state "
            f"{rss['state_MiB']:.0f} MiB) | {_fmt(rss['peak_MiB'], digits=0)} | "
            f"peak - base - 2S: {_fmt(rss['peak_minus_base_minus_2S_MiB'], digits=0)} MiB |"
        )
    so = report["step_overhead"]
    lines += [
        "",
        f"Per-step cost over {so['steps']} steps (microseconds): bare loop "
        f"{_fmt(so['bare_us'], digits=2)}, MonitoredTrainingSession "
        f"{_fmt(so['session_us'], digits=2)}, overhead {_fmt(so['overhead_us'], digits=2)}.",
        "",
    ]
    kills = report["kills"]
    lines += [
        f"SIGKILL of a plain-step trainer ({kills['kills']} kills, a save every "
        f"{kills['save_steps']} steps of {kills['step_secs'] * 1e3:.0f} ms, 1 MiB state): steps "
        f"lost per kill median {kills['median_lost']:.1f}, max {kills['max_lost']} "
        f"(every kill: {kills['steps_lost']}); "
        + ("every directory checked sound." if not kills["problems"] else "PROBLEMS: ")
        + "; ".join(kills["problems"]),
        "",
    ]
    sc = report["scalars"]
    lines.append(
        f"add_scalar, {sc['count']} scalars: asyncckpt caller "
        f"{_fmt(sc['asyncckpt']['caller_us'], digits=2)} us, written "
        f"{_fmt(sc['asyncckpt']['scalars_per_s'], digits=0)} /s; tensorboardX: "
        + (
            sc["tensorboardX"]
            if isinstance(sc["tensorboardX"], str)
            else f"caller {_fmt(sc['tensorboardX']['caller_us'], digits=2)} us, written "
            f"{_fmt(sc['tensorboardX']['scalars_per_s'], digits=0)} /s"
        )
        + "."
    )
    if "service" in report:
        lines += ["", service.markdown(report["service"], with_targets=False).rstrip("\n")]
    if isinstance(report.get("remote"), dict):
        lines += ["", remote.markdown(report["remote"], with_targets=False).rstrip("\n")]
    elif "remote" in report:
        lines += ["", f"Object stores: {report['remote']}."]
    if isinstance(report.get("distributed"), dict):
        md = distributed.markdown(report["distributed"], with_targets=False)
        lines += ["", md.rstrip("\n")]
    elif "distributed" in report:
        lines += ["", f"Several ranks: {report['distributed']}."]
    lines += ["", "| case | target | measured | met |", "| --- | --- | --- | --- |"]
    for row in report["targets"]:
        lines.append(
            f"| {row['case']} | {row['target']} | {row['value']:.3f} | "
            f"{'met' if row['met'] else 'MISSED'} |"
        )
    return "\n".join(lines) + "\n"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    table = SMOKE_CASES if args.smoke else CASES
    names = args.cases.split(",") if args.cases else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(table)}")
    steps = args.steps or (500 if args.smoke else 20_000)
    scalars = args.scalars or (1000 if args.smoke else 100_000)
    rss_runs = min(args.repeats, 3)
    versions = {
        "python": platform.python_version(),
        **{
            d: version_of(d)
            for d in (
                "asyncckpt",
                "numpy",
                "anyio",
                "crc32c",
                "safetensors",
                "torch",
                "tensorboardX",
                "orbax-checkpoint",
                "jax",
                "jaxlib",
            )
        },
    }
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as workdir,
        concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool,
    ):
        cases = [
            await _case(name, table[name], args.repeats, workdir, pool, rss_runs) for name in names
        ]
        report: dict[str, Any] = {
            "machine": _machine(),
            "versions": versions,
            "repeats": args.repeats,
            "cases": cases,
            "step_overhead": await _step_overhead(steps, args.repeats, workdir),
            "scalars": await _scalars(scalars, args.repeats, workdir),
            "kills": await _trainer_kills(2 if args.smoke else 20, workdir),
        }
        if args.service:
            report["service"] = await _service(args.smoke, workdir)
        if args.remote:
            report["remote"] = await _remote(args.smoke, args.repeats)
        if args.distributed:
            report["distributed"] = await _distributed(args.smoke, args.repeats, workdir)
    report["targets"] = targets(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated: {', '.join(CASES)} (smoke: {', '.join(SMOKE_CASES)})",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per overhead run")
    parser.add_argument("--scalars", type=int, default=None, help="scalars per add_scalar run")
    parser.add_argument(
        "--service",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the service benchmark (benchmarks/service.py; about 3 min at full size)",
    )
    parser.add_argument(
        "--remote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the object-store benchmark (benchmarks/remote.py, a local S3 server; about "
        "3.5 min at full size)",
    )
    parser.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run 2 gloo ranks x 256 MiB against DCP's async_save "
        "(benchmarks/distributed.py; off by default; about 30 s at full size)",
    )
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    report = anyio.run(_main, args)
    write_report(report, args.json_path, args.markdown, _markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
