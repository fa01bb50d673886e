"""A CheckpointSaverListener that uploads each durable checkpoint and stops training early.

After every save the listener (async) copies the new checkpoint to a "remote" directory
(standing in for object storage) and evaluates the uploaded copy on held-out data; when the
validation loss has not improved for ``--patience`` evaluations it returns True, and the
session stops at its next step boundary, saving the last step. The training loop never
waits for the upload or the evaluation: both run in the background while it keeps stepping,
which is why the listener evaluates the checkpoint it was called for, never
``session.state`` (by then the loop has moved on by a few steps).

An upload slower than the save interval is fine: the checkpoint being uploaded is never
deleted by retention until ``after_save`` returns, and the hook's policy decides what
happens to saves meanwhile (``"block"``, the default, holds the loop; ``"skip"`` drops
them). Try ``--upload-seconds 0.5 --keep 1 --policy skip``.

    python examples/listener_upload.py --dir ckpt/upload --remote ckpt/remote
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

import anyio
import numpy as np

import asyncckpt

FEATURES = 16


class UploadAndEarlyStop(asyncckpt.CheckpointSaverListener):
    """Copy each durable checkpoint to ``remote``; stop when validation stops improving."""

    def __init__(
        self, checkpoint_dir: str, remote: str, patience: int, upload_seconds: float
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.remote = remote
        self.patience = patience
        self.upload_seconds = upload_seconds  # a slow network, for trying it out
        self.saver = asyncckpt.Saver()
        self.best = float("inf")
        self.stale = 0
        self.uploaded: list[int] = []
        rng = np.random.default_rng(1)
        self.val_inputs = rng.standard_normal((256, FEATURES))

    async def after_save(self, session: Any, global_step_value: int) -> bool:
        source = os.path.join(self.checkpoint_dir, f"model.ckpt-{global_step_value}")
        uploaded = await anyio.to_thread.run_sync(shutil.copy2, source, self.remote)
        await anyio.sleep(self.upload_seconds)
        self.uploaded.append(global_step_value)
        state = await self.saver.restore(uploaded)  # the uploaded copy, checksums verified
        targets = self.val_inputs @ state["true_weights"]
        val_loss = float(np.mean((self.val_inputs @ state["weights"] - targets) ** 2))
        if val_loss < self.best * 0.99:
            self.best, self.stale = val_loss, 0
        else:
            self.stale += 1
        print(f"step {global_step_value}: uploaded, validation loss {val_loss:.6f}")
        if self.stale < self.patience:
            return False
        # The stop lands at the loop's next step boundary: a few steps later, since this
        # listener runs in the background while the loop keeps stepping.
        print(f"step {global_step_value}: no improvement in {self.stale} evaluations, stopping")
        return True  # asks the session to stop

    def end(self, session: Any, global_step_value: int) -> None:
        print(f"done at step {global_step_value}; uploaded {len(self.uploaded)} checkpoints")


def step_fn(state: dict[str, Any]) -> dict[str, float]:
    rng = np.random.default_rng(state["step"])
    inputs = rng.standard_normal((32, FEATURES))
    targets = inputs @ state["true_weights"] + 0.5 * rng.standard_normal(len(inputs))
    error = inputs @ state["weights"] - targets
    state["weights"] -= 0.02 * inputs.T @ error / len(inputs)
    state["step"] += 1
    return {"loss": float(np.mean(error**2))}


async def train(args: argparse.Namespace) -> int:
    directory = args.dir
    os.makedirs(args.remote, exist_ok=True)
    state = {"weights": np.zeros(FEATURES), "true_weights": np.linspace(-1, 1, FEATURES), "step": 0}
    listener = UploadAndEarlyStop(directory, args.remote, args.patience, args.upload_seconds)
    saver_hook = asyncckpt.CheckpointSaverHook(
        directory,
        save_steps=25,
        saver=asyncckpt.Saver(max_to_keep=args.keep),
        listeners=[listener],
        policy=args.policy,
    )
    async with asyncckpt.MonitoredSession(
        asyncckpt.ChiefSessionCreator(state, step_fn, checkpoint_dir=directory),
        hooks=[saver_hook, asyncckpt.StopAtStepHook(num_steps=args.max_steps)],
    ) as sess:
        while not sess.should_stop():
            await sess.run()
    return sess.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="ckpt/upload")
    parser.add_argument("--remote", default="ckpt/remote")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--upload-seconds", type=float, default=0.0)
    parser.add_argument("--keep", type=int, default=5, help="checkpoints kept locally")
    parser.add_argument("--policy", choices=["block", "skip", "replace"], default="block")
    args = parser.parse_args()
    step = anyio.run(train, args)
    print(f"stopped at step {step}")


if __name__ == "__main__":
    main()
