"""Hostile input at scale: mutate valid checkpoint and state files, read each, check the outcome.

Run: ``python -m benchmarks.fuzz --inputs 100000 [--seed N] [--json PATH]``, or, with the
optional ``atheris`` installed, ``python -m benchmarks.fuzz --atheris [libFuzzer flags]``.

Each input is a mutation of one of a few valid files:

- checkpoints (about 85% of inputs): bit flips, byte overwrites, truncations, insertions,
  deletions, and headers re-encoded with *valid* CRCs (prelude layout of ``_format``) whose
  fields were replaced by hostile values (object dtypes, huge shapes, wrong offsets, deep
  trees, unknown tags ...), so that the checks behind the checksums are reached too. Each is
  read by ``Saver().restore`` on both read paths (streaming and ``mmap=True``).
- state files: the same byte mutations plus hostile lines with a recomputed checksum line,
  read by ``get_checkpoint_state`` and ``latest_checkpoint``. A changed state file may be
  accepted only when it lost its (optional, TensorFlow writes none) checksum line: counted.

A read must raise a ``CheckpointError`` subclass or succeed. A byte mutation of a checkpoint
that is read successfully is a failure (every byte is checked); a re-encoded header may be a
valid checkpoint (counted as ``accepted_reencoded``); a mutation that happens to leave the
bytes as they were is counted as ``unchanged_input_read_back``. Every read is timed (the maximum is
reported; a watchdog kills the run if one input takes ``--hang-secs``) and its peak
allocation is traced with ``tracemalloc`` (reported as the largest ratio of peak bytes to
the file's size, and as ``max_alloc_ratio_over_slack``: the part beyond ``--alloc-slack``
bytes of fixed overhead over the size; over ``--alloc-limit`` times the size plus the slack
is a failure). The JSON summary ends with ``failures`` (0 expected) and the first
few failing inputs, saved to ``--keep-dir`` for replay.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import faulthandler
import importlib
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import msgpack
import numpy as np

from asyncckpt import CheckpointError, Saver, get_checkpoint_state, latest_checkpoint
from asyncckpt._checkpoint._format import ALIGNMENT, MAGIC, PRELUDE_SIZE
from asyncckpt._checkpoint._state_file import CheckpointState, format_state
from asyncckpt._core._crc32c import crc32c

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

_PRELUDE = struct.Struct("<8sIIQII")
_CRC_LINE = re.compile(rb"(?:^|\n)# crc32c: [0-9a-f]{8}\s*$")


# -- the valid files --------------------------------------------------------------------------


def _states() -> list[Any]:
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8", (2,)), ("c", "|S3")])
    structured["a"] = [1, 2, 3]
    aligned = np.dtype({"names": ["x", "y"], "formats": ["<u2", "<f8"], "offsets": [0, 8]})
    return [
        {
            "weights": np.arange(600, dtype=np.float32).reshape(20, 30),
            "counts": np.arange(50, dtype=">i8"),
            "mask": np.array([True, False, True]),
            "when": np.array(["2024-01-01"], dtype="<M8[ms]"),
            "text": np.array(["ab", "cde"], dtype="<U3"),
            "empty": np.zeros((0, 5), np.float64),
            "scalar": np.float32(1.5),
            "raw": b"\x00\x01binary",
            "records": structured,
            "aligned": np.zeros(2, aligned),
            "python": [1, 2**70, -3.5, complex(1, -2), "s", None, True, (1, "t")],
            "nested": {"a": {"b": {"c": [np.int16(7)]}}, 5: "int key"},
        },
        {"step": 3, "name": "no arrays", "values": [1.0, float("inf"), -0.0], "d": {}},
        {"big": np.linspace(0, 1, 4096).astype(np.float64), "small": np.arange(3, dtype=np.uint8)},
    ]


async def _make_checkpoints(directory: str) -> list[tuple[bytes, Any]]:
    saver = Saver(max_to_keep=None)
    out = []
    for index, state in enumerate(_states()):
        path = await saver.save(
            state, os.path.join(directory, f"base{index}"), index, metadata={"i": index}
        )
        out.append((_read(path), await Saver().restore(path)))
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _make_state_file(directory: str) -> tuple[bytes, CheckpointState]:
    names = ("model.ckpt-1", "model.ckpt-2", "model.ckpt-3")
    for name in names:
        with open(os.path.join(directory, name), "wb"):
            pass
    state = CheckpointState(
        directory=directory,
        names=names,
        timestamps=(1.5, 2.5, 3.5),
        last_preserved_timestamp=1.0,
    )
    return format_state(state), state


# -- mutations ------------------------------------------------------------------------------


def _byte_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    buf = bytearray(data)
    kind = rng.choice(["bitflip", "overwrite", "truncate", "insert", "delete", "splice"])
    if not buf:
        return "insert", bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "bitflip":
        for _ in range(rng.choice([1, 1, 1, 2, 8])):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        i = rng.randrange(len(buf))
        n = rng.choice([1, 1, 2, 4, 8, 32])
        buf[i : i + n] = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(n))[
            : len(buf) - i
        ]
    elif kind == "truncate":
        del buf[rng.choice([rng.randrange(len(buf)), rng.randrange(min(len(buf), 64))]) :]
    elif kind == "insert":
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = bytes(rng.choice([0, rng.randrange(256)]) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        i = rng.randrange(len(buf))
        del buf[i : i + rng.randint(1, 64)]
    else:  # copy a chunk of the file over another place
        i, j, n = rng.randrange(len(buf)), rng.randrange(len(buf)), rng.randint(1, 128)
        chunk = buf[i : i + n]
        buf[j : j + len(chunk)] = chunk
    return kind, bytes(buf)


def _deep(depth: int) -> list[Any]:
    node: list[Any] = ["n"]
    for _ in range(depth):
        node = ["l", [node]]
    return node


_HOSTILE_VALUES: list[Any] = [
    None, True, False, -1, 0, 1, 2**63, 2**64 - 1, -(2**63), 1e308, float("nan"),
    float("inf"), "", "os.system", "__import__('os').system('true')", b"\x00bin", [], {},
    [[[[[]]]]], {"a": 1}, "O", "|O", "x" * 5000, list(range(70)),
]  # fmt: skip
_HOSTILE_DTYPES: list[Any] = [
    "|O", "O", "|O8", "object", "<f8", ">f8", "float", "a8", "|V0", "<U0", "|S0", "<M8[xx]",
    "<m8[99999999999999999999ms]", "<f99999999999999999", "<i3", "|b9", "<U99999999999",
    "|V99999999999", [["a", "|O"]], [["", "|V8"]], [["a", "<f4", [2**40, 2**40]]],
    [["a", [["b", [["c", "|O"]]]]]], [[["t", "n"], "<i4"]], [["a", "<i4"], ["a", "<i4"]],
    [], [[1, "<i4"]], [["a"]], "numpy.ma", "builtins.eval", ["os.system", "|O"],
    [["x", "<f8", [-1]]], [["x", "<f8", [3]]], "<U", "|S", "|V", "<c32", "<f16",
]  # fmt: skip
_HOSTILE_SHAPES: list[Any] = [
    [2**62, 2**62], [0, 2**63], [-1], [1] * 65, [], [2**40], [0, 2**64 - 1], [1.5], [None],
    "[]", [10**30],
]  # fmt: skip
_HOSTILE_TREES: list[Any] = [
    ["o", ["n"]], ["I", "9" * 5000], ["I", "1" * 4301], ["I", "0x10"], ["a", 999], ["a", -1],
    ["g", 0], ["y", 0], ["x"], ["d", [[True, ["n"]]]], ["d", [[1.5, ["n"]]]], ["s", b"b"],
    ["f", "1.0"], ["c", 1.0], ["i", 2**64 - 1], ["i", True], ["l", "notalist"], ["t", [["z"]]],
    _deep(199), _deep(201), _deep(250), ["o", "os.system"], ["d", [["k", ["o", ["a", 0]]]]],
    [], "n", None, ["n", "extra"],
]  # fmt: skip


def _hostile(rng: random.Random, pool: list[Any]) -> Any:
    return rng.choice(pool) if rng.random() < 0.8 else rng.choice(_HOSTILE_VALUES)


def _mutate_tree(rng: random.Random, node: Any) -> Any:
    # Replace a random descendant (or the root) with a hostile node.
    if not isinstance(node, list) or rng.random() < 0.3:
        return _hostile(rng, _HOSTILE_TREES)
    if len(node) >= 2 and isinstance(node[1], list) and node[1]:
        children = list(node[1])
        i = rng.randrange(len(children))
        child = children[i]
        if node[0] == "d" and isinstance(child, list) and len(child) == 2:
            if rng.random() < 0.2:
                children[i] = [_hostile(rng, _HOSTILE_VALUES), child[1]]
            else:
                children[i] = [child[0], _mutate_tree(rng, child[1])]
        else:
            children[i] = _mutate_tree(rng, child)
        return [node[0], children, *node[2:]]
    if len(node) >= 2 and rng.random() < 0.5:
        return [node[0], _hostile(rng, _HOSTILE_VALUES)]
    return _hostile(rng, _HOSTILE_TREES)


def _mutate_header(rng: random.Random, header: dict[str, Any]) -> str:
    what = rng.choice(
        ["dtype", "shape", "offset", "nbytes", "crc", "entry", "arrays", "tree", "tree",
         "file_size", "step", "time", "metadata", "keys"]
    )  # fmt: skip
    arrays = header["arrays"]
    if what in ("dtype", "shape", "offset", "nbytes", "crc", "entry") and not arrays:
        what = "tree"
    if what in ("dtype", "shape", "offset", "nbytes", "crc", "entry"):
        entry = arrays[rng.randrange(len(arrays))]
        if what == "dtype":
            entry[0] = _hostile(rng, _HOSTILE_DTYPES)
        elif what == "shape":
            entry[1] = _hostile(rng, _HOSTILE_SHAPES)
        elif what in ("offset", "nbytes", "crc"):
            i = {"offset": 2, "nbytes": 3, "crc": 4}[what]
            value = entry[i]
            entry[i] = rng.choice(
                [value + ALIGNMENT, value - ALIGNMENT, value + 1, 0, 2**63, 2**64 - 1, -1,
                 value * 2, _hostile(rng, _HOSTILE_VALUES)]
            )  # fmt: skip
        else:
            entry[rng.randrange(len(entry))] = _hostile(rng, _HOSTILE_VALUES)
            if rng.random() < 0.3:
                entry.append(0)
    elif what == "arrays":
        choice = rng.randrange(4)
        if choice == 0 and arrays:
            arrays.pop(rng.randrange(len(arrays)))
        elif choice == 1 and arrays:
            arrays.append(list(rng.choice(arrays)))
        elif choice == 2 and len(arrays) > 1:
            i, j = rng.randrange(len(arrays)), rng.randrange(len(arrays))
            arrays[i], arrays[j] = arrays[j], arrays[i]
        else:
            header["arrays"] = _hostile(rng, _HOSTILE_VALUES)
    elif what == "tree":
        header["tree"] = _mutate_tree(rng, header["tree"])
    elif what == "keys":
        if rng.random() < 0.5:
            del header[rng.choice(sorted(header))]
        else:
            header[rng.choice(["extra", "__reduce__", "pickle"])] = "os.system"
    elif what == "metadata":
        header["metadata"] = rng.choice(
            [{"k": _hostile(rng, _HOSTILE_VALUES)}, _hostile(rng, _HOSTILE_VALUES)]
        )
    else:
        header[what] = _hostile(rng, _HOSTILE_VALUES)
    return what


def _reencode(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Decode the header, change a field, write it back with valid CRCs."""
    while True:
        try:
            return _reencode_once(rng, data)
        except (OverflowError, ValueError, TypeError):
            continue  # a value msgpack cannot encode (an int over 2**64): draw another


def _reencode_once(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    header_len = _PRELUDE.unpack(data[:PRELUDE_SIZE])[3]
    old_start = -(-(PRELUDE_SIZE + header_len) // ALIGNMENT) * ALIGNMENT
    body = data[old_start:] if data[PRELUDE_SIZE + header_len :] else b""
    if rng.random() < 0.05:  # arbitrary msgpack (or not even that) behind valid checksums
        packed = rng.choice(
            [
                bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))),
                msgpack.packb(_hostile(rng, _HOSTILE_VALUES), use_bin_type=True),
                b"\xc7\x01\x05x" + b"\x80",  # an extension type
                b"\xdd\xff\xff\xff\xff",  # an array claiming 2**32 - 1 items
                b"\xdf\xff\xff\xff\xff",  # a map claiming 2**32 - 1 items
                b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the stack
            ]
        )
        what = "header:raw"
    else:
        header = msgpack.unpackb(data[PRELUDE_SIZE : PRELUDE_SIZE + header_len], raw=False)
        what = "header:" + _mutate_header(rng, header)
        fix_size = "file_size" not in what and rng.random() < 0.8
        packed = b""
        for _ in range(4):  # file_size measures the file holding it: settle it
            packed = msgpack.packb(header, use_bin_type=True)
            start = -(-(PRELUDE_SIZE + len(packed)) // ALIGNMENT) * ALIGNMENT if body else 0
            size = (start + len(body)) if body else PRELUDE_SIZE + len(packed)
            if not fix_size or "file_size" not in header or header["file_size"] == size:
                break
            header["file_size"] = size
    head = _PRELUDE.pack(MAGIC, 1, 0, len(packed), crc32c(packed), 0)
    head = head[:28] + struct.pack("<I", crc32c(head[:28]))
    if not body:
        return what, head + packed
    gap = -(PRELUDE_SIZE + len(packed)) % ALIGNMENT
    return what, head + packed + bytes(gap) + body


def _prelude_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Change one prelude field and recompute the prelude CRC (the header CRC kept)."""
    fields = list(_PRELUDE.unpack(data[:PRELUDE_SIZE]))
    i = rng.choice([1, 2, 3, 3, 4])
    fields[i] = rng.choice([0, 1, 2, 2**32 - 1, fields[i] + 1, fields[i] - 1 if fields[i] else 0])
    if i == 3:
        fields[i] = rng.choice([fields[i], 2**64 - 1, 2**40, 256 * 1024 * 1024 + 1])
    fields[5] = 0
    head = _PRELUDE.pack(*fields)
    head = head[:28] + struct.pack("<I", crc32c(head[:28]))
    return "prelude", head + data[PRELUDE_SIZE:]


_STATE_LINES = [
    'model_checkpoint_path: "../../etc/passwd"', 'model_checkpoint_path: "/abs"',
    'all_model_checkpoint_paths: ".."', 'all_model_checkpoint_paths: ""',
    'all_model_checkpoint_paths: "missing-7"', 'model_checkpoint_path: "missing-9"',
    "all_model_checkpoint_timestamps: 1e999", "all_model_checkpoint_timestamps: nan",
    "last_preserved_timestamp: -inf", "last_preserved_timestamp: 1" + "0" * 400,
    "all_model_checkpoint_timestamps: 1.2.3", "unknown_field: 1", 'model_checkpoint_path: 7',
    'all_model_checkpoint_paths: "a\\"b"', "model_checkpoint_path: \"" + "x" * 300 + '"',
    "\u00e9\u0000\ud7ff", "# comment", "", "model_checkpoint_path",
    'all_model_checkpoint_paths: "model.ckpt-1"',
]  # fmt: skip


def _state_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    if rng.random() < 0.5:
        kind, out = _byte_mutation(rng, data)
        return "state:" + kind, out
    lines = data.decode().splitlines()[:-1]  # without the checksum line
    choice = rng.randrange(3)
    line = rng.choice(_STATE_LINES)
    if choice == 0 and lines:
        lines[rng.randrange(len(lines))] = line
    elif choice == 1:
        lines.insert(rng.randrange(len(lines) + 1), line)
    elif lines:
        del lines[rng.randrange(len(lines))]
    body = "".join(f"{x}\n" for x in lines)
    if rng.random() < 0.1:
        body = body * rng.randint(2, 2000)
    return "state:lines", (body + f"# crc32c: {crc32c(body.encode()):08x}\n").encode(
        errors="surrogatepass"
    )


# -- comparing results ----------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray | np.generic) or isinstance(b, np.ndarray | np.generic):
        if type(a) is not type(b) or np.asarray(a).dtype != np.asarray(b).dtype:
            return False
        return bytes(np.ascontiguousarray(a).tobytes()) == bytes(
            np.ascontiguousarray(b).tobytes()
        ) and np.shape(a) == np.shape(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    return bool(a == b)


# -- the run --------------------------------------------------------------------------------


class _Stats:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.inputs = 0
        self.reads = 0
        self.by_exception: Counter[str] = Counter()
        self.by_mutation: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.max_secs = 0.0
        self.max_secs_input = ""
        self.max_ratio: dict[str, float] = {}
        self.max_peak: dict[str, tuple[int, int, str]] = {}
        self.max_ratio_over_slack: dict[str, float] = {}
        self.failures: list[dict[str, Any]] = []
        self.failure_count = 0

    def fail(self, index: int, mutation: str, reader: str, reason: str, data: bytes) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            os.makedirs(self.args.keep_dir, exist_ok=True)
            path = os.path.join(self.args.keep_dir, f"failure-{index}-{reader}.bin")
            with open(path, "wb") as file:
                file.write(data)
            self.failures.append(
                {"input": index, "mutation": mutation, "reader": reader, "reason": reason,
                 "file": path}
            )  # fmt: skip

    async def measure(
        self,
        index: int,
        mutation: str,
        reader: str,
        data: bytes,
        read: Callable[[], Awaitable[Any]],
    ) -> tuple[str, Any]:
        """Run one read, traced and timed: ("ok", result), ("error", name) or ("bad", detail)."""
        self.reads += 1
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        outcome: tuple[str, Any]
        try:
            result = await read()
        except CheckpointError as exc:
            outcome = ("error", type(exc).__name__)
        except Exception as exc:  # anything else is a finding
            outcome = ("bad", f"{type(exc).__name__}: {exc}"[:300])
        else:
            outcome = ("ok", result)
        secs = time.perf_counter() - start
        peak = max(tracemalloc.get_traced_memory()[1] - base, 0)
        if secs > self.max_secs:
            self.max_secs, self.max_secs_input = secs, f"{index} {mutation} {reader}"
        size = max(len(data), 1)
        kind = "state_file" if mutation.startswith("state:") else "checkpoint"
        self.max_ratio[kind] = max(self.max_ratio.get(kind, 0.0), peak / size)
        label = f"{index} {mutation} {reader}"
        self.max_peak[kind] = max(self.max_peak.get(kind, (0, 0, "")), (peak, len(data), label))
        # The ratio of what a read allocates beyond a fixed overhead (the exception, the
        # event loop's thread hop) to the file's size: the figure that must stay small.
        over = max(peak - self.args.alloc_slack, 0) / size
        self.max_ratio_over_slack[kind] = max(self.max_ratio_over_slack.get(kind, 0.0), over)
        if peak > self.args.alloc_limit * size + self.args.alloc_slack:
            self.fail(index, mutation, reader, f"allocated {peak} bytes for {len(data)}", data)
        if outcome[0] == "error":
            self.by_exception[outcome[1]] += 1
        elif outcome[0] == "bad":
            self.by_exception[outcome[1].split(":")[0]] += 1
            self.fail(index, mutation, reader, outcome[1], data)
        return outcome


def _write(path: str, data: bytes) -> None:
    # A new inode each time: a mapping of the previous input is never truncated under it.
    temp = path + ".new"
    with open(temp, "wb") as file:
        file.write(data)
    os.replace(temp, path)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    stats = _Stats(args)
    with tempfile.TemporaryDirectory(prefix="asyncckpt-fuzz-") as work:
        base_dir = os.path.join(work, "base")
        state_dir = os.path.join(work, "state")
        os.makedirs(base_dir)
        os.makedirs(state_dir)
        bases = await _make_checkpoints(base_dir)
        state_bytes, state_value = _make_state_file(state_dir)
        target = os.path.join(work, "input.ckpt")
        state_path = os.path.join(state_dir, "checkpoint")
        saver = Saver()
        tracemalloc.start()
        started = time.perf_counter()
        for index in range(args.inputs):
            faulthandler.dump_traceback_later(args.hang_secs, exit=True)
            stats.inputs += 1
            if rng.random() < 0.15:
                await _one_state_file(stats, rng, index, state_path, state_bytes, state_value)
                continue
            original, tree = rng.choice(bases)
            roll = rng.random()
            if roll < 0.3:
                mutation, data = _reencode(rng, original)
            elif roll < 0.35:
                mutation, data = _prelude_mutation(rng, original)
            else:
                mutation, data = _byte_mutation(rng, original)
            stats.by_mutation[mutation] += 1
            _write(target, data)
            for reader, use_mmap in (("restore", False), ("restore-mmap", True)):
                kind, result = await stats.measure(
                    index, mutation, reader, data,
                    lambda m=use_mmap: saver.restore(target, mmap=m),  # type: ignore[misc]
                )  # fmt: skip
                if kind != "ok":
                    continue
                if data == original:
                    stats.outcomes["unchanged_input_read_back"] += 1
                elif mutation.startswith("header:"):
                    stats.outcomes["accepted_reencoded"] += 1
                elif _same(result, tree):
                    stats.outcomes["mutated_but_identical_data"] += 1
                    stats.fail(index, mutation, reader, "a mutated file was accepted", data)
                else:
                    stats.fail(index, mutation, reader, "mutated file read as other data", data)
                del result
            if args.progress and (index + 1) % args.progress == 0:
                elapsed = time.perf_counter() - started
                print(f"{index + 1} inputs, {elapsed:.0f} s", file=sys.stderr, flush=True)
        faulthandler.cancel_dump_traceback_later()
        elapsed = time.perf_counter() - started
        tracemalloc.stop()
    return {
        "inputs": stats.inputs,
        "reads": stats.reads,
        "seed": args.seed,
        "elapsed_secs": round(elapsed, 1),
        "by_exception": dict(stats.by_exception.most_common()),
        "by_mutation": dict(stats.by_mutation.most_common()),
        "outcomes": dict(stats.outcomes),
        "max_secs_per_read": round(stats.max_secs, 4),
        "max_secs_input": stats.max_secs_input,
        "max_alloc_ratio": {k: round(v, 2) for k, v in stats.max_ratio.items()},
        "max_alloc_bytes": {
            k: {"peak": v[0], "file_size": v[1], "input": v[2]} for k, v in stats.max_peak.items()
        },
        "max_alloc_ratio_over_slack": {
            k: round(v, 2) for k, v in stats.max_ratio_over_slack.items()
        },
        "alloc_limit": f"{args.alloc_limit} * size + {args.alloc_slack}",
        "failures": stats.failure_count,
        "first_failures": stats.failures,
    }


async def _one_state_file(
    stats: _Stats,
    rng: random.Random,
    index: int,
    path: str,
    original: bytes,
    value: CheckpointState,
) -> None:
    mutation, data = _state_mutation(rng, original)
    stats.by_mutation[mutation] += 1
    _write(path, data)
    directory = os.path.dirname(path)

    async def state() -> Any:
        return get_checkpoint_state(directory)

    async def latest() -> Any:
        return latest_checkpoint(directory)

    expected = {"get_checkpoint_state": value, "latest_checkpoint": value.paths()[-1]}
    for reader, read in (("get_checkpoint_state", state), ("latest_checkpoint", latest)):
        kind, result = await stats.measure(index, mutation, reader, data, read)
        if kind != "ok":
            continue
        if result == expected[reader]:
            stats.outcomes["state_same_value"] += 1
        elif mutation == "state:lines":
            stats.outcomes["state_accepted_rewritten"] += 1  # its checksum was recomputed
        elif _CRC_LINE.search(data):
            stats.fail(index, mutation, reader, "a changed state file passed its checksum", data)
        else:
            # The checksum comment is optional (TensorFlow writes none): a mutation that
            # damages it and the body at once (a truncation) is read as a plain TF file.
            stats.outcomes["state_accepted_changed_without_checksum_line"] += 1


# -- atheris (optional) ---------------------------------------------------------------------


def _atheris_main(argv: list[str]) -> None:
    try:
        atheris: Any = importlib.import_module("atheris")
    except ImportError:
        sys.exit("atheris is not installed (pip install atheris); it is optional")
    work = tempfile.mkdtemp(prefix="asyncckpt-atheris-")
    atexit.register(shutil.rmtree, work, True)
    bases = anyio.run(_make_checkpoints, work)
    target = os.path.join(work, "input.ckpt")
    saver = Saver()

    def one_input(raw: bytes) -> None:
        provider = atheris.FuzzedDataProvider(raw)
        mode = provider.ConsumeIntInRange(0, 2)
        if mode == 0:  # the fuzzer's bytes are the file
            data = provider.ConsumeBytes(provider.remaining_bytes())
        else:  # mutations of a valid file, steered by the fuzzer's bytes as the seed
            rng = random.Random(provider.ConsumeBytes(provider.remaining_bytes()))
            original = rng.choice(bases)[0]
            data = (_reencode if mode == 1 else _byte_mutation)(rng, original)[1]
        _write(target, data)
        for use_mmap in (False, True):
            with contextlib.suppress(CheckpointError):
                anyio.run(lambda m=use_mmap: saver.restore(target, mmap=m))  # type: ignore[misc]

    atheris.instrument_all()  # coverage feedback from every loaded module (asyncckpt, msgpack)
    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris"]:
        _atheris_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-secs", type=float, default=60.0)
    parser.add_argument("--alloc-limit", type=float, default=16.0)
    parser.add_argument("--alloc-slack", type=int, default=256 * 1024)
    parser.add_argument("--keep-dir", default="fuzz-failures")
    parser.add_argument("--progress", type=int, default=0, help="report every N inputs")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    summary = anyio.run(_run, args, backend="asyncio")
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as file:
            file.write(text + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
