"""A PyTorch MLP trained with AdamW that checkpoints, and resumes where it stopped when run again.

The model, the AdamW optimizer (its moments and step counts) and the torch.Generator that
draws each step's dropout masks go in the state tree as themselves; the synthetic dataset is
made from a fixed seed, and a CheckpointInputPipelineHook saves the position of its shuffled
batch iterator with every model checkpoint. A run killed at any instant (SIGKILL included)
and started again with the same arguments resumes from the latest checkpoint and prints, for
every step, the loss the uninterrupted run printed, bit for bit. SIGTERM or Ctrl-C stops it
at a step boundary with a final checkpoint:

    python examples/train_torch.py --dir ckpt/torch --last-step 200
    python examples/train_torch.py --dir ckpt/torch --last-step 400   # resumes at 200
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import torch
from torch import nn

import asyncckpt
from asyncckpt import BatchIterator, CheckpointInputPipelineHook, ShuffledIterator

EXAMPLES = 512
FEATURES = 16
HIDDEN = 32
BATCH = 32
DATA_SEED = 0
ORDER_SEED = 1


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded regression problem: a random teacher network's outputs plus noise."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    inputs = torch.randn(EXAMPLES, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, 1, generator=gen)
    targets = torch.tanh(inputs @ teacher) + 0.05 * torch.randn(EXAMPLES, 1, generator=gen)
    return inputs, targets


def make_state() -> dict[str, Any]:
    """The state tree: model, optimizer and the dropout generator, as live objects."""
    torch.manual_seed(0)  # the initial weights
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    return {
        "model": model,
        "opt": torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2),
        "dropout_rng": torch.Generator().manual_seed(2),
    }


async def train(directory: str, last_step: int, save_steps: int, step_seconds: float) -> int:
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    inputs, targets = make_data()
    batches = BatchIterator(
        ShuffledIterator(range(EXAMPLES), seed=ORDER_SEED, num_epochs=None), BATCH
    )
    state = make_state()

    def train_step(state: dict[str, Any]) -> dict[str, float]:
        model: nn.Sequential = state["model"]
        opt: torch.optim.Optimizer = state["opt"]
        index = torch.tensor(next(batches))  # the step's batch, taken inside the step
        hidden = model[1](model[0](inputs[index]))
        # Dropout drawn from the generator in the state: a resumed run draws the same masks.
        keep = torch.rand(hidden.shape, generator=state["dropout_rng"]) >= 0.1
        prediction = model[2](hidden * keep / 0.9)
        loss = nn.functional.mse_loss(prediction, targets[index])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        return {"loss": loss.item()}

    async with (
        asyncckpt.MonitoredTrainingSession(
            state,
            train_step,
            checkpoint_dir=directory,
            save_checkpoint_steps=save_steps,
            save_summaries_steps=None,
            log_step_count_steps=None,
            # Saves with each model checkpoint, just before it (docs/INPUT.md).
            hooks=[
                asyncckpt.StopAtStepHook(last_step=last_step),
                CheckpointInputPipelineHook(batches, directory),
            ],
        ) as sess,
        asyncckpt.stop_on_signals(sess),
    ):
        print(f"starting at step {sess.global_step}", flush=True)
        while not sess.should_stop():
            loss = await sess.run("loss")
            print(f"step {sess.global_step} loss {loss!r}", flush=True)
            if step_seconds:
                await anyio.sleep(step_seconds)
    print(
        f"stopped at step {sess.global_step}; "
        f"latest checkpoint {asyncckpt.latest_checkpoint(directory)}",
        flush=True,
    )
    return sess.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="ckpt/torch", help="checkpoint directory")
    parser.add_argument("--last-step", type=int, default=200, help="stop at this step")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=0.0,
        help="sleep this long after each step (a slower model; lets a test kill it mid-run)",
    )
    args = parser.parse_args()
    anyio.run(train, args.dir, args.last_step, args.save_steps, args.step_seconds)


if __name__ == "__main__":
    main()
