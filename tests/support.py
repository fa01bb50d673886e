"""Helpers shared by several test modules (not a test module itself)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from asyncckpt.testing import FaultyStorage

# The storage calls of a save into a directory holding one older checkpoint, with
# max_to_keep=1: the checkpoint file (open, write the arrays, write the header that holds
# their checksums, fsync, rename, fsync_dir), the state file (open, write, fsync, rename,
# fsync_dir), then the retirement of the older checkpoint (a manager renames it to a
# temporary name, for its next save to overwrite in place; then fsync_dir).
SAVE_OPS: Final = [
    "open", "write", "write", "fsync", "rename", "fsync_dir",
    "open", "write", "fsync", "rename", "fsync_dir",
    "rename", "fsync_dir",
]  # fmt: skip
STATE_FILE_FIRST_CALL: Final = 6

Fields = dict[int, list[Any]]
CKPT_FILE: Final = re.compile(r"model\.ckpt-(\d+)$")


def written_steps(storage: FaultyStorage) -> list[int]:
    """Steps whose checkpoint file was committed (renamed into place), in order."""
    return [
        int(match.group(1))
        for op, path in storage.calls
        if op == "rename" and (match := CKPT_FILE.search(path))
    ]


def make_state() -> dict[str, Any]:
    """A small training state: weights and a step counter."""
    return {"w": np.zeros(4), "step": 0}


def step_fn(state: dict[str, Any]) -> dict[str, float]:
    """One training step on ``make_state()``: every weight and the counter go up by one."""
    state["w"] += 1.0
    state["step"] += 1
    return {"loss": float(state["w"][0])}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def parse_protobuf(buf: bytes) -> Fields:
    """Split a protobuf message into its fields: varints as int, the rest as raw bytes.

    Written from the wire format (TB_FORMAT.md §3), independently of the encoder under test.
    """
    fields: Fields = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            assert wire == 2, f"unexpected wire type {wire}"
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        fields.setdefault(key >> 3, []).append(value)
    assert pos == len(buf), "a field runs past the end of the message"
    return fields
