"""Two ranks on one machine: asyncckpt's sharded save against DCP's ``async_save``, in one run.

The benchmark starts ``WORLD_SIZE`` (2) rank processes itself, joined in a gloo default
group on 127.0.0.1 at a free port. Each rank holds its own state, ``--mib`` MiB (256 by
default) in 16 float32 CPU tensors, and every save goes to one directory both ranks share,
as on a shared disk. The keys name the rank (``rank1.t03``): DCP takes a plain tensor
under the same key on every rank for a replicated one and writes it once, which would
halve its work; asyncckpt is given no ``replicated=`` paths for the same reason.

Figures, per rank (both ranks run each one at the same time, after a barrier on the
default group; nothing timed includes a barrier):

- ``copy`` (the floor of a stall): the tensors' bytes copied into preallocated buffers
  with ``np.copyto``, split by bytes over one thread per core (as asyncckpt's snapshot
  copies them);
- ``write+fsync`` (the floor of durable): the same bytes written to one file of this rank's
  in the shared directory, then fsynced; the same file every round, so its page cache and
  its blocks stay (the single-process benchmark's floor);
- ``write+fsync_new``: the same into a new file every round, the last two kept (the older
  deleted outside the timed region), as both libraries write a checkpoint: on these virtual
  machines a new file's page cache is memory that may have gone back to the host, dearer
  to touch (docs/DESIGN_NOTES.md, on recycling);
- asyncckpt: one ``CheckpointManager(directory, coordinator=TorchDistributedCoordinator(
  timeout=120), max_to_keep=2)`` per rank, opened once, its buffers made with ``await
  manager.reserve(state)``: ``asyncckpt_stall``, how long ``await manager.save(state,
  step)`` blocks, ``asyncckpt_durable``, from that call until ``await manager.wait()``
  returns (every rank's shard durable and rank 0's commit made: the manifest, the state
  file and the retirement of the checkpoint ``max_to_keep`` drops);
- DCP: ``torch.distributed.checkpoint.async_save(state, checkpoint_id=<dir>/dcp-<round>)``
  on the default group with its defaults (a new ``DefaultStager`` per call, staging into
  fresh CPU memory, and a ``FileSystemWriter``, which fsyncs its files):
  ``dcp_stall``, until it returns, ``dcp_durable``, until its future's ``result()``
  returns (rank 0 has then written ``.metadata``);
- ``dcp_reused``: the same with one ``DefaultStager`` kept for every save
  (``async_stager=``), which caches its staging storages: DCP's way to reuse buffers,
  as asyncckpt does; for contrast, not a target.

The first round warms every contender up (asyncckpt's first save after ``reserve``,
DCP's first staging, the page cache) and is not counted; after it every rank restores its
state from both libraries' checkpoints and compares it, and rank 0 counts the bytes each
wrote per save. Then each figure is the median of ``--repeats`` rounds with min and max;
the contenders take turns, in an order that rotates from round to round. ``max`` is, per
round, the slower rank's figure (a job waits for its slowest rank), the one the ratios use;
rank 0's own figures are reported beside it. DCP's checkpoints older than the last two are
deleted by rank 0 outside the timed regions (asyncckpt's retirement is inside its durable
time). ``OMP_NUM_THREADS`` is left as found (``torchrun`` would set 1): torch's copies use
its default threads, and each report says how many.

Ratios: ``asyncckpt_stall / dcp_stall``, ``asyncckpt_durable / dcp_durable``,
``asyncckpt_stall / copy``, ``asyncckpt_durable / write+fsync`` (and durable against
``write+fsync_new``, the same against ``dcp_reused``, DCP's against the floors, and rank 0's
durable against DCP's). Targets: below DCP, and the single-process targets of ``python -m
benchmarks`` per rank (stall at most 1.1 x the copy, durable at most 1.15 x write+fsync).
Both ranks share this machine's cores and disk: every figure, floors included, is measured
under that contention.

Every process and every wait has a deadline: the ranks' run (``--timeout``, killed when
over), the default group (its barriers and DCP's collectives, 60 s), the coordinator (120
s), each durable wait (120 s).

Usage::

    python -m benchmarks.distributed                    # 2 ranks x 256 MiB, 3 rounds
    python -m benchmarks.distributed --mib 4 --repeats 1   # tiny, for the report's shape
    python -m benchmarks.distributed --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._floors import copy_all_floor
from ._report import targets_table, version_of, write_report

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import torch

    from asyncckpt import CheckpointManager

__all__ = [
    "MIB",
    "REPEATS",
    "TIMEOUT_SECS",
    "WORLD_SIZE",
    "main",
    "markdown",
    "run_distributed",
    "targets",
    "unavailable",
]

MiB: Final = 1024 * 1024
WORLD_SIZE: Final = 2
MIB: Final = 256
"""Each rank's state, MiB."""
TENSORS: Final = 16
REPEATS: Final = 3
TIMEOUT_SECS: Final = 300.0
"""Longest the ranks may run before they are killed and the benchmark fails."""
GROUP_TIMEOUT_SECS: Final = 60.0
"""The default group's: its init, every barrier and DCP's collectives."""
COORDINATOR_TIMEOUT_SECS: Final = 120.0
WAIT_SECS: Final = 120.0
"""Longest one save may take to become durable, for either library."""
STALL_TARGET: Final = 1.1
DURABLE_TARGET: Final = 1.15
ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES: Final = (
    "copy",
    "write+fsync",
    "write+fsync_new",
    "asyncckpt_stall",
    "asyncckpt_durable",
    "dcp_stall",
    "dcp_durable",
    "dcp_reused_stall",
    "dcp_reused_durable",
)
OPS: Final = ("copy", "write+fsync", "write+fsync_new", "asyncckpt", "dcp", "dcp_reused")
"""What each round runs, in this order rotated by the round's number."""
RATIOS: Final = (
    ("asyncckpt_stall", "dcp_stall"),
    ("asyncckpt_durable", "dcp_durable"),
    ("asyncckpt_stall", "copy"),
    ("asyncckpt_durable", "write+fsync"),
    ("asyncckpt_durable", "write+fsync_new"),
    ("asyncckpt_stall", "dcp_reused_stall"),
    ("asyncckpt_durable", "dcp_reused_durable"),
    ("dcp_stall", "copy"),
    ("dcp_durable", "write+fsync"),
    ("dcp_durable", "write+fsync_new"),
    ("dcp_reused_stall", "copy"),
    ("dcp_reused_durable", "write+fsync"),
)

Samples = dict[str, list[float]]


# -- one rank -----------------------------------------------------------------------------------


def _state(rank: int, mib: int) -> dict[str, torch.Tensor]:
    import torch

    numel = max(mib * MiB // TENSORS // 4, 1)
    # torch.full writes every page: the state is resident before anything is timed.
    return {
        f"rank{rank}.t{i:02d}": torch.full((numel,), float(rank * TENSORS + i + 1))
        for i in range(TENSORS)
    }


def _write_fsync(state: dict[str, torch.Tensor], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for tensor in state.values():
            os.write(fd, tensor.numpy().data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(names: list[str], round_no: int) -> list[str]:
    shift = round_no % len(names)
    return names[shift:] + names[:shift]


def _bytes_of(directory: str, name: str) -> int:
    """The bytes of ``name`` in ``directory`` (every file under it, for a directory) and of
    the files named ``name.*`` beside it (a sharded checkpoint's shards)."""
    total = 0
    for entry in os.scandir(directory):
        if entry.name == name and entry.is_dir():
            for root, _dirs, files in os.walk(entry.path):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        elif entry.name == name or entry.name.startswith(name + "."):
            total += entry.stat().st_size
    return total


async def _rank(config: dict[str, Any]) -> dict[str, Any]:
    """One rank's run: every figure of every round, the checks, and what it allocated."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

    import asyncckpt

    rank: int = config["rank"]
    directory: str = config["directory"]
    repeats: int = config["repeats"]
    state = _state(rank, config["mib"])
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    samples: Samples = {figure: [] for figure in (*FIGURES, "asyncckpt_stat_stall")}
    result: dict[str, Any] = {
        "rank": rank,
        "state_bytes": state_bytes,
        "torch_threads": torch.get_num_threads(),
        "cores": workers,
        "samples": samples,
    }

    async def barrier() -> None:
        # In a worker thread: the loop stays free for the manager's task while this rank
        # waits for the other.
        await anyio.to_thread.run_sync(dist.barrier)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        copy = copy_all_floor([t.numpy() for t in state.values()], pool, workers)
        # One stager for every save: it keeps the staging storages of the state's tensors.
        reused = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
        )
        coordinator = asyncckpt.TorchDistributedCoordinator(timeout=COORDINATOR_TIMEOUT_SECS)
        async with asyncckpt.CheckpointManager(
            directory, coordinator=coordinator, max_to_keep=2
        ) as manager:
            began = time.perf_counter()
            await manager.reserve(state)
            result["reserve_s"] = time.perf_counter() - began

            async def floor(fn: Callable[[], None], figure: str, _round: int) -> dict[str, float]:
                began = time.perf_counter()
                fn()
                return {figure: time.perf_counter() - began}

            async def write_new(round_no: int) -> dict[str, float]:
                def path(round_no: int) -> str:
                    return os.path.join(directory, f"floor-new.rank{rank}.{round_no}.bin")

                began = time.perf_counter()
                _write_fsync(state, path(round_no))
                seconds = time.perf_counter() - began
                with contextlib.suppress(FileNotFoundError):  # keep the last two; not timed
                    os.remove(path(round_no - 2))
                return {"write+fsync_new": seconds}

            async def asyncckpt_save(round_no: int) -> dict[str, float]:
                began = time.perf_counter()
                await manager.save(state, round_no)
                returned = time.perf_counter()
                with anyio.fail_after(WAIT_SECS):
                    await manager.wait()
                durable = time.perf_counter()
                stall = manager.statistics().last_stall_secs
                return {
                    "asyncckpt_stall": returned - began,
                    "asyncckpt_durable": durable - began,
                    "asyncckpt_stat_stall": float("nan") if stall is None else stall,
                }

            async def dcp_save(
                name: str, stager: DefaultStager | None, round_no: int
            ) -> dict[str, float]:
                path = os.path.join(directory, f"{name}-{round_no}")
                began = time.perf_counter()
                response = async_save(state, checkpoint_id=path, async_stager=stager)
                returned = time.perf_counter()
                # A Future, or (with an asynchronous stager) a response holding the upload's.
                future = (
                    response.upload_completion
                    if isinstance(response, AsyncSaveResponse)
                    else response
                )
                await anyio.to_thread.run_sync(partial(future.result, timeout=WAIT_SECS))
                durable = time.perf_counter()
                if rank == 0:  # keep the last two, as max_to_keep=2 does; not timed
                    shutil.rmtree(
                        os.path.join(directory, f"{name}-{round_no - 2}"), ignore_errors=True
                    )
                return {f"{name}_stall": returned - began, f"{name}_durable": durable - began}

            ops: dict[str, Callable[[int], Awaitable[dict[str, float]]]] = {
                "copy": partial(floor, copy, "copy"),
                "write+fsync": partial(
                    floor,
                    partial(_write_fsync, state, os.path.join(directory, f"floor.rank{rank}.bin")),
                    "write+fsync",
                ),
                "write+fsync_new": write_new,
                "asyncckpt": asyncckpt_save,
                "dcp": partial(dcp_save, "dcp", None),
                "dcp_reused": partial(dcp_save, "dcp_reused", reused),
            }
            assert tuple(ops) == OPS
            for round_no in range(repeats + 1):
                for name in _rotate(list(OPS), round_no):
                    await barrier()
                    figures = await ops[name](round_no)
                    if round_no:
                        for figure, seconds in figures.items():
                            samples[figure].append(seconds)
                if round_no == 0:
                    await barrier()
                    result["checks"] = await _check(state, manager, directory, rank)
            stats = manager.statistics()
            result["buffers_allocated"] = stats.buffers_allocated
            result["bytes_allocated"] = stats.bytes_allocated
            result["written"] = stats.written
        reused.close()
    await barrier()
    return result


async def _check(
    state: dict[str, torch.Tensor], manager: CheckpointManager, directory: str, rank: int
) -> dict[str, Any]:
    """After the warm-up round: each library's checkpoint of round 0 restores this rank's
    state, and (rank 0) how many bytes each wrote for it, both ranks together."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import load

    into = {key: torch.zeros_like(value) for key, value in state.items()}
    await manager.restore(into=into)
    checks: dict[str, Any] = {
        "asyncckpt_restored": all(torch.equal(into[k], state[k]) for k in state),
    }
    for name in ("dcp", "dcp_reused"):
        for value in into.values():
            value.zero_()
        load(into, checkpoint_id=os.path.join(directory, f"{name}-0"))
        checks[f"{name}_restored"] = all(torch.equal(into[k], state[k]) for k in state)
    if rank == 0:
        checks["bytes_per_save"] = {
            "asyncckpt": _bytes_of(directory, f"{manager.basename}-0"),
            "dcp": _bytes_of(directory, "dcp-0"),
            "dcp_reused": _bytes_of(directory, "dcp_reused-0"),
        }
    return checks


def _rank_main(config: dict[str, Any]) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{config['port']}",
        rank=config["rank"],
        world_size=config["world_size"],
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_SECS),
    )
    try:
        result = anyio.run(_rank, config)
    finally:
        dist.destroy_process_group()
    with open(config["out"], "w") as file:
        json.dump(result, file)


# -- the parent ---------------------------------------------------------------------------------


def unavailable() -> str | None:
    """None when the benchmark can run (torch with gloo and DCP's async_save), else why not."""
    try:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict_saver import async_save  # noqa: F401
    except Exception as exc:
        return f"torch.distributed.checkpoint not importable ({type(exc).__name__}: {exc})"
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed has no gloo backend"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as file:
            return file.read()[-chars:]
    except OSError:
        return ""


def _run_ranks(
    mib: int, repeats: int, directory: str, logs: str, timeout: float
) -> list[dict[str, Any]]:
    """Start every rank, wait for all (killing all at the first failure or at the deadline);
    return their results in rank order.

    Raises:
        RuntimeError: a rank failed or the ranks did not finish within ``timeout``.
    """
    port = _free_port()
    env = os.environ | {"MASTER_ADDR": "127.0.0.1"}  # the coordinator's store listens there
    processes: list[subprocess.Popen[bytes]] = []
    configs: list[dict[str, Any]] = []
    for rank in range(WORLD_SIZE):
        config: dict[str, Any] = {
            "rank": rank,
            "world_size": WORLD_SIZE,
            "port": port,
            "mib": mib,
            "repeats": repeats,
            "directory": directory,
            "out": os.path.join(logs, f"rank{rank}.json"),
        }
        configs.append(config)
        # Output to files, not pipes: a rank never blocks on a full pipe nobody reads.
        with (
            open(os.path.join(logs, f"rank{rank}.stdout"), "wb") as out,
            open(os.path.join(logs, f"rank{rank}.stderr"), "wb") as err,
        ):
            command = [sys.executable, "-m", "benchmarks.distributed", "--rank-config"]
            processes.append(
                subprocess.Popen(
                    [*command, json.dumps(config)], cwd=ROOT, env=env, stdout=out, stderr=err
                )
            )
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [process.poll() for process in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank = failed[0]
                raise RuntimeError(
                    f"rank {rank} exited with {codes[rank]}: "
                    f"{_tail(os.path.join(logs, f'rank{rank}.stderr'))}"
                )
            if all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                running = [rank for rank, code in enumerate(codes) if code is None]
                raise RuntimeError(
                    f"ranks {running} did not finish within {timeout:.0f} s; rank "
                    f"{running[0]}'s stderr: "
                    f"{_tail(os.path.join(logs, f'rank{running[0]}.stderr'))}"
                )
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    results = []
    for config in configs:
        with open(config["out"]) as file:
            results.append(json.load(file))
    return results


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1024 * MiB)
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()}"


def run_distributed(
    *,
    mib: int = MIB,
    repeats: int = REPEATS,
    directory: str | None = None,
    timeout: float = TIMEOUT_SECS,
) -> dict[str, Any]:
    """Run the ranks on ``mib`` MiB each for ``repeats`` rounds after a warm-up; return the
    report (figures per rank and over ranks, ratios).

    Raises:
        ValueError: ``mib`` or ``repeats`` below 1.
        RuntimeError: a rank failed or did not finish within ``timeout``.
    """
    if mib < 1 or repeats < 1:
        raise ValueError("mib and repeats must be at least 1")
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="asyncckpt-distributed-", dir=directory) as work,
        tempfile.TemporaryDirectory(prefix="asyncckpt-distributed-logs-") as logs,
    ):
        results = _run_ranks(mib, repeats, work, logs, timeout)
    seconds: dict[str, dict[str, dict[str, float]]] = {}
    for figure in (*FIGURES, "asyncckpt_stat_stall"):
        per_rank = [result["samples"][figure] for result in results]
        entry = {f"rank{r}": _summary(s) for r, s in enumerate(per_rank)}
        entry["max"] = _summary([max(values) for values in zip(*per_rank, strict=True)])
        seconds[figure] = entry
    ratios = {
        f"{a} / {b}": seconds[a]["max"]["median"] / seconds[b]["max"]["median"] for a, b in RATIOS
    }
    ratios["asyncckpt_durable / dcp_durable (rank 0)"] = (
        seconds["asyncckpt_durable"]["rank0"]["median"] / seconds["dcp_durable"]["rank0"]["median"]
    )
    checks = {f"rank{r['rank']}": r["checks"] for r in results}
    return {
        "machine": _machine(),
        "versions": {
            "python": platform.python_version(),
            **{d: version_of(d) for d in ("asyncckpt", "torch", "numpy", "anyio")},
        },
        "world_size": WORLD_SIZE,
        "mib_per_rank": mib,
        "tensors_per_rank": TENSORS,
        "state_bytes_per_rank": results[0]["state_bytes"],
        "repeats": repeats,
        "torch_threads": [r["torch_threads"] for r in results],
        "cores": results[0]["cores"],
        "reserve_s": [r["reserve_s"] for r in results],
        "snapshot_MiB_allocated": [r["bytes_allocated"] / MiB for r in results],
        "written": [r["written"] for r in results],
        "checks": checks,
        "seconds": seconds,
        "ratios": ratios,
        "order": [_rotate(list(OPS), round_no) for round_no in range(1, repeats + 1)],
        "samples": {f"rank{r['rank']}": r["samples"] for r in results},
        "wall_s": round(time.monotonic() - began, 2),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (below DCP; the single-process floors' targets per rank), each with the
    measured value, the limit and met / missed."""
    ratios = report["ratios"]
    rows = [
        ("asyncckpt_stall / dcp_stall", "< 1 (stall below DCP)", 1.0, True),
        ("asyncckpt_durable / dcp_durable", "< 1 (durable below DCP)", 1.0, True),
        ("asyncckpt_stall / copy", f"<= {STALL_TARGET}", STALL_TARGET, False),
        ("asyncckpt_durable / write+fsync", f"<= {DURABLE_TARGET}", DURABLE_TARGET, False),
    ]
    case = f"{report['world_size']} ranks x {report['mib_per_rank']} MiB"
    return [
        {
            "case": case,
            "target": f"{key} {label}",
            "value": ratios[key],
            "limit": limit,
            "met": ratios[key] < limit if strict else ratios[key] <= limit,
        }
        for key, label, limit, strict in rows
    ]


_LABELS: Final = {
    "copy": "copy into preallocated buffers (floor of a stall)",
    "write+fsync": "write + fsync of the bytes, one file rewritten (floor of durable)",
    "write+fsync_new": "write + fsync of the bytes, a new file each round",
    "asyncckpt_stall": "asyncckpt stall (`save()` blocked)",
    "asyncckpt_durable": "asyncckpt durable (save -> `wait()`: committed)",
    "asyncckpt_stat_stall": "asyncckpt `statistics().last_stall_secs`",
    "dcp_stall": "DCP `async_save` stall (returned)",
    "dcp_durable": "DCP durable (its future's `result()`)",
    "dcp_reused_stall": "DCP, one stager reused: stall",
    "dcp_reused_durable": "DCP, one stager reused: durable",
}


def _ms(figure: dict[str, float]) -> str:
    return f"{figure['median'] * 1e3:.1f} [{figure['min'] * 1e3:.1f}, {figure['max'] * 1e3:.1f}]"


def markdown(report: dict[str, Any], *, with_targets: bool = True) -> str:
    """The figures per rank and over ranks (milliseconds), with their ratios, and
    (``with_targets``) the table of targets."""
    ranks = [f"rank{r}" for r in range(report["world_size"])]
    lines = [
        f"Distributed: {report['world_size']} ranks x {report['mib_per_rank']} MiB "
        f"({report['tensors_per_rank']} float32 CPU tensors each), gloo on 127.0.0.1, one "
        f"directory; {report['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f"; torch threads per rank {report['torch_threads']}. Median [min, max] of "
        f"{report['repeats']} rounds after a warm-up round, milliseconds; max: per round, the "
        f"slower rank (the ratios use it). {report['wall_s']:.0f} s in all.",
        "",
        "| figure | " + " | ".join(ranks) + " | max over ranks | ratios |",
        "| --- | " + " | ".join("---" for _ in ranks) + " | --- | --- |",
    ]
    for figure, entry in report["seconds"].items():
        ratio = "; ".join(
            f"/ {key.split(' / ', 1)[1]}: {value:.2f}"
            for key, value in report["ratios"].items()
            if key.split(" / ")[0] == figure
        )
        cells = " | ".join(_ms(entry[r]) for r in ranks)
        lines.append(f"| {_LABELS.get(figure, figure)} | {cells} | {_ms(entry['max'])} | {ratio} |")
    checks = "; ".join(
        f"{rank}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "bytes_per_save")
        for rank, c in report["checks"].items()
    )
    written = report["checks"]["rank0"].get("bytes_per_save", {})
    lines += [
        "",
        f"After the warm-up round, restored and compared: {checks}. Bytes per save, both "
        "ranks: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in written.items()) + ". "
        f"reserve(): {', '.join(f'{s:.2f}' for s in report['reserve_s'])} s; snapshot "
        f"buffers allocated per rank: "
        f"{', '.join(f'{m:.0f}' for m in report['snapshot_MiB_allocated'])} MiB.",
    ]
    if with_targets:
        lines += targets_table(targets(report))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the distributed benchmark and print the JSON report (or run one rank)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    parser.add_argument("--mib", type=int, default=MIB, help=f"state per rank (default {MIB})")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"rounds ({REPEATS})")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_SECS, help=f"ranks' deadline ({TIMEOUT_SECS})"
    )
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--rank-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_config is not None:
        _rank_main(json.loads(args.rank_config))
        return 0
    reason = unavailable()
    if reason:
        write_report({"skipped": reason}, args.json_path, None, markdown)
        return 0
    report = run_distributed(
        mib=args.mib, repeats=args.repeats, directory=args.workdir, timeout=args.timeout
    )
    report["targets"] = targets(report)
    write_report(report, args.json_path, args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
