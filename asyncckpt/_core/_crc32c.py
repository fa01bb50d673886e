"""CRC32C (Castagnoli) over any buffer, and TFRecord's masked variant; no package imports.

One place wraps the untyped C extension so the rest of the package sees typed functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import crc32c as _c

if TYPE_CHECKING:
    from ._types import Buffer

__all__ = ["crc32c", "masked_crc32c"]

_MASK_DELTA = 0xA282EAD8


def crc32c(data: Buffer, value: int = 0) -> int:
    """Return the CRC32C of ``data``, continuing from ``value`` (the CRC of what came before).

    The extension reads the buffer in place (no copy) and releases the GIL on large inputs.
    """
    return int(_c.crc32c(data, value=value))


def masked_crc32c(data: Buffer) -> int:
    """Return TFRecord's masked CRC32C of ``data`` (rotate right by 15, add a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
