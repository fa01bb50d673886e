"""An async numpy trainer that checkpoints, stops at a step, and resumes when run again.

Fits a linear model with SGD under MonitoredTrainingSession: the state (weights, optimizer
momentum, the data order's RNG state) is restored from the latest checkpoint at start,
checkpointed in the background every ``--save-steps`` steps without stalling the loop, and
saved one last time when StopAtStepHook ends the run (or on SIGTERM / Ctrl-C). Every 25 steps
it writes TensorBoard summaries (the loss, a histogram and an image of the weights, a note)
next to the checkpoints (``tensorboard --logdir ckpt/train``):

    python examples/train_numpy.py --dir ckpt/train --last-step 200
    python examples/train_numpy.py --dir ckpt/train --last-step 400   # resumes at 200
    asyncckpt ls ckpt/train
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

import asyncckpt
from asyncckpt import summary

if TYPE_CHECKING:
    from collections.abc import Mapping

FEATURES = 32
BATCH = 64


def make_state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "weights": np.zeros(FEATURES, np.float64),
        "momentum": np.zeros(FEATURES, np.float64),
        "true_weights": rng.standard_normal(FEATURES),  # the teacher the model learns
        "rng": rng.bit_generator.state,  # a plain dict: saved and restored with the rest
    }


async def train_step(state: dict[str, Any], learning_rate: float = 0.05) -> dict[str, Any]:
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    inputs = rng.standard_normal((BATCH, FEATURES))
    targets = inputs @ state["true_weights"] + 0.01 * rng.standard_normal(BATCH)
    error = inputs @ state["weights"] - targets
    gradient = inputs.T @ error / BATCH
    state["momentum"] *= 0.9
    state["momentum"] += gradient
    state["weights"] -= learning_rate * state["momentum"]
    state["rng"] = rng.bit_generator.state
    await anyio.lowlevel.checkpoint()  # a real trainer awaits its data loader here
    return {"loss": float(np.mean(error**2)), "weights": state["weights"]}


def summaries(outputs: Mapping[str, Any]) -> list[summary.SummaryValue]:
    """What TensorBoard shows: the loss, the weights' histogram, a note, an image of them."""
    weights = outputs["weights"]
    picture = np.abs(weights.reshape(4, 8)) / max(float(np.abs(weights).max()), 1e-12)
    return [
        summary.scalar("loss", outputs["loss"]),
        summary.histogram("weights", weights),
        summary.text("notes", f"max |w| = {np.abs(weights).max():.3f}"),
        summary.image("weights_image", np.kron(picture, np.ones((8, 8)))[:, :, None]),
    ]


async def train(directory: str, last_step: int, save_steps: int) -> tuple[int, float]:
    state = make_state()
    hooks = [
        asyncckpt.StopAtStepHook(last_step=last_step),
        asyncckpt.NanTensorHook("loss"),
        asyncckpt.LoggingTensorHook({"loss": "loss", "step": "global_step"}, every_n_iter=50),
    ]
    loss = float("nan")
    async with (
        asyncckpt.MonitoredTrainingSession(
            state,
            train_step,
            checkpoint_dir=directory,
            save_checkpoint_steps=save_steps,
            save_summaries_steps=25,
            scaffold=asyncckpt.Scaffold(summary_op=summaries),
            hooks=hooks,
        ) as sess,
        asyncckpt.stop_on_signals(sess),
    ):
        print(f"starting at step {sess.global_step}")
        while not sess.should_stop():
            loss = await sess.run("loss")
    print(
        f"stopped at step {sess.global_step}, loss {loss:.5f}; "
        f"latest checkpoint {asyncckpt.latest_checkpoint(directory)}"
    )
    return sess.global_step, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="ckpt/train")
    parser.add_argument("--last-step", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    anyio.run(train, args.dir, args.last_step, args.save_steps)


if __name__ == "__main__":
    main()
