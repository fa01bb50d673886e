"""A PyTorch job of two processes that checkpoints one shard per rank and resumes bit for bit.

Each rank trains the same small MLP, wrapped in ``DistributedDataParallel`` (gloo, on
127.0.0.1), on batches drawn from its own seeded ``torch.Generator``; a
``ZeroRedundancyOptimizer`` gives each rank the AdamW state of its own part of the
parameters only. Every rank saves through a ``CheckpointManager`` with a
``TorchDistributedCoordinator``: the model, alike on every rank, is saved once, by rank 0
(``replicated=["model"]``); each rank's optimizer partition, generator and step go into its
own shard; rank 0 lists a checkpoint only once every rank's shard of it is durable. Run again
with the same directory, every rank restores its own shard of the latest checkpoint and goes
on, printing the losses an uninterrupted run prints, bit for bit:

    python examples/train_torch_ddp.py --ckpt ckpt/ddp --steps 200
    python examples/train_torch_ddp.py --ckpt ckpt/ddp --steps 400   # resumes at 200

Started so, it forks ``--world-size`` ranks (2) on this machine and waits for them; when one
fails or is killed, it stops the others at once (a checkpoint is never torn, and the next run
resumes from the latest one that every rank finished). ``--stop-at S`` ends every rank at
step S, with a checkpoint there. Each rank can also be started by hand, with its rank and one
port for all (and ``--world-size`` if not 2):

    python examples/train_torch_ddp.py --ckpt ckpt/ddp --steps 200 --rank 0 --port 29500 &
    python examples/train_torch_ddp.py --ckpt ckpt/ddp --steps 200 --rank 1 --port 29500

Each rank prints one JSON line when it starts (``{"rank", "pid", "start"}``: the step it
restored), one per step (``{"rank", "step", "loss"}``) and one when it ends
(``{"rank", "stopped", "latest"}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from typing import Any

import anyio
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.multiprocessing.spawn import ProcessException, start_processes
from torch.nn.parallel import DistributedDataParallel

import asyncckpt

EXAMPLES = 512
FEATURES = 16
HIDDEN = 32
BATCH = 32
DATA_SEED = 0
MODEL_SEED = 1
BATCH_SEED = 2  # plus the rank: each rank draws its own batches
TIMEOUT_SECS = 60.0
"""How long a rank waits for the others, in a collective or a checkpoint's commit: a rank
that died or hangs fails the others within it, never blocks them forever."""


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded regression problem, the same on every rank: a random teacher's outputs plus
    noise."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    inputs = torch.randn(EXAMPLES, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, 1, generator=gen)
    targets = torch.tanh(inputs @ teacher) + 0.05 * torch.randn(EXAMPLES, 1, generator=gen)
    return inputs, targets


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: torch.Generator,
    data: tuple[torch.Tensor, torch.Tensor],
) -> float:
    inputs, targets = data
    index = torch.randint(EXAMPLES, (BATCH,), generator=batches)
    loss = nn.functional.mse_loss(model(inputs[index]), targets[index])
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]  # DDP averages the gradients of all ranks
    optimizer.step()  # this rank's partition, then every rank gets the others' new parameters
    return loss.item()


def emit(**fields: Any) -> None:
    # The ranks share one stdout: a line goes out in one write, newline included (print()
    # writes its end apart, and unbuffered, as under PYTHONUNBUFFERED, lines would mix).
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def train(
    directory: str, steps: int, save_steps: int, stop_at: int | None, step_seconds: float
) -> None:
    rank = dist.get_rank()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    data = make_data()
    torch.manual_seed(MODEL_SEED)  # DDP also copies rank 0's initial weights to every rank
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    ddp = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=1e-2
    )
    # ZeroRedundancyOptimizer's own state_dict() gathers every rank's state on one rank;
    # its .optim is this rank's AdamW over its own partition: that is this rank's shard.
    state: dict[str, Any] = {
        "model": model,
        "opt": optimizer.optim,
        "rng": torch.Generator().manual_seed(BATCH_SEED + rank),
        "step": 0,
    }
    last = steps if stop_at is None else min(steps, stop_at)
    async with asyncckpt.CheckpointManager(
        directory,
        coordinator=asyncckpt.TorchDistributedCoordinator(timeout=TIMEOUT_SECS),
        replicated=["model"],
        max_to_keep=3,
    ) as manager:
        if manager.latest_step() is not None:
            # The model from rank 0's shard, the rest from this rank's own.
            state = await manager.restore(into=state)
        step: int = state["step"]
        emit(rank=rank, pid=os.getpid(), start=step)
        while step < last:
            # In a worker thread: the event loop meanwhile writes and commits the last save.
            loss = await anyio.to_thread.run_sync(train_step, ddp, optimizer, state["rng"], data)
            step += 1
            emit(rank=rank, step=step, loss=loss)
            if step % save_steps == 0 or step == last:
                state["step"] = step
                await manager.save(state, step)  # returns once snapshotted
            if step_seconds:
                await anyio.sleep(step_seconds)
    # Leaving the block waited for every save to be committed on every rank.
    emit(rank=rank, stopped=step, latest=manager.latest_step())


def run_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    """One rank: join the process group, train, leave it."""
    # env:// reads both; the coordinator also starts its store on MASTER_ADDR.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_SECS),
    )
    try:
        anyio.run(train, args.ckpt, args.steps, args.save_steps, args.stop_at, args.step_seconds)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(args: argparse.Namespace) -> int:
    """Run every rank as a child process and wait for them all; when one fails, the others
    are terminated (a survivor would otherwise wait TIMEOUT_SECS for the dead rank)."""
    try:
        start_processes(  # type: ignore[no-untyped-call]  # torch leaves it untyped
            run_rank,
            args=(args, args.port or free_port()),
            nprocs=args.world_size,
            # Forked ranks start with torch imported already; spawned ones (where fork is
            # unsafe) import it again, seconds each.
            start_method="fork" if sys.platform == "linux" else "spawn",
        )
    except ProcessException as exc:  # a rank raised, or exited by a signal
        print(f"rank {exc.error_index} failed, the others were stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="ckpt/ddp", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=200, help="train up to this step")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--stop-at", type=int, help="end every rank at this step")
    parser.add_argument("--world-size", type=int, default=2, help="how many ranks")
    parser.add_argument("--rank", type=int, help="run this rank only (else launch them all)")
    parser.add_argument("--port", type=int, default=0, help="rank 0's port (else a free one)")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=0.0,
        help="sleep this long after each step (a slower model; lets a test kill it mid-run)",
    )
    args = parser.parse_args()
    if args.rank is None:
        sys.exit(launch(args))
    if not args.port:
        parser.error("--rank needs --port: the port rank 0 listens on, the same for every rank")
    run_rank(args.rank, args, args.port)


if __name__ == "__main__":
    main()
