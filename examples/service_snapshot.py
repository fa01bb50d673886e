"""An asyncio service that keeps state in memory and snapshots it while it serves.

At start it restores the newest snapshot (if any); while "serving" requests it saves a
snapshot every ``--every`` requests through a CheckpointManager (the write runs in the
background: requests keep flowing); on shutdown (end of the run, Ctrl-C or SIGTERM) it saves
a last snapshot. Run it twice and the second run continues the counters of the first:

    python examples/service_snapshot.py --dir /tmp/svc --requests 500
    python examples/service_snapshot.py --dir /tmp/svc --requests 500
    asyncckpt ls /tmp/svc
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import numpy as np

import asyncckpt


def fresh_state() -> dict[str, Any]:
    return {
        "requests": 0,
        "histogram": np.zeros(16, np.int64),  # latency buckets, updated in place
        "embeddings": np.zeros((256, 64), np.float32),  # an online-learned table
        "last_user": "",
    }


async def handle_request(state: dict[str, Any], rng: np.random.Generator) -> None:
    user = int(rng.integers(256))
    state["embeddings"][user] += rng.standard_normal(64, dtype=np.float32) * 0.01
    state["histogram"][int(rng.integers(16))] += 1
    state["requests"] += 1
    state["last_user"] = f"user-{user}"
    await asyncio.sleep(0)  # a real service awaits its clients here


async def serve(
    directory: str, requests: int, every: int, **manager_options: Any
) -> dict[str, Any]:
    """Serve ``requests`` requests, snapshotting every ``every``; return the final state.

    ``manager_options`` go to the CheckpointManager (a test passes ``storage=``).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = fresh_state()
    async with asyncckpt.CheckpointManager(
        directory, max_to_keep=3, policy="skip", **manager_options
    ) as manager:
        if manager.latest_step() is not None:
            state = await manager.restore(into=state)
            print(f"restored {state['requests']} requests from step {manager.latest_step()}")
        rng = np.random.default_rng(state["requests"])
        target = state["requests"] + requests
        while state["requests"] < target and not stop.is_set():
            await handle_request(state, rng)
            if state["requests"] % every == 0:
                # Returns once the state is copied; "skip" drops it if a write is still busy.
                await manager.save(state, state["requests"], metadata={"service": "demo"})
        # Shutdown: let the writes in flight finish first, so that the last snapshot cannot
        # be dropped by "skip"; then save it unless it is already the latest, and wait until
        # it is durable.
        await manager.wait()
        if manager.latest_step() != state["requests"]:
            await manager.save(state, state["requests"])
        await manager.wait()
        stats = manager.statistics()
        print(
            f"served up to request {state['requests']}; wrote {stats.written} snapshots "
            f"({stats.skipped} skipped while a write was busy); latest {manager.latest_step()}"
        )
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="ckpt/service")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()
    asyncio.run(serve(args.dir, args.requests, args.every))


if __name__ == "__main__":
    main()
