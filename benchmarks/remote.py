"""Object-store benchmark: asyncckpt on S3 against obstore's raw requests and DCP, in one run.

A local S3 server (moto's ``ThreadedMotoServer`` on 127.0.0.1, a free port, in this process)
is started for the run, a bucket created on it with boto3, and the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...) pointed at it, so a URL alone reaches it; it
is stopped at the end and the variables restored (moto is told to keep objects in memory,
not in temporary files). moto is slow and its speed drifts (it serves each request in Python,
in this process, and answers a ranged GET by copying the whole object), so every figure
is compared only with figures of the same run, and the contenders take turns: each round
runs every write, then every read, and the order within each rotates from round to round.
The first round warms up (connections, buffers, the page cache) and is not counted; then
each figure is the median of ``repeats`` rounds, with min and max.

For each case (the state: ``(count, bytes per array)`` groups of float32 arrays), figures:

- ``save``: ``CheckpointManager("s3://bucket/prefix")``: ``save()`` then ``await
  manager.wait()`` (durable: the checkpoint uploaded, the state file written, the retired
  checkpoint deleted); ``stall`` is the manager's ``statistics().last_stall_secs``;
- ``restore_into``: ``restore(into=...)`` into existing arrays; ``restore``: into fresh ones;
- ``raw_put`` (the floor of ``save``): obstore's ``put`` of the arrays' bytes from the same
  buffers, one object, with ObjectStorage's part size and parts at once (one PUT when it
  fits one part);
- ``raw_get`` (the floor of a restore): obstore's ``get`` of that object, whole, into memory
  (one request; obstore's buffer, no copy into arrays); ``raw_get_ranges``: ``get_ranges``
  of it in part-sized ranges (obstore coalesces adjacent ranges: see its request count);
- ``ranged_gets``: the ranged GETs asyncckpt's ``restore(into=...)`` made (recorded in the
  warm-up round), replayed with obstore's ``get_range`` at the concurrency that restore had;
  ``ranged_gets_x8``: the same at 8 at once; ``ranged_gets_merged``: the same bytes in one
  ranged GET per reader. Not floors: they split a restore's time into what its requests cost
  on this server and what asyncckpt adds, and show what a plan of fewer requests would cost;
- ``restore_into_<plan>``: ``restore(into=...)`` with its read plan forced (``READ_PLANS``):
  16 MiB per ranged GET (the library's), 64 MiB, one ranged GET per reader (a reader's whole
  share), and one reader making one ranged GET; how a restore's time follows its request
  count on this server, and what a larger range would buy;
- ``memory_raw_put`` / ``memory_save`` / ``memory_restore_into``: obstore's put and
  asyncckpt's save and restore on an in-memory store (``memory://``, obstore's
  ``MemoryStore``): the client's own cost, without a server;
- ``dcp_save`` / ``dcp_load``: PyTorch DCP's ``FsspecWriter`` / ``FsspecReader`` (s3fs) on
  the same server, ``dcp.save`` / ``dcp.load`` into existing tensors in one process
  (``no_dist``), with DCP's defaults but ``sync_files=False`` (on a stream without a file
  descriptor DCP's fsync falls back to ``os.sync()`` of the whole machine, which an S3 PUT
  does not need); "skipped: <reason>" where torch.distributed.checkpoint or s3fs does not
  import.

Then, once per run (``api``; on asyncio only), obstore's asyncio API (``put_async``,
``get_async``) against its sync API with one worker-thread hop per call, the path
ObjectStorage takes on asyncio and trio: a 256 MiB object (the 256MiB case's arrays) put
in parts and got whole, and 1,000 objects of 4 KiB put and got 8 at a time (ObjectStorage's
``max_concurrency``), on the server and on an in-memory store; ratios ``sync / async``.

Every request the server answers is logged (a WSGI wrapper around moto's application):
its kind (PUT, upload part, ranged GET...), when it began and ended, its bytes. For each
figure the report gives the requests of its last round by kind, the median time the server
took per request of each kind (until its last byte was sent), how long at least one
request was at the server (``busy``) and for how long none was (``client``: the client's
own work: for asyncckpt the snapshot copy, checksums, header, Python per request). After
the warm-up round every contender's data is compared with the state.

Targets (issue 16): ``save / raw_put`` and ``restore_into / raw_get`` (and ``restore /
raw_get``) at most 1.2.

Usage::

    python -m benchmarks.remote                   # 256 MiB in 64 arrays; many small arrays
    python -m benchmarks.remote --smoke           # tiny sizes, a few seconds
    python -m benchmarks.remote --cases '' --repeats 3   # the API comparison alone
    python -m benchmarks.remote --cases 256MiB --no-api  # one case, no API comparison
    python -m benchmarks.remote --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import itertools
import statistics
import sys
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import numpy as np

from asyncckpt import CheckpointManager, latest_checkpoint, testing

from . import _peers
from ._report import targets_table, version_of, write_report

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator

__all__ = [
    "CASES",
    "RATIO_TARGET",
    "REPEATS",
    "SMOKE_CASES",
    "SMOKE_REPEATS",
    "LocalS3",
    "Request",
    "RequestLog",
    "local_s3",
    "main",
    "markdown",
    "run_remote",
    "targets",
    "unavailable",
]

MiB: Final = 1024 * 1024
State = dict[str, np.ndarray[Any, Any]]

# name -> groups of (count, bytes per array)
CASES: Final[dict[str, list[tuple[int, int]]]] = {
    "256MiB": [(64, 256 * MiB // 64)],
    "many-small": [(10_000, 4096), (4, 16 * MiB)],
}
SMOKE_CASES: Final[dict[str, list[tuple[int, int]]]] = {
    "smoke-10MiB": [(5, 2 * MiB)],  # over one 8 MiB part: a multipart upload of two parts
    "smoke-small": [(100, 4096), (2, 64 * 1024)],
}
REPEATS: Final = 3
SMOKE_REPEATS: Final = 1
RATIO_TARGET: Final = 1.2
"""Issue 16: save at most this times obstore's raw put, restore at most this times its get."""
API_SIZES: Final = {"big": (64, 256 * MiB // 64), "small": (1000, 4096)}
"""The ``api`` comparison: one object of ``count x bytes`` (the 256MiB case's arrays, as
one multipart upload), and ``count`` objects of ``bytes``."""
SMOKE_API_SIZES: Final = {"big": (5, 2 * MiB), "small": (100, 4096)}
APIS: Final = ("async", "sync")
"""obstore's asyncio API (``put_async``, ``get_async``) and its sync API in worker threads."""
BUCKET: Final = "asyncckpt-bench"
MOTO_BUFFER_BYTES: Final = 4 * 1024 * MiB
"""Objects up to this size stay in moto's memory (``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``)."""
WIDE: Final = 8
"""The concurrency of the ``ranged_gets_x8`` replay (ObjectStorage's parts at once)."""
READ_PLANS: Final[dict[str, tuple[int | None, int | None]]] = {
    "16MiB": (16 * MiB, None),
    "64MiB": (64 * MiB, None),
    "per_reader": (None, None),
    "one_reader": (None, 1),
}
"""The ``restore_into_<plan>`` figures: (bytes per ranged GET, None: a reader's whole share;
readers, None: the default, one per core)."""


@contextlib.contextmanager
def _read_plan(batch_bytes: int | None, readers: int | None) -> Iterator[None]:
    """Make restores in this block read ``batch_bytes`` per ranged GET (None: each reader's
    whole share in one) with ``readers`` readers (None: the default).

    The plan is not an option of the library (no user should need one), so the benchmark
    sets the module's globals for the length of one figure; restores are the only thing
    running then.
    """
    from asyncckpt._checkpoint import _file

    values: dict[str, Any] = {"_READ_BATCH_BYTES": batch_bytes or sys.maxsize}
    if readers is not None:
        values["_read_threads"] = lambda: readers
    saved = {name: getattr(_file, name) for name in values}
    for name, value in values.items():
        setattr(_file, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_file, name, value)


def _object_storage_defaults() -> tuple[int, int]:
    """ObjectStorage's part size and parts at once, read from its signature so that the raw
    floor keeps following them."""
    from asyncckpt._storage._object import ObjectStorage

    parameters = inspect.signature(ObjectStorage).parameters
    return int(parameters["part_bytes"].default), int(parameters["max_concurrency"].default)


# -- the server ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One request the server answered."""

    kind: str
    path: str
    began: float
    ended: float
    received: int
    sent: int
    range: str | None


def _kind(environ: dict[str, Any]) -> str:
    method = str(environ["REQUEST_METHOD"])
    params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if method == "PUT":
        return "upload part" if "partNumber" in params else "put"
    if method == "POST":
        if "uploads" in params:
            return "create multipart"
        if "uploadId" in params:
            return "complete multipart"
        return "delete objects" if "delete" in params else "post"
    if method == "GET":
        if environ.get("HTTP_RANGE"):
            return "ranged get"
        return "get" if "/" in environ.get("PATH_INFO", "").strip("/") else "list"
    if method == "DELETE":
        return "abort multipart" if "uploadId" in params else "delete"
    return method.lower()


class RequestLog:
    """A WSGI wrapper that records every request: its kind, when it began and when its
    response's last byte was handed to the socket, and its bytes."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._requests: list[Request] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        began = time.perf_counter()
        sent = 0
        body = self._app(environ, start_response)
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            request = Request(
                kind=_kind(environ),
                path=environ.get("PATH_INFO", ""),
                began=began,
                ended=time.perf_counter(),
                received=int(environ.get("CONTENT_LENGTH") or 0),
                sent=sent,
                range=environ.get("HTTP_RANGE"),
            )
            with self._lock:
                self._requests.append(request)

    def between(self, start: float, end: float) -> list[Request]:
        """The requests that began in ``[start, end]`` (a request is logged when its last
        byte is sent, a moment after its client may have returned: select by when it began)."""
        with self._lock:
            return [r for r in self._requests if start <= r.began <= end]


@dataclass(frozen=True, slots=True)
class LocalS3:
    """A bucket on the local S3 server, and the log of the requests it answers."""

    endpoint: str
    bucket: str
    log: RequestLog


@contextlib.contextmanager
def local_s3(bucket: str = BUCKET) -> Iterator[LocalS3]:
    """``asyncckpt.testing.local_s3`` with every request logged, and objects kept in memory."""
    logs: list[RequestLog] = []

    def logged(app: Any) -> RequestLog:
        logs.append(RequestLog(app))
        return logs[-1]

    # moto keeps an object over ~5 MiB in a temporary file (a disk write per upload, noise
    # from whatever else writes to this machine's disk); this keeps them in memory. Read when
    # each object is made: set while the server serves.
    environment = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(MOTO_BUFFER_BYTES)}
    with testing.local_s3(bucket, environment=environment, middleware=logged) as s3:
        yield LocalS3(s3.endpoint, s3.bucket, logs[0])


# -- what the requests show -----------------------------------------------------------------------


def _busy(requests: list[Request], start: float, end: float) -> tuple[float, int]:
    """(how long at least one request was at the server within [start, end], the most at
    once)."""
    spans = sorted((max(r.began, start), min(r.ended, end)) for r in requests)
    busy, reach = 0.0, start
    for began, ended in spans:
        if ended > reach:
            busy += ended - max(began, reach)
            reach = ended
    events = sorted([(r.began, 1) for r in requests] + [(r.ended, -1) for r in requests])
    most = now = 0
    for _moment, change in events:
        now += change
        most = max(most, now)
    return busy, most


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _profile(windows: list[tuple[float, float, list[Request]]]) -> dict[str, Any]:
    """The requests of one figure's timed rounds: the last round's counts by kind, the
    median latency per kind over every round, busy and client-only time."""
    busy, client, most = [], [], 0
    latency: dict[str, list[float]] = {}
    for start, end, requests in windows:
        spent, peak = _busy(requests, start, end)
        busy.append(spent)
        client.append(end - start - spent)
        most = max(most, peak)
        for r in requests:
            latency.setdefault(r.kind, []).append(r.ended - r.began)
    last = windows[-1][2]
    counts: dict[str, int] = {}
    for r in last:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return {
        "requests": dict(sorted(counts.items())),
        "latency_s": {kind: statistics.median(v) for kind, v in sorted(latency.items())},
        "bytes_sent": sum(r.received for r in last),
        "bytes_received": sum(r.sent for r in last),
        "busy_s": _summary(busy),
        "client_s": _summary(client),
        "most_at_once": most,
    }


# -- the contenders -----------------------------------------------------------------------------


def _state(groups: list[tuple[int, int]]) -> State:
    rng = np.random.default_rng(0)
    return {
        f"g{group}_{i:05d}": rng.standard_normal(max(nbytes // 4, 1), dtype=np.float32)
        for group, (count, nbytes) in enumerate(groups)
        for i in range(count)
    }


def _views(state: State) -> list[memoryview]:
    return [value.data.cast("B") for value in state.values()]


def _delete_prefix(store: Any, prefix: str) -> None:
    obstore = importlib.import_module("obstore")
    for batch in obstore.list(store, prefix):
        for meta in batch:
            obstore.delete(store, meta["path"])


def _parse_range(header: str) -> tuple[int, int]:
    """``bytes=a-b`` as ``(a, b + 1)``."""
    first, _, last = header.partition("=")[2].partition("-")
    return int(first), int(last) + 1


class _Dcp:
    """PyTorch DCP's FsspecWriter / FsspecReader (s3fs) on the local server, in one process."""

    def __init__(self, state: State, endpoint: str) -> None:
        torch = importlib.import_module("torch")
        self._dcp = importlib.import_module("torch.distributed.checkpoint")
        fsspec = importlib.import_module("torch.distributed.checkpoint._fsspec_filesystem")
        self._writer, self._reader = fsspec.FsspecWriter, fsspec.FsspecReader
        self._tensors = {k: torch.from_numpy(v) for k, v in state.items()}  # the same bytes
        self.into = {k: torch.empty_like(v) for k, v in self._tensors.items()}
        self._options = {"endpoint_url": endpoint}

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming the intent is to save in a single
            # process": that is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def save(self, url: str) -> None:
        # sync_files=False: on an s3fs stream (no fileno) DCP's fsync falls back to
        # os.sync() of the whole machine; a completed S3 upload is durable without it.
        writer = self._writer(url, sync_files=False, **self._options)
        with self._quiet():
            self._dcp.save(self._tensors, storage_writer=writer, no_dist=True)

    def load(self, url: str) -> None:
        reader = self._reader(url, **self._options)
        with self._quiet():
            self._dcp.load(self.into, storage_reader=reader, no_dist=True)


def _dcp_reason() -> str | None:
    for module in ("torch.distributed.checkpoint", "s3fs"):
        reason = _peers.available(module)
        if reason:
            return reason
    return None


def _key(url: str | None, bucket: str) -> str:
    """The object key of a checkpoint URL in ``bucket``."""
    prefix = f"s3://{bucket}/"
    if url is None or not url.startswith(prefix):
        raise RuntimeError(f"no checkpoint in s3://{bucket} ({url!r})")
    return url[len(prefix) :]


def _rotate(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


async def _case(
    name: str, groups: list[tuple[int, int]], repeats: int, s3: LocalS3
) -> dict[str, Any]:
    obstore = importlib.import_module("obstore")
    stores = importlib.import_module("obstore.store")
    part_bytes, max_concurrency = _object_storage_defaults()
    store = stores.from_url(f"s3://{s3.bucket}")
    memory = stores.MemoryStore()
    state = _state(groups)
    views = _views(state)
    total = sum(len(v) for v in views)
    raw_key = f"raw/{name}"
    directory = f"s3://{s3.bucket}/asyncckpt/{name}"
    into = {k: np.empty_like(v) for k, v in state.items()}
    into_memory = {k: np.empty_like(v) for k, v in state.items()}
    dcp_reason = _dcp_reason()
    dcp: _Dcp | None = None
    if dcp_reason is None:
        try:
            dcp = _Dcp(state, s3.endpoint)
        except Exception as exc:
            dcp_reason = f"failed ({type(exc).__name__}: {exc})"
    windows: dict[str, list[tuple[float, float]]] = {}
    samples: dict[str, list[float]] = {}
    stalls: list[float] = []
    replay: dict[str, Any] = {}  # the key, ranges and concurrency of restore(into=)
    round_no = 0

    def put(target: Any) -> None:
        obstore.put(
            target,
            raw_key,
            views,
            use_multipart=total > part_bytes,
            chunk_size=part_bytes,
            max_concurrency=max_concurrency,
        )

    def raw_get() -> None:
        obstore.get(store, raw_key).bytes()

    def raw_get_ranges() -> None:
        starts = list(range(0, total, part_bytes))
        ends = [min(start + part_bytes, total) for start in starts]
        obstore.get_ranges(store, raw_key, starts=starts, ends=ends)

    def gets(ranges: list[tuple[int, int]], concurrency: int) -> None:
        def get(span: tuple[int, int]) -> None:
            obstore.get_range(store, replay["key"], start=span[0], end=span[1])

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(get, ranges))

    def merged() -> list[tuple[int, int]]:
        """The restore's bytes in one range per reader (``concurrency`` equal spans)."""
        low = min(start for start, _end in replay["ranges"])
        high = max(end for _start, end in replay["ranges"])
        cuts = np.linspace(low, high, replay["concurrency"] + 1).astype(int).tolist()
        return list(itertools.pairwise(cuts))

    async with (
        CheckpointManager(directory, max_to_keep=1) as manager,
        CheckpointManager(f"memory://{s3.bucket}-{name}/asyncckpt", max_to_keep=1) as mem,
    ):

        async def save() -> None:
            await manager.save(state, round_no + 1)
            await manager.wait()
            stall = manager.statistics().last_stall_secs
            if stall is not None and round_no:
                stalls.append(stall)

        async def memory_save() -> None:
            await mem.save(state, round_no + 1)
            await mem.wait()

        async def restore_into() -> None:
            await manager.restore(into=into)

        async def restore() -> None:
            await manager.restore()

        async def memory_restore_into() -> None:
            await mem.restore(into=into_memory)

        def planned(plan: str) -> Callable[[], Awaitable[None]]:
            async def restore_into_planned() -> None:
                with _read_plan(*READ_PLANS[plan]):
                    await manager.restore(into=into)

            return restore_into_planned

        def dcp_url(round_: int) -> str:
            return f"s3://{s3.bucket}/dcp/{name}/{round_}"

        ops: dict[str, Callable[[], Awaitable[None] | None]] = {
            "raw_put": lambda: put(store),
            "save": save,
            # restore_into first: the warm-up round records its requests for the replays
            "restore_into": restore_into,
            "restore": restore,
            "raw_get": raw_get,
            "raw_get_ranges": raw_get_ranges,
            "ranged_gets": lambda: gets(replay["ranges"], replay["concurrency"]),
            "ranged_gets_x8": lambda: gets(replay["ranges"], WIDE),
            "ranged_gets_merged": lambda: gets(merged(), replay["concurrency"]),
            "memory_raw_put": lambda: put(memory),
            "memory_save": memory_save,
            "memory_restore_into": memory_restore_into,
            **{f"restore_into_{plan}": planned(plan) for plan in READ_PLANS},
        }
        writes = ["raw_put", "save", "memory_raw_put", "memory_save", "dcp_save"]
        reads = [
            "restore_into",
            "restore",
            "raw_get",
            "raw_get_ranges",
            "memory_restore_into",
            "dcp_load",
            *(f"restore_into_{plan}" for plan in READ_PLANS),
        ]
        replays = ["ranged_gets", "ranged_gets_x8", "ranged_gets_merged"]
        if dcp is not None:
            driver = dcp
            ops["dcp_save"] = lambda: driver.save(dcp_url(round_no))
            ops["dcp_load"] = lambda: driver.load(dcp_url(round_no))

        for round_no in range(repeats + 1):
            order = _rotate(writes, round_no) + (
                _rotate(reads + replays, round_no) if round_no else reads
            )
            for op in order:
                if op not in ops:  # DCP, after it failed
                    continue
                checked = not round_no and op.startswith("restore_into")
                if checked:  # each read plan must fill every array: start from zeros
                    for array in into.values():
                        array.fill(0)
                start = time.perf_counter()
                try:
                    result = ops[op]()
                    if result is not None:
                        await result
                except Exception as exc:
                    if not op.startswith("dcp_"):
                        raise
                    # A peer that fails is reported, as the local peers are, not fatal.
                    dcp, dcp_reason = None, f"failed in {op} ({type(exc).__name__}: {exc})"
                    for key in ("dcp_save", "dcp_load"):
                        ops.pop(key)
                        samples.pop(key, None)
                        windows.pop(key, None)
                    continue
                end = time.perf_counter()
                if checked and not all(np.array_equal(into[k], state[k]) for k in state):
                    raise RuntimeError(f"{op} did not restore the state saved")
                if round_no:
                    samples.setdefault(op, []).append(end - start)
                    windows.setdefault(op, []).append((start, end))
                if op == "save":  # the replays read the checkpoint just written
                    replay["key"] = _key(latest_checkpoint(directory), s3.bucket)
                elif op == "restore_into" and not round_no:
                    ranged = [
                        r for r in s3.log.between(start, end) if r.kind == "ranged get" and r.range
                    ]
                    replay["ranges"] = [_parse_range(r.range or "") for r in ranged]
                    replay["concurrency"] = _busy(ranged, start, end)[1]
            if round_no == 0:
                restored = {"s3": into, "s3, fresh": await manager.restore(), "memory": into_memory}
                _check(state, store, raw_key, restored, dcp)
                del restored
            # Each DCP save goes to a new prefix (DCP warns about overwriting): free the last.
            await anyio.to_thread.run_sync(_delete_prefix, store, f"dcp/{name}/")
        checkpoint_bytes = obstore.head(store, replay["key"])["size"]
    for prefix in (f"asyncckpt/{name}/", f"dcp/{name}/"):
        await anyio.to_thread.run_sync(_delete_prefix, store, prefix)
    obstore.delete(store, raw_key)

    await anyio.sleep(0.2)  # the last responses are logged
    seconds = {op: _summary(samples[op]) for op in ops}
    seconds["stall"] = _summary(stalls)
    requests = {
        op: _profile([(s, e, s3.log.between(s, e)) for s, e in windows[op]])
        for op in ops
        if not op.startswith("memory_")
    }

    def ratio(a: str, b: str) -> float:
        return float(seconds[a]["median"] / seconds[b]["median"])

    ratios = {
        "save / raw_put": ratio("save", "raw_put"),
        "restore_into / raw_get": ratio("restore_into", "raw_get"),
        "restore / raw_get": ratio("restore", "raw_get"),
        "restore_into / ranged_gets": ratio("restore_into", "ranged_gets"),
        "ranged_gets / raw_get": ratio("ranged_gets", "raw_get"),
        "ranged_gets_x8 / raw_get": ratio("ranged_gets_x8", "raw_get"),
        "ranged_gets_merged / raw_get": ratio("ranged_gets_merged", "raw_get"),
        "raw_get_ranges / raw_get": ratio("raw_get_ranges", "raw_get"),
        "memory_save / memory_raw_put": ratio("memory_save", "memory_raw_put"),
        **{
            f"restore_into_{plan} / raw_get": ratio(f"restore_into_{plan}", "raw_get")
            for plan in READ_PLANS
        },
    }
    if dcp is not None:
        ratios |= {
            "dcp_save / raw_put": ratio("dcp_save", "raw_put"),
            "dcp_load / raw_get": ratio("dcp_load", "raw_get"),
            "save / dcp_save": ratio("save", "dcp_save"),
            "restore_into / dcp_load": ratio("restore_into", "dcp_load"),
        }
    return {
        "case": name,
        "bytes": total,
        "checkpoint_bytes": checkpoint_bytes,
        "arrays": len(state),
        "part_bytes": part_bytes,
        "max_concurrency": max_concurrency,
        "restore_concurrency": replay["concurrency"],
        "dcp": "measured" if dcp is not None else f"skipped: {dcp_reason}",
        "seconds": seconds,
        "requests": requests,
        "ratios": ratios,
    }


async def _api(sizes: dict[str, tuple[int, int]], repeats: int, s3: LocalS3) -> dict[str, Any]:
    """obstore's asyncio API against its sync API called in worker threads (ObjectStorage's
    path on every backend), on asyncio, in one run: one large object put (multipart, with
    ObjectStorage's part size and parts at once) and got whole, and many small objects put
    and got ``max_concurrency`` at a time (ObjectStorage's bound on requests at once), on
    the local server and, for the small ones, on an in-memory store (the client's cost per
    call, without a server).

    Both APIs get the same loop of calls: ``max_concurrency`` tasks, each taking its share
    of the keys one call at a time; the sync one makes one ``anyio.to_thread.run_sync`` hop
    per call, as ObjectStorage does, under a limiter of that many threads.
    """
    obstore = importlib.import_module("obstore")
    stores = importlib.import_module("obstore.store")
    part_bytes, max_concurrency = _object_storage_defaults()
    targets = {"s3": stores.from_url(f"s3://{s3.bucket}"), "memory": stores.MemoryStore()}
    big_count, big_bytes = sizes["big"]
    big = _views(_state([(big_count, big_bytes)]))
    big_total = sum(len(v) for v in big)
    small_count, small_bytes = sizes["small"]
    small = np.random.default_rng(1).bytes(small_bytes)
    limiter = anyio.CapacityLimiter(max_concurrency)
    got: dict[str, list[Any]] = {}

    def keys(api: str) -> list[str]:
        return [f"api/small-{api}/{i:05d}" for i in range(small_count)]

    async def spread(call: Callable[[str], Awaitable[Any]], names: list[str]) -> None:
        async def worker(mine: list[str]) -> None:
            for name in mine:
                await call(name)

        async with anyio.create_task_group() as tasks:
            for i in range(max_concurrency):
                tasks.start_soon(worker, names[i::max_concurrency])

    def big_put(api: str) -> Callable[[], Awaitable[Any]]:
        store, key = targets["s3"], f"api/big-{api}"
        options = {
            "use_multipart": big_total > part_bytes,
            "chunk_size": part_bytes,
            "max_concurrency": max_concurrency,
        }
        if api == "async":
            return lambda: obstore.put_async(store, key, big, **options)
        return lambda: anyio.to_thread.run_sync(
            lambda: obstore.put(store, key, big, **options), limiter=limiter
        )

    def big_get(api: str) -> Callable[[], Awaitable[Any]]:
        store, key = targets["s3"], f"api/big-{api}"

        async def get_async() -> None:
            got[f"{api}_get_big"] = [await (await obstore.get_async(store, key)).bytes_async()]

        async def get_sync() -> None:
            got[f"{api}_get_big"] = [
                await anyio.to_thread.run_sync(
                    lambda: obstore.get(store, key).bytes(), limiter=limiter
                )
            ]

        return get_async if api == "async" else get_sync

    def small_put(api: str, where: str) -> Callable[[], Awaitable[Any]]:
        store = targets[where]

        async def put_async(key: str) -> None:
            await obstore.put_async(store, key, small)

        async def put_sync(key: str) -> None:
            await anyio.to_thread.run_sync(obstore.put, store, key, small, limiter=limiter)

        return lambda: spread(put_async if api == "async" else put_sync, keys(api))

    def small_get(api: str, where: str) -> Callable[[], Awaitable[Any]]:
        store = targets[where]
        out: list[Any] = []
        got[f"{where}_{api}_get_small"] = out

        async def get_async(key: str) -> None:
            out.append(await (await obstore.get_async(store, key)).bytes_async())

        def get_one(key: str) -> Any:
            return obstore.get(store, key).bytes()

        async def get_sync(key: str) -> None:
            out.append(await anyio.to_thread.run_sync(get_one, key, limiter=limiter))

        async def run() -> None:
            out.clear()
            await spread(get_async if api == "async" else get_sync, keys(api))

        return run

    ops: dict[str, Callable[[], Awaitable[Any]]] = {}
    for api in APIS:
        ops[f"{api}_put_big"] = big_put(api)
        ops[f"{api}_put_small"] = small_put(api, "s3")
        ops[f"memory_{api}_put_small"] = small_put(api, "memory")
    writes = list(ops)
    for api in APIS:
        ops[f"{api}_get_big"] = big_get(api)
        ops[f"{api}_get_small"] = small_get(api, "s3")
        ops[f"memory_{api}_get_small"] = small_get(api, "memory")
    reads = [op for op in ops if op not in writes]
    samples: dict[str, list[float]] = {}
    windows: dict[str, list[tuple[float, float]]] = {}
    for round_no in range(repeats + 1):
        for op in _rotate(writes, round_no) + _rotate(reads, round_no):
            start = time.perf_counter()
            await ops[op]()
            end = time.perf_counter()
            if round_no:
                samples.setdefault(op, []).append(end - start)
                windows.setdefault(op, []).append((start, end))
        if round_no == 0:
            whole = b"".join(big)
            for api in APIS:
                if bytes(got[f"{api}_get_big"][0]) != whole:
                    raise RuntimeError(f"obstore's {api} get did not return the bytes put")
                for where in targets:
                    found = got[f"{where}_{api}_get_small"]
                    if len(found) != small_count or any(bytes(b) != small for b in found):
                        raise RuntimeError(f"obstore's {api} gets ({where}) did not return them")
        got.clear()
    await anyio.to_thread.run_sync(_delete_prefix, targets["s3"], "api/")

    await anyio.sleep(0.2)  # the last responses are logged
    seconds = {op: _summary(samples[op]) for op in ops}
    med = {op: statistics.median(samples[op]) for op in ops}
    ratios = {
        f"sync_{what} / async_{what}": med[f"sync_{what}"] / med[f"async_{what}"]
        for what in ("put_big", "get_big", "put_small", "get_small")
    } | {
        f"memory_sync_{what} / memory_async_{what}": (
            med[f"memory_sync_{what}"] / med[f"memory_async_{what}"]
        )
        for what in ("put_small", "get_small")
    }
    return {
        "big": {"count": big_count, "bytes": big_total},
        "small": {"count": small_count, "bytes": small_bytes},
        "max_concurrency": max_concurrency,
        "part_bytes": part_bytes,
        "seconds": seconds,
        "requests": {
            op: _profile([(s, e, s3.log.between(s, e)) for s, e in windows[op]])
            for op in ops
            if not op.startswith("memory_")
        },
        "ratios": ratios,
    }


def _check(
    state: State, store: Any, raw_key: str, restored: dict[str, Any], dcp: _Dcp | None
) -> None:
    """After the warm-up round: every contender read back the state's bytes.

    Raises:
        RuntimeError: one did not.
    """
    obstore = importlib.import_module("obstore")
    if bytes(obstore.get(store, raw_key).bytes()) != b"".join(_views(state)):
        raise RuntimeError("obstore's raw get did not return the bytes put")
    for what, tree in restored.items():
        if set(tree) != set(state) or not all(np.array_equal(tree[k], state[k]) for k in state):
            raise RuntimeError(f"asyncckpt's restore ({what}) did not return the state saved")
    if dcp is not None and not all(np.array_equal(dcp.into[k].numpy(), state[k]) for k in state):
        raise RuntimeError("DCP's load did not return the state saved")


def unavailable() -> str | None:
    """None when the benchmark can run (obstore, moto's server and boto3 import), else why not."""
    for module in ("obstore", "moto.server", "boto3"):
        reason = _peers.available(module)
        if reason:
            return reason
    return None


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def run_remote(
    *,
    smoke: bool = False,
    repeats: int | None = None,
    cases: list[str] | None = None,
    api: bool = True,
) -> dict[str, Any]:
    """Start the local S3 server, measure every case (``cases=[]``: none) and, with ``api``,
    obstore's asyncio API against its sync one; stop it; return the report.

    Raises:
        ValueError: an unknown case name.
    """
    table = SMOKE_CASES if smoke else CASES
    names = list(table) if cases is None else cases
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {sorted(table)}")
    repeats = repeats or (SMOKE_REPEATS if smoke else REPEATS)
    began = time.monotonic()
    api_report: dict[str, Any] | str = "not measured"
    with local_s3() as s3:
        results = [await _case(name, table[name], repeats, s3) for name in names]
        if api and _on_asyncio():
            api_report = await _api(SMOKE_API_SIZES if smoke else API_SIZES, repeats, s3)
        elif api:
            api_report = "skipped: obstore's async API needs an asyncio loop"
    return {
        "server": "moto's S3 server on 127.0.0.1, in this process (asyncckpt.testing.local_s3)",
        "versions": {
            dist: version_of(dist) for dist in ("obstore", "moto", "s3fs", "torch", "boto3")
        },
        "repeats": repeats,
        "cases": results,
        "api": api_report,
        "seconds": round(time.monotonic() - began, 2),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's targets, each with the measured value, the limit and met / missed."""
    out: list[dict[str, Any]] = []
    for case in report["cases"]:
        for key in ("save / raw_put", "restore_into / raw_get", "restore / raw_get"):
            value = case["ratios"][key]
            out.append(
                {
                    "case": f"s3 {case['case']}",
                    "target": f"{key} <= {RATIO_TARGET}",
                    "value": value,
                    "limit": RATIO_TARGET,
                    "met": value <= RATIO_TARGET,
                }
            )
    return out


def _fmt(figure: dict[str, float]) -> str:
    return f"{figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]"


_LABELS: Final = {
    "raw_put": "obstore put (floor of save)",
    "save": "asyncckpt save -> wait (durable)",
    "stall": "asyncckpt stall (save() blocked the loop)",
    "dcp_save": "DCP FsspecWriter save",
    "raw_get": "obstore get, whole (floor of restore)",
    "raw_get_ranges": "obstore get_ranges, part-sized",
    "ranged_gets": "asyncckpt restore's ranged GETs, replayed",
    "ranged_gets_x8": f"the same, {WIDE} at once",
    "ranged_gets_merged": "the same bytes, one ranged GET per reader",
    "memory_raw_put": "obstore put, in-memory store",
    "memory_save": "asyncckpt save -> wait, memory://",
    "memory_restore_into": "asyncckpt restore(into=), memory://",
    "restore_into": "asyncckpt restore(into=)",
    "restore": "asyncckpt restore() (fresh arrays)",
    "restore_into_16MiB": "restore(into=), 16 MiB per ranged GET",
    "restore_into_64MiB": "restore(into=), 64 MiB per ranged GET",
    "restore_into_per_reader": "restore(into=), one ranged GET per reader",
    "restore_into_one_reader": "restore(into=), one reader, one ranged GET",
    "dcp_load": "DCP FsspecReader load (into tensors)",
}


_API_LABELS: Final = {
    "put_big": "put, one object (multipart)",
    "get_big": "get, one object, whole",
    "put_small": "put, small objects",
    "get_small": "get, small objects",
}


def _api_markdown(api: dict[str, Any] | str) -> list[str]:
    """The async-against-sync table: each figure's seconds and sync / async."""
    if isinstance(api, str):
        return ["", f"obstore's asyncio API against its sync API in threads: {api}."]
    big, small = api["big"], api["small"]
    sizes = {
        "big": f"{big['bytes'] / MiB:.0f} MiB",
        "small": f"{small['count']} x {small['bytes'] / 1024:.0f} KiB, "
        f"{api['max_concurrency']} at once",
    }
    lines = [
        "",
        "obstore's asyncio API (`put_async`, `get_async`) against its sync API, one worker-"
        "thread hop per call (ObjectStorage's path on asyncio and trio), on asyncio. Seconds; "
        "sync / async above 1: the threads are slower. Client: median time no request was at "
        "the server (the client's own work, async / sync).",
        "",
        "| store | figure | async | sync in threads | sync / async | client |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for where, prefix in (("s3", ""), ("memory://", "memory_")):
        for what, label in _API_LABELS.items():
            key = f"{prefix}async_{what}"
            if key not in api["seconds"]:
                continue
            size = sizes["big" if what.endswith("big") else "small"]
            ratio = api["ratios"][f"{prefix}sync_{what} / {prefix}async_{what}"]
            client = "-"
            if key in api["requests"]:
                client = " / ".join(
                    f"{api['requests'][f'{side}_{what}']['client_s']['median']:.3f}"
                    for side in APIS
                )
            lines.append(
                f"| {where} | {label} ({size}) | {_fmt(api['seconds'][key])} | "
                f"{_fmt(api['seconds'][f'{prefix}sync_{what}'])} | {ratio:.2f} | {client} |"
            )
    return lines


def markdown(report: dict[str, Any], *, with_targets: bool = True) -> str:
    """The figures and the request profile as Markdown tables, and (``with_targets``) the
    table of targets."""
    lines = [
        f"Object stores ({report['server']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f"): median [min, max] of {report['repeats']} rounds after a warm-up round, "
        f"{report['seconds']:.0f} s in all. Seconds.",
        "",
        "| case | figure | seconds | ratios |",
        "| --- | --- | --- | --- |",
    ]
    for case in report["cases"]:
        name = f"{case['case']} ({case['bytes'] / MiB:.0f} MiB, {case['arrays']} arrays)"
        for op, figure in case["seconds"].items():
            ratio = "; ".join(
                f"/ {key.split(' / ')[1]}: {value:.2f}"
                for key, value in case["ratios"].items()
                if key.split(" / ")[0] == op
            )
            lines.append(f"| {name} | {_LABELS.get(op, op)} | {_fmt(figure)} | {ratio} |")
        if case["dcp"] != "measured":
            lines.append(f"| {name} | DCP FsspecWriter / FsspecReader | {case['dcp']} | |")
    lines += [
        "",
        "Requests of each figure's last round (kind: count), the server's median time per "
        "request of each kind over all rounds (ms), and the time at least one request was at "
        "the server (busy) or none was (client), median seconds.",
        "",
        "| case | figure | requests | ms per request | busy | client | most at once |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in report["cases"]:
        for op, profile in case["requests"].items():
            counts = ", ".join(f"{k}: {v}" for k, v in profile["requests"].items())
            latency = ", ".join(f"{k}: {v * 1e3:.0f}" for k, v in profile["latency_s"].items())
            lines.append(
                f"| {case['case']} | {op} | {counts} | {latency} | "
                f"{profile['busy_s']['median']:.3f} | {profile['client_s']['median']:.3f} | "
                f"{profile['most_at_once']} |"
            )
    lines += _api_markdown(report.get("api", "not measured"))
    if not with_targets:
        return "\n".join(lines) + "\n"
    lines += targets_table(targets(report))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the object-store benchmark and print the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated: {', '.join(CASES)} (smoke: {', '.join(SMOKE_CASES)})",
    )
    parser.add_argument("--repeats", type=int, default=None, help=f"rounds (default {REPEATS})")
    parser.add_argument(
        "--no-api",
        action="store_true",
        help="skip obstore's asyncio API against its sync API in threads",
    )
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    # --cases '' runs none (with the API comparison alone)
    cases = None if args.cases is None else [c for c in args.cases.split(",") if c]
    report = anyio.run(
        lambda: run_remote(smoke=args.smoke, repeats=args.repeats, cases=cases, api=not args.no_api)
    )
    report["targets"] = targets(report)
    write_report(report, args.json_path, args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
