"""One rank of a real multi-process job, for tests/test_distributed_processes.py.

    python tests/distributed_worker.py DIRECTORY --rank R --world-size N --port P
        [--coordinator torch|storage] [--steps 1,2,3] [--fail-step S] [--stall-step S]
        [--timeout T] [--restore-only] [--session [--last-step S] [--step-secs T]]

Initializes torch.distributed (gloo, on 127.0.0.1:P) for ``--coordinator torch``, trains a
small model whose gradients are all-reduced over the training group each step, and saves
its state (the replicated model, its own optimizer shard) at each step of ``--steps``, with a
``CheckpointManager`` coordinated by ``TorchDistributedCoordinator`` or
``StorageCoordinator``. ``--fail-step`` makes this rank's write of that step fail (ENOSPC);
``--stall-step`` holds it (for a kill -9 mid-save: it prints ``STALLED`` and waits).
Prints one JSON line: each save's outcome, the latest step, and what a restore gives back.
With ``--session`` it trains under a ``MonitoredTrainingSession`` (checkpoints every 2 steps)
until any rank stops it, and prints where it started, where it stopped and its state.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Any

import anyio
import numpy as np

import asyncckpt
from asyncckpt.testing import FaultyStorage


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--coordinator", choices=["torch", "storage"], default="torch")
    parser.add_argument("--steps", default="1,2,3")
    parser.add_argument("--fail-step", type=int)
    parser.add_argument("--stall-step", type=int)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--step-offset", type=int, default=0, help="save step + this")
    parser.add_argument("--restore-only", action="store_true")
    parser.add_argument("--session", action="store_true")
    parser.add_argument("--last-step", type=int, help="with --session: this rank's StopAtStepHook")
    parser.add_argument("--step-secs", type=float, default=0.0)
    return parser.parse_args()


def make_coordinator(args: argparse.Namespace) -> Any:
    if args.coordinator == "storage":
        return asyncckpt.StorageCoordinator(args.rank, args.world_size, timeout=args.timeout)
    return asyncckpt.TorchDistributedCoordinator(timeout=args.timeout)


def rank_state(rank: int, step: int) -> dict[str, Any]:
    return {
        "model": {"w": np.full(1024, float(step), np.float32)},
        "opt": {"m": np.full(256, step * 10.0 + rank), "rank": rank},
    }


async def main(args: argparse.Namespace, coordinator: Any) -> dict[str, Any]:
    faults = FaultyStorage()
    if args.fail_step is not None:
        faults.fail("write", errno.ENOSPC, match=f"model.ckpt-{args.fail_step}.rank")
    stall = None
    if args.stall_step is not None:
        stall = faults.stall("fsync", match=f"model.ckpt-{args.stall_step}.rank", limit_secs=600)
    outcomes: list[dict[str, Any]] = []
    result: dict[str, Any] = {"rank": args.rank, "outcomes": outcomes}
    with faults:
        async with asyncckpt.CheckpointManager(
            args.directory,
            coordinator=coordinator,
            replicated=["model"],
            storage=None if args.directory.startswith("s3://") else faults,
            max_to_keep=2,
        ) as manager:
            result["opened_latest"] = manager.latest_step()
            if not args.restore_only:
                for step in [int(s) for s in args.steps.split(",")]:
                    allreduce(step)
                    saved = step + args.step_offset
                    await manager.save(rank_state(args.rank, saved), saved)
                    if stall is not None and step == args.stall_step:
                        await stall.wait_reached()
                        print("STALLED", flush=True)
                        await anyio.sleep(600)
                    try:
                        await manager.wait()
                        outcomes.append({"step": saved, "ok": True})
                    except asyncckpt.CheckpointWriteError as exc:
                        outcomes.append({"step": saved, "ok": False, "error": str(exc)})
            result["latest"] = manager.latest_step()
            if manager.latest_step() is not None:
                restored = await manager.restore(into=rank_state(args.rank, 0))
                result["restored"] = {
                    "w": float(restored["model"]["w"][0]),
                    "m": float(restored["opt"]["m"][0]),
                    "rank": restored["opt"]["rank"],
                }
    return result


async def session_main(args: argparse.Namespace, coordinator: Any) -> dict[str, Any]:
    """A MonitoredTrainingSession on every rank, stopped by whichever rank asks first (a
    StopAtStepHook of its own, or a SIGTERM to it alone); prints each step as it ends."""
    state = rank_state(args.rank, 0)

    def step_fn(state: dict[str, Any]) -> dict[str, Any]:
        allreduce(1)
        state["model"]["w"] += 1.0
        state["opt"]["m"] += 10.0
        if args.step_secs:
            time.sleep(args.step_secs)
        return {}

    hooks = [asyncckpt.StopAtStepHook(last_step=args.last_step)] if args.last_step else []
    async with (
        asyncckpt.MonitoredTrainingSession(
            state,
            step_fn,
            checkpoint_dir=args.directory,
            save_checkpoint_steps=2,
            hooks=hooks,
            coordinator=coordinator,
            replicated=["model"],
        ) as session,
        asyncckpt.stop_on_signals(session),
    ):
        start = session.global_step
        while not session.should_stop():
            await session.run()
            print(f"STEP {session.global_step}", flush=True)
        final = session.global_step
    return {
        "rank": args.rank,
        "start": start,
        "final": final,
        "w": float(session.state["model"]["w"][0]),
        "m": float(session.state["opt"]["m"][0]),
    }


def allreduce(step: int) -> None:
    """A training step's collective on the training group, as DDP's gradient sync is."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        grad = torch.full((4,), float(step))
        dist.all_reduce(grad)
        assert float(grad[0]) == step * dist.get_world_size()


if __name__ == "__main__":
    arguments = parse()
    if arguments.coordinator == "torch":
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{arguments.port}",
            rank=arguments.rank,
            world_size=arguments.world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    entry = session_main if arguments.session else main
    outcome = anyio.run(entry, arguments, make_coordinator(arguments))
    print(json.dumps(outcome), flush=True)
    if arguments.coordinator == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.exit(0)
