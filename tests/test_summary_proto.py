"""The bytes of TensorBoard event files (../shared/TB_FORMAT.md): CRC32C, framing, messages.

Pure and sync. Golden bytes are the hand-checked examples of TB_FORMAT.md §8, so a change in
the encoder and in its tests at once still shows up. Messages are read back with a small
protobuf reader written here from the wire format (§3), not with the package's own code;
images are decoded with the standard library (and with Pillow where it is installed). Where
TensorBoard is installed (a test extra), its generated classes, its summary helpers and its
record reader are the reference: same bytes, same CRCs, every record read.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from support import Fields
from support import parse_protobuf as parse

from asyncckpt import summary
from asyncckpt._core._crc32c import crc32c, masked_crc32c
from asyncckpt._summary._proto import (
    FILE_VERSION,
    MAX_STEP,
    SessionLog,
    encode_event,
    histogram_buckets,
    session_log,
)
from asyncckpt._summary._records import RecordError, frame, iter_records
from asyncckpt._summary._scalars import ScalarRecords

if TYPE_CHECKING:
    from pathlib import Path

# -- a protobuf reader from the wire format (TB_FORMAT.md §3) ---------------------------------


def tensor_of(value: bytes) -> tuple[str, Fields, list[int], Fields]:
    """``(tag, tensor fields, shape, metadata fields)`` of a ``Summary.Value``."""
    fields = parse(value)
    assert sorted(fields) == [1, 8, 9]  # tag, tensor, metadata: nothing else
    tensor = parse(fields[8][0])
    shape = [parse(dim)[1][0] for dim in parse(tensor[2][0]).get(2, [])]
    return fields[1][0].decode(), tensor, shape, parse(fields[9][0])


def plugin_of(metadata: Fields) -> str:
    assert sorted(metadata) == [1]  # plugin_data only: no data_class, no description
    plugin = parse(metadata[1][0])
    assert sorted(plugin) == [1]  # plugin_name only: empty content (version 0)
    return str(plugin[1][0].decode())


def decode_png(png: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode the PNGs the encoder writes (8-bit, not interlaced), checking every chunk."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: list[tuple[bytes, bytes]] = []
    pos = 8
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", png, pos + 8 + length)
        assert crc == zlib.crc32(kind + data), f"bad CRC in the {kind!r} chunk"
        chunks.append((kind, data))
        pos += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    width, height, depth, color, *methods = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8
    assert methods == [0, 0, 0]  # deflate, adaptive filtering, no interlace
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[color]
    raw = zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return rows[:, 1:].reshape(height, width, channels)


def crc32c_reference(data: bytes) -> int:
    """Bit at a time, from the definition (TB_FORMAT.md §2)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("\n", " "))


# -- CRC32C --------------------------------------------------------------------------------------

ISCSI_READ_PDU = hexbytes(
    "01 c0 00 00 00 00 00 00 00 00 00 00 00 00 00 00 14 00 00 00 00 00 04 00"
    " 00 00 00 14 00 00 00 18 28 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),  # the CRC catalogue's check value
        # RFC 3720 B.4
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (ISCSI_READ_PDU, 0xD9963A56),
    ],
    ids=["empty", "check", "zeros", "ones", "ascending", "descending", "iscsi-pdu"],
)
def test_crc32c_test_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert crc32c_reference(data) == expected


def test_crc32c_is_not_zlib_crc32() -> None:
    # The IEEE CRC makes every record fail its check in both loaders (TB_FORMAT.md §9.10).
    assert zlib.crc32(b"123456789") == 0xCBF43926 != crc32c(b"123456789")


@settings(max_examples=50)
@given(head=st.binary(max_size=300), tail=st.binary(max_size=300))
def test_crc32c_agrees_with_the_definition_and_continues(head: bytes, tail: bytes) -> None:
    assert crc32c(head + tail) == crc32c_reference(head + tail)
    assert crc32c(tail, crc32c(head)) == crc32c(head + tail)


def test_crc32c_reads_any_buffer() -> None:
    data = bytes(range(256)) * 3
    expected = crc32c(data)
    assert crc32c(bytearray(data)) == expected
    assert crc32c(memoryview(data)) == expected
    assert crc32c(np.frombuffer(data, np.uint8).data) == expected  # an array, in place


def test_masked_crc32c_worked_example() -> None:
    # TB_FORMAT.md §8.2: the length bytes of a 46-byte event, and the event itself.
    length = struct.pack("<Q", 46)
    assert crc32c(length) == 0x7076ABEA
    assert masked_crc32c(length) == 0xFA57CBC5  # rotate right by 15, add 0xA282EAD8


@settings(max_examples=50)
@given(data=st.binary(max_size=200))
def test_masked_crc32c_is_rotate_right_15_plus_delta(data: bytes) -> None:
    crc = crc32c_reference(data)
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert masked_crc32c(data) == (rotated + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.tensorboard
@settings(max_examples=25)
@given(data=st.binary(max_size=200))
def test_masked_crc32c_equals_tensorboards(data: bytes) -> None:
    stub = pytest.importorskip("tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
    assert masked_crc32c(data) == stub.masked_crc32c(data)
    assert crc32c(data) == stub.crc32c(data)


# -- golden records (TB_FORMAT.md §8) ------------------------------------------------------------

FIRST_EVENT = hexbytes("09 00 00 00 00 00 00 f0 3f 1a 0d") + b"brain.Event:2"
FIRST_RECORD = (
    hexbytes("18 00 00 00 00 00 00 00 a3 7f 4b 22") + FIRST_EVENT + hexbytes("86 bf 57 7a")
)
SCALAR_EVENT = hexbytes(
    """09 00 00 00 00 00 00 f0 3f 10 03 2a 21 0a 1f 0a 04 6c 6f 73 73 42 0a 08 01
    12 00 2a 04 00 00 00 3f 4a 0b 0a 09 0a 07 73 63 61 6c 61 72 73"""
)
SCALAR_RECORD = hexbytes(
    """2e 00 00 00 00 00 00 00 c5 cb 57 fa 09 00 00 00 00 00 00 f0 3f 10 03 2a 21 0a
    1f 0a 04 6c 6f 73 73 42 0a 08 01 12 00 2a 04 00 00 00 3f 4a 0b 0a 09 0a 07 73
    63 61 6c 61 72 73 cd 64 39 b8"""
)


def test_golden_first_record() -> None:
    event = encode_event(wall_time=1.0, file_version=FILE_VERSION)
    assert FILE_VERSION == "brain.Event:2"
    assert event == FIRST_EVENT
    assert frame(event) == FIRST_RECORD


def test_golden_first_record_with_source_metadata() -> None:
    # What SummaryWriter writes first: the writer's name travels in source_metadata (10).
    event = encode_event(wall_time=1.0, file_version=FILE_VERSION, source_writer="asyncckpt")
    assert event == FIRST_EVENT + hexbytes("52 0b 0a 09") + b"asyncckpt"


def test_golden_scalar_record() -> None:
    event = encode_event(wall_time=1.0, step=3, values=[summary.scalar("loss", 0.5)])
    assert event == SCALAR_EVENT
    assert crc32c(event) == 0x3CFA8ADB
    assert masked_crc32c(event) == 0xB83964CD
    assert frame(event) == SCALAR_RECORD
    assert list(iter_records(FIRST_RECORD + SCALAR_RECORD)) == [FIRST_EVENT, SCALAR_EVENT]


def test_golden_session_logs() -> None:
    checkpoint = encode_event(
        wall_time=2.0,
        step=7,
        session_log=session_log(SessionLog.CHECKPOINT, "/ckpt/model.ckpt-7"),
    )
    assert checkpoint == (
        hexbytes("09 00 00 00 00 00 00 00 40 10 07 3a 16 08 03 12 12") + b"/ckpt/model.ckpt-7"
    )
    start = encode_event(wall_time=2.0, step=300, session_log=session_log(SessionLog.START))
    assert start == hexbytes("09 00 00 00 00 00 00 00 40 10 ac 02 3a 02 08 01")
    assert [int(status) for status in SessionLog] == [1, 2, 3]  # START, STOP, CHECKPOINT


def test_golden_histogram_value() -> None:
    value = summary.histogram("w", [0.0, 1.0, 2.0, 3.0], bins=2)
    rows = struct.pack("<6d", 0.0, 1.5, 2.0, 1.5, 3.0, 2.0)  # [left, right, count] per bucket
    assert value.encoded == (
        hexbytes("0a 01 77 42 3e 08 02 12 08 12 02 08 02 12 02 08 03 22 30")
        + rows
        + hexbytes("4a 0e 0a 0c 0a 0a")
        + b"histograms"
    )


def test_golden_text_value() -> None:
    assert (
        summary.text("notes", "hi").encoded
        == (
            hexbytes("0a 05")
            + b"notes"
            + hexbytes("42 08 08 07 12 00 42 02 68 69 4a 08 0a 06 0a 04")
        )
        + b"text"
    )


def test_golden_empty_histogram_is_all_zero_buckets() -> None:
    # As TensorBoard's histogram_pb: [bins, 3] zeros, not an empty tensor.
    assert np.array_equal(histogram_buckets([], bins=3), np.zeros((3, 3)))
    value = summary.histogram("w", np.array([]), bins=1)
    assert value.encoded == (
        hexbytes("0a 01 77 42 26 08 02 12 08 12 02 08 01 12 02 08 03 22 18")
        + bytes(24)
        + hexbytes("4a 0e 0a 0c 0a 0a")
        + b"histograms"
    )


# -- framing --------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(payloads=st.lists(st.binary(max_size=100), max_size=5))
def test_records_round_trip(payloads: list[bytes]) -> None:
    stream = b"".join(frame(payload) for payload in payloads)
    assert len(stream) == sum(len(payload) + 16 for payload in payloads)
    assert list(iter_records(stream)) == payloads


@pytest.mark.parametrize(
    ("cut", "message"),
    [(5, "truncated record header"), (20, "truncated record at offset 0"), (61, "truncated")],
)
def test_records_cut_short_are_refused(cut: int, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        list(iter_records(SCALAR_RECORD[:cut]))


@pytest.mark.parametrize(
    ("offset", "message"),
    [(0, "length checksum"), (9, "length checksum"), (30, "data checksum"), (60, "data checksum")],
)
def test_records_with_a_flipped_bit_are_refused(offset: int, message: str) -> None:
    corrupt = bytearray(FIRST_RECORD + SCALAR_RECORD)
    corrupt[len(FIRST_RECORD) + offset] ^= 0x10
    records = iter_records(bytes(corrupt))
    assert next(records) == FIRST_EVENT  # the records before the damage still read
    with pytest.raises(RecordError, match=f"{message} mismatch at offset {len(FIRST_RECORD)}"):
        next(records)


@pytest.mark.tensorboard
def test_tensorboards_record_reader_reads_every_record(tmp_path: Path) -> None:
    stub = pytest.importorskip("tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
    errors = pytest.importorskip("tensorboard.compat.tensorflow_stub.errors")
    payloads = [
        FIRST_EVENT,
        SCALAR_EVENT,
        b"",
        bytes(range(256)) * 40,
        encode_event(wall_time=3.0, step=2**40, values=[summary.text("t", "x" * 300)]),
    ]
    path = tmp_path / "events.out.tfevents.0000000001.example"
    path.write_bytes(b"".join(frame(payload) for payload in payloads))
    reader = stub.PyRecordReader_New(str(path).encode())
    read = []
    while True:
        try:
            reader.GetNext()  # raises DataLossError on a bad CRC or a torn record
        except errors.OutOfRangeError:
            break
        read.append(reader.record())
    assert read == payloads


# -- messages ---------------------------------------------------------------------------------


def test_events_refuse_what_would_hide_data() -> None:
    for wall_time in (math.nan, math.inf, -math.inf):  # rustboard abandons the file
        with pytest.raises(ValueError, match="wall_time must be finite"):
            encode_event(wall_time=wall_time)
    with pytest.raises(ValueError, match="step must be >= 0"):
        encode_event(wall_time=1.0, step=-1)
    with pytest.raises(ValueError, match=r"step must be < 2\*\*63 \(an int64\)"):
        encode_event(wall_time=1.0, step=2**63)  # TensorBoard would read it as -2**63


def test_event_fields_come_in_field_number_order() -> None:
    event = encode_event(
        wall_time=1.5,
        step=2**40,
        values=[summary.scalar("a", 1.0), summary.scalar("b", 2.0)],
    )
    fields = parse(event)
    assert list(fields) == [1, 2, 5]
    assert struct.unpack("<d", fields[1][0]) == (1.5,)
    assert fields[2] == [2**40]
    assert [tensor_of(value)[0] for value in parse(fields[5][0])[1]] == ["a", "b"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, 0.0),
        (-2.5, -2.5),
        (0.1, 0.10000000149011612),  # float32 precision
        (1e-46, 0.0),  # below the smallest float32
        (3.4e38, 3.3999999521443642e38),
        (1e39, math.inf),  # beyond float32: infinite, as TensorBoard's scalar_pb stores it
        pytest.param(-(2**1100), -math.inf, id="int-beyond-float64"),
        (math.inf, math.inf),
        (-math.inf, -math.inf),
        (math.nan, math.nan),  # NaN and infinities are kept: both loaders show them
    ],
)
def test_scalar_is_a_rank0_float32_tensor_with_the_scalars_plugin(
    value: float, expected: float
) -> None:
    tag, tensor, shape, metadata = tensor_of(summary.scalar("loss/train", value).encoded)
    assert tag == "loss/train"
    assert plugin_of(metadata) == "scalars"
    assert sorted(tensor) == [1, 2, 5]  # dtype, shape, float_val
    assert tensor[1] == [1]  # DT_FLOAT: rustboard drops any other dtype
    assert shape == []  # rank 0
    (stored,) = struct.unpack("<f", tensor[5][0])
    assert stored == expected or (math.isnan(stored) and math.isnan(expected))


@pytest.mark.parametrize("value", [np.float16(0.25), np.int64(7), np.float64(0.1), 3])
def test_scalar_takes_real_numbers(value: Any) -> None:
    _, tensor, _, _ = tensor_of(summary.scalar("x", value).encoded)
    assert struct.unpack("<f", tensor[5][0]) == (float(np.float32(value)),)


@pytest.mark.parametrize("value", ["1.0", None, 1j, np.complex64(1j), np.ones(1), [1.0]])
def test_scalar_refuses_what_is_not_a_real_number(value: Any) -> None:
    with pytest.raises(TypeError, match="must be a real number"):
        summary.scalar("x", value)


def test_tags_must_be_non_empty_strings() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        summary.scalar("", 1.0)
    with pytest.raises(TypeError, match="must be a str, not bytes"):
        summary.text(b"tag", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str, not int"):
        summary.histogram(3, [1.0])  # type: ignore[arg-type]


def test_a_summary_value_shows_its_tag_not_its_bytes() -> None:
    assert repr(summary.scalar("loss", 1.0)) == "SummaryValue(tag='loss', 31 bytes)"


# -- the scalar fast path: the generic bytes, from bytes cached per tag ------------------------


def generic_scalar_record(tag: Any, value: Any, step: int, wall_time: float) -> bytes:
    return frame(encode_event(wall_time=wall_time, step=step, values=[summary.scalar(tag, value)]))


SCALAR_VALUES = (
    st.floats()  # NaN with any payload and sign, infinities, subnormals, beyond float32
    | st.floats(width=32)
    | st.integers(min_value=-(2**1100), max_value=2**1100)
    | st.booleans()
    | st.floats(width=32).map(np.float32)
    | st.floats().map(np.float64)
)


_NAN_WITH_PAYLOAD = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_DEAD_BEEF))[0]

# The edges the property below draws from, each once: kept out of the slow mark.
EDGE_POINTS: list[tuple[Any, int, float]] = [
    (1.5, 0, 0.0),
    (_NAN_WITH_PAYLOAD, 1, -0.0),
    (float("-inf"), 127, 1_795_210_956.5),
    (5e-324, 128, 1e300),  # subnormal
    (3.4028235e38 * 2, 2**14 - 1, -1.5),  # beyond float32
    (2**1100, 2**14, 2.0),
    (-(2**1100), 2**21 - 1, 3.0),
    (True, 2**21, 4.0),
    (np.float32(0.1), MAX_STEP, 5.0),
    (np.float64(-2.5), 2**22, 6.0),
]


@pytest.mark.parametrize(
    "tag", ["l", "x" * 127, "x" * 128, "é" * 64, "t" * 300], ids=["1", "127", "128", "2byte", "300"]
)
def test_the_scalar_fast_path_writes_the_generic_bytes_at_the_edges(tag: str) -> None:
    records = ScalarRecords()
    for value, step, wall_time in EDGE_POINTS:  # the first one caches the tag; the rest use it
        assert records.record(tag, value, step, wall_time) == generic_scalar_record(
            tag, value, step, wall_time
        )


@pytest.mark.slow
@settings(max_examples=300)
@given(
    tag=st.text(min_size=1, max_size=300),  # lengths past 127: two-byte length fields
    points=st.lists(
        st.tuples(
            SCALAR_VALUES,
            st.integers(min_value=0, max_value=MAX_STEP)
            | st.integers(min_value=0, max_value=2**22)
            | st.sampled_from([0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, MAX_STEP]),
            st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -0.0]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_the_scalar_fast_path_writes_the_generic_bytes(
    tag: str, points: list[tuple[Any, int, float]]
) -> None:
    records = ScalarRecords()
    for value, step, wall_time in points:  # the first one caches the tag; the rest use it
        assert records.record(tag, value, step, wall_time) == generic_scalar_record(
            tag, value, step, wall_time
        )


@pytest.mark.parametrize(
    ("tag", "value", "error", "message"),
    [
        ("", 1.0, ValueError, "must not be empty"),
        (b"loss", 1.0, TypeError, "must be a str, not bytes"),
        (["loss"], 1.0, TypeError, "must be a str, not list"),
        ("loss", "1.0", TypeError, "must be a real number"),
        ("loss", 1j, TypeError, "must be a real number"),
    ],
)
def test_the_scalar_fast_path_refuses_what_scalar_refuses(
    tag: Any, value: Any, error: type[Exception], message: str
) -> None:
    records = ScalarRecords()
    records.record("loss", 1.0, 1, 1.0)  # a known tag takes the fast path
    with pytest.raises(error, match=message):
        records.record(tag, value, 2, 1.0)
    with pytest.raises(error, match=message):
        summary.scalar(tag, value)


@pytest.mark.parametrize(
    ("values", "bins", "rows"),
    [
        ([0, 1, 2, 3], 3, [[0, 1, 1], [1, 2, 1], [2, 3, 2]]),  # the maximum is in the last bucket
        ([5, 5, 5], 2, [[5, 5, 0], [5, 5, 3]]),  # all equal: the whole count in the last one
        ([[1, 2], [3, 4]], 1, [[1, 4, 4]]),  # any shape
        (np.arange(4, dtype=np.int8), 2, [[0, 1.5, 2], [1.5, 3, 2]]),
    ],
)
def test_histogram_buckets(values: Any, bins: int, rows: list[list[float]]) -> None:
    buckets = histogram_buckets(values, bins)
    assert buckets.dtype == np.float64
    assert buckets.tolist() == rows


@pytest.mark.parametrize(
    ("values", "bins", "counts"),
    [
        ([0.1, 0.3, 0.7], 9, [1, 0, 0, 1, 0, 0, 0, 0, 1]),  # np.histogram: [1, 0, 1, 0, ...]
        ([0.2, 0.3, 0.7], 5, [2, 0, 0, 0, 1]),  # np.histogram: [1, 1, 0, 0, 1]
    ],
)
def test_histogram_counts_values_near_an_edge_as_tensorboard_does(
    values: list[float], bins: int, counts: list[int]
) -> None:
    # floor((value - min) / width), TensorBoard's rule, not numpy's comparison with the edges.
    assert histogram_buckets(values, bins)[:, 2].tolist() == counts


def test_histogram_is_a_k_by_3_float64_tensor_with_the_histograms_plugin() -> None:
    data = np.random.default_rng(0).normal(size=1000)
    tag, tensor, shape, metadata = tensor_of(summary.histogram("w", data).encoded)
    assert (tag, plugin_of(metadata), shape) == ("w", "histograms", [30, 3])
    assert tensor[1] == [2]  # DT_DOUBLE
    rows = np.frombuffer(tensor[4][0], "<f8").reshape(30, 3)  # tensor_content
    assert rows[:, 2].sum() == 1000
    assert (rows[1:, 0] == rows[:-1, 1]).all()  # contiguous buckets
    assert (rows[0, 0], rows[-1, 1]) == (data.min(), data.max())


@pytest.mark.parametrize(
    ("values", "bins", "error", "message"),
    [
        ([1.0, math.nan], 30, ValueError, "must be finite"),
        ([math.inf], 30, ValueError, "must be finite"),
        ([-1e308, 1e308], 30, ValueError, "span less than the float64 range"),
        ([1.0], 0, ValueError, "bins must be >= 1"),
        ([1.0], 2.0, TypeError, "bins must be an int"),
        (["a"], 30, ValueError, "could not convert"),
    ],
)
def test_histogram_refuses(values: Any, bins: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        summary.histogram("w", values, bins=bins)


def test_histogram_of_a_subnormal_range_keeps_every_count() -> None:
    # The bucket width underflows to 0: the minimum goes first, anything above it last.
    rows = histogram_buckets([0.0, 5e-324, 5e-324], bins=3)
    assert rows[:, 2].tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    "text", ["", "plain", "**Markdown** `code`\n\n| a |\n|---|", "héllo ✓ 漢字"]
)
def test_text_is_a_rank0_string_tensor_with_the_text_plugin(text: str) -> None:
    tag, tensor, shape, metadata = tensor_of(summary.text("notes", text).encoded)
    assert (tag, plugin_of(metadata), shape) == ("notes", "text", [])
    assert tensor[1] == [7]  # DT_STRING: string_val, never tensor_content
    assert tensor[8] == [text.encode()]


def test_text_refuses_what_is_not_a_str() -> None:
    with pytest.raises(TypeError, match="must be a str, not bytes"):
        summary.text("notes", b"raw")  # type: ignore[arg-type]


# -- images ---------------------------------------------------------------------------------------

RNG = np.random.default_rng(2024)
HWC_PIXELS = {
    channels: RNG.integers(0, 256, (5, 7, channels), np.uint8) for channels in range(1, 5)
}


def image_cases() -> list[Any]:
    return [
        pytest.param(pixels, dtype, layout, id=f"{layout}-{channels}-{dtype}")
        for channels, pixels in HWC_PIXELS.items()
        for dtype in ("uint8", "float32", "float64")
        for layout in ["HWC", "CHW"] + (["HW"] if channels == 1 else [])
    ]


def as_given(pixels: np.ndarray[Any, Any], dtype: str, layout: str) -> np.ndarray[Any, Any]:
    """``pixels`` (HWC uint8) as a user would pass them."""
    given: np.ndarray[Any, Any] = pixels if dtype == "uint8" else (pixels / 255.0).astype(dtype)
    if layout == "CHW":
        return np.moveaxis(given, -1, 0)
    if layout == "HW":
        return given[:, :, 0]
    return given


def image_blobs(value: summary.SummaryValue) -> list[bytes]:
    _, tensor, shape, metadata = tensor_of(value.encoded)
    assert plugin_of(metadata) == "images"
    assert tensor[1] == [7]  # DT_STRING
    assert shape == [len(tensor[8])]  # rank 1: rustboard refuses any other shape
    return list(tensor[8])


@pytest.mark.parametrize(("pixels", "dtype", "layout"), image_cases())
def test_image_is_a_blob_sequence_of_width_height_png(
    pixels: np.ndarray[Any, Any], dtype: str, layout: str
) -> None:
    value = summary.image("sample", as_given(pixels, dtype, layout), dataformats=layout)
    width, height, png = image_blobs(value)
    assert (width, height) == (b"7", b"5")
    assert np.array_equal(decode_png(png), pixels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_image_png_decodes_with_pillow(channels: int) -> None:
    image_module = pytest.importorskip("PIL.Image")
    pixels = HWC_PIXELS[channels]
    _, _, png = image_blobs(summary.image("sample", pixels))
    with image_module.open(io.BytesIO(png)) as decoded:
        assert decoded.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        array = np.asarray(decoded)
    assert np.array_equal(array.reshape(pixels.shape), pixels)


def test_float_pixels_are_scaled_rounded_and_clipped() -> None:
    floats = np.array([[-0.5, 0.0, 0.2, 0.5, 1.0, 7.0]], np.float32)
    _, _, png = image_blobs(summary.image("g", floats, dataformats="HW"))
    assert decode_png(png)[0, :, 0].tolist() == [0, 0, 51, 128, 255, 255]


@pytest.mark.parametrize(
    ("pixels", "dataformats", "error", "message"),
    [
        (np.zeros((2, 2, 3), np.uint8), "NHWC", ValueError, "dataformats must be"),
        (np.zeros((2, 2, 5), np.uint8), "HWC", ValueError, "1 to 4 channels"),
        (np.zeros((0, 2, 3), np.uint8), "HWC", ValueError, "no empty side"),
        (np.zeros((2, 2), np.uint8), "HWC", ValueError, "got shape \\(2, 2\\)"),
        (np.zeros((2, 2, 3), np.uint8), "HW", ValueError, "got shape"),
        (np.zeros((1, 2, 2, 3), np.uint8), "CHW", ValueError, "got shape"),
        (np.zeros((2, 2, 3), np.int32), "HWC", TypeError, "uint8 or float"),
        (np.zeros((2, 2), bool), "HW", TypeError, "uint8 or float"),
        (np.full((2, 2), np.nan), "HW", ValueError, "must be finite"),
    ],
)
def test_image_refuses(
    pixels: np.ndarray[Any, Any], dataformats: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        summary.image("sample", pixels, dataformats=dataformats)


# -- the same bytes as TensorBoard's own classes ------------------------------------------------


@pytest.mark.tensorboard
@settings(max_examples=40)
@given(
    value=st.floats(width=32) | st.floats(allow_nan=False),
    tag=st.text(min_size=1, max_size=20),
)
def test_scalar_bytes_equal_tensorboards_scalar_pb(value: float, tag: str) -> None:
    scalar_v2 = pytest.importorskip("tensorboard.plugins.scalar.summary_v2")
    with np.errstate(over="ignore"):  # scalar_pb casts to float32 with numpy
        expected = scalar_v2.scalar_pb(tag, value).value[0].SerializeToString()
    assert summary.scalar(tag, value).encoded == expected


@pytest.mark.tensorboard
@settings(max_examples=60)
@given(
    values=st.lists(
        st.floats(-1e6, 1e6) | st.sampled_from([0.1, 0.2, 0.3, 1 / 3, 2 / 3, 1.0]),
        max_size=40,
    ),
    bins=st.integers(1, 40),
)
def test_histogram_bytes_equal_tensorboards_histogram_pb(values: list[float], bins: int) -> None:
    histogram_v2 = pytest.importorskip("tensorboard.plugins.histogram.summary_v2")
    expected = histogram_v2.histogram_pb("w", values, buckets=bins).value[0].SerializeToString()
    assert summary.histogram("w", values, bins=bins).encoded == expected


@pytest.mark.tensorboard
@settings(max_examples=40)
@given(text=st.text(max_size=50))
def test_text_bytes_equal_tensorboards_text_pb(text: str) -> None:
    text_v2 = pytest.importorskip("tensorboard.plugins.text.summary_v2")
    assert (
        summary.text("notes", text).encoded
        == text_v2.text_pb("notes", text).value[0].SerializeToString()
    )


@pytest.mark.tensorboard
def test_events_equal_tensorboards_event_pb2() -> None:
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    summary_pb2 = pytest.importorskip("tensorboard.compat.proto.summary_pb2")
    first = event_pb2.Event(
        wall_time=1795210956.25,
        file_version="brain.Event:2",
        source_metadata=event_pb2.SourceMetadata(writer="asyncckpt"),
    )
    assert (
        encode_event(wall_time=1795210956.25, file_version=FILE_VERSION, source_writer="asyncckpt")
        == first.SerializeToString()
    )
    checkpoint = event_pb2.Event(
        wall_time=2.0,
        step=12,
        session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.CHECKPOINT, checkpoint_path="d/model.ckpt-12"
        ),
    )
    assert (
        encode_event(
            wall_time=2.0,
            step=12,
            session_log=session_log(SessionLog.CHECKPOINT, "d/model.ckpt-12"),
        )
        == checkpoint.SerializeToString()
    )
    start = event_pb2.Event(
        wall_time=3.0, step=5, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    )
    assert encode_event(wall_time=3.0, step=5, session_log=session_log(SessionLog.START)) == (
        start.SerializeToString()
    )
    values = [summary.scalar("a", 1.0), summary.text("b", "x"), summary.histogram("c", [1, 2])]
    data = event_pb2.Event(
        wall_time=4.0,
        step=6,
        summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value.FromString(value.encoded) for value in values]
        ),
    )
    assert encode_event(wall_time=4.0, step=6, values=values) == data.SerializeToString()


@pytest.mark.tensorboard
def test_images_parse_as_tensorboards_blob_sequences() -> None:
    summary_pb2 = pytest.importorskip("tensorboard.compat.proto.summary_pb2")
    tensor_util = pytest.importorskip("tensorboard.util.tensor_util")
    image_metadata = pytest.importorskip("tensorboard.plugins.image.metadata")
    value = summary_pb2.Summary.Value.FromString(summary.image("s", HWC_PIXELS[3]).encoded)
    assert value.SerializeToString() == summary.image("s", HWC_PIXELS[3]).encoded
    assert value.metadata.plugin_data.plugin_name == image_metadata.PLUGIN_NAME
    assert image_metadata.parse_plugin_metadata(value.metadata.plugin_data.content).version == 0
    blobs = tensor_util.make_ndarray(value.tensor)
    assert blobs.shape == (3,)
    assert (blobs[0], blobs[1]) == (b"7", b"5")
    assert np.array_equal(decode_png(blobs[2]), HWC_PIXELS[3])
