"""The checkpoint file format (docs/FORMAT.md): golden bytes, layout, checksums, hostile files.

The layout is checked with ``struct`` and ``msgpack`` directly, not through the package's own
decoder, so a change on both sides at once still shows up. Hostile files are crafted with a
correct prelude and header CRC, so that each one reaches the check it is meant to trip.

Regenerate the golden file after an intended format change (and bump FORMAT_VERSION when old
readers could misread the new bytes)::

    ASYNCCKPT_REGEN_GOLDEN=1 python -m pytest tests/test_format.py -k golden
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import hypothesis.strategies as st
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from asyncckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    Saver,
)
from asyncckpt._checkpoint import verify_file
from asyncckpt._checkpoint._format import (
    ALIGNMENT,
    FORMAT_VERSION,
    HEADER_KEYS,
    MAGIC,
    MAX_HEADER_BYTES,
    PRELUDE_SIZE,
    check_metadata,
    encode_header,
)
from asyncckpt._core._crc32c import crc32c
from asyncckpt._storage import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.anyio

CLOCK = 1_700_000_000.0
GOLDEN = Path(__file__).parent / "golden" / "v1-small.ckpt"
FORMAT_DOC = Path(__file__).parent.parent / "docs" / "FORMAT.md"
REGENERATE = os.environ.get("ASYNCCKPT_REGEN_GOLDEN") == "1"
PRELUDE = struct.Struct("<8sIIQII")
SMALL_PEAK = 5 * 2**20  # bytes of traced memory a hostile file may cost


# -- helpers ---------------------------------------------------------------------------------


def assert_same(actual: Any, expected: Any, path: str = "<root>") -> None:
    """Assert two trees are identical: types, dict order, dtypes, shapes and bytes."""
    if isinstance(expected, np.ndarray | np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: {actual.shape} != {expected.shape}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: bytes differ"
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}/{i}")
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), path
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


async def save_bytes(directory: Path, tree: Any, **kwargs: Any) -> tuple[Path, bytes]:
    """Save ``tree`` as ``model.ckpt-<step>`` with a fixed clock; return its path and bytes."""
    saver = Saver(clock=lambda: CLOCK)
    path = await saver.save(tree, directory / "model.ckpt", **kwargs)
    return Path(path), await anyio.Path(path).read_bytes()


async def restore(path: Path, *, use_mmap: bool) -> Any:
    return await Saver().restore(path, mmap=use_mmap, verify=True)


def header_of(data: bytes) -> dict[str, Any]:
    (header_len,) = struct.unpack_from("<Q", data, 16)
    header: dict[str, Any] = msgpack.unpackb(
        data[PRELUDE_SIZE : PRELUDE_SIZE + header_len], raw=False, strict_map_key=False
    )
    return header


def array_paths(tree: list[Any]) -> dict[int, str]:
    """Map array index -> tree path, walking a spec as docs/FORMAT.md describes it."""
    found: dict[int, str] = {}

    def walk(node: list[Any], path: tuple[Any, ...]) -> None:
        tag = node[0]
        if tag in ("a", "g", "y"):
            found[node[1]] = "/".join(map(str, path)) or "<root>"
        elif tag == "d":
            for key, child in node[1]:
                walk(child, (*path, key))
        elif tag in ("l", "t"):
            for i, child in enumerate(node[1]):
                walk(child, (*path, i))
        elif tag == "o":
            walk(node[1], path)

    walk(tree, ())
    return found


def regions(data: bytes) -> list[tuple[int, int, str]]:
    """Split a checkpoint into ``(start, end, part)`` regions that cover every byte once."""
    header_len = struct.unpack_from("<Q", data, 16)[0]
    header = header_of(data)
    names = array_paths(header["tree"])
    out = [(0, 8, "magic"), (8, PRELUDE_SIZE, "prelude")]
    out.append((PRELUDE_SIZE, PRELUDE_SIZE + header_len, "header"))
    position = PRELUDE_SIZE + header_len
    for index, (_descr, _shape, offset, nbytes, _crc) in enumerate(header["arrays"]):
        if offset > position:
            out.append((position, offset, f"padding before array {index}"))
        if nbytes:
            out.append((offset, offset + nbytes, f"array {index} ({names[index]!r})"))
        position = offset + nbytes
    assert position == len(data)
    return out


def flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= mask
    return bytes(changed)


# -- golden bytes ----------------------------------------------------------------------------


def golden_tree() -> dict[Any, Any]:
    return {
        "w": np.arange(6, dtype="<f4").reshape(2, 3),
        "ids": np.array([1, -2, 3], ">i8"),
        "mask": np.array([True, False]),
        "lr": np.float32(0.5),
        "blob": b"\x00\x01abc",
        "step": 7,
        "big": 2**70,
        "x": -0.25,
        "z": complex(1, -2),
        "name": "héllo",
        "none": None,
        "flag": True,
        "seq": [1, (2, "t")],
        3: "int key",
    }


GOLDEN_SAVE: dict[str, Any] = {"global_step": 7, "metadata": {"run": "golden"}}


async def test_golden_bytes_do_not_drift(tmp_path: Path) -> None:
    _path, data = await save_bytes(tmp_path, golden_tree(), **GOLDEN_SAVE)
    if REGENERATE:
        await anyio.Path(GOLDEN.parent).mkdir(exist_ok=True)
        await anyio.Path(GOLDEN).write_bytes(data)
        pytest.skip(f"regenerated {GOLDEN}; now update the hexdump in docs/FORMAT.md")
    golden = await anyio.Path(GOLDEN).read_bytes()
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(data, golden, strict=False)) if a != b),
        min(len(data), len(golden)),
    )
    assert data == golden, (
        f"the saved bytes differ from {GOLDEN.name} at offset {first_difference} "
        f"({len(data)} vs {len(golden)} bytes). An unintended format change breaks every "
        "reader; if it is intended, bump FORMAT_VERSION if old readers would misread it, "
        "update docs/FORMAT.md and regenerate with ASYNCCKPT_REGEN_GOLDEN=1"
    )


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_golden_file_loads_as_the_golden_tree(use_mmap: bool) -> None:
    assert_same(await restore(GOLDEN, use_mmap=use_mmap), golden_tree())


async def test_golden_header_holds_step_time_and_metadata() -> None:
    header = header_of(await anyio.Path(GOLDEN).read_bytes())
    assert header["step"] == 7
    assert header["time"] == CLOCK
    assert type(header["time"]) is float
    assert header["metadata"] == {"run": "golden"}


def _hexdump(data: bytes) -> list[str]:
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hexes = (
            " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        )
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{start:08x}  {hexes:<48}  |{text}|")
    return lines


def test_format_doc_hexdump_matches_the_golden_file() -> None:
    doc = FORMAT_DOC.read_text(encoding="utf-8")
    expected = _hexdump(GOLDEN.read_bytes()[:64])
    documented = [line for line in doc.splitlines() if re.match(r"^[0-9a-f]{8}  ", line)]
    assert documented == expected, "docs/FORMAT.md's hexdump is stale; paste:\n" + "\n".join(
        expected
    )


def test_format_doc_names_every_header_key_and_tag() -> None:
    doc = FORMAT_DOC.read_text(encoding="utf-8")
    for key in HEADER_KEYS:
        assert f"`{key}`" in doc
    for tag in "nbiIfcsagydlto":
        assert f'`"{tag}"`' in doc, tag


# -- layout ----------------------------------------------------------------------------------


def check_layout(data: bytes) -> dict[str, Any]:
    """Check every documented layout rule of a version 1 file; return its header."""
    magic, version, flags, header_len, header_crc, prelude_crc = PRELUDE.unpack_from(data)
    assert magic == b"\x89ACKPT\r\n" == MAGIC
    assert version == FORMAT_VERSION == 1
    assert flags == 0
    assert prelude_crc == crc32c(data[:28])
    assert header_crc == crc32c(data[PRELUDE_SIZE : PRELUDE_SIZE + header_len])
    header = header_of(data)
    assert set(header) == set(HEADER_KEYS)
    assert list(header) == sorted(HEADER_KEYS)  # written in sorted key order
    assert header["file_size"] == len(data)
    assert type(header["time"]) is float
    assert header["step"] is None or type(header["step"]) is int
    assert isinstance(header["metadata"], dict)
    position = PRELUDE_SIZE + header_len
    for descr, shape, offset, nbytes, crc in header["arrays"]:
        assert isinstance(descr, str | list)
        assert all(type(d) is int and d >= 0 for d in shape)
        assert offset % ALIGNMENT == 0
        assert position <= offset < position + ALIGNMENT  # the next multiple of 64, no later
        assert data[position:offset] == bytes(offset - position)  # zero padding
        if isinstance(descr, str):
            assert math.prod(shape) * np.dtype(descr).itemsize == nbytes
        assert crc == crc32c(data[offset : offset + nbytes])
        position = offset + nbytes
    assert position == len(data)  # the file ends with the last array (or the header)
    return header


async def test_golden_file_layout() -> None:
    header = check_layout(await anyio.Path(GOLDEN).read_bytes())
    assert [entry[0] for entry in header["arrays"]] == ["<f4", ">i8", "|b1", "<f4", "|u1"]
    assert [entry[1] for entry in header["arrays"]] == [[2, 3], [3], [2], [], [5]]


async def test_arrays_are_stored_raw_in_c_order_at_aligned_offsets(tmp_path: Path) -> None:
    tree: dict[str, np.ndarray[Any, Any]] = {
        "odd": np.arange(3, dtype=np.uint8),
        "one": np.zeros(1, np.int8),
        "empty": np.zeros((0, 4)),
        "63": np.ones(63, np.uint8),
        "65": np.full(65, 7, np.uint8),
        "fortran": np.asfortranarray(np.arange(6, dtype=">u2").reshape(2, 3)),
        "rec": np.array([(1, 2.0)], [("a", "u1"), ("b", "<f8")]),
    }
    _path, data = await save_bytes(tmp_path, tree, global_step=1)
    header = check_layout(data)
    for (_descr, shape, offset, nbytes, _crc), array in zip(
        header["arrays"], tree.values(), strict=True
    ):
        assert shape == list(array.shape)
        assert data[offset : offset + nbytes] == array.tobytes(order="C")
    assert header["arrays"][-1][0] == [["a", "|u1"], ["b", "<f8"]]  # structured: descr


async def test_a_checkpoint_without_arrays_ends_with_its_header(tmp_path: Path) -> None:
    _path, data = await save_bytes(tmp_path, {"step": 3, "name": "x"}, global_step=3)
    header = check_layout(data)
    assert header["arrays"] == []
    (header_len,) = struct.unpack_from("<Q", data, 16)
    assert len(data) == PRELUDE_SIZE + header_len == header["file_size"]


def test_array_less_file_sizes_settle_across_msgpack_width_changes() -> None:
    # file_size measures the header that holds it; its msgpack width steps from 2 to 3 to
    # 5 bytes at 256 and 65536 (the smallest header is already over 128 bytes).
    sizes = {}
    for n in [*range(60, 200), *range(65_400, 65_500)]:
        head, offsets, file_size = encode_header(
            step=1, time=CLOCK, metadata={}, tree=["s", "x" * n], leaves=[], crcs=[]
        )
        assert offsets == []
        assert len(head) == file_size
        check_layout(head)
        sizes[file_size] = n
    assert {255, 257, 65_535, 65_538} <= set(sizes)
    # Sizes that cannot be: 254 bytes + a 3-byte file_size is 257, 65533 + 5 is 65538.
    assert not {256, 65_536, 65_537} & set(sizes)


async def test_an_array_less_checkpoint_of_257_bytes_saves(tmp_path: Path) -> None:
    # 255 -> 256 -> 257: the width of file_size steps up twice before it settles.
    n = next(
        n
        for n in range(100, 300)
        if encode_header(
            step=1, time=CLOCK, metadata={}, tree=["d", [["s", ["s", "x" * n]]]], leaves=[], crcs=[]
        )[2]
        == 257
    )
    path, data = await save_bytes(tmp_path, {"s": "x" * n}, global_step=1)
    assert len(data) == 257
    assert await restore(path, use_mmap=False) == {"s": "x" * n}


async def test_an_int_clock_still_writes_a_float_time(tmp_path: Path) -> None:
    saver = Saver(clock=lambda: 1_700_000_000)
    path = await saver.save({"x": 1}, tmp_path / "model.ckpt", global_step=1)
    assert header_of(await anyio.Path(path).read_bytes())["time"] == 1_700_000_000.0
    assert await saver.restore(path) == {"x": 1}


def test_metadata_must_be_plain_msgpack_values() -> None:
    assert check_metadata({"a": [1, "x", None, {"b": 2.5}], "c": b"raw"}) == {
        "a": [1, "x", None, {"b": 2.5}],
        "c": b"raw",
    }
    for bad in ({1: "int key"}, {"t": (1, 2)}, {"s": {1}}, {"big": 2**64}, ["not a dict"]):
        with pytest.raises(TypeError, match="metadata"):
            check_metadata(bad)


# -- corruption: every region, both read paths -----------------------------------------------

CORRUPTION_TREE_SIZES = {"a": 24, "big": 320_008, "b": 40, "c": 5}


def corruption_tree() -> dict[str, Any]:
    # "big" is over the reader's 256 KiB small-array threshold: it is read on its own,
    # the others in one span, so both read strategies see a damaged byte.
    return {
        "a": np.arange(3, dtype=np.int64),
        "big": np.arange(40_001, dtype=np.float64),
        "b": np.ones((2, 5), np.float32),
        "c": b"hello",
    }


@pytest.fixture
async def several_arrays(tmp_path: Path) -> tuple[Path, bytes]:
    return await save_bytes(tmp_path, corruption_tree(), global_step=1)


PARTS = [
    "magic",
    "prelude",
    "header",
    "padding before array 0",
    "array 0 ('a')",
    "padding before array 1",
    "array 1 ('big')",
    "padding before array 2",
    "array 2 ('b')",
    "padding before array 3",
    "array 3 ('c')",
]


async def test_the_corruption_file_has_every_kind_of_region(
    several_arrays: tuple[Path, bytes],
) -> None:
    _path, data = several_arrays
    assert [part for _start, _end, part in regions(data)] == PARTS


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("part", PARTS)
async def test_a_flipped_byte_is_reported_with_its_region(
    several_arrays: tuple[Path, bytes], part: str, use_mmap: bool
) -> None:
    path, data = several_arrays
    start, end, _ = next(r for r in regions(data) if r[2] == part)
    for offset in sorted({start, (start + end) // 2, end - 1}):
        await anyio.Path(path).write_bytes(flipped(data, offset))
        with pytest.raises(CheckpointError) as info:
            await restore(path, use_mmap=use_mmap)
        error = info.value
        if part == "magic":
            assert isinstance(error, CheckpointFormatError), offset
            assert "not an asyncckpt checkpoint" in str(error)
        else:
            assert isinstance(error, CheckpointCorruptedError), (offset, error)
            assert error.part == part, offset
            assert error.path == str(path)
            assert part in str(error)
    await anyio.Path(path).write_bytes(data)
    assert_same(await restore(path, use_mmap=use_mmap), corruption_tree())


@pytest.mark.slow  # one file write and verify per byte: ~0.1 s, more on a slow disk
def test_every_byte_is_covered_by_a_checksum_or_zero_padding(tmp_path: Path) -> None:
    tree = {"a": np.arange(3, dtype=np.int16), "s": "x", "b": [b"xyz", np.float64(2.5)]}
    path = tmp_path / "small.ckpt"
    data = anyio.run(_save_and_read, tmp_path, tree)
    spans = regions(data)
    assert len(data) < 1024  # small enough to try every byte
    for start, end, part in spans:
        for offset in range(start, end):
            path.write_bytes(flipped(data, offset, 0x80))
            with pytest.raises(CheckpointError) as info:
                verify_file(LocalStorage(), str(path))
            if part == "magic":
                assert isinstance(info.value, CheckpointFormatError)
            else:
                assert isinstance(info.value, CheckpointCorruptedError), offset
                assert info.value.part == part, offset
    path.write_bytes(data)
    verify_file(LocalStorage(), str(path))


async def _save_and_read(directory: Path, tree: Any) -> bytes:
    _path, data = await save_bytes(directory, tree, global_step=1)
    return data


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_truncation_anywhere_is_reported(
    several_arrays: tuple[Path, bytes], use_mmap: bool
) -> None:
    path, data = several_arrays
    cuts = {1, 7, 8, 20, 31, 32, 33, len(data) - 1}
    for start, end, _part in regions(data):
        cuts |= {start, start + 1, end - 1, end}
    cuts = {cut for cut in cuts if 0 < cut < len(data)}
    for cut in sorted(cuts):
        await anyio.Path(path).write_bytes(data[:cut])
        with pytest.raises(CheckpointCorruptedError) as info:
            await restore(path, use_mmap=use_mmap)
        assert info.value.part in ("prelude", "size"), cut


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_an_empty_file_is_a_checkpoint_error(tmp_path: Path, use_mmap: bool) -> None:
    path = tmp_path / "model.ckpt-1"
    await anyio.Path(path).write_bytes(b"")
    with pytest.raises(CheckpointCorruptedError) as info:
        await restore(path, use_mmap=use_mmap)
    assert info.value.part == "prelude"


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("extra", [b"\x00", bytes(64), b"junk" * 100])
async def test_appended_bytes_are_reported(
    several_arrays: tuple[Path, bytes], extra: bytes, use_mmap: bool
) -> None:
    path, data = several_arrays
    await anyio.Path(path).write_bytes(data + extra)
    with pytest.raises(CheckpointCorruptedError) as info:
        await restore(path, use_mmap=use_mmap)
    assert info.value.part == "size"


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
async def test_not_a_checkpoint_at_all(tmp_path: Path, use_mmap: bool) -> None:
    path = tmp_path / "model.ckpt-1"
    await anyio.Path(path).write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointFormatError, match="not an asyncckpt checkpoint"):
        await restore(path, use_mmap=use_mmap)


async def test_verify_false_skips_array_checks_but_never_the_header(
    several_arrays: tuple[Path, bytes],
) -> None:
    path, data = several_arrays
    spans = {part: (start, end) for start, end, part in regions(data)}
    await anyio.Path(path).write_bytes(flipped(data, spans["array 0 ('a')"][0]))
    for use_mmap in (False, True):
        tree = await Saver().restore(path, mmap=use_mmap, verify=False)
        assert tree["a"][0] == 1  # the flipped low bit, unchecked as documented
    await anyio.Path(path).write_bytes(flipped(data, spans["header"][0]))
    for use_mmap in (False, True):
        with pytest.raises(CheckpointCorruptedError, match="header"):
            await Saver().restore(path, mmap=use_mmap, verify=False)


# -- hostile files: correct checksums, impossible contents ----------------------------------

DATA_START = 8192  # crafted files put their arrays here, well past any crafted header


def frame(
    header: bytes,
    *,
    version: int = 1,
    flags: int = 0,
    header_len: int | None = None,
) -> bytes:
    """Prelude + header with correct checksums, whatever the fields say."""
    length = len(header) if header_len is None else header_len
    head = struct.pack("<8sIIQI", MAGIC, version, flags, length, crc32c(header))
    return head + struct.pack("<I", crc32c(head)) + header


def craft(
    *,
    tree: Any,
    arrays: Any = None,
    data: bytes = b"",
    drop: tuple[str, ...] = (),
    **fields: Any,
) -> bytes:
    """A file with a hand-built header (``fields`` override or add keys, ``drop`` removes).

    With arrays or data, ``data`` starts at DATA_START (entries hold absolute offsets, see
    ``entry``); without, the file ends with the header and ``file_size`` is settled here.
    """
    header: dict[Any, Any] = {
        "arrays": arrays or [],
        "metadata": {},
        "step": 1,
        "time": CLOCK,
        "tree": tree,
        **fields,
    }
    for key in drop:
        del header[key]
    if arrays or data:
        header.setdefault("file_size", DATA_START + len(data))
        head = frame(msgpack.packb(header, use_bin_type=True))
        assert len(head) <= DATA_START
        return head + bytes(DATA_START - len(head)) + data
    if "file_size" in header or "file_size" in drop:
        return frame(msgpack.packb(header, use_bin_type=True))
    size = 0
    for _ in range(8):  # file_size is inside the header it measures
        out = frame(msgpack.packb({**header, "file_size": size}, use_bin_type=True))
        if len(out) == size:
            return out
        size = len(out)
    raise AssertionError("file_size did not settle")


def entry(array: np.ndarray[Any, Any], offset: int = 0) -> list[Any]:
    descr = array.dtype.str if array.dtype.fields is None else [list(f) for f in array.dtype.descr]
    return [descr, list(array.shape), DATA_START + offset, array.nbytes, crc32c(array.tobytes())]


TWO = np.array([1.5, -2.5])


def one_array(descr: Any, shape: list[Any], nbytes: int, *, tree: Any = None) -> bytes:
    """A file declaring one array, with 16 real bytes of data after DATA_START."""
    return craft(
        tree=["a", 0] if tree is None else tree,
        arrays=[[descr, shape, DATA_START, nbytes, crc32c(TWO.tobytes())]],
        data=TWO.tobytes(),
    )


def _header_with_a_bytes_key() -> bytes:
    # msgpack allows str and bytes map keys, which do not sort together.
    header: dict[str | bytes, Any] = dict.fromkeys(HEADER_KEYS, 0)
    header[b"zz"] = 1
    return bytes(msgpack.packb(header, use_bin_type=True))


def _nested_objects(levels: int) -> list[Any]:
    node: list[Any] = ["n"]
    for _ in range(levels):
        node = ["o", node]
    return node


def _nested_lists(levels: int) -> list[Any]:
    node: list[Any] = ["n"]
    for _ in range(levels):
        node = ["l", [node]]
    return node


def _nested_dtype(levels: int) -> Any:
    descr: Any = "<f8"
    for _ in range(levels):
        descr = [["f", descr]]
    return descr


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # prelude
    "header_length_2**60": (
        lambda: frame(msgpack.packb({}), header_len=2**60),
        r"header declares 1152921504606846976 bytes, over the \d+ limit",
    ),
    "header_length_over_limit": (
        lambda: frame(msgpack.packb({}), header_len=MAX_HEADER_BYTES + 1),
        r"over the \d+ limit",
    ),
    "version_2": (lambda: frame(msgpack.packb({}), version=2), r"format version 2 is not"),
    "version_0": (lambda: frame(msgpack.packb({}), version=0), r"format version 0 is not"),
    "flags": (lambda: frame(msgpack.packb({}), flags=1), r"unknown flags 0x1"),
    # header framing
    "header_not_a_map": (lambda: frame(msgpack.packb([1, 2])), r"must be a map with keys"),
    "header_garbage": (lambda: frame(b"\xc1\xc1"), r"undecodable header"),
    "header_trailing_bytes": (lambda: frame(msgpack.packb({}) + b"\x00"), r"undecodable"),
    "msgpack_array_of_2**32": (lambda: frame(b"\xdd\xff\xff\xff\xff"), r"undecodable"),
    "msgpack_str_of_2**32": (lambda: frame(b"\xdb\xff\xff\xff\xff" + b"x" * 8), r"undecodable"),
    "msgpack_map_of_2**32": (lambda: frame(b"\xdf\xff\xff\xff\xff"), r"undecodable"),
    "invalid_utf8": (
        lambda: frame(msgpack.packb({"tree": ["s", "x"]}).replace(b"\xa1x", b"\xa1\xff")),
        r"undecodable header",
    ),
    "ext_type": (
        lambda: craft(tree=["n"], metadata={"x": msgpack.ExtType(1, b"py")}),
        r"undecodable header.*extension",
    ),
    "missing_key": (lambda: craft(tree=["n"], drop=("time",)), r"must be a map with keys"),
    "extra_key": (lambda: craft(tree=["n"], extra=1), r"must be a map with keys"),
    "bytes_key": (lambda: frame(_header_with_a_bytes_key()), r"must be a map with keys"),
    "step_float": (lambda: craft(tree=["n"], step=1.5), r"step must be an int or nil"),
    "step_bool": (lambda: craft(tree=["n"], step=True), r"step must be an int or nil"),
    "time_int": (lambda: craft(tree=["n"], time=1), r"time must be a finite float"),
    "time_nan": (lambda: craft(tree=["n"], time=math.nan), r"time must be a finite float"),
    "metadata_list": (lambda: craft(tree=["n"], metadata=[]), r"metadata must be a map"),
    "file_size_str": (lambda: craft(tree=["n"], file_size="1"), r"file_size must be an int"),
    "arrays_not_list": (
        lambda: craft(tree=["n"], arrays={"a": 1}, data=b"x"),
        r"arrays must be a list",
    ),
    # array entries
    "huge_nbytes": (
        lambda: one_array("<f8", [2**59], 2**62),
        r"array 0 declares 4611686018427387904 bytes past the end of the file",
    ),
    "huge_shape": (lambda: one_array("<f8", [2**40, 2**40], 16), r"declares 16 bytes for"),
    "huge_empty_shape": (
        lambda: one_array("<f8", [0, 2**62, 2**62], 0),
        r"shape numpy cannot hold",
    ),
    "negative_dim": (lambda: one_array("<f8", [-2, -1], 16), r"invalid shape"),
    "float_dim": (lambda: one_array("<f8", [2.0], 16), r"invalid shape"),
    "too_many_dims": (lambda: one_array("<f8", [1] * 65, 8), r"invalid shape"),
    "object_dtype": (lambda: one_array("|O", [2], 16), r"invalid dtype"),
    "object_field": (lambda: one_array([["a", "|O"]], [2], 16), r"invalid dtype"),
    "string_dtype": (lambda: one_array("|T16", [1], 16), r"invalid dtype"),
    "deprecated_alias": (lambda: one_array("a8", [2], 16), r"invalid dtype"),
    "python_type_name": (lambda: one_array("float", [2], 16), r"invalid dtype"),
    "subarray_dtype": (lambda: one_array("(2,)<f8", [1], 16), r"invalid dtype"),
    "nested_dtype": (lambda: one_array(_nested_dtype(40), [2], 16), r"invalid dtype"),
    "malformed_field": (lambda: one_array([["a"]], [2], 16), r"invalid dtype"),
    "dtype_int": (lambda: one_array(8, [2], 16), r"invalid dtype"),
    "entry_too_short": (
        lambda: craft(tree=["a", 0], arrays=[["<f8", [2], DATA_START, 16]], data=bytes(16)),
        r"array 0 entry is malformed",
    ),
    "crc_over_32_bits": (
        lambda: craft(tree=["a", 0], arrays=[["<f8", [2], DATA_START, 16, 2**32]], data=bytes(16)),
        r"invalid offset, size or crc",
    ),
    "misaligned_offset": (
        lambda: craft(tree=["a", 0], arrays=[["<f8", [2], DATA_START + 8, 16, 0]], data=bytes(24)),
        r"misaligned or overlaps",
    ),
    "offset_inside_header": (
        lambda: craft(tree=["a", 0], arrays=[["<f8", [2], 0, 16, 0]], data=bytes(16)),
        r"misaligned or overlaps",
    ),
    "overlapping_arrays": (
        lambda: craft(
            tree=["l", [["a", 0], ["a", 1]]],
            arrays=[entry(TWO), entry(TWO)],
            data=TWO.tobytes(),
        ),
        r"array 1 .* overlaps",
    ),
    "bytes_after_last_array": (
        lambda: craft(tree=["a", 0], arrays=[entry(TWO)], data=TWO.tobytes() + bytes(64)),
        r"bytes after the last array",
    ),
    # the tree
    "float_key": (lambda: craft(tree=["d", [[1.5, ["n"]]]]), r"dict key of type float"),
    "bool_key": (lambda: craft(tree=["d", [[True, ["n"]]]]), r"dict key of type bool"),
    "nil_key": (lambda: craft(tree=["d", [[None, ["n"]]]]), r"dict key of type NoneType"),
    "list_key": (lambda: craft(tree=["d", [[[1], ["n"]]]]), r"dict key of type list"),
    "missing_array": (
        lambda: craft(tree=["l", [["a", 0], ["a", 1]]], arrays=[entry(TWO)], data=TWO.tobytes()),
        r"references array 1 wrongly",
    ),
    "unused_array": (
        lambda: craft(tree=["n"], arrays=[entry(TWO)], data=TWO.tobytes()),
        r"arrays the tree does not use",
    ),
    "array_used_twice": (
        lambda: craft(tree=["t", [["a", 0], ["a", 0]]], arrays=[entry(TWO)], data=TWO.tobytes()),
        r"references array 0 wrongly",
    ),
    "negative_index": (lambda: craft(tree=["a", -1]), r"references array -1 wrongly"),
    "scalar_not_0d": (
        lambda: craft(tree=["g", 0], arrays=[entry(TWO)], data=TWO.tobytes()),
        r"numpy scalar but is not 0-d",
    ),
    "bytes_not_uint8": (
        lambda: craft(tree=["y", 0], arrays=[entry(TWO)], data=TWO.tobytes()),
        r"bytes but is not flat uint8",
    ),
    "unknown_tag": (lambda: craft(tree=["q", 1]), r"unknown or malformed leaf 'q'"),
    "int_as_float": (lambda: craft(tree=["i", 1.0]), r"malformed leaf 'i'"),
    "bool_as_int": (lambda: craft(tree=["i", True]), r"malformed leaf 'i'"),
    "bigint_two_signs": (lambda: craft(tree=["I", "--5"]), r"malformed leaf 'I'"),
    "bigint_unicode_digit": (lambda: craft(tree=["I", "\u00b2"]), r"malformed leaf 'I'"),
    "bigint_empty": (lambda: craft(tree=["I", ""]), r"malformed leaf 'I'"),
    "bigint_too_long": (lambda: craft(tree=["I", "9" * 4301]), r"malformed leaf 'I'"),
    "complex_one_part": (lambda: craft(tree=["c", 1.0]), r"malformed leaf 'c'"),
    "empty_node": (lambda: craft(tree=[]), r"malformed node"),
    "node_not_list": (lambda: craft(tree={"a": 1}), r"malformed node"),
    "deep_lists": (lambda: craft(tree=_nested_lists(201)), r"nested deeper than 200 levels"),
    "deep_objects": (lambda: craft(tree=_nested_objects(1000)), r"nested deeper than 200"),
}


async def test_crafted_files_are_valid_when_nothing_is_wrong(tmp_path: Path) -> None:
    # The positive control: each hostile case differs from this in one field only.
    path = tmp_path / "model.ckpt-1"
    cases: list[tuple[bytes, Any]] = [
        (
            craft(
                tree=["d", [["x", ["a", 0]], [3, ["I", "-" + "9" * 4300]]]],
                arrays=[entry(TWO)],
                data=TWO.tobytes(),
            ),
            {"x": TWO, 3: -int("9" * 4300)},
        ),
        (craft(tree=["l", [["n"], ["o", ["f", 0.5]]]]), [None, 0.5]),
        (
            craft(tree=["g", 0], arrays=[entry(np.array(7, "<i4"))], data=np.int32(7).tobytes()),
            np.int32(7),
        ),
        (one_array([["a", "<f8"]], [2], 16), np.frombuffer(TWO.tobytes(), [("a", "<f8")])),
        (craft(tree=_nested_lists(200)), _unnest(200)),
    ]
    for data, expected in cases:
        await anyio.Path(path).write_bytes(data)
        for use_mmap in (False, True):
            assert_same(await restore(path, use_mmap=use_mmap), expected)


def _unnest(levels: int) -> Any:
    tree: Any = None
    for _ in range(levels):
        tree = [tree]
    return tree


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_files_raise_format_errors_cheaply(
    tmp_path: Path, case: str, use_mmap: bool
) -> None:
    make, pattern = HOSTILE[case]
    path = tmp_path / "model.ckpt-1"
    await anyio.Path(path).write_bytes(make())
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match=pattern):
            await restore(path, use_mmap=use_mmap)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize(
    "header_len", [100, MAX_HEADER_BYTES], ids=["just_past_the_end", "at_the_limit"]
)
async def test_a_header_longer_than_the_file_is_reported_without_reading_it(
    tmp_path: Path, header_len: int, use_mmap: bool
) -> None:
    path = tmp_path / "model.ckpt-1"
    await anyio.Path(path).write_bytes(frame(msgpack.packb({}), header_len=header_len))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptedError) as info:
            await restore(path, use_mmap=use_mmap)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.part == "size"
    assert peak < SMALL_PEAK


# -- hypothesis decoder fuzz -----------------------------------------------------------------


def fuzz_tree() -> dict[str, Any]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "meta": {"name": "fuzz", "n": 3, 4: [None, 2.5]},
        "blob": b"\x00\xff",
        "s": np.int16(-2),
    }


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A small valid checkpoint, and a path that each example overwrites with its mutant."""
    directory = tmp_path_factory.mktemp("fuzz")
    data = anyio.run(_save_and_read, directory, fuzz_tree())
    return directory / "mutant.ckpt", data


FUZZ = settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
MUTATIONS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2**16), st.integers(min_value=1, max_value=255)),
    max_size=4,
)


@pytest.mark.slow
@FUZZ
@given(
    mutations=MUTATIONS,
    cut=st.none() | st.integers(min_value=0, max_value=2**16),
    tail=st.binary(max_size=8),
)
async def test_decoder_fuzz_raises_only_checkpoint_errors(
    fuzz_file: tuple[Path, bytes],
    mutations: list[tuple[int, int]],
    cut: int | None,
    tail: bytes,
) -> None:
    path, original = fuzz_file
    data = bytearray(original)
    for position, mask in mutations:
        data[position % len(data)] ^= mask
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    data += tail
    await anyio.Path(path).write_bytes(bytes(data))
    for use_mmap in (False, True):
        try:
            tree = await restore(path, use_mmap=use_mmap)
        except CheckpointError:
            assert bytes(data) != original
        else:
            # Every byte is checked, so only an unchanged file may load, and then exactly.
            assert bytes(data) == original
            assert_same(tree, fuzz_tree())


def _reframed(original: bytes, mutations: list[tuple[int, int]], cut: int | None) -> bytes:
    """Mutate the header bytes, then give them valid checksums again."""
    (header_len,) = struct.unpack_from("<Q", original, 16)
    header = bytearray(original[PRELUDE_SIZE : PRELUDE_SIZE + header_len])
    for position, mask in mutations:
        header[position % len(header)] ^= mask
    if cut is not None:
        del header[cut % (len(header) + 1) :]
    return frame(bytes(header)) + original[PRELUDE_SIZE + header_len :]


@pytest.mark.slow
@FUZZ
@given(mutations=MUTATIONS, cut=st.none() | st.integers(min_value=0, max_value=2**16))
async def test_decoder_fuzz_behind_valid_checksums(
    fuzz_file: tuple[Path, bytes], mutations: list[tuple[int, int]], cut: int | None
) -> None:
    # With the CRCs fixed up, damaged headers reach msgpack and every validator.
    path, original = fuzz_file
    await anyio.Path(path).write_bytes(_reframed(original, mutations, cut))
    for use_mmap in (False, True):
        with contextlib.suppress(CheckpointError):  # anything else fails the test
            await restore(path, use_mmap=use_mmap)


_TAGS = st.sampled_from(list("nbiIfcsagydlto"))
_WIRE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=6),
    _TAGS,
    st.sampled_from(["<f8", "|u1", "|b1", ">i2", "<M8[s]", "|S3", "", "-1", "12"]),
    st.sampled_from([0, 1, 8, 16, 64, DATA_START, DATA_START + 64, 2**32, 2**63]),
)
_DIMS = st.sampled_from([0, 1, 2, 3, 2**31, 2**62, 2**63 - 1, -1])
# Near-valid pieces, so that examples get past the first checks: array references and
# array entries built from plausible (and a few extreme) values.
_REFERENCES = st.tuples(st.sampled_from(["a", "g", "y"]), st.integers(-1, 3)).map(list)
_ENTRIES = st.tuples(
    st.sampled_from(["<f8", "|u1", "<f4", "|O", [["x", "<f8"]], [["", "|V8"], ["y", "|u1"]]]),
    st.lists(_DIMS, max_size=4),
    st.sampled_from([0, DATA_START, DATA_START + 8, DATA_START + 64]),
    st.sampled_from([0, 1, 8, 16, 64, 2**62]),
    st.sampled_from([0, 2**32 - 1, 2**32]),
).map(list)
WIRE_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.one_of(_WIRE_SCALARS, _REFERENCES, _ENTRIES),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(_TAGS, children).map(list),  # node-like: a tag and one argument
        st.tuples(st.just("d"), st.lists(st.tuples(_WIRE_SCALARS, children).map(list))).map(list),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=16,
)


@pytest.mark.slow
@FUZZ
@given(
    tree=WIRE_VALUES, arrays=st.lists(WIRE_VALUES, max_size=3), data_size=st.sampled_from([0, 64])
)
async def test_decoder_fuzz_with_arbitrary_header_values(
    fuzz_file: tuple[Path, bytes], tree: Any, arrays: list[Any], data_size: int
) -> None:
    # Type confusion in every place the tree and the array entries hold a value.
    path, _original = fuzz_file
    await anyio.Path(path).write_bytes(
        craft(tree=tree, arrays=arrays, data=bytes(data_size))
        if arrays or data_size
        else craft(tree=tree)
    )
    for use_mmap in (False, True):
        with contextlib.suppress(CheckpointError):  # anything else fails the test
            await restore(path, use_mmap=use_mmap)
