"""The scalar fast path: a framed scalar event from bytes cached per tag.

Pure and sync. ``ScalarRecords.record`` returns exactly
``frame(encode_event(wall_time=..., step=..., values=[scalar(tag, value)]))`` (a hypothesis
test holds it to that), packing only the wall time, the step and the float32 value of each
event with one ``struct`` call; every unusual case goes to the generic encoders.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

from .._core._crc32c import crc32c
from . import _proto
from ._records import frame

__all__ = ["ScalarRecords"]

# TFRecord's checksum mask, applied here rather than by _crc32c.masked_crc32c: a Python call
# less per scalar.
_MASK_DELTA: Final = 0xA282EAD8
_CRC: Final = struct.Struct("<I")
_VALUE_SIZE: Final = 4  # the float32
_WALL_TIME_KEY: Final = 0x09  # Event.wall_time: field 1, fixed64
_STEP_KEY: Final = 0x10  # Event.step: field 2, varint
# Values that struct packs as float32 exactly as the generic path rounds them (both are C's
# cast): a Python float and numpy's usual results (np.mean of float32 or float64 arrays).
_FAST_VALUES: Final = frozenset((float, np.float64, np.float32))
# Event.step of steps below 128; step 0 is omitted (the proto3 default).
_SMALL_STEP_FIELDS: Final = (b"", *(bytes((_STEP_KEY, step)) for step in range(1, 0x80)))


def _step_field(step: int) -> bytes:
    if step < 0x80:
        return _SMALL_STEP_FIELDS[step]
    if step < 0x4000:
        return bytes((_STEP_KEY, (step & 0x7F) | 0x80, step >> 7))
    if step < 0x200000:
        return bytes((_STEP_KEY, (step & 0x7F) | 0x80, ((step >> 7) & 0x7F) | 0x80, step >> 14))
    return bytes((_STEP_KEY,)) + _proto.varint(step)


class _Tag:
    """The constant bytes of one tag's events."""

    __slots__ = ("head", "layouts", "tail")

    def __init__(self, head: bytes, tail: bytes) -> None:
        self.head = head  # the summary field up to the value
        self.tail = tail  # and after it
        # The length of the step field -> the layout of such an event (wall time, step,
        # head, value, tail), and the TFRecord length and its checksum for it.
        self.layouts: dict[int, tuple[struct.Struct, bytes]] = {}

    def add_layout(self, step_field: int) -> tuple[struct.Struct, bytes]:
        event = struct.Struct(f"<Bd{step_field}s{len(self.head)}sf{len(self.tail)}s")
        layout = self.layouts[step_field] = (event, frame(bytes(event.size))[:12])
        return layout


class ScalarRecords:
    """Encode scalar event records, caching the constant bytes of each tag.

    Two events of one tag differ only in their wall time, step and value: the bytes in
    between are cut from the generic encoding of the tag's first event, so that the two
    encodings can not drift apart.
    """

    __slots__ = ("_tags",)

    def __init__(self) -> None:
        self._tags: dict[str, _Tag] = {}

    def record(self, tag: str, value: float, step: int, wall_time: float) -> bytes:
        """Return the framed event of ``value`` at ``step`` for ``tag``.

        ``step`` must already be checked (an int, 0 to ``MAX_STEP``) and ``wall_time`` be
        finite.

        Raises:
            TypeError: ``tag`` is not a str, ``value`` not a real number.
            ValueError: ``tag`` is empty.
        """
        known = self._tags.get(tag) if type(tag) is str else None
        # A new tag, other kinds of values, NaN (whose payload bits struct and numpy might
        # not round alike) and a wall time of 0 (omitted, as the proto3 default) go the
        # generic way.
        if known is None or type(value) not in _FAST_VALUES or value != value or not wall_time:
            return self._generic(tag, value, step, wall_time)
        steps = _step_field(step)
        layout, record_head = known.layouts.get(len(steps)) or known.add_layout(len(steps))
        try:
            event = layout.pack(_WALL_TIME_KEY, wall_time, steps, known.head, value, known.tail)
        except OverflowError:  # beyond float32: struct refuses, the generic path makes it inf
            return self._generic(tag, value, step, wall_time)
        crc = crc32c(event)
        return b"".join(
            (
                record_head,
                event,
                _CRC.pack((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF),
            )
        )

    def _generic(self, tag: str, value: float, step: int, wall_time: float) -> bytes:
        scalar = _proto.scalar(tag, value)  # checks the tag and the value
        if tag not in self._tags:
            # With the defaults (wall time 0, step 0) omitted, an event is its summary field.
            field = _proto.encode_event(wall_time=0.0, values=[scalar])
            tail = _proto.SCALARS_METADATA
            cut = len(field) - len(tail) - _VALUE_SIZE
            self._tags[tag] = _Tag(field[:cut], field[cut + _VALUE_SIZE :])
        return frame(_proto.encode_event(wall_time=wall_time, step=step, values=[scalar]))
