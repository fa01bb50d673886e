"""The few TensorBoard protobuf messages asyncckpt writes, hand-encoded (../shared/TB_FORMAT.md).

Pure and sync: Event, Summary, Summary.Value, SummaryMetadata/PluginData, TensorProto,
TensorShapeProto and SessionLog, plus a standard-library PNG encoder for images. Fields are
emitted in increasing field-number order and proto3 defaults are omitted, so the bytes equal
what TensorBoard's own generated classes serialize.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "FILE_VERSION",
    "MAX_STEP",
    "SCALARS_METADATA",
    "SessionLog",
    "SummaryValue",
    "encode_event",
    "encode_png",
    "histogram",
    "image",
    "scalar",
    "session_log",
    "text",
    "varint",
]

FILE_VERSION: Final = "brain.Event:2"
MAX_STEP: Final = 2**63 - 1
"""``Event.step`` is an int64: TensorBoard reads a larger step as another (negative) one, or,
from 2**70 on, not at all, dropping the rest of the file."""

# Wire types.
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# TensorProto dtypes.
_DT_FLOAT, _DT_DOUBLE, _DT_STRING = 1, 2, 7


class SessionLog(IntEnum):
    """``SessionLog.status``: what happened to the session at this step."""

    START = 1
    """The run (re)starts here: TensorBoard drops points of later steps written before."""
    STOP = 2
    """The run stopped."""
    CHECKPOINT = 3
    """A checkpoint was written (its path travels with the event)."""


# Each one-byte varint once: lengths, keys and most steps are below 128.
_ONE_BYTE: Final = tuple(bytes((value,)) for value in range(0x80))


def varint(value: int) -> bytes:
    """Encode a proto ``uint64``/``int64`` varint (negative: ten-byte two's complement)."""
    if value < 0:
        value += 1 << 64
    elif value < 0x80:
        return _ONE_BYTE[value]
    elif value < 0x4000:  # two bytes, without the loop: most lengths, steps below 16384
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def _message(field: int, payload: bytes) -> bytes:
    """A length-delimited field, written even when empty (a set sub-message)."""
    return _key(field, _LENGTH) + varint(len(payload)) + payload


def _string(field: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _message(field, data) if data else b""


def _uint(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + varint(value) if value else b""


def _double(field: int, value: float) -> bytes:
    return _key(field, _FIXED64) + struct.pack("<d", value) if value else b""


def _plugin_metadata(plugin_name: str) -> bytes:
    # SummaryMetadata { plugin_data { plugin_name } }: content and data_class stay empty so
    # both TensorBoard loaders derive the data class from the plugin name.
    return _message(9, _message(1, _string(1, plugin_name)))


SCALARS_METADATA: Final = _plugin_metadata("scalars")
"""The last field of a scalar's ``Summary.Value`` (what follows its float32 value)."""
_HISTOGRAMS: Final = _plugin_metadata("histograms")
_TEXT: Final = _plugin_metadata("text")
_IMAGES: Final = _plugin_metadata("images")
_RANK0_FLOAT_HEAD: Final = _uint(1, _DT_FLOAT) + _message(2, b"") + _key(5, _LENGTH) + b"\x04"


def _shape(dims: Sequence[int]) -> bytes:
    return _message(2, b"".join(_message(2, _uint(1, size)) for size in dims))


@dataclass(frozen=True, slots=True)
class SummaryValue:
    """One tagged summary value, already encoded (``asyncckpt.summary.scalar`` etc.)."""

    tag: str
    encoded: bytes
    """The serialized ``Summary.Value`` message."""

    def __repr__(self) -> str:
        return f"SummaryValue(tag={self.tag!r}, {len(self.encoded)} bytes)"


def _check_tag(tag: object) -> bytes:
    if not isinstance(tag, str):
        raise TypeError(f"a summary tag must be a str, not {type(tag).__name__}")
    if not tag:
        raise ValueError("a summary tag must not be empty")
    return _string(1, tag)


def scalar(tag: str, value: float) -> SummaryValue:
    """A scalar: a rank-0 float32 tensor with the ``scalars`` plugin (what every loader reads).

    Args:
        tag: the chart's name (``/`` groups charts).
        value: any real number (stored as float32; NaN and infinities are kept).
    """
    if isinstance(value, complex | np.complexfloating) or not isinstance(
        value, int | float | np.number
    ):
        raise TypeError(f"scalar {tag!r} must be a real number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64: infinite, as numpy casts it
        number = -math.inf if value < 0 else math.inf
    with np.errstate(over="ignore"):  # beyond float32: infinite, as TensorBoard's scalar_pb
        packed = np.array(number, "<f4").tobytes()
    tensor = _RANK0_FLOAT_HEAD + packed
    return SummaryValue(tag, _check_tag(tag) + _message(8, tensor) + SCALARS_METADATA)


def histogram_buckets(values: Any, bins: int = 30) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Return ``[bins, 3]`` rows ``[left, right, count]``, exactly as TensorBoard's own
    ``histogram_pb`` computes them (so a histogram is the same whichever library wrote it).

    ``bins`` equal-width buckets between the minimum and the maximum, a value going to bucket
    ``floor((value - min) / width)`` (the maximum to the last); when every value is equal,
    ``bins`` zero-width buckets at that value with the whole count in the last one; no values,
    ``bins`` all-zero rows.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"bins must be an int, not {type(bins).__name__}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, not {bins}")
    rows = np.zeros((bins, 3), np.float64)
    if not data.size:
        return rows
    if not np.isfinite(data).all():
        raise ValueError("histogram values must be finite (drop NaN and infinities first)")
    low, high = float(data.min()), float(data.max())
    if low == high:
        rows[:, 0] = rows[:, 1] = low
        rows[-1, 2] = data.size
        return rows
    if not np.isfinite(high - low):
        raise ValueError("histogram values must span less than the float64 range")
    # TensorBoard's arithmetic, step by step: np.histogram assigns values that fall on an
    # edge by comparing with the edges, which differs from this in the last bit.
    width = (high - low) / bins
    with np.errstate(divide="ignore", invalid="ignore"):  # width 0: a subnormal range
        position = np.minimum(np.floor((data - low) / width), bins - 1)
    index = np.nan_to_num(position, nan=0.0).astype(np.int64)
    edges = np.linspace(low, high, bins + 1)
    rows[:, 0], rows[:, 1] = edges[:-1], edges[1:]
    rows[:, 2] = np.bincount(index, minlength=bins)
    return rows


def histogram(tag: str, values: Any, bins: int = 30) -> SummaryValue:
    """A histogram of ``values``: a ``[bins, 3]`` float64 tensor with the ``histograms``
    plugin (see ``histogram_buckets``)."""
    rows = histogram_buckets(values, bins)
    content = rows.astype("<f8").tobytes()
    tensor = _uint(1, _DT_DOUBLE) + _shape(rows.shape) + _string(4, content)
    return SummaryValue(tag, _check_tag(tag) + _message(8, tensor) + _HISTOGRAMS)


def text(tag: str, value: str) -> SummaryValue:
    """Markdown text: a rank-0 string tensor with the ``text`` plugin."""
    if not isinstance(value, str):
        raise TypeError(f"text {tag!r} must be a str, not {type(value).__name__}")
    tensor = _uint(1, _DT_STRING) + _message(2, b"") + _message(8, value.encode())
    return SummaryValue(tag, _check_tag(tag) + _message(8, tensor) + _TEXT)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_COLOR_TYPE: Final = {1: 0, 2: 4, 3: 2, 4: 6}  # gray, gray+alpha, RGB, RGBA


def encode_png(pixels: np.ndarray[Any, Any]) -> bytes:
    """Encode ``[height, width, channels]`` uint8 pixels (1-4 channels) as PNG, stdlib only."""
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # filter byte 0 per row
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def _image_pixels(image: Any, dataformats: str) -> np.ndarray[Any, Any]:
    array = np.asarray(image)
    if dataformats == "HW":
        array = array[:, :, None]
    elif dataformats == "CHW":
        array = np.moveaxis(array, 0, -1)
    elif dataformats != "HWC":
        raise ValueError(f"dataformats must be 'HWC', 'CHW' or 'HW', not {dataformats!r}")
    if array.ndim != 3 or array.shape[2] not in _PNG_COLOR_TYPE or 0 in array.shape[:2]:
        raise ValueError(
            f"an image must be {dataformats} with 1 to 4 channels and no empty side, got "
            f"shape {np.shape(image)}"
        )
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image pixels must be finite")
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    raise TypeError(f"image pixels must be uint8 or float in [0, 1], not {array.dtype}")


def image(tag: str, pixels: Any, dataformats: str = "HWC") -> SummaryValue:
    """An image (uint8, or float in [0, 1]) as PNG: the ``images`` plugin's blob sequence."""
    array = _image_pixels(pixels, dataformats)
    height, width = array.shape[:2]
    blobs = (str(width).encode(), str(height).encode(), encode_png(array))
    tensor = (
        _uint(1, _DT_STRING) + _shape((len(blobs),)) + b"".join(_message(8, blob) for blob in blobs)
    )
    return SummaryValue(tag, _check_tag(tag) + _message(8, tensor) + _IMAGES)


def session_log(status: SessionLog, checkpoint_path: str = "", msg: str = "") -> bytes:
    """Encode a ``SessionLog`` message."""
    return _uint(1, int(status)) + _string(2, checkpoint_path) + _string(3, msg)


def encode_event(
    *,
    wall_time: float,
    step: int = 0,
    file_version: str | None = None,
    values: Sequence[SummaryValue] | None = None,
    session_log: bytes | None = None,
    source_writer: str | None = None,
) -> bytes:
    """Encode one ``Event``: a file version, a summary of values, or a session log.

    Raises:
        ValueError: a non-finite wall time (TensorBoard's default loader would abandon the
            rest of the file), or a step that is negative or beyond an int64.
    """
    if not math.isfinite(wall_time):
        raise ValueError(f"wall_time must be finite, not {wall_time}")
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    if step > MAX_STEP:
        raise ValueError(f"step must be < 2**63 (an int64), not {step}")
    parts = [_double(1, wall_time), _uint(2, step)]
    if file_version is not None:
        parts.append(_string(3, file_version))
    if values is not None:
        parts.append(_message(5, b"".join(_message(1, value.encoded) for value in values)))
    if session_log is not None:
        parts.append(_message(7, session_log))
    if source_writer is not None:
        parts.append(_message(10, _string(1, source_writer)))
    return b"".join(parts)
