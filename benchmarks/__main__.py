"""Measure save stall, durable time and restore against the physical floors, in one run.

Every figure is the median of ``--repeats`` runs with min and max; every comparison is a ratio
to a floor measured in the same run (absolute times are not comparable across runs here).
Results: JSON on stdout or ``--json PATH``, and a Markdown table with ``--markdown PATH``.

Floors: ``copy`` (np.copyto into preallocated buffers, one thread), ``write+fsync`` (the same
bytes written sequentially to one file and fsynced), ``readinto`` (reading them back into
preallocated arrays from the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

import asyncckpt

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MiB = 1024 * 1024


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _state(total_bytes: int, arrays: int) -> dict[str, np.ndarray[Any, Any]]:
    per_array = max(total_bytes // arrays // 4, 1)
    rng = np.random.default_rng(0)
    return {f"a{i:05d}": rng.standard_normal(per_array, dtype=np.float32) for i in range(arrays)}


def _floor_copy(state: dict[str, np.ndarray[Any, Any]]) -> Callable[[], None]:
    buffers = {k: np.empty_like(v) for k, v in state.items()}

    def run() -> None:
        for key, value in state.items():
            np.copyto(buffers[key], value)

    return run


def _floor_write(state: dict[str, np.ndarray[Any, Any]], path: str) -> Callable[[], None]:
    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for value in state.values():
                os.write(fd, value.data)
            os.fsync(fd)
        finally:
            os.close(fd)

    return run


def _floor_read(state: dict[str, np.ndarray[Any, Any]], path: str) -> Callable[[], None]:
    targets = [np.empty_like(v) for v in state.values()]

    def run() -> None:
        with open(path, "rb", buffering=0) as file:
            for target in targets:
                file.readinto(target.data)  # type: ignore[attr-defined]

    return run


def _time_sync(fn: Callable[[], None], repeats: int) -> list[float]:
    fn()  # warm: page cache, buffers
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


async def _time_async(fn: Callable[[], Awaitable[None]], repeats: int) -> list[float]:
    await fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return samples


async def _case(
    name: str, total_bytes: int, arrays: int, repeats: int, workdir: str
) -> dict[str, Any]:
    state = _state(total_bytes, arrays)
    raw_path = os.path.join(workdir, "raw.bin")
    results: dict[str, Any] = {"case": name, "bytes": total_bytes, "arrays": arrays}
    results["floor_copy_s"] = _summary(_time_sync(_floor_copy(state), repeats))
    results["floor_write_fsync_s"] = _summary(_time_sync(_floor_write(state, raw_path), repeats))
    results["floor_readinto_s"] = _summary(_time_sync(_floor_read(state, raw_path), repeats))

    directory = os.path.join(workdir, name)
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

        results["durable_s"] = _summary(await _time_async(durable, repeats))
        results["stall_s"] = _summary(stalls[1:])
        into = {k: np.empty_like(v) for k, v in state.items()}

        async def restore_into() -> None:
            await manager.restore(into=into)

        async def restore_mmap() -> None:
            await manager.restore(mmap=True, verify=False)

        results["restore_into_s"] = _summary(await _time_async(restore_into, repeats))
        results["restore_mmap_s"] = _summary(await _time_async(restore_mmap, repeats))

    def ratio(a: str, b: str) -> float:
        return float(results[a]["median"] / results[b]["median"])

    results["ratios"] = {
        "stall / copy": ratio("stall_s", "floor_copy_s"),
        "durable / write+fsync": ratio("durable_s", "floor_write_fsync_s"),
        "restore_into / readinto": ratio("restore_into_s", "floor_readinto_s"),
    }
    return results


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']}; Python {report['python']}; numpy {report['numpy']}; "
        f"asyncckpt {report['asyncckpt']}; {report['repeats']} repeats (median, [min, max]).",
        "",
        "| case | figure | seconds | ratio to floor |",
        "| --- | --- | --- | --- |",
    ]
    for case in report["cases"]:
        for key in (
            "floor_copy_s",
            "floor_write_fsync_s",
            "floor_readinto_s",
            "stall_s",
            "durable_s",
            "restore_into_s",
            "restore_mmap_s",
        ):
            figure = case[key]
            ratio = next(
                (
                    f"{v:.2f} ({k})"
                    for k, v in case["ratios"].items()
                    if k.split(" / ")[0] == key.removesuffix("_s")
                ),
                "",
            )
            lines.append(
                f"| {case['case']} | {key.removesuffix('_s')} | {figure['median']:.4f} "
                f"[{figure['min']:.4f}, {figure['max']:.4f}] | {ratio} |"
            )
    return "\n".join(lines) + "\n"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    cases = (
        [("smoke-1MiB", MiB, 8)]
        if args.smoke
        else [("256MiB-64", 256 * MiB, 64), ("many-small-10k", 10_000 * 4096, 10_000)]
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        report: dict[str, Any] = {
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "asyncckpt": asyncckpt.__version__,
            "repeats": args.repeats,
            "cases": [
                await _case(name, size, count, args.repeats, workdir) for name, size, count in cases
            ],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    report = anyio.run(_main, args)
    text = json.dumps(report, indent=2)
    if args.json_path:
        with open(args.json_path, "w") as file:
            file.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
