"""TFRecord framing of event files: length, masked CRC32C of the length, data, masked CRC32C.

Pure and sync; knows nothing of events or files.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from .._core._crc32c import masked_crc32c

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["RecordError", "frame", "iter_records"]

_LENGTH: Final = struct.Struct("<Q")
_CRC: Final = struct.Struct("<I")


class RecordError(ValueError):
    """A TFRecord stream is truncated or fails a checksum."""


def frame(data: bytes) -> bytes:
    """Return ``data`` framed as one TFRecord (16 bytes of overhead)."""
    length = _LENGTH.pack(len(data))
    return b"".join(
        (length, _CRC.pack(masked_crc32c(length)), data, _CRC.pack(masked_crc32c(data)))
    )


def iter_records(buffer: bytes) -> Iterator[bytes]:
    """Yield the data of each record in ``buffer``, checking both checksums.

    Raises:
        RecordError: a record is cut short or a checksum does not match (with its offset).
    """
    view = memoryview(buffer)
    offset = 0
    while offset < len(view):
        if offset + 12 > len(view):
            raise RecordError(f"truncated record header at offset {offset}")
        length_bytes = bytes(view[offset : offset + 8])
        (length,) = _LENGTH.unpack(length_bytes)
        (length_crc,) = _CRC.unpack(view[offset + 8 : offset + 12])
        if masked_crc32c(length_bytes) != length_crc:
            raise RecordError(f"length checksum mismatch at offset {offset}")
        end = offset + 12 + length + 4
        if end > len(view):
            raise RecordError(f"truncated record at offset {offset}")
        data = bytes(view[offset + 12 : offset + 12 + length])
        (data_crc,) = _CRC.unpack(view[end - 4 : end])
        if masked_crc32c(data) != data_crc:
            raise RecordError(f"data checksum mismatch at offset {offset}")
        yield data
        offset = end
