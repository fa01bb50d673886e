"""A Starlette service on uvicorn that keeps its state in memory and checkpoints it as it serves.

The state is an embedding table, counter arrays and ``version``, the number of updates
applied. At start the service restores the newest checkpoint of ``--dir`` (if any) and
reserves the snapshot buffers; then every ``--save-secs`` a background task snapshots the
state (the write runs in the background: requests keep being served) and on shutdown
(Ctrl-C, SIGTERM) it saves once more. A failed write is logged and the service goes on.
Needs the ``examples`` extra (``pip install -e '.[examples]'``):

    python examples/service_snapshot.py --dir ckpt/service --port 8000
    curl -X POST localhost:8000/update           # {"version":1}; ?row=K picks the row
    curl localhost:8000/statistics               # the CheckpointManager's counters
    curl localhost:8000/health                   # {"status":"ok","version":1,...}
    asyncckpt ls ckpt/service                    # after a few --save-secs, or a Ctrl-C

Run it again (with the same sizes): it continues from the version it stopped at.
``--table-mib 512`` shows what a large state costs (``/statistics``: the stalls of the event
loop, the write time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncckpt

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator
    from types import FrameType

    from starlette.requests import Request

DIM = 64
"""Floats per embedding (one row of the table)."""
BINS = 8
"""Entries per counter array."""

logger = logging.getLogger("service")


def make_state(table_mib: float, counters: int) -> dict[str, Any]:
    """The service's state, zeroed: what a first start serves and a restart restores into."""
    rows = max(1, int(table_mib * 2**20) // (DIM * 4))
    return {
        "table": np.zeros((rows, DIM), np.float32),
        "counters": [np.zeros(BINS, np.int64) for _ in range(counters)],
        "version": 0,
    }


class SnapshotService:
    """The state, the CheckpointManager that saves it, and the app that serves both.

    Every handler is an ``async def``: Starlette runs those on the event loop (a plain
    ``def`` would run in a worker thread), so no update runs while ``save()`` copies the
    state, and each snapshot holds whole updates only.
    """

    def __init__(
        self, directory: str, *, table_mib: float, counters: int, save_secs: float
    ) -> None:
        if not table_mib > 0:
            raise ValueError("table_mib must be > 0")
        if counters < 1:
            raise ValueError("counters must be >= 1")
        if not save_secs > 0:
            raise ValueError("save_secs must be > 0")
        self.directory = directory
        self.save_secs = save_secs
        self.state = make_state(table_mib, counters)
        self._manager: asyncckpt.CheckpointManager | None = None
        self.saved_on_exit = False
        """Whether the state's last version was durable when the service stopped."""

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/update", self.update, methods=["POST"]),
                Route("/statistics", self.statistics, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )

    @property
    def manager(self) -> asyncckpt.CheckpointManager:
        if self._manager is None:
            raise RuntimeError("the service is not running (its lifespan is not entered)")
        return self._manager

    def version(self) -> int:
        """The number of updates applied: the step ``save()`` labels a snapshot with, read
        at the instant it copies the state."""
        version: int = self.state["version"]
        return version

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # max_pending=0: at most one snapshot exists (being written); the state plus one
        # snapshot is the whole memory cost. "log": a failed write is logged and counted,
        # and the service keeps serving and saving.
        async with asyncckpt.CheckpointManager(
            self.directory, max_to_keep=3, max_pending=0, on_write_error="log"
        ) as manager:
            if manager.latest_step() is not None:
                self.state = await manager.restore(into=self.state)  # fills the arrays
                logger.info("restored version %d", self.version())
            # The buffers the snapshots copy into, made and touched in a worker thread
            # now, not by the first save while requests wait.
            await manager.reserve(self.state)
            self._manager = manager
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._save_periodically, manager)
                yield  # serving; uvicorn turns SIGINT and SIGTERM into this block's exit
                tg.cancel_scope.cancel()
            # uvicorn has drained the requests: the state changes no more. Save it unless
            # the newest durable checkpoint holds it already; the exit writes it.
            await manager.wait()
            if manager.latest_step() != self.version():
                await manager.save(self.state, self.version)
        self.saved_on_exit = manager.latest_step() == self.version()
        if not self.saved_on_exit:
            logger.error(
                "version %d was not saved (the newest checkpoint is step %s)",
                self.version(),
                manager.latest_step(),
            )

    async def _save_periodically(self, manager: asyncckpt.CheckpointManager) -> None:
        while True:
            await anyio.sleep(self.save_secs)
            # With max_pending=0 a save waits for the write in flight anyway; waiting here
            # first shows whether the state changed since the newest durable checkpoint (a
            # failed write left an older one: this saves again).
            await manager.wait()
            if manager.latest_step() != self.version():
                # A callable step is read when the snapshot is taken, after any wait: the
                # label is the version the snapshot holds, whatever ran meanwhile.
                await manager.save(self.state, self.version)

    async def update(self, request: Request) -> JSONResponse:
        """Apply one update (to row ``?row=K``, or one the version picks); return the
        new version."""
        table: np.ndarray[Any, np.dtype[np.float32]] = self.state["table"]
        counters: list[np.ndarray[Any, np.dtype[np.int64]]] = self.state["counters"]
        rows = len(table)
        version = self.version()
        try:
            row = int(request.query_params.get("row", (version * 7919) % rows))
        except ValueError:
            return JSONResponse({"error": "row must be an int"}, status_code=400)
        if not 0 <= row < rows:
            return JSONResponse({"error": f"row must be in [0, {rows})"}, status_code=400)
        # In place, as an online learner would: the table row, one counter, the version.
        table[row] += 1.0
        counters[row % len(counters)][version % BINS] += 1
        self.state["version"] = version + 1
        return JSONResponse({"version": version + 1})

    async def statistics(self, request: Request) -> JSONResponse:
        """The manager's counters and timings (``CheckpointManager.statistics()``)."""
        stats = self.manager.statistics()
        # Every field is JSON-ready but last_error, an exception: sent as its message.
        # (Field by field: dataclasses.asdict would deep-copy the exception first.)
        fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
        fields["last_error"] = None if stats.last_error is None else str(stats.last_error)
        return JSONResponse(fields)

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "version": self.version(),
                "latest_step": self.manager.latest_step(),
            }
        )


class Server(uvicorn.Server):
    """uvicorn's server; prints the URL once it accepts requests (the port if ``--port 0``)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"serving on http://{host}:{port}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="ckpt/service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--save-secs", type=float, default=5.0)
    parser.add_argument("--table-mib", type=float, default=4.0, help="the embedding table")
    parser.add_argument("--counters", type=int, default=100, help="how many counter arrays")
    args = parser.parse_args()
    # asyncckpt logs each save ("saving checkpoint for step N into P"), each commit ("... is
    # durable") at INFO, and a failed write at ERROR, on the "asyncckpt" logger.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s: %(message)s")
    service = SnapshotService(
        args.dir, table_mib=args.table_mib, counters=args.counters, save_secs=args.save_secs
    )
    server = Server(uvicorn.Config(service.app(), host=args.host, port=args.port))

    def stop(signum: int, frame: FrameType | None) -> None:
        # While it serves, uvicorn handles SIGINT and SIGTERM itself: a graceful shutdown,
        # which runs the lifespan's last save. Once stopped it raises the signal again for
        # the handler it found: this one, so that a stop that was asked for ends in the
        # exit status below (how the last save went), not in a death by signal. A signal
        # before uvicorn takes over stops it as soon as it has started.
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    server.run()
    sys.exit(0 if service.saved_on_exit else 1)


if __name__ == "__main__":
    main()
