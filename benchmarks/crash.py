"""Crash harness: SIGKILL a training process at random instants; nothing durable is ever lost.

A child process (a small script written to a temporary directory) opens a
``CheckpointManager`` on one directory, restores the latest checkpoint if there is one,
then saves at every step a state whose every array holds the step number, and reports on
stdout each step once it is durable (``add_done_callback``). The harness kills it with
SIGKILL after a random delay, then checks the directory as the next start finds it:

- ``asyncckpt verify DIR`` passes (every file a reader could take for a checkpoint is whole);
- the latest checkpoint restores and holds one step: every array equals the header's step
  (a mix of two saves would show);
- the latest step never goes back, across kills, and is at least the last step the child
  reported durable (a loss);
- opening the next ``CheckpointManager`` removes every temporary file.

Then the child is started again on the same directory and resumes.

``run_trainer_kills`` does the same to a plain-step trainer (a ``MonitoredTrainingSession``
whose ``def`` step never yields, saving every few steps) and counts the steps each kill
loses: the last step the trainer finished minus the step the next start resumes from. The
goal is at most one save interval plus the write. Each start must resume from the latest
checkpoint the previous kill left.

The directory may be an object-store URL (``s3://bucket/prefix``): the children and the
checks then reach it by the URL alone, configured by the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), which each child gets from this process's
environment. On an object store there are no temporary files to count (a checkpoint is
uploaded under its final name and is valid once listed). Usage::

    python -m benchmarks.crash --kills 200   # prints a JSON summary; exit 1 on any failure
    python -m benchmarks.crash --trainer --kills 20
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 ... python -m benchmarks.crash --trainer \
        --kills 20 --dir s3://bucket/crash   # the same against an S3 server
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import numpy as np

from asyncckpt import CheckpointManager, cli, latest_checkpoint
from asyncckpt._checkpoint import read_header_sync
from asyncckpt._storage import TEMP_MARKER, Storage, is_url, resolve_storage

__all__ = [
    "CHILD",
    "TRAINER",
    "CrashSummary",
    "KillReport",
    "TrainerKills",
    "check_directory",
    "main",
    "run_crashes",
    "run_trainer_kills",
]

MAX_TO_KEEP = 3
STARTUP_TIMEOUT = 120.0
"""Seconds a child may take to report its start (imports, the lock, the restore)."""

CHILD = textwrap.dedent(
    """
    import os, sys
    import anyio
    import numpy as np
    from asyncckpt import CheckpointManager

    directory, backend = sys.argv[1:3]


    def make_state():
        return {
            "weights": np.zeros((128, 512), np.float32),
            "bias": np.zeros(512, np.int64),
            "layers": [{"w": np.zeros((64, 64), np.float64)}, {"w": np.zeros(1000, np.int32)}],
            "step": np.zeros((), np.int64),
        }


    def leaves(tree):
        if isinstance(tree, dict):
            for value in tree.values():
                yield from leaves(value)
        elif isinstance(tree, list):
            for value in tree:
                yield from leaves(value)
        else:
            yield tree


    def report(outcome):
        if outcome.written:
            os.write(1, f"durable {outcome.step}\\n".encode())


    async def main():
        state = make_state()
        async with CheckpointManager(directory, max_to_keep=%(keep)d) as manager:
            manager.add_done_callback(report)
            step = manager.latest_step()
            if step is not None:
                await manager.restore(into=state)
                if not all((leaf == step).all() for leaf in leaves(state)):
                    os.write(2, f"restored step {step} is inconsistent\\n".encode())
                    sys.exit(3)
            step = step or 0
            os.write(1, f"start {step}\\n".encode())
            while True:
                step += 1
                for leaf in leaves(state):
                    leaf.fill(step)
                await manager.save(state, step)


    anyio.run(main, backend=backend)
    """
) % {"keep": MAX_TO_KEEP}


TRAINER = textwrap.dedent(
    """
    import os, sys, time
    import anyio
    import numpy as np
    import asyncckpt

    directory, backend, save_steps, step_secs = sys.argv[1:5]


    def step_fn(state):  # a plain def that never yields: the case the loop must serve
        state["weights"] += 1.0
        time.sleep(float(step_secs))


    async def main():
        async with asyncckpt.MonitoredTrainingSession(
            {"weights": np.zeros((256, 1024), np.float32)},  # 1 MiB, every value the step
            step_fn,
            checkpoint_dir=directory,
            save_checkpoint_steps=int(save_steps),
            save_summaries_steps=None,
            log_step_count_steps=None,
            scaffold=asyncckpt.Scaffold(saver=asyncckpt.Saver(max_to_keep=%(keep)d)),
        ) as sess:
            os.write(1, f"start {sess.global_step}\\n".encode())
            while True:
                await sess.run()
                os.write(1, f"step {sess.global_step}\\n".encode())


    anyio.run(main, backend=backend)
    """
) % {"keep": MAX_TO_KEEP}


@dataclass(slots=True)
class KillReport:
    """What one kill left, as the next start found it."""

    backend: str
    delay: float
    during_startup: bool
    start_step: int | None  # where the killed child resumed from (None: killed before)
    durable_step: int | None  # the last step the child reported durable
    latest_step: int | None  # the latest checkpoint found after the kill
    temp_files: int  # temporary files found after the kill
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class CrashSummary:
    """The figures of a run (``losses`` counts checkpoints lost or gone back)."""

    kills: int = 0
    kills_during_startup: int = 0
    max_step: int = 0
    min_step: int | None = None
    min_steps_per_kill: int | None = None
    max_steps_per_kill: int = 0
    kills_with_temp_files: int = 0
    losses: int = 0
    inconsistent: int = 0
    verify_failures: int = 0
    restore_failures: int = 0
    temp_files_left: int = 0
    child_failures: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every kill left a directory that passed every check."""
        return not self.problems


def _leaves(tree: object) -> list[np.ndarray[Any, Any]]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    assert isinstance(tree, np.ndarray), type(tree)
    return [tree]


def _temp_names(storage: Storage, directory: str) -> list[str]:
    return [name for name in storage.list_names(directory) if TEMP_MARKER in name]


def _child_environment() -> dict[str, str]:
    """The environment of a child: this process's, so that a URL reaches the same store
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``... and their GCS and Azure equivalents)."""
    return dict(os.environ)


def _inspect(directory: str) -> tuple[int | None, int, list[str]]:
    """Count temporary files, run ``asyncckpt verify``, read the latest checkpoint's step."""
    storage = resolve_storage(directory)
    if storage.file_info(directory) is None:
        return None, 0, []  # killed before the first start created it (or saved anything)
    problems: list[str] = []
    temps = len(_temp_names(storage, directory))
    out = io.StringIO()
    if cli.main(["verify", directory], out=out) != 0:
        problems.append(f"verify failed: {out.getvalue().strip()}")
    try:
        path = latest_checkpoint(directory)
        step = None if path is None else read_header_sync(storage, path).step
    except Exception as exc:
        problems.append(f"latest_checkpoint failed: {exc!r}")
        step = None
    return step, temps, problems


async def check_directory(directory: str) -> tuple[int | None, int, list[str]]:
    """Check a directory as a crash left it; return (latest step, temp files, problems).

    Opens a ``CheckpointManager`` on it (as the next start does), which must remove every
    temporary file. ``directory`` may be an object-store URL.
    """
    header_step, temps, problems = await anyio.to_thread.run_sync(_inspect, directory)
    if any(p.startswith("latest_checkpoint") for p in problems):
        return None, temps, problems
    async with CheckpointManager(directory, max_to_keep=MAX_TO_KEEP) as manager:
        storage = resolve_storage(directory)
        left = await anyio.to_thread.run_sync(_temp_names, storage, directory)
        if left:
            problems.append(f"temporary files left after the manager opened: {left}")
        step = manager.latest_step()
        if step != header_step:
            problems.append(f"manager's latest step {step} != header step {header_step}")
        if step is not None:
            try:
                tree = await manager.restore()
            except Exception as exc:
                problems.append(f"restore of step {step} failed: {exc!r}")
            else:
                mixed = sorted({int(v) for leaf in _leaves(tree) for v in np.unique(leaf)})
                if mixed != [header_step]:
                    problems.append(f"checkpoint of step {header_step} holds steps {mixed}")
    return header_step, temps, problems


def _read_lines(data: bytes) -> dict[str, int]:
    """The last number the child reported after each word (``start``, ``durable``, ``step``)."""
    last: dict[str, int] = {}
    for line in data.decode(errors="replace").splitlines():
        word, _, rest = line.partition(" ")
        if rest.strip().isdigit():  # not a line torn by the kill
            last[word] = int(rest)
    return last


def _kill_once(
    command: list[str], delay: float, during_startup: bool
) -> tuple[dict[str, int], str]:
    """Start the child, SIGKILL it after ``delay``; return (its last reports, stderr)."""
    process = subprocess.Popen(
        [sys.executable, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_environment(),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        head = b""
        if not during_startup:
            # Wait until it has restored and started saving, then give it a random time.
            ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
            if ready:
                head = process.stdout.readline()
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:  # pragma: no cover - only on an error above
            process.kill()
            process.wait()
    reports = _read_lines(head + process.stdout.read())
    stderr = process.stderr.read().decode(errors="replace")
    process.stdout.close()
    process.stderr.close()
    if process.returncode != -signal.SIGKILL:
        stderr = f"exit status {process.returncode}: {stderr}"
    else:
        stderr = ""
    return reports, stderr


def run_crashes(
    kills: int,
    *,
    seed: int = 0,
    window: float = 0.08,
    startup_fraction: float = 0.1,
    startup_window: float = 0.5,
    backends: tuple[str, ...] = ("asyncio",),
    directory: str | None = None,
) -> CrashSummary:
    """Kill the child ``kills`` times on one directory; check what every kill left.

    Args:
        kills: how many times to start and SIGKILL the child.
        seed: for the random delays (a run's instants still vary with the machine).
        window: a kill lands uniformly within this many seconds after the child's first
            save began.
        startup_fraction: this share of kills lands during startup instead (imports, lock,
            temp cleanup, restore), uniformly within ``startup_window`` of the spawn.
        backends: the child's event loops, used in turn.
        directory: where to work (a new temporary directory when None): a local directory
            or an object-store URL (``s3://bucket/prefix``).
    """
    rng = random.Random(seed)
    summary = CrashSummary()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncckpt-crash-") as scratch:
        work = directory or scratch
        script = os.path.join(scratch, "child.py")
        with open(script, "w") as file:
            file.write(CHILD)
        ckpt = os.path.join(work, "ckpt")
        previous: int | None = None
        durable_so_far: int | None = None
        for index in range(kills):
            backend = backends[index % len(backends)]
            during_startup = rng.random() < startup_fraction
            delay = rng.uniform(0, startup_window if during_startup else window)
            reports, stderr = _kill_once([script, ckpt, backend], delay, during_startup)
            start, durable = reports.get("start"), reports.get("durable")
            latest, temps, problems = anyio.run(check_directory, ckpt, backend=backend)
            if stderr:
                summary.child_failures += 1
                problems.append(f"the child failed: {stderr.strip()}")
            if start is not None and start != (previous or 0):
                problems.append(f"the child resumed from {start}, not {previous}")
            if durable is not None:
                durable_so_far = max(durable, durable_so_far or 0)
            lost = [
                f"{what} {step} but the latest checkpoint is {latest}"
                for what, step in (("the step was", previous), ("durable", durable_so_far))
                if step is not None and (latest is None or latest < step)
            ]
            if lost:
                summary.losses += 1
                problems.extend(lost)
            report = KillReport(
                backend, delay, during_startup, start, durable, latest, temps, problems
            )
            _count(summary, report, previous)
            previous = latest if latest is not None else previous
    summary.seconds = round(time.monotonic() - began, 2)
    return summary


@dataclass(slots=True)
class TrainerKills:
    """Steps lost when a plain-step trainer is SIGKILLed, against its save interval."""

    kills: int
    save_steps: int
    step_secs: float
    steps_lost: list[int] = field(default_factory=list)
    """Per kill: the last step finished minus the step the next start resumed from."""
    problems: list[str] = field(default_factory=list)

    @property
    def max_lost(self) -> int:
        return max(self.steps_lost, default=0)

    @property
    def median_lost(self) -> float:
        return float(np.median(self.steps_lost)) if self.steps_lost else 0.0


def run_trainer_kills(
    kills: int,
    *,
    save_steps: int = 10,
    step_secs: float = 0.02,
    seed: int = 0,
    backends: tuple[str, ...] = ("asyncio",),
    directory: str | None = None,
) -> TrainerKills:
    """SIGKILL the plain-step trainer ``kills`` times, each at a random instant within five
    save intervals of its start; check the directory each kill left and count the steps lost.

    ``directory`` (a new temporary directory when None) may be an object-store URL
    (``s3://bucket/prefix``); the checkpoints go to ``<directory>/ckpt``.
    """
    rng = random.Random(seed)
    result = TrainerKills(kills=kills, save_steps=save_steps, step_secs=step_secs)
    window = 5 * save_steps * step_secs
    with tempfile.TemporaryDirectory(prefix="asyncckpt-trainer-") as scratch:
        script = os.path.join(scratch, "trainer.py")
        with open(script, "w") as file:
            file.write(TRAINER)
        ckpt = os.path.join(directory or scratch, "ckpt")
        previous: int | None = None
        for index in range(kills):
            backend = backends[index % len(backends)]
            command = [script, ckpt, backend, str(save_steps), str(step_secs)]
            reports, stderr = _kill_once(command, rng.uniform(0, window), during_startup=False)
            latest, _temps, problems = anyio.run(check_directory, ckpt, backend=backend)
            if stderr:
                problems.append(f"the trainer failed: {stderr.strip()}")
            start = reports.get("start")
            if start is None:
                problems.append("the trainer never reported its start")
            elif start != (previous or 0):
                problems.append(f"the trainer resumed from step {start}, not {previous or 0}")
            if previous is not None and (latest is None or latest < previous):
                problems.append(f"the latest checkpoint went back from {previous} to {latest}")
            previous = latest if latest is not None else previous
            finished = reports.get("step", start)
            if finished is not None:
                result.steps_lost.append(max(0, finished - (latest or 0)))
            result.problems.extend(f"kill {index + 1}: {problem}" for problem in problems)
    return result


def _count(summary: CrashSummary, report: KillReport, previous: int | None) -> None:
    summary.kills += 1
    summary.kills_during_startup += report.during_startup
    summary.kills_with_temp_files += report.temp_files > 0
    for problem in report.problems:
        summary.inconsistent += " holds steps " in problem
        summary.verify_failures += problem.startswith("verify failed")
        summary.restore_failures += problem.startswith(("restore", "latest_checkpoint"))
        summary.temp_files_left += problem.startswith("temporary files left")
        summary.problems.append(f"kill {summary.kills} ({asdict(report)}): {problem}")
    if report.latest_step is not None:
        summary.max_step = max(summary.max_step, report.latest_step)
        summary.min_step = (
            report.latest_step
            if summary.min_step is None
            else min(summary.min_step, report.latest_step)
        )
        advanced = report.latest_step - (previous or 0)
        summary.max_steps_per_kill = max(summary.max_steps_per_kill, advanced)
        summary.min_steps_per_kill = (
            advanced
            if summary.min_steps_per_kill is None
            else min(summary.min_steps_per_kill, advanced)
        )


def main(argv: list[str] | None = None) -> int:
    """Run the harness and print the JSON summary; exit 1 if any kill broke a check."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crash", description=__doc__)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=0.08, help="seconds (default 0.08)")
    parser.add_argument("--backends", default="asyncio,trio", help="comma-separated")
    parser.add_argument(
        "--trainer", action="store_true", help="kill the plain-step trainer; count steps lost"
    )
    parser.add_argument(
        "--dir",
        help="where to work: a local directory or an object-store URL (s3://bucket/prefix, "
        "configured by the AWS_* variables); a new temporary directory by default",
    )
    args = parser.parse_args(argv)
    if args.dir is not None and not is_url(args.dir):
        os.makedirs(args.dir, exist_ok=True)
    if args.trainer:
        trainer = run_trainer_kills(
            args.kills,
            seed=args.seed,
            backends=tuple(args.backends.split(",")),
            directory=args.dir,
        )
        figures = {"max_lost": trainer.max_lost, "median_lost": trainer.median_lost}
        json.dump({"ok": not trainer.problems, **figures, **asdict(trainer)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if not trainer.problems else 1
    summary = run_crashes(
        args.kills,
        seed=args.seed,
        window=args.window,
        backends=tuple(args.backends.split(",")),
        directory=args.dir,
    )
    json.dump({"ok": summary.ok, **asdict(summary)}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
