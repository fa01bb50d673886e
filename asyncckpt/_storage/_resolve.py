"""Which ``Storage`` serves a directory: the one given, an object store for a URL, or local files.

Knows the URL schemes and nothing of what the backends do; ``obstore`` (the ``remote`` extra)
is imported only when a URL needs it, so local use never requires it.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Final

from ._local import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._base import Storage

__all__ = ["OBJECT_SCHEMES", "is_url", "resolve_storage", "url_root"]

OBJECT_SCHEMES: Final = ("s3", "gs", "az", "memory")
"""The URL schemes of the object-store backend (``ObjectStorage``)."""

_URL: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return _URL.match(os.fspath(path)) is not None


def url_root(url: str) -> str:
    """Return the store root of ``url``: its scheme (lower case) and bucket or container.

    ``s3://bucket/runs/a`` gives ``s3://bucket``; ``memory://name/prefix`` gives
    ``memory://name``.

    Raises:
        ValueError: ``url`` is not a URL, or names no bucket (``s3://``).
    """
    found = _URL.match(url)
    if found is None:
        raise ValueError(f"{url!r} is not a URL (scheme://bucket/prefix)")
    scheme = found.group(1).lower()
    bucket = url[found.end() :].split("/", 1)[0]
    if not bucket and scheme != "memory":
        raise ValueError(f"{url!r} names no bucket: write {scheme}://<bucket>/<prefix>")
    return f"{scheme}://{bucket}"


def _supported() -> str:
    return ", ".join(f"{scheme}://" for scheme in OBJECT_SCHEMES)


def resolve_storage(
    directory: str | os.PathLike[str],
    storage: Storage | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Storage:
    """Return the storage that serves ``directory``.

    ``storage`` when given; for a URL of an object store (``s3://bucket/prefix``, ``gs://``,
    ``az://``, ``memory://name/prefix``) an ``ObjectStorage`` of its bucket, configured by the
    standard environment variables and ``storage_options`` (obstore's configuration keys,
    which override them); for a local path, ``LocalStorage()``.

    Raises:
        ValueError: both ``storage`` and ``storage_options`` are given; ``storage_options``
            for a local path; a URL of a scheme no backend serves; bad options.
        ImportError: a URL needs the ``remote`` extra (obstore), which is not installed.
    """
    path = os.fspath(directory)
    if storage is not None:
        if storage_options is not None:
            raise ValueError(
                "pass storage= or storage_options=, not both: storage_options configures the "
                "object store asyncckpt builds from the URL when no storage is given"
            )
        return storage
    found = _URL.match(path)
    if found is None:
        if storage_options is not None:
            raise ValueError(
                f"storage_options= configures an object store, but {path!r} is a local path; "
                f"pass a URL ({_supported()}) or drop storage_options"
            )
        return LocalStorage()
    scheme = found.group(1).lower()
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(
            f"{path!r}: no storage for {scheme}:// URLs; asyncckpt supports {_supported()} "
            "and local paths"
        )
    try:
        # Imported here: obstore is an optional extra, needed only by URLs.
        from ._object import ObjectStorage
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "obstore":
            raise
        raise ImportError(
            f"{scheme}:// needs the remote extra: pip install 'asyncckpt[remote]'",
            name=exc.name,
        ) from exc
    return ObjectStorage(url_root(path), options=storage_options)
