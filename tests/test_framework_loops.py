"""Real PyTorch and JAX training loops, killed and resumed, print the losses of an unbroken run.

Each example (examples/train_torch.py, examples/train_jax.py) prints ``step N loss <repr>``
once per step. A run SIGKILLed part-way and started again with the same arguments must go
on from a checkpoint and print, bit for bit, the losses of a run that was never interrupted:
the model, the optimizer state, the RNG state and the input position all came back exactly.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest
from support import verify_exit

from asyncckpt import get_checkpoint_state, latest_checkpoint

EXAMPLES_DIR: Final = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT: Final = 60.0
LAST_STEP: Final = 100
SAVE_STEPS: Final = 20
# Reached after the save of step 60 was queued, which waits for the write of step 20 to end
# (one pending save, policy "block"): a checkpoint past step 0 is on disk when the kill lands.
KILL_AT: Final = 65
# 5 ms per step leave the run 35 steps (over 0.17 s) to go when the kill lands.
ARGS: Final = ["--last-step", str(LAST_STEP), "--save-steps", str(SAVE_STEPS),
               "--step-seconds", "0.005"]  # fmt: skip
STEP_LINE: Final = re.compile(r"step (\d+) loss (\S+)")
START_LINE: Final = re.compile(r"starting at step (\d+)")

FRAMEWORKS: Final = {"train_torch.py": "torch", "train_jax.py": "jax"}


def command(example: str, directory: Path) -> list[str]:
    return [sys.executable, str(EXAMPLES_DIR / example), "--dir", str(directory), *ARGS]


def losses(lines: list[str]) -> dict[int, str]:
    """Each printed step's loss, as printed (a float's repr: equal strings, equal bits)."""
    return {int(m.group(1)): m.group(2) for line in lines if (m := STEP_LINE.fullmatch(line))}


def start_step(lines: list[str]) -> int:
    match = START_LINE.fullmatch(lines[0])
    assert match, lines[:1]
    return int(match.group(1))


def run_to_end(example: str, directory: Path) -> list[str]:
    result = subprocess.run(
        command(example, directory), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def signal_at_step(
    example: str, directory: Path, step: int, signum: int
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run the example, send ``signum`` once it printed step ``step``; its lines up to that
    one, and the rest of its output and its exit status (every wait bounded)."""
    argv = command(example, directory)
    deadline = time.monotonic() + TIMEOUT
    seen: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    ) as child:
        try:
            assert child.stdout is not None
            while not seen or not seen[-1].startswith(f"step {step} "):
                left = deadline - time.monotonic()
                readable, _, _ = select.select([child.stdout], [], [], max(left, 0))
                assert readable, f"{example} did not reach step {step}: {seen[-3:]}"
                line = child.stdout.readline()
                assert line, f"{example} ended before step {step}: {seen[-3:]}"
                seen.append(line.rstrip("\n"))
            child.send_signal(signum)
            stdout, stderr = child.communicate(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if child.poll() is None:  # pragma: no cover - only when the test fails
                child.kill()
                child.wait(timeout=TIMEOUT)
    return seen, subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, str]]:
    """Each example's losses of every step of a run from 0 to LAST_STEP, never interrupted
    (computed once per example, when a test first asks for it)."""
    return _Unbroken(tmp_path_factory)


class _Unbroken(dict[str, dict[int, str]]):
    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, example: str) -> dict[int, str]:
        lines = run_to_end(example, self._factory.mktemp("unbroken") / "ckpt")
        assert start_step(lines) == 0
        assert lines[-1].startswith(f"stopped at step {LAST_STEP};")
        result = losses(lines)
        assert sorted(result) == list(range(1, LAST_STEP + 1))
        self[example] = result
        return result


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(FRAMEWORKS))
def test_sigkilled_run_resumes_with_identical_losses(
    example: str, tmp_path: Path, unbroken: dict[str, dict[int, str]]
) -> None:
    pytest.importorskip(FRAMEWORKS[example])
    expected = unbroken[example]
    directory = tmp_path / "ckpt"

    killed, result = signal_at_step(example, directory, KILL_AT, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert start_step(killed) == 0
    killed_losses = losses(killed + result.stdout.splitlines())
    last_killed = max(killed_losses)
    assert last_killed < LAST_STEP, "the kill came too late: the run had finished"
    assert all(loss == expected[step] for step, loss in killed_losses.items())
    state = get_checkpoint_state(directory)
    assert state is not None
    saved = [int(path.rsplit("-", 1)[1]) for path in state.paths()]

    resumed = run_to_end(example, directory)
    start = start_step(resumed)
    # It went on from a checkpoint the killed run listed, not from the beginning.
    assert start in saved
    assert 0 < start <= last_killed
    resumed_losses = losses(resumed)
    assert sorted(resumed_losses) == list(range(start + 1, LAST_STEP + 1))
    different = {
        s: (loss, expected[s]) for s, loss in resumed_losses.items() if loss != expected[s]
    }
    assert not different
    assert latest_checkpoint(directory) == os.path.join(directory, f"model.ckpt-{LAST_STEP}")
    assert verify_exit(directory) == 0


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_final_checkpoint(
    tmp_path: Path, unbroken: dict[str, dict[int, str]]
) -> None:
    pytest.importorskip("torch")
    directory = tmp_path / "ckpt"
    seen, result = signal_at_step("train_torch.py", directory, 30, signal.SIGTERM)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = seen + result.stdout.splitlines()
    printed = losses(lines)
    last = max(printed)
    assert 30 <= last < LAST_STEP
    final = os.path.join(directory, f"model.ckpt-{last}")
    assert lines[-1] == f"stopped at step {last}; latest checkpoint {final}"
    assert latest_checkpoint(directory) == final
    assert verify_exit(directory) == 0
    expected = unbroken["train_torch.py"]
    assert all(loss == expected[step] for step, loss in printed.items())
