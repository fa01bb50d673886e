"""The checkpoint file format: encode and decode the prelude and header; pure, sync, no I/O.

Owns the byte layout (docs/FORMAT.md), versions and size limits, and is the one module that
talks to msgpack. Knows nothing of files, directories or scheduling: callers read and write.

Layout (little-endian)::

    0   8  magic  b"\\x89ACKPT\\r\\n"
    8   4  u32 format version (1)
    12  4  u32 flags (0; any other value is refused)
    16  8  u64 header length H
    24  4  u32 CRC32C of the header bytes
    28  4  u32 CRC32C of bytes 0..28 (the prelude itself)
    32  H  header: a msgpack map (see HEADER_KEYS)
    ... zero padding up to the first array's offset (a multiple of ALIGNMENT)
    arrays: raw C-order bytes, each at a multiple of ALIGNMENT, zero padding between;
    the file ends with the last array (or with the header when there are no arrays).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import msgpack
import numpy as np

from .._core._crc32c import crc32c
from .._core._errors import CheckpointCorruptedError, CheckpointFormatError
from .._tree import (
    ArrayLeaf,
    Spec,
    extension_dtype,
    extension_name,
    format_path,
    install_advice,
    iter_array_refs,
    name_in_file,
    raw_dtype,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PRELUDE_SIZE",
    "ArrayEntry",
    "DtypeUnavailableError",
    "Header",
    "Layout",
    "array_part",
    "check_metadata",
    "decode_header",
    "decode_prelude",
    "dtypes_for_restore",
    "encode_head",
    "encode_header",
    "plan_layout",
]

MAGIC: Final = b"\x89ACKPT\r\n"
FORMAT_VERSION: Final = 1
PRELUDE_SIZE: Final = 32
ALIGNMENT: Final = 64
MAX_HEADER_BYTES: Final = 256 * 1024 * 1024
"""Largest header a reader accepts: far above any real tree, far below a harmful allocation."""
MAX_ARRAYS: Final = 10_000_000
MAX_DTYPE_CHARS: Final = 4096
MAX_NDIM: Final = 64  # numpy's own limit
MAX_DTYPE_NESTING: Final = 32
"""Deepest structured dtype (fields of fields) a reader accepts."""

# dtype.str as numpy writes it, for the kinds a checkpoint may hold: bool, signed and
# unsigned int, float, complex, timedelta, datetime, bytes, str, raw void. Matching it before
# numpy parses the text keeps aliases (some deprecated, some not data at all) out. ml_dtypes'
# dtypes are spelled by name instead (EXTENSION_ITEMSIZES), and looked up in that list only.
_DTYPE_STR: Final = re.compile(r"[<>|][biufcmMSUV][0-9]+(?:\[[0-9]*[A-Za-z]+\])?")

_PRELUDE = struct.Struct("<8sIIQII")
HEADER_KEYS: Final = ("arrays", "file_size", "metadata", "step", "time", "tree")


@dataclass(frozen=True, slots=True)
class ArrayEntry:
    """Where one array lives in the file and how to check it.

    ``extension`` is the name of an ml_dtypes dtype (``"bfloat16"``) the file gives the
    array, None for numpy's own. ``dtype`` is then that dtype, or its raw stand-in (unsigned
    ints of its size) where ml_dtypes is missing or ``raw_dtypes=True`` was asked for.
    """

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32c: int
    extension: str | None = None

    @property
    def dtype_name(self) -> str:
        """The dtype as saved: an ml_dtypes name (``bfloat16``) even where it reads raw."""
        return self.extension or str(self.dtype)


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded, validated header."""

    step: int | None
    time: float
    metadata: dict[str, Any]
    tree: Spec
    arrays: tuple[ArrayEntry, ...]
    file_size: int
    data_start: int
    extension_dtypes: frozenset[str] = frozenset()
    """The names of the ml_dtypes dtypes the file's arrays use."""


class DtypeUnavailableError(CheckpointFormatError):
    """An array's dtype (ml_dtypes') cannot be made here; installing a package would do.

    A fact about this machine, not the file: restoring with ``on_corrupt="fallback"`` raises
    it rather than falling back to an older checkpoint.
    """


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _dtype_descr(dtype: np.dtype[Any]) -> str | list[Any]:
    # Structured dtypes lose their fields in dtype.str ('|V8'), so they travel as descr;
    # ml_dtypes' lose their type ('<V2' for bfloat16), so they travel by name.
    if dtype.fields is not None:
        return [list(f) for f in dtype.descr]
    return extension_name(dtype) or dtype.str


def check_metadata(metadata: object) -> dict[str, Any]:
    """Validate user metadata: plain msgpack values under str keys.

    Raises:
        TypeError: metadata holds something msgpack cannot carry faithfully.
    """
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata must be a dict with str keys")
    try:
        return dict(msgpack.unpackb(msgpack.packb(metadata, strict_types=True)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"metadata must hold only None, bool, int, float, str, bytes, lists and "
            f"str-keyed dicts: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a checkpoint's arrays go, decided before their checksums are known.

    The header holds each array's CRC32C, and the arrays' offsets depend on the header's
    length. Planning with the widest msgpack encoding of every CRC fixes the offsets first,
    so the arrays can be written while their checksums are computed; the real header is
    never longer, and any bytes it leaves before ``data_start`` are zero padding.
    """

    offsets: list[int]
    data_start: int
    file_size: int


_WIDEST_CRC: Final = 0xFFFFFFFF


def plan_layout(
    *,
    step: int | None,
    time: float,
    metadata: dict[str, Any],
    tree: Spec,
    leaves: Sequence[ArrayLeaf],
) -> Layout:
    """Place the arrays of a checkpoint that has at least one."""
    if not leaves:
        raise ValueError("a checkpoint without arrays has no layout to plan: use encode_header")
    entries = _array_entries(leaves, [0] * len(leaves), None)
    data_start = 0
    while True:
        end = data_start
        for entry, leaf in zip(entries, leaves, strict=True):
            end = _align(end)
            entry[_OFFSET] = end
            end += leaf.array.nbytes
        header = _pack_header(step, time, metadata, tree, entries, end)
        if PRELUDE_SIZE + len(header) <= data_start:
            return Layout([entry[_OFFSET] for entry in entries], data_start, end)
        # The offsets depend on the header's length and the header holds the offsets: grow
        # the data start until the header fits before it (two rounds in practice).
        data_start = _align(PRELUDE_SIZE + len(header))


def encode_head(
    layout: Layout,
    *,
    step: int | None,
    time: float,
    metadata: dict[str, Any],
    tree: Spec,
    leaves: Sequence[ArrayLeaf],
    crcs: Sequence[int],
) -> bytes:
    """Encode prelude + header for arrays placed by ``layout``; at most ``data_start`` bytes."""
    header = _pack_header(
        step, time, metadata, tree, _array_entries(leaves, layout.offsets, crcs), layout.file_size
    )
    head = _encode_prelude(header) + header
    assert len(head) <= layout.data_start, "a CRC packed wider than the planned widest"
    return head


def encode_header(
    *,
    step: int | None,
    time: float,
    metadata: dict[str, Any],
    tree: Spec,
    leaves: Sequence[ArrayLeaf],
    crcs: Sequence[int],
) -> tuple[bytes, list[int], int]:
    """Encode prelude + header for arrays of known CRC32C.

    Returns:
        ``(head, offsets, file_size)``: the bytes that start the file, the offset of each
        array, and the total file size.
    """
    if not leaves:
        return _finish_without_arrays(step, time, metadata, tree)
    layout = plan_layout(step=step, time=time, metadata=metadata, tree=tree, leaves=leaves)
    head = encode_head(
        layout, step=step, time=time, metadata=metadata, tree=tree, leaves=leaves, crcs=crcs
    )
    return head, layout.offsets, layout.file_size


_OFFSET: Final = 2  # where an array entry holds its offset


def _array_entries(
    leaves: Sequence[ArrayLeaf], offsets: Sequence[int], crcs: Sequence[int] | None
) -> list[list[Any]]:
    descrs: dict[np.dtype[Any], str | list[Any]] = {}  # one per dtype, not one per array
    entries = []
    for index, (leaf, offset) in enumerate(zip(leaves, offsets, strict=True)):
        array = leaf.array
        descr = descrs.get(array.dtype)
        if descr is None:
            descr = descrs[array.dtype] = _dtype_descr(array.dtype)
        crc = _WIDEST_CRC if crcs is None else crcs[index]
        entries.append([descr, list(array.shape), offset, array.nbytes, crc])
    return entries


def _pack_header(
    step: int | None,
    time: float,
    metadata: dict[str, Any],
    tree: Spec,
    arrays: list[list[Any]],
    file_size: int,
) -> bytes:
    # A reader refuses anything but a finite float, so never write anything else (a clock
    # returning an int would otherwise produce a file that cannot be read back).
    if not math.isfinite(time):
        raise ValueError(f"checkpoint time must be a finite number, not {time!r}")
    fields = {
        "arrays": arrays,
        "file_size": file_size,
        "metadata": metadata,
        "step": step,
        "time": float(time),
        "tree": tree,
    }
    return bytes(msgpack.packb(fields, use_bin_type=True))


def _finish_without_arrays(
    step: int | None, time: float, metadata: dict[str, Any], tree: Spec
) -> tuple[bytes, list[int], int]:
    # file_size is part of the header it measures. Each round measures the header holding
    # the previous guess; guesses only grow, with the msgpack width of file_size (1, 2, 3,
    # 5 or 9 bytes), so they settle in a few rounds: 0 -> 255 -> 256 -> 257 takes four.
    size = 0
    for _ in range(8):
        header = _pack_header(step, time, metadata, tree, [], size)
        if PRELUDE_SIZE + len(header) == size:
            return _encode_prelude(header) + header, [], size
        size = PRELUDE_SIZE + len(header)
    raise AssertionError("file size of an array-less header did not settle")  # pragma: no cover


def _encode_prelude(header: bytes) -> bytes:
    head = _PRELUDE.pack(MAGIC, FORMAT_VERSION, 0, len(header), crc32c(header), 0)
    return head[:28] + struct.pack("<I", crc32c(head[:28]))


def decode_prelude(prelude: bytes, file_size: int, source: str) -> tuple[int, int]:
    """Check the fixed 32 bytes that open a checkpoint.

    Returns:
        ``(header_length, header_crc32c)``.

    Raises:
        CheckpointFormatError: not a checkpoint, an unknown version, an absurd header length.
        CheckpointCorruptedError: the prelude's checksum does not match, or it is truncated.
    """
    if len(prelude) < PRELUDE_SIZE:
        if MAGIC.startswith(prelude[: len(MAGIC)]) or prelude[: len(MAGIC)] == MAGIC:
            raise CheckpointCorruptedError(source, "prelude", f"file is only {file_size} bytes")
        raise CheckpointFormatError(source, "not an asyncckpt checkpoint (file too short)")
    magic, version, flags, header_len, header_crc, prelude_crc = _PRELUDE.unpack(prelude)
    if magic != MAGIC:
        raise CheckpointFormatError(source, "not an asyncckpt checkpoint (bad magic bytes)")
    if crc32c(prelude[:28]) != prelude_crc:
        raise CheckpointCorruptedError(source, "prelude", "checksum mismatch")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            source,
            f"format version {version} is not supported (this asyncckpt reads version "
            f"{FORMAT_VERSION}); upgrade asyncckpt to read it",
        )
    if flags:
        raise CheckpointFormatError(source, f"unknown flags {flags:#x} in version 1")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            source, f"header declares {header_len} bytes, over the {MAX_HEADER_BYTES} limit"
        )
    if PRELUDE_SIZE + header_len > file_size:
        raise CheckpointCorruptedError(
            source, "size", f"header declares {header_len} bytes but the file has {file_size}"
        )
    return header_len, header_crc


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_header(header: bytes, header_crc: int, file_size: int, source: str) -> Header:
    """Decode and validate the header; no allocation beyond a small multiple of its size.

    Raises:
        CheckpointCorruptedError: checksum mismatch, or the file size differs from the header's.
        CheckpointFormatError: the header is well-formed bytes but describes an impossible file.
    """
    if crc32c(header) != header_crc:
        raise CheckpointCorruptedError(source, "header", "checksum mismatch")
    try:
        raw = msgpack.unpackb(
            header,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_array_len=len(header),
            max_map_len=len(header),
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise CheckpointFormatError(source, f"undecodable header: {exc}") from None
    if not isinstance(raw, dict) or raw.keys() != set(HEADER_KEYS):
        raise CheckpointFormatError(source, f"header must be a map with keys {HEADER_KEYS}")
    step, time, metadata, declared_size = (
        raw["step"],
        raw["time"],
        raw["metadata"],
        raw["file_size"],
    )
    if step is not None and (type(step) is not int):
        raise CheckpointFormatError(source, "header step must be an int or nil")
    if not isinstance(time, float) or not math.isfinite(time):
        raise CheckpointFormatError(source, "header time must be a finite float")
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(source, "header metadata must be a map")
    if type(declared_size) is not int:
        raise CheckpointFormatError(source, "header file_size must be an int")
    if declared_size != file_size:
        raise CheckpointCorruptedError(
            source,
            "size",
            f"header declares {declared_size} bytes, the file has {file_size}"
            + (" (truncated)" if file_size < declared_size else ""),
        )
    if not isinstance(raw["arrays"], list) or len(raw["arrays"]) > MAX_ARRAYS:
        raise CheckpointFormatError(source, "header arrays must be a list of bounded length")
    data_start = PRELUDE_SIZE + len(header)
    paths, tags = _array_paths(raw["tree"], len(raw["arrays"]), source)
    arrays = []
    previous_end = data_start
    dtypes: dict[str, tuple[np.dtype[Any], str | None]] = {}
    for index, item in enumerate(raw["arrays"]):
        entry = _decode_entry(item, index, paths[index], source, dtypes)
        _check_tag(entry, tags[index], index, source)
        if entry.offset % ALIGNMENT or entry.offset < previous_end:
            raise CheckpointFormatError(
                source, f"array {index} at offset {entry.offset} is misaligned or overlaps"
            )
        previous_end = entry.offset + entry.nbytes
        if previous_end > file_size:
            raise CheckpointFormatError(
                source, f"array {index} declares {entry.nbytes} bytes past the end of the file"
            )
        arrays.append(entry)
    if previous_end != file_size:
        raise CheckpointFormatError(source, "bytes after the last array or the header")
    return Header(
        step=step,
        time=time,
        metadata=metadata,
        tree=raw["tree"],
        arrays=tuple(arrays),
        file_size=file_size,
        data_start=data_start,
        extension_dtypes=frozenset(name for _dtype, name in dtypes.values() if name),
    )


def dtypes_for_restore(header: Header, *, raw_dtypes: bool, source: str) -> Header:
    """Return ``header`` with each array's dtype as a restore creates it.

    ml_dtypes' dtypes stay themselves, or become unsigned ints of their size (``"<u2"``
    for bfloat16) with ``raw_dtypes``: their bits, readable without ml_dtypes.

    Raises:
        DtypeUnavailableError: an array's dtype needs ml_dtypes (or a newer one) and
            ``raw_dtypes`` is False; the message names the array, the dtype and the package.
    """
    if not header.extension_dtypes:
        return header
    if raw_dtypes:
        arrays = tuple(
            entry if entry.extension is None else replace(entry, dtype=raw_dtype(entry.extension))
            for entry in header.arrays
        )
        return replace(header, arrays=arrays)
    missing = {name for name in header.extension_dtypes if extension_dtype(name) is None}
    for index, entry in enumerate(header.arrays if missing else ()):
        name = entry.extension
        if name is not None and name in missing:
            raise DtypeUnavailableError(
                source,
                f"{array_part(entry, index)} is {name}, which cannot be made here: "
                f"{install_advice(name)}; or restore with raw_dtypes=True to get its bits "
                f"as {raw_dtype(name)}",
            )
    return header


def _array_paths(tree: object, count: int, source: str) -> tuple[list[str], list[str]]:
    paths: list[str | None] = [None] * count
    tags = [""] * count
    for path, tag, index in iter_array_refs(tree, source):
        if not 0 <= index < count or paths[index] is not None:
            raise CheckpointFormatError(source, f"tree references array {index} wrongly")
        paths[index] = format_path(path)
        tags[index] = tag
    if any(p is None for p in paths):
        raise CheckpointFormatError(source, "header lists arrays the tree does not use")
    return [p for p in paths if p is not None], tags


def _check_tag(entry: ArrayEntry, tag: str, index: int, source: str) -> None:
    # A numpy scalar is a 0-d array, bytes a flat uint8 array, a tensor or jax array a
    # numeric one; anything else would come back as something the writer never saved.
    if tag == "g" and entry.shape != ():
        raise CheckpointFormatError(source, f"array {index} holds a numpy scalar but is not 0-d")
    if tag == "y" and (
        entry.extension is not None or entry.dtype != np.dtype(np.uint8) or len(entry.shape) != 1
    ):
        raise CheckpointFormatError(source, f"array {index} holds bytes but is not flat uint8")
    if tag in ("T", "J") and entry.extension is None and entry.dtype.kind not in "biufc":
        framework = "a torch tensor" if tag == "T" else "a jax array"
        raise CheckpointFormatError(
            source, f"array {index} holds {framework} but its dtype {entry.dtype} is not numeric"
        )


def _decode_entry(
    item: object,
    index: int,
    path: str,
    source: str,
    dtypes: dict[str, tuple[np.dtype[Any], str | None]],
) -> ArrayEntry:
    if not isinstance(item, list) or len(item) != 5:
        raise CheckpointFormatError(source, f"array {index} entry is malformed")
    descr, shape, offset, nbytes, crc = item
    # Thousands of arrays share a few dtypes: each plain one is parsed and checked once.
    known = dtypes.get(descr) if type(descr) is str else None
    if known is None:
        known = _decode_dtype(descr, index, source)
        if type(descr) is str:
            dtypes[descr] = known
    dtype, extension = known
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CheckpointFormatError(source, f"array {index} has an invalid shape")
    for d in shape:
        if type(d) is not int or d < 0:
            raise CheckpointFormatError(source, f"array {index} has an invalid shape")
    if (
        type(offset) is not int
        or type(nbytes) is not int
        or type(crc) is not int
        or offset < 0
        or nbytes < 0
        or not 0 <= crc <= 0xFFFFFFFF
    ):
        raise CheckpointFormatError(source, f"array {index} has invalid offset, size or crc")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise CheckpointFormatError(
            source, f"array {index} declares {nbytes} bytes for {dtype}{shape}"
        )
    # An empty array can declare huge other dimensions; numpy refuses those (ValueError).
    if math.prod(d for d in shape if d) * max(dtype.itemsize, 1) > sys.maxsize:
        raise CheckpointFormatError(source, f"array {index} has a shape numpy cannot hold")
    return ArrayEntry(path, dtype, tuple(shape), offset, nbytes, crc, extension)


def _decode_dtype(descr: object, index: int, source: str) -> tuple[np.dtype[Any], str | None]:
    """Return an array's dtype and, for one of ml_dtypes', its name.

    An ml_dtypes name gives ml_dtypes' dtype, or (where it is missing) the raw stand-in,
    which is enough to check the bytes; ``dtypes_for_restore`` decides what a restore gets.
    """
    name = name_in_file(descr) if type(descr) is str else None
    if name is not None:
        dtype = extension_dtype(name)
        return (raw_dtype(name) if dtype is None else dtype), name
    try:
        if not isinstance(descr, str | list) or len(repr(descr)) > MAX_DTYPE_CHARS:
            raise ValueError("not a dtype description of bounded size")
        dtype = _dtype_from_descr(descr, 0)
    except (TypeError, ValueError, SyntaxError, RecursionError) as exc:
        raise CheckpointFormatError(source, f"array {index} has an invalid dtype: {exc}") from None
    if dtype.hasobject:
        raise CheckpointFormatError(source, f"array {index} has an object dtype (never loaded)")
    if dtype.subdtype is not None:
        raise CheckpointFormatError(source, f"array {index} has a subarray dtype")
    return dtype, None


def _dtype_from_descr(descr: object, depth: int) -> np.dtype[Any]:
    """Rebuild a dtype from ``_dtype_descr``'s output after a msgpack round trip.

    The inverse of ``dtype.descr`` as ``numpy.lib.format.descr_to_dtype`` computes it (padding
    fields named ``""`` become offsets again), for lists where numpy has tuples.
    """
    if depth > MAX_DTYPE_NESTING:
        raise ValueError(f"structured dtype nested deeper than {MAX_DTYPE_NESTING} levels")
    if isinstance(descr, str):
        if not _DTYPE_STR.fullmatch(descr):
            raise ValueError(
                f"{descr!r} is not a dtype a checkpoint may hold (bool, int, uint, float, "
                "complex, timedelta, datetime, bytes, str or void, in numpy's dtype.str form; "
                "never object)"
            )
        return np.dtype(descr)
    if not isinstance(descr, list):
        raise TypeError(f"dtype description {type(descr).__name__} is neither str nor list")
    names: list[str] = []
    titles: list[str | None] = []
    formats: list[np.dtype[Any]] = []
    offsets: list[int] = []
    offset = 0
    for field in descr:
        if not isinstance(field, list) or len(field) not in (2, 3):
            raise ValueError("a field must be [name, dtype] or [name, dtype, shape]")
        name, field_dtype = field[0], _dtype_from_descr(field[1], depth + 1)
        if len(field) == 3:
            shape = field[2]
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError("a field's shape must be a list of non-negative ints")
            field_dtype = np.dtype((field_dtype, tuple(shape)))
        if name == "" and field_dtype.kind == "V" and field_dtype.names is None:
            offset += field_dtype.itemsize  # padding that dtype.descr spells out
            continue
        title = None
        if isinstance(name, list) and len(name) == 2:
            title, name = name
        if not isinstance(name, str) or not isinstance(title, str | None):
            raise ValueError("a field name must be a str or [title, name]")
        names.append(name)
        titles.append(title)
        formats.append(field_dtype)
        offsets.append(offset)
        offset += field_dtype.itemsize
    return np.dtype(
        {
            "names": names,
            "formats": formats,
            "titles": titles,
            "offsets": offsets,
            "itemsize": offset,
        }
    )


def array_part(entry: ArrayEntry, index: int) -> str:
    """Name array ``index`` as a corruption report does: ``array 3 ('params/w')``."""
    return f"array {index} ({entry.path!r})"
