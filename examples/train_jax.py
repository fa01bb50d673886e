"""A JAX model with bfloat16 parameters and a hand-written Adam, checkpointed and resumable.

The parameters are a pytree of ``jnp.bfloat16`` arrays in nested dicts; the optimizer state
is a NamedTuple ``AdamState(count, mu, nu)`` written here as optax would (no optax needed);
one jitted function computes the loss, the gradients and the update. Dropout draws from a
``jax.random`` key kept in the state tree: a typed key array is not a leaf a checkpoint can
hold, so the state keeps its raw bits (``jax.random.key_data``) and each step rebuilds the key
with ``jax.random.wrap_key_data``. The data is made from a fixed seed and read in a shuffled
order whose position a CheckpointInputPipelineHook saves with every model checkpoint, so a
run killed at any instant and started again resumes from the latest checkpoint and prints
the losses of an uninterrupted run, bit for bit:

    python examples/train_jax.py --dir ckpt/jax --last-step 200
    python examples/train_jax.py --dir ckpt/jax --last-step 400   # resumes at 200
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import anyio
import jax
import jax.numpy as jnp
import numpy as np

import asyncckpt
from asyncckpt import BatchIterator, CheckpointInputPipelineHook, ShuffledIterator

EXAMPLES = 512
FEATURES = 16
HIDDEN = 32
BATCH = 32
DROPOUT = 0.1
ORDER_SEED = 1

Params = dict[str, dict[str, jax.Array]]


class AdamState(NamedTuple):
    """Adam's state, as ``optax.adam`` keeps it: the step count and both moments (float32)."""

    count: jax.Array  # type: ignore[assignment]  # optax's name; it hides tuple.count
    mu: Params
    nu: Params


def make_data() -> tuple[
    np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float32]]
]:
    """A seeded regression problem: a random teacher's outputs plus noise."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((EXAMPLES, FEATURES), dtype=np.float32)
    teacher = rng.standard_normal((FEATURES, 1), dtype=np.float32)
    noise = 0.05 * rng.standard_normal((EXAMPLES, 1), dtype=np.float32)
    return inputs, np.tanh(inputs @ teacher) + noise


def make_state() -> dict[str, Any]:
    """The state tree: bf16 parameters, Adam's state and the dropout key's raw bits."""
    init, key = jax.random.split(jax.random.key(0))
    k1, k2 = jax.random.split(init)
    params: Params = {
        "hidden": {
            "w": (jax.random.normal(k1, (FEATURES, HIDDEN)) / FEATURES**0.5).astype(jnp.bfloat16),
            "b": jnp.zeros(HIDDEN, jnp.bfloat16),
        },
        "out": {
            "w": (jax.random.normal(k2, (HIDDEN, 1)) / HIDDEN**0.5).astype(jnp.bfloat16),
            "b": jnp.zeros(1, jnp.bfloat16),
        },
    }

    def zeros() -> Params:
        moments: Params = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return moments

    return {
        "params": params,
        "opt": AdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros()),
        "key": jax.random.key_data(key),  # a uint32 array; the typed key is rebuilt per step
    }


def loss_fn(params: Params, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(x.astype(jnp.bfloat16) @ params["hidden"]["w"] + params["hidden"]["b"])
    keep = jax.random.bernoulli(key, 1 - DROPOUT, hidden.shape)
    hidden = jnp.where(keep, hidden / (1 - DROPOUT), 0).astype(jnp.bfloat16)
    prediction = hidden @ params["out"]["w"] + params["out"]["b"]
    return jnp.mean((prediction.astype(jnp.float32) - y) ** 2)


@jax.jit
def update(
    params: Params, opt: AdamState, key_data: jax.Array, x: jax.Array, y: jax.Array
) -> tuple[Params, AdamState, jax.Array, jax.Array]:
    """One Adam step (lr 1e-2, optax's defaults otherwise); the new key's bits and the loss."""
    key, dropout_key = jax.random.split(jax.random.wrap_key_data(key_data))
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, dropout_key)
    count = opt.count + 1
    mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g.astype(jnp.float32), opt.mu, grads)
    nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g.astype(jnp.float32) ** 2, opt.nu, grads)
    step = count.astype(jnp.float32)
    scale = 1e-2 * jnp.sqrt(1 - 0.999**step) / (1 - 0.9**step)

    def apply(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
        return (p.astype(jnp.float32) - scale * m / (jnp.sqrt(v) + 1e-8)).astype(p.dtype)

    params = jax.tree.map(apply, params, mu, nu)
    return params, AdamState(count, mu, nu), jax.random.key_data(key), loss


async def train(directory: str, last_step: int, save_steps: int, step_seconds: float) -> int:
    inputs, targets = make_data()
    batches = BatchIterator(
        ShuffledIterator(range(EXAMPLES), seed=ORDER_SEED, num_epochs=None), BATCH
    )
    state = make_state()

    def train_step(state: dict[str, Any]) -> dict[str, float]:
        index = np.array(next(batches))  # the step's batch, taken inside the step
        x, y = jnp.asarray(inputs[index]), jnp.asarray(targets[index])
        # jax arrays are immutable: the step puts the new ones in the state tree.
        state["params"], state["opt"], state["key"], loss = update(
            state["params"], state["opt"], state["key"], x, y
        )
        return {"loss": float(loss)}

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
    parser.add_argument("--dir", default="ckpt/jax", help="checkpoint directory")
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
