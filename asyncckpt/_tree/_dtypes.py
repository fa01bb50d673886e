"""ml_dtypes' dtypes (bfloat16, float8, int4 ...): the names a checkpoint stores them under.

Owns the fixed list of those names, the dtype each stands for here, and its raw stand-in.
A name read from a file only selects an entry of that list; nothing a file names is ever
imported or looked up otherwise. Knows nothing of files, headers or trees.
"""

from __future__ import annotations

import sys
from types import MappingProxyType
from typing import Any, Final

import numpy as np

__all__ = [
    "EXTENSION_ITEMSIZES",
    "extension_dtype",
    "extension_name",
    "install_advice",
    "name_in_file",
    "raw_dtype",
]

EXTENSION_ITEMSIZES: Final = MappingProxyType(
    {
        "bfloat16": 2,
        "bcomplex32": 4,
        "complex32": 4,
        "float4_e2m1fn": 1,
        "float6_e2m3fn": 1,
        "float6_e3m2fn": 1,
        "float8_e3m4": 1,
        "float8_e4m3": 1,
        "float8_e4m3b11fnuz": 1,
        "float8_e4m3fn": 1,
        "float8_e4m3fnuz": 1,
        "float8_e5m2": 1,
        "float8_e5m2fnuz": 1,
        "float8_e5m3fnu": 1,
        "float8_e8m0fnu": 1,
        "int1": 1,
        "int2": 1,
        "int4": 1,
        "uint1": 1,
        "uint2": 1,
        "uint4": 1,
    }
)
"""Every ml_dtypes dtype a checkpoint may hold, by the name the header stores, and its size.

Sub-byte types (int4, float4 ...) take one byte per element, as ml_dtypes stores them.
Multi-byte ones (bfloat16, complex32, bcomplex32) are little-endian in the file.
"""

# Files written before these names existed spelled two of them as numpy's dtype.str, which
# numpy itself cannot parse (so nothing else can mean them); they read as what they were.
_LEGACY_SPELLINGS: Final = MappingProxyType({"<f1": "float8_e5m2", "<c4": "complex32"})

_USER_DEFINED: Final = 2  # dtype.isbuiltin of a dtype another package registered


def extension_name(dtype: np.dtype[Any]) -> str | None:
    """Return the name a checkpoint stores ``dtype`` under, if it is one of ml_dtypes' dtypes.

    None for numpy's own dtypes, and for a dtype of ml_dtypes this list does not know.

    Raises:
        TypeError: a multi-byte one on a big-endian machine (the file's bytes are
            little-endian).
    """
    if dtype.isbuiltin != _USER_DEFINED or dtype.type.__module__ != "ml_dtypes":
        return None
    name = dtype.name
    if name not in EXTENSION_ITEMSIZES:
        return None
    if dtype.itemsize > 1 and sys.byteorder != "little":
        raise TypeError(f"{name} arrays are saved on little-endian machines only")
    return name


def name_in_file(descr: str) -> str | None:
    """Return the ml_dtypes name a header's dtype string stands for, None for numpy's own."""
    if descr in EXTENSION_ITEMSIZES:
        return descr
    return _LEGACY_SPELLINGS.get(descr)


def extension_dtype(name: str) -> np.dtype[Any] | None:
    """Return ml_dtypes' dtype called ``name`` (a key of ``EXTENSION_ITEMSIZES``).

    None when ml_dtypes is not installed, or its version lacks that dtype. Not cached: the
    import is a dictionary look-up once done, and a test may hide the package.
    """
    if name not in EXTENSION_ITEMSIZES:
        raise ValueError(f"{name!r} is not one of ml_dtypes' dtypes a checkpoint may hold")
    try:
        import ml_dtypes
    except ImportError:
        return None
    # ``name`` is one of the fixed keys above, never free text from a file.
    scalar_type = getattr(ml_dtypes, name, None)
    return None if scalar_type is None else np.dtype(scalar_type)


def raw_dtype(name: str) -> np.dtype[Any]:
    """Return the unsigned little-endian integer dtype as wide as ml_dtypes' ``name``."""
    return np.dtype(f"<u{EXTENSION_ITEMSIZES[name]}")


def install_advice(name: str) -> str:
    """Say what to install so that ``name`` (a key of ``EXTENSION_ITEMSIZES``) can be read."""
    try:
        import ml_dtypes
    except ImportError:
        return f"{name} needs the ml_dtypes package: pip install ml_dtypes"
    return f"{name} is not in ml_dtypes {ml_dtypes.__version__}: pip install --upgrade ml_dtypes"
