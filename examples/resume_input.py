"""Kill a training run mid-way, resume it, and see the input continue with no gap or repeat.

A toy trainer reads a dataset in a shuffled order (a new order each epoch), two items per
step, under MonitoredTrainingSession. A CheckpointInputPipelineHook saves the iterator's
position (a few ints: seed, epoch, position) just before each model checkpoint, in files of
its own beside the model's. The first run is SIGKILLed part-way (no clean-up, no final
save); the second resumes from the newest model checkpoint and the input checkpoint of the
same step. Every item the runs consumed is logged as it is taken: cut at the step the second
run resumed from, the two runs together read the dataset exactly in its order.

    python examples/resume_input.py --dir ckpt/input --items 40 --kill-at 13
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import numpy as np

import asyncckpt
from asyncckpt import BatchIterator, CheckpointInputPipelineHook, ShuffledIterator

BATCH = 2
EPOCHS = 2
SAVE_STEPS = 4
SEED = 2024


def make_input(items: int) -> BatchIterator[int]:
    """The input pipeline: the items in a seeded shuffled order, a new one each epoch."""
    return BatchIterator(ShuffledIterator(range(items), seed=SEED, num_epochs=EPOCHS), BATCH)


async def train(directory: str, items: int, log_path: str, report_steps: bool) -> int:
    """Train until the input runs out; log each step's items; return the last step."""
    batches = make_input(items)
    state: dict[str, Any] = {"weights": np.zeros(4), "step": 0}
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def train_step(state: dict[str, Any]) -> dict[str, float]:
        batch = next(batches)  # the end of the input ends the session normally
        state["weights"] += np.mean(batch) / 100
        state["step"] += 1
        # Logged as soon as it is taken (os.write: a SIGKILL loses nothing the kernel has).
        os.write(log, f"{state['step']} {' '.join(map(str, batch))}\n".encode())
        return {"loss": float(np.sum(state["weights"]))}

    # The input saves whenever the model does, just before the model's snapshot, so the
    # input checkpoint of every model checkpoint's step is on disk before the model's is.
    input_hook = CheckpointInputPipelineHook(batches, directory)
    model_hook = asyncckpt.CheckpointSaverHook(
        directory, save_steps=SAVE_STEPS, listeners=[input_hook.saver_listener()]
    )
    try:
        async with asyncckpt.MonitoredTrainingSession(
            state,
            train_step,
            checkpoint_dir=directory,
            save_checkpoint_secs=None,  # the model_hook above saves instead
            save_summaries_steps=None,
            log_step_count_steps=None,
            hooks=[model_hook, input_hook],
        ) as sess:
            os.write(log, f"start {sess.global_step}\n".encode())
            while not sess.should_stop():
                await sess.run()
                if report_steps:  # to the parent process, which decides when to kill us
                    print(f"step {sess.global_step}", flush=True)
                    await anyio.to_thread.run_sync(sys.stdin.readline)
    finally:
        os.close(log)
    return sess.global_step


def kill_a_run(directory: str, items: int, log_path: str, kill_at: int) -> None:
    """Run the trainer in a subprocess and SIGKILL it once it reports step ``kill_at``."""
    command = [sys.executable, __file__, "--train", "--dir", directory, "--items", str(items)]
    with subprocess.Popen(
        [*command, "--log", log_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        for line in child.stdout:
            if int(line.split()[1]) >= kill_at:
                child.send_signal(signal.SIGKILL)  # no clean-up, no final save
                break
            child.stdin.write(b"go on\n")
            child.stdin.flush()
        child.wait()


def read_runs(log_path: str) -> list[tuple[int, list[tuple[int, list[int]]]]]:
    """Each run's starting step and the items of each step it took."""
    runs: list[tuple[int, list[tuple[int, list[int]]]]] = []
    with open(log_path) as file:
        for line in file:
            word, *rest = line.split()
            if word == "start":
                runs.append((int(rest[0]), []))
            elif line.endswith("\n"):  # a line the kill cut short is no step of record
                runs[-1][1].append((int(word), [int(item) for item in rest]))
    return runs


def show(label: str, steps: list[tuple[int, list[int]]]) -> None:
    if steps:
        batches = " ".join(str(items) for _, items in steps)
        print(f"  {label} steps {steps[0][0]}-{steps[-1][0]}: {batches}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", default="ckpt/input", help="checkpoint directory")
    parser.add_argument("--items", type=int, default=40, help="items in the dataset")
    parser.add_argument("--kill-at", type=int, default=13, help="kill the first run here")
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train:  # the run that gets killed
        anyio.run(train, args.dir, args.items, args.log, True)
        return 0

    os.makedirs(args.dir, exist_ok=True)
    log_path = os.path.join(args.dir, "consumed.log")
    if os.path.exists(log_path):
        os.remove(log_path)
    kill_a_run(args.dir, args.items, log_path, args.kill_at)
    last_step = anyio.run(train, args.dir, args.items, log_path, False)

    (_, first), (resumed_at, second) = read_runs(log_path)
    print(f"run 1: killed (SIGKILL) after step {first[-1][0]}")
    print(f"run 2: resumed at step {resumed_at}, ran to step {last_step} (the input ran out)")
    kept = [(step, items) for step, items in first if step <= resumed_at]
    show("run 1 up to the resumed step,", kept[-3:])
    show("run 2 from there,", second[:3])
    if len(kept) < len(first):
        lost = f"{resumed_at + 1}-{first[-1][0]}"
        print(f"  (run 1's steps {lost} were lost with it: run 2 took their items again)")
    consumed = [item for _, items in kept + second for item in items]
    expected = [item for batch in make_input(args.items) for item in batch]
    if consumed != expected:
        print("the input skipped or repeated items", file=sys.stderr)
        return 1
    print(
        f"{EPOCHS} epochs of {args.items} items, each in its own shuffled order: "
        f"every item once per epoch, no gap, no repeat"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
