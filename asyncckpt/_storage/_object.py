"""ObjectStorage: the ``Storage`` of object stores (S3, GCS, Azure, in-memory), on obstore.

Knows nothing of hooks, trees or the header layout: it moves bytes and names, and turns the
client's errors into the package's errors at its boundary, with the URL in each message.

Paths are URLs under one store root (``s3://bucket``): ``s3://bucket/run/model.ckpt-5`` is the
object ``run/model.ckpt-5``, and the "directory" ``s3://bucket/run`` the prefix ``run/``. The
layers above build them with ``os.path.join`` / ``basename`` / ``dirname``, which work on such
strings.

What replaces what a file system gives:

* no rename: a checkpoint is uploaded under its final name (``write_atomic``), as one PUT or
  one multipart upload, and appears whole or not at all when the request completes; it is
  valid only once the state file that lists it is written, after it. No temporary objects
  exist; an interrupted multipart upload is invisible, and its parts are reclaimed by the
  store (obstore aborts it on an error; after a crash, a bucket lifecycle rule such as S3's
  ``AbortIncompleteMultipartUpload``);
* the state file is written with a conditional PUT (create-only, or matched to the version
  this storage last read or wrote), so a second writer's commit is refused, never lost;
* the directory lock is a lease object (``ObjectLease``), written create-only, that expires
  unless renewed (each write renews the storage's leases once past half their time);
* readers pin the version they opened: every ranged read is conditional on its ETag, so a
  reader never gets another version's bytes (an object replaced meanwhile is an error);
* objects are immutable, so an event file is a sequence of objects (``ObjectAppendFile``).

Every method that blocks uses obstore's synchronous API and is called from a worker thread
(the layers above make one hop per logical operation); the async methods of the read and
append files make their own ``anyio.to_thread.run_sync`` hop. obstore's asyncio API is never
used: it needs an asyncio loop, and on trio there is none; on asyncio it measured no faster
than this path (docs/STORAGE.md), so one path serves both.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import socket
import stat
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import anyio.to_thread
import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
    UnknownConfigurationKeyError,
)
from obstore.store import MemoryStore, from_url

from .._core._errors import (
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
)
from .._core._util import check_int
from ._base import LOCK_NAME, MAX_SMALL_FILE, Probe, Storage, WriteAborted
from ._local import pid_has_exited
from ._resolve import OBJECT_SCHEMES, url_root

if TYPE_CHECKING:
    import mmap
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

    from obstore import ObjectMeta, PutMode, UpdateVersion
    from obstore.store import ObjectStore

    from .._core._types import Buffer

__all__ = ["ObjectAppendFile", "ObjectLease", "ObjectReadFile", "ObjectStorage"]

logger = logging.getLogger("asyncckpt")

_MIB: Final = 1024 * 1024
_MIN_PART_BYTES: Final = 5 * _MIB
"""S3's (and GCS's XML API's) smallest part of a multipart upload, but the last."""
_WHOLE_READ_BYTES: Final = 16 * _MIB
"""Ranged reads up to this size come back as one buffer; larger ones are streamed."""
_STREAM_CHUNK: Final = 4 * _MIB
_SEQ_DIGITS: Final = 10
_LEASE_READ_BYTES: Final = 64 * 1024

# What obstore raises for a conditional PUT the store cannot make: object_store's
# NotImplemented comes out as the builtin NotImplementedError (S3 with conditional_put
# "disabled"), NotSupported as obstore's own error.
_NO_CONDITIONS: Final = (NotSupportedError, NotImplementedError)

# obstore's ClientConfig keys: they go to client_options, every other key to the store's
# config (a client key in the config makes obstore panic).
_CLIENT_KEYS: Final = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "default_headers",
        "http1_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "root_certificate",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    }
)

# memory:// URLs must reach the same store from every object of one process that names them
# (a Saver, a manager, the command line), so the stores live here: the one registry of the
# package, for a test and development backend.
_MEMORY_STORES: dict[str, MemoryStore] = {}
_MEMORY_LOCK = threading.Lock()


def _memory_store(name: str) -> MemoryStore:
    with _MEMORY_LOCK:
        store = _MEMORY_STORES.get(name)
        if store is None:
            store = _MEMORY_STORES[name] = MemoryStore()
        return store


def _no_probe(op: str, path: str, /) -> None:
    """The probe of an uninstrumented storage: every request proceeds."""


def _check_aborted(aborted: Callable[[], bool] | None) -> None:
    if aborted is not None and aborted():
        raise WriteAborted("the writer abandoned this write")


def _reason(exc: BaseException) -> str:
    """One line saying what failed (obstore's messages add a multi-line debug dump)."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno:
        return f"{exc.strerror or exc} (errno {exc.errno})"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _advice(exc: BaseException) -> str:
    if isinstance(exc, PermissionDeniedError | PermissionError):
        return "check the credentials' permissions on this bucket"
    if isinstance(exc, UnauthenticatedError):
        return (
            "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or their "
            "GCS and Azure equivalents, or storage_options)"
        )
    return "check the store's endpoint, credentials and network"


def _write_error(
    path: str, exc: BaseException, doing: str = "could not write"
) -> CheckpointWriteError:
    return CheckpointWriteError(path, f"{doing}: {_reason(exc)}; {_advice(exc)}")


def _read_error(path: str, exc: BaseException) -> CheckpointReadError:
    return CheckpointReadError(
        path, f"{_reason(exc)}; {_advice(exc)} (the object itself may be intact)"
    )


def _as_os_error(path: str, exc: BaseError) -> OSError:
    """An OSError for the interfaces that raise one (``list_names``, event files)."""
    if isinstance(exc, AlreadyExistsError | PreconditionError):
        code = errno.EEXIST
    elif isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        code = errno.EACCES
    else:
        code = errno.EIO
    error = OSError(code, _reason(exc), path)
    error.__cause__ = exc
    return error


def _holder_exited(owner: str) -> bool:
    """Whether a lease's holder (``<host>/<pid>/<random>``) was a process of this host that
    has exited: a writer killed here and restarted here need not wait for its lease."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    return host == socket.gethostname() and pid != str(os.getpid()) and pid_has_exited(pid)


def _version(meta: ObjectMeta | Mapping[str, Any]) -> UpdateVersion:
    """What identifies this version of an object for a conditional request (S3 and Azure
    match the ETag, GCS the generation: keep both)."""
    found: UpdateVersion = {}
    if meta.get("e_tag") is not None:
        found["e_tag"] = meta["e_tag"]
    if meta.get("version") not in (None, "null"):
        found["version"] = meta["version"]
    return found


def _wall(meta: ObjectMeta) -> float:
    return meta["last_modified"].timestamp()


def _when(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _byte_view(piece: Buffer) -> memoryview:
    view = memoryview(piece)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _stat(meta: ObjectMeta) -> os.stat_result:
    """An object's metadata as a regular file's stat (the float times where stat keeps them)."""
    mtime = _wall(meta)
    whole = int(mtime)
    fields = (stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, meta["size"], whole, whole, whole)
    floats = {"st_atime": mtime, "st_mtime": mtime, "st_ctime": mtime}
    return os.stat_result(fields, floats)


def _directory_stat() -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 1, 0, 0, 0, 0, 0, 0))


def _build_store(root: str, options: Mapping[str, Any]) -> ObjectStore:
    """Build the client of ``root`` (``s3://bucket``) from the environment and ``options``.

    Raises:
        ValueError: an unknown or invalid option (the message names it).
    """
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry_config: Any = None
    credential_provider: Any = None
    for key, value in options.items():
        name = key.lower()
        if name in _CLIENT_KEYS:
            client[name] = value
        elif name == "client_options":
            client.update(value)
        elif name == "retry_config":
            retry_config = value
        elif name == "credential_provider":
            credential_provider = value
        else:
            config[name] = value
    if root.startswith("s3://") and not (
        {"conditional_put", "aws_conditional_put"} & config.keys()
        or "AWS_CONDITIONAL_PUT" in os.environ
    ):
        # The state file's and the lease's If-None-Match / If-Match PUTs. object_store has
        # made "etag" the default since 0.12; said here so that an older one does not turn
        # every conditional write into NotSupportedError.
        config["conditional_put"] = "etag"
    try:
        return from_url(
            root,
            config=cast("Any", config) or None,
            client_options=cast("Any", client) or None,
            retry_config=retry_config,
            credential_provider=credential_provider,
        )
    except UnknownConfigurationKeyError as exc:
        raise ValueError(
            f"{root}: {_reason(exc)} (storage_options takes obstore's configuration keys for "
            "this store, e.g. endpoint, region, access_key_id, allow_http)"
        ) from exc
    except (BaseError, ValueError) as exc:
        raise ValueError(f"{root}: cannot configure the object store: {_reason(exc)}") from exc


class ObjectStorage(Storage):
    """The ``Storage`` of an object store (``s3://``, ``gs://``, ``az://``, ``memory://``).

    The client reads the standard environment variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``...,
    ``GOOGLE_SERVICE_ACCOUNT``..., ``AZURE_STORAGE_ACCOUNT_NAME``...); ``options`` overrides
    them with obstore's configuration keys (``{"endpoint": ..., "allow_http": True}``; the
    HTTP client's keys, such as ``allow_http`` and ``timeout``, are told apart from the
    store's). On S3, conditional PUTs use ``If-Match`` / ``If-None-Match``
    (``conditional_put="etag"``, set unless the options or ``AWS_CONDITIONAL_PUT`` say
    otherwise).

    ``memory://<name>`` is one in-memory store per name per process: every ``ObjectStorage``
    of that URL in the process (a ``Saver``'s, a manager's, the command line's) sees the same
    objects, and they last as long as the process. For tests and development.

    Guarantees (see the module docstring): a checkpoint object appears whole or not at all; the
    state file is replaced by a single conditional PUT, refused (``CheckpointLockedError``) when
    another writer changed it since this storage read it; the lock is a lease. On a store
    without conditional PUTs (obstore's ``NotSupportedError`` or ``NotImplementedError``; S3
    with ``conditional_put="disabled"``) the state file and the lease are
    written unconditionally: a second writer's commit made between this writer's read and write
    is then silently replaced, and two writers can both believe they hold an expired lease, so
    only one writer per directory may run there. An S3-compatible store that ignores the
    conditional headers loses the same, without an error.

    Args:
        url: the store root: scheme and bucket (``s3://bucket``, ``az://container``,
            ``memory://name``); a path after it is ignored, since every path passed to the
            methods is a full URL under that root.
        options: obstore configuration for the client, overriding the environment.
        lease_secs: how long a lock lasts unless renewed (``ObjectLease``). The hosts'
            clocks must agree to well within it.
        part_bytes: the part size of multipart uploads (a checkpoint larger than one part is
            uploaded in parts); at least 5 MiB on S3, GCS and Azure.
        max_concurrency: parts uploaded at once; memory in flight is at most about
            ``part_bytes * max_concurrency``.
        clock: wall-clock time for leases (``time.time``).
        probe: sees every request first (``asyncckpt.testing.FaultyStorage`` passes one; see
            ``instrumented``).

    Raises:
        ValueError: an unsupported scheme, no bucket, bad options or sizes.
        TypeError: ``part_bytes`` or ``max_concurrency`` is not an int.
    """

    supports_mmap = False
    writes_in_place = True  # objects are read in ranges; open_mmap refuses

    def __init__(
        self,
        url: str,
        *,
        options: Mapping[str, Any] | None = None,
        lease_secs: float = 60.0,
        part_bytes: int = 8 * _MIB,
        max_concurrency: int = 8,
        clock: Callable[[], float] = time.time,
        probe: Probe | None = None,
    ) -> None:
        scheme = url.partition("://")[0].lower()
        if scheme not in OBJECT_SCHEMES:
            raise ValueError(
                f"{url!r}: ObjectStorage serves "
                f"{', '.join(s + '://' for s in OBJECT_SCHEMES)} URLs, not {scheme}://"
            )
        root = url_root(url)
        if not (lease_secs > 0 and math.isfinite(lease_secs)):
            raise ValueError(f"lease_secs must be a positive number of seconds, not {lease_secs!r}")
        check_int("part_bytes", part_bytes, minimum=1)
        check_int("max_concurrency", max_concurrency, minimum=1)
        if scheme != "memory" and part_bytes < _MIN_PART_BYTES:
            raise ValueError(
                f"part_bytes must be at least 5 MiB ({_MIN_PART_BYTES}) for {scheme}://, the "
                f"smallest part the store accepts; not {part_bytes}"
            )
        if scheme == "memory":
            if options:
                raise ValueError(f"{root}: a memory:// store takes no options")
            self._store: ObjectStore = _memory_store(root.split("://", 1)[1])
        else:
            self._store = _build_store(root, options or {})
        self.root = root
        self.lease_secs = float(lease_secs)
        self.part_bytes = part_bytes
        self.max_concurrency = max_concurrency
        self._clock = clock
        self._probe: Probe = probe or _no_probe
        # The version of each state file this storage last read or wrote: its next write
        # must match it (create-only when it saw none).
        self._versions: dict[str, UpdateVersion] = {}
        self._versions_lock = threading.Lock()
        self._leases: weakref.WeakSet[ObjectLease] = weakref.WeakSet()

    def __repr__(self) -> str:
        if self._probe is _no_probe:
            return f"ObjectStorage({self.root!r})"
        name = getattr(self._probe, "__qualname__", type(self._probe).__qualname__)
        return f"ObjectStorage({self.root!r}, probe={name})"

    def instrumented(self, probe: Probe) -> ObjectStorage:
        """Return a storage over the same store (the same client) whose requests pass
        ``probe`` (after this one's probe).

        The operations a probe sees: ``"open"`` (a HEAD: opening an object to read, its
        ``file_info``; and the check that an event file is new), ``"read"`` (a GET: the state
        file, a lease, ranged reads), ``"write"`` (every PUT: the state file, a lease, an
        event file's object; and each part-sized stretch of a checkpoint's upload),
        ``"rename"`` (the moment a checkpoint or the state file becomes visible: before the
        single PUT, or before a multipart upload completes; a failure there leaves nothing)
        and ``"unlink"`` (a DELETE). There is no ``"fsync"`` or ``"fsync_dir"``: a completed
        request is durable. Listings are not probed (nor are they in ``LocalStorage``).
        """
        outer = self._probe

        def both(op: str, path: str, /) -> None:
            outer(op, path)
            probe(op, path)

        twin = object.__new__(ObjectStorage)
        twin._store = self._store
        twin.root = self.root
        twin.lease_secs = self.lease_secs
        twin.part_bytes = self.part_bytes
        twin.max_concurrency = self.max_concurrency
        twin._clock = self._clock
        twin._probe = probe if outer is _no_probe else both
        twin._versions = {}
        twin._versions_lock = threading.Lock()
        twin._leases = weakref.WeakSet()
        return twin

    def _keep_leases(self) -> None:
        """Renew the leases this storage holds that are past half their time, before a write.

        A writer's saves then keep its lock alive however long an upload takes, and a writer
        whose lease was taken over meanwhile learns it before it writes, not after.

        Raises:
            CheckpointLockedError: a lease was lost (nothing more is written).
            CheckpointWriteError: a lease could not be renewed.
        """
        now = self._clock()
        for lease in list(self._leases):
            expires = lease.expires
            if expires is not None and expires - now < self.lease_secs / 2:
                lease.renew()

    # -- paths ---------------------------------------------------------------------------------

    def key(self, path: str) -> str:
        """Return the object key of ``path``, a URL under this storage's root ("" for the root).

        Raises:
            ValueError: ``path`` is not under the root, or has an empty, ``.`` or ``..``
                segment.
        """
        text = os.fspath(path)
        scheme, sep, rest = text.partition("://")
        normal = f"{scheme.lower()}{sep}{rest}"
        if normal == self.root or normal == self.root + "/":
            return ""
        if not normal.startswith(self.root + "/"):
            raise ValueError(
                f"{text!r} is not under {self.root}: this ObjectStorage serves {self.root} "
                "only (give that path its own storage, or none: asyncckpt makes one from "
                "the URL)"
            )
        key = normal[len(self.root) + 1 :].rstrip("/")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"{text!r}: an object path has no empty, '.' or '..' segments")
        return key

    def _prefix(self, directory: str) -> str | None:
        key = self.key(directory)
        return key + "/" if key else None

    # -- small files and names -------------------------------------------------------------------

    def read_small_file(self, path: str) -> bytes | None:
        """Return the bytes of a small object (a state file), or None when there is none;
        remember its version, which this storage's next ``write_small_file_atomic`` of
        ``path`` must match.

        Raises:
            CheckpointReadError: it exists but cannot be read (``__cause__``: the client's
                error).
        """
        key = self.key(path)
        try:
            self._probe("read", path)
            result = obstore.get(self._store, key)
            meta = result.meta
            if meta["size"] <= MAX_SMALL_FILE:
                data = bytes(result.bytes())
            else:  # larger than any state file: read only enough for the parser to refuse it
                data = b""
                for chunk in result.stream(min_chunk_size=_STREAM_CHUNK):
                    data += chunk[: MAX_SMALL_FILE + 1 - len(data)]
                    if len(data) > MAX_SMALL_FILE:
                        break
        except FileNotFoundError:
            with self._versions_lock:
                self._versions.pop(path, None)
            return None
        except (BaseError, OSError) as exc:
            raise _read_error(path, exc) from exc
        with self._versions_lock:
            self._versions[path] = _version(meta)
        return data

    def write_small_file_atomic(self, path: str, data: bytes) -> None:
        """Replace the object ``path`` with ``data`` in one PUT (the state file), on condition
        that it is still the version this storage last read or wrote there (create-only when
        it saw none). A completed PUT is durable; no ``DirectorySyncError`` is raised.

        On a store without conditional PUTs the PUT is unconditional (see the class
        docstring for what is lost).

        Raises:
            CheckpointLockedError: another writer changed (or created) the state file since
                this storage last read it; nothing was written.
            CheckpointWriteError: it could not be written; the old one is untouched.
        """
        key = self.key(path)
        with self._versions_lock:
            seen = self._versions.get(path)
        mode: PutMode = seen if seen else "create"
        self._keep_leases()
        try:
            self._probe("write", path)
            self._probe("rename", path)
            try:
                result = obstore.put(self._store, key, data, mode=mode)
            except _NO_CONDITIONS:
                result = obstore.put(self._store, key, data, mode="overwrite")
        except (AlreadyExistsError, PreconditionError) as exc:
            raise CheckpointLockedError(
                path,
                "another writer changed the state file since this writer read it (two writers "
                "on one directory: each must hold its lease); nothing was written: stop the "
                "other writer, or use another directory",
            ) from exc
        except (BaseError, OSError) as exc:
            raise _write_error(path, exc) from exc
        with self._versions_lock:
            self._versions[path] = _version(result)

    def list_names(self, directory: str) -> list[str]:
        """Return the sorted names directly under the prefix ``directory`` (objects, and the
        names of deeper prefixes, as a file system lists subdirectories); empty when there
        are none.

        Raises:
            OSError: the listing failed (``__cause__``: the client's error).
        """
        prefix = self._prefix(directory)
        try:
            found = obstore.list_with_delimiter(self._store, prefix)
        except BaseError as exc:
            raise _as_os_error(directory, exc) from exc
        start = len(prefix or "")
        names = {meta["path"][start:] for meta in found["objects"]}
        names.update(common[start:].rstrip("/") for common in found["common_prefixes"])
        names.discard("")
        return sorted(names)

    def file_info(self, path: str) -> os.stat_result | None:
        """Return an object's metadata as a stat (a regular file, ``0o644``, its size and
        last-modified time); a directory's stat for a prefix that holds objects; None when
        there is neither.

        Raises:
            CheckpointReadError: it cannot be looked at (``__cause__``: the client's error).
        """
        key = self.key(path)
        try:
            if not key:
                return _directory_stat()
            self._probe("open", path)
            try:
                return _stat(obstore.head(self._store, key))
            except FileNotFoundError:
                pass
            found = obstore.list_with_delimiter(self._store, key + "/")
        except (BaseError, OSError) as exc:
            raise _read_error(path, exc) from exc
        if found["objects"] or found["common_prefixes"]:
            return _directory_stat()
        return None

    def read_prefix(self, path: str, size: int) -> bytes:
        """Return the first ``size`` bytes of an object (b"" for anything else, an object that
        cannot be read included: it is a sniff, and never fails a directory scan)."""
        if size <= 0:
            return b""
        try:
            key = self.key(path)
            self._probe("read", path)
            return bytes(obstore.get(self._store, key, options={"range": (0, size)}).bytes())
        except (BaseError, OSError, ValueError):
            return b""

    # -- removing ----------------------------------------------------------------------------

    def _delete(self, path: str) -> None:
        key = self.key(path)
        self._probe("unlink", path)
        with contextlib.suppress(FileNotFoundError):  # GCS and Azure say so; S3 does not
            obstore.delete(self._store, key)
        with self._versions_lock:
            self._versions.pop(path, None)

    def remove_files(self, paths: Sequence[str], *, keep_spare: bool = False) -> str | None:
        """Delete objects (retention, prune); missing ones are fine. ``keep_spare`` is ignored:
        an object cannot be overwritten in place, so there are no spares (None).

        A reader that opened one of them keeps reading it where the store serves a deleted
        object's open reads no more: its next read fails with ``CheckpointNotFoundError``,
        never another object's bytes.

        Every object is tried, even after one fails.

        Raises:
            CheckpointWriteError: an object could not be deleted (the first such; a note lists
                the others).
        """
        self._keep_leases()
        errors: list[CheckpointWriteError] = []
        for path in paths:
            try:
                self._delete(path)
            except (BaseError, OSError) as exc:
                error = _write_error(path, exc, "could not delete")
                error.__cause__ = exc
                errors.append(error)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"also failed: {[str(e) for e in errors[1:]]}")
            raise errors[0]
        return None

    def remove_spare(self, path: str) -> None:
        """Delete an object that no save will reuse (this storage makes no spares; a failure
        is no error)."""
        with contextlib.suppress(BaseError, OSError, ValueError):
            self._delete(path)

    def remove_temp_files(self, directory: str, owns: Callable[[str], bool]) -> list[str]:
        """Return [] : no temporary objects exist. A checkpoint is uploaded under its final
        name and appears only when its upload completes; an interrupted multipart upload is
        invisible to listings (obstore aborts it on an error; after a crash, a bucket
        lifecycle rule such as S3's ``AbortIncompleteMultipartUpload`` reclaims its parts),
        and a complete but unlisted checkpoint is an ordinary object that ``prune`` removes.
        """
        return []

    def lock(self, directory: str, name: str = LOCK_NAME) -> ObjectLease:
        """Return the lease ``<directory>/<name>`` (not yet taken)."""
        return ObjectLease(self, directory, name)

    # -- checkpoint files ----------------------------------------------------------------------

    def write_atomic(
        self,
        final_path: str,
        pieces: Sequence[Buffer],
        *,
        late_head: Callable[[], bytes] | None = None,
        reuse: str | None = None,
        aborted: Callable[[], bool] | None = None,
    ) -> None:
        """Upload ``pieces`` to ``final_path``: one PUT when they fit in one part, else one
        multipart upload of ``part_bytes`` parts, ``max_concurrency`` at a time, fed straight
        from the pieces (no copy of the whole checkpoint is made). Either completes whole or
        leaves the old object (or none) in place.

        One blocking call (one worker thread). With ``late_head``, it is called first: its
        bytes replace the start of the first piece. ``reuse`` is ignored (no spares).
        ``aborted()`` is asked before each part-sized stretch and before the upload completes;
        once it says True the upload is aborted (obstore aborts a multipart upload whose
        input fails) and ``WriteAborted`` raised.

        Raises:
            WriteAborted: ``aborted()`` said so; nothing was put in place.
            ValueError: ``late_head()`` returned more bytes than the first piece reserves.
            CheckpointWriteError: the upload failed (``__cause__``: the client's error).
        """
        key = self.key(final_path)
        self._keep_leases()
        views = [_byte_view(piece) for piece in pieces]
        if late_head is not None:
            head = memoryview(late_head())
            if not views or len(head) > len(views[0]):
                raise ValueError("late_head() returned more bytes than the first piece reserves")
            views[0:1] = [head, views[0][len(head) :]]
        views = [view for view in views if len(view)]
        total = sum(len(view) for view in views)
        try:
            if total <= self.part_bytes:
                _check_aborted(aborted)
                self._probe("write", final_path)
                self._probe("rename", final_path)
                obstore.put(self._store, key, views, use_multipart=False)
            else:
                obstore.put(
                    self._store,
                    key,
                    self._stretches(final_path, views, aborted),
                    use_multipart=True,
                    chunk_size=self.part_bytes,
                    max_concurrency=self.max_concurrency,
                )
        except (BaseError, OSError) as exc:
            raise _write_error(final_path, exc) from exc

    def _stretches(
        self, path: str, views: list[memoryview], aborted: Callable[[], bool] | None
    ) -> Iterator[memoryview]:
        """Yield the views in stretches of at most one part, asking ``aborted()`` (and the
        probe, and the leases) once per part's worth of bytes, and once more before the
        upload may complete.

        obstore pulls this from the thread that called ``put``; what it raises there aborts
        the multipart upload and propagates unchanged. The checks are per part, not per
        piece: thousands of small arrays would pay them thousands of times.
        """
        step = self.part_bytes
        since_check = step  # checked before the first piece
        for view in views:
            for start in range(0, len(view), step):
                if since_check >= step:
                    _check_aborted(aborted)
                    self._keep_leases()
                    self._probe("write", path)
                    since_check = 0
                piece = view[start : start + step]
                since_check += len(piece)
                yield piece
        _check_aborted(aborted)
        self._probe("rename", path)

    @contextlib.asynccontextmanager
    async def open_for_read(
        self, path: str, *, limiter: anyio.CapacityLimiter | None = None
    ) -> AsyncIterator[ObjectReadFile]:
        """Open a checkpoint object for ranged reads, pinned to the version it has now.

        Every read is conditional on that version's ETag (``If-Match``): if the object is
        replaced or deleted while open, the read fails with ``CheckpointNotFoundError``, never
        giving another version's bytes.

        Raises:
            CheckpointNotFoundError: there is no object at ``path``.
            CheckpointReadError: it cannot be looked at (``__cause__``: the client's error).
        """
        meta = await anyio.to_thread.run_sync(self._head_for_read, path, limiter=limiter)
        yield ObjectReadFile(self, path, meta, limiter)

    def _head_for_read(self, path: str) -> ObjectMeta:
        key = self.key(path)
        try:
            self._probe("open", path)
            return obstore.head(self._store, key)
        except FileNotFoundError:
            raise CheckpointNotFoundError(path, "no such checkpoint") from None
        except (BaseError, OSError) as exc:
            raise _read_error(path, exc) from exc

    def open_mmap(self, path: str) -> mmap.mmap:
        """Refuse: an object cannot be mapped.

        Raises:
            ValueError: always (restore with ``mmap=False``).
        """
        raise ValueError(
            f"mmap=True needs a local checkpoint; {path} is in an object store: restore with "
            "mmap=False"
        )

    # -- event files ---------------------------------------------------------------------------

    def _create_new_sync(self, path: str) -> None:
        name = self.key(path).rsplit("/", 1)[-1]
        self._probe("open", path)
        taken = self.list_names(os.path.dirname(path))
        if any(other == name or other.startswith(name + ".") for other in taken):
            raise FileExistsError(errno.EEXIST, "an event file of this name exists", path)

    async def create_new_file(self, path: str) -> ObjectAppendFile:
        """Start an event file at ``path``: a sequence of objects, one per ``write``.

        The first write is the object ``path`` itself, the n-th after it
        ``<path>.<n:010d>``, so that they sort in write order, all hold ``tfevents`` in their
        names (TensorBoard reads each as an event file, in name order), and each holds whole
        records. Prefixes need no creating.

        Raises:
            OSError: an object of this name (or one of its sequence) exists, or the store
                cannot be listed.
        """
        await anyio.to_thread.run_sync(self._create_new_sync, path)
        return ObjectAppendFile(self, path)

    def _put_new(self, path: str, data: bytes) -> None:
        """PUT a new object (create-only), for the event files.

        Raises:
            OSError: it exists (``EEXIST``), or the PUT failed (``__cause__``: the client's
                error).
        """
        key = self.key(path)
        try:
            self._probe("write", path)
            try:
                obstore.put(self._store, key, data, mode="create")
            except _NO_CONDITIONS:
                obstore.put(self._store, key, data, mode="overwrite")
        except BaseError as exc:
            raise _as_os_error(path, exc) from exc


@dataclass(slots=True)
class ObjectReadFile:
    """An object open for reading, pinned to the version it had when opened: ranged GETs,
    each conditional on that version's ETag."""

    _storage: ObjectStorage
    path: str
    _meta: ObjectMeta
    _limiter: anyio.CapacityLimiter | None
    size: int = field(init=False)
    _key: str = field(init=False)

    def __post_init__(self) -> None:
        self.size = self._meta["size"]
        self._key = self._storage.key(self.path)

    def _replaced(self, detail: str) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            self.path,
            f"{detail} while being read (a writer saved or retired it meanwhile); nothing of "
            "the new version was read: restore again (latest_checkpoint(directory) names the "
            "newest)",
        )

    def _get(self, start: int, end: int) -> obstore.GetResult:
        """GET ``[start, end)`` of the pinned version."""
        options: obstore.GetOptions = {"range": (start, end)}
        e_tag = self._meta.get("e_tag")
        if e_tag is not None:
            options["if_match"] = e_tag
        try:
            self._storage._probe("read", self.path)
            result = obstore.get(self._storage._store, self._key, options=options)
        except PreconditionError:
            raise self._replaced("replaced") from None
        except FileNotFoundError:
            raise self._replaced("deleted") from None
        except (BaseError, OSError) as exc:
            raise _read_error(self.path, exc) from exc
        got = result.meta
        # Where the store gives no ETag, If-Match could not pin it: compare what it does give.
        if e_tag is None and (
            got["size"] != self.size or got["last_modified"] != self._meta["last_modified"]
        ):
            raise self._replaced("replaced")
        return result

    def read_into_sync(self, offset: int, views: list[memoryview]) -> int:
        """Fill ``views`` back to back from ``offset`` with one ranged GET (from a worker
        thread); return how many bytes were read, fewer only at the end of the object.

        Raises:
            CheckpointNotFoundError: the object was replaced or deleted since it was opened.
            CheckpointReadError: the read failed (``__cause__``: the client's error).
        """
        targets = [_byte_view(view) for view in views if len(view)]
        end = min(offset + sum(len(view) for view in targets), self.size)
        if offset >= end:
            return 0
        result = self._get(offset, end)
        try:
            if end - offset <= _WHOLE_READ_BYTES:
                return _fill(targets, [memoryview(result.bytes())])
            return _fill(targets, map(memoryview, result.stream(min_chunk_size=_STREAM_CHUNK)))
        except PreconditionError:  # pragma: no cover - the store checks before it streams
            raise self._replaced("replaced") from None
        except (BaseError, OSError) as exc:
            raise _read_error(self.path, exc) from exc

    def _read_sync(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if size <= 0 or offset >= end:
            return b""
        result = self._get(offset, end)
        try:
            return bytes(result.bytes())
        except (BaseError, OSError) as exc:
            raise _read_error(self.path, exc) from exc

    async def read(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (fewer only at the end of the object),
        in one worker-thread hop.

        Raises:
            CheckpointNotFoundError: the object was replaced or deleted since it was opened.
            CheckpointReadError: the read failed (``__cause__``: the client's error).
        """
        return await anyio.to_thread.run_sync(self._read_sync, offset, size, limiter=self._limiter)

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work on this object (its reads, their checksums) in a worker thread."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


def _fill(targets: list[memoryview], chunks: Iterator[memoryview] | list[memoryview]) -> int:
    """Copy ``chunks`` into ``targets`` back to back; return the bytes copied."""
    index, position, total = 0, 0, 0
    for chunk in chunks:
        while len(chunk) and index < len(targets):
            target = targets[index]
            count = min(len(target) - position, len(chunk))
            target[position : position + count] = chunk[:count]
            position += count
            total += count
            chunk = chunk[count:]
            if position == len(target):
                index, position = index + 1, 0
    return total


class ObjectAppendFile:
    """An event file on an object store: each ``write`` puts one new object of whole records.

    Objects cannot be appended to, so the file is the sequence ``<path>``,
    ``<path>.0000000001``, ``<path>.0000000002``...: the names sort in write order and hold
    ``tfevents``, and each object is a complete sequence of TFRecords, so TensorBoard reads
    them as event files, one after the other. Ten digits: a writer flushing every second
    needs three centuries to reach them (six would wrap in 12 days, and ``1000000`` sorts
    before ``999999``).
    """

    __slots__ = ("_closed", "_seq", "_storage", "path")

    def __init__(self, storage: ObjectStorage, path: str) -> None:
        self._storage = storage
        self.path = path
        self._seq = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<ObjectAppendFile {self.path!r} objects={self._seq}>"

    def _next_path(self) -> str:
        return self.path if self._seq == 0 else f"{self.path}.{self._seq:0{_SEQ_DIGITS}d}"

    async def write(self, data: bytes) -> None:
        """Put ``data`` (whole records) as the next object of the sequence: readers see it
        once this returns. One worker-thread call, shielded: a cancellation never tears it.

        Raises:
            ValueError: the file is closed.
            OSError: the PUT failed (``__cause__``: the client's error), or the object exists.
        """
        if self._closed:
            raise ValueError(f"write to a closed event file: {self.path}")
        if not data:
            return
        path = self._next_path()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._storage._put_new, path, data)
        self._seq += 1

    async def aclose(self) -> None:
        """Close (idempotent; every write was put already)."""
        self._closed = True


class ObjectLease:
    """The lock of a directory on an object store: a lease object, taken create-only.

    The object ``<directory>/<name>`` holds JSON ``{"owner": "<host>/<pid>/<random>",
    "expires": <wall time>}``. ``acquire()`` creates it (``If-None-Match: *``); when it exists
    and has not expired the directory is locked; an expired one is taken over with a PUT
    matched to the version read, so of two writers taking over one lease exactly one wins.
    ``renew()`` extends it (matched to this holder's version: a lease lost meanwhile is
    reported, never silently retaken); ``release()`` deletes it if it is still this holder's.

    Its holder keeps it alive: every write of the storage that issued it (a checkpoint's
    upload, part by part; the state file; deletions) first renews it once it is past half its
    time, so a lease lost meanwhile stops the write; between writes the holder calls
    ``renew()`` more often than every ``lease_secs``, or another writer may take it over. The
    hosts' wall clocks must agree to well within ``lease_secs``. Object stores
    have no conditional delete: ``release()`` checks the version, then deletes, so a takeover
    landing in between (only possible once the lease has expired) is deleted with it.
    """

    def __init__(self, storage: ObjectStorage, directory: str, name: str = LOCK_NAME) -> None:
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory, name)
        self._storage = storage
        self._key = storage.key(self.path)
        self._owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self._version: UpdateVersion | None = None
        self._lost: CheckpointLockedError | None = None
        """Why the lease is no longer held, once it was lost (renewals raise it again)."""
        self.expires: float | None = None
        """When the lease held runs out (wall-clock seconds), None when not held."""
        # One request at a time: a renewal from a write (ObjectStorage._keep_leases) and one
        # from the holder's own timer must not both match the same version.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = f"held until {_when(self.expires)}" if self.expires is not None else "not held"
        return f"<ObjectLease {self.path!r} {state}>"

    @property
    def held(self) -> bool:
        """Whether this object took the lease and has not released or lost it (it expires
        unless renewed)."""
        return self._version is not None

    @property
    def renew_every(self) -> float | None:
        """A third of the lease: two renewals may fail (a network blip) before it runs out."""
        return self._storage.lease_secs / 3

    @property
    def owner(self) -> str:
        """Who this lease says holds it: ``<host>/<pid>/<random>``."""
        return self._owner

    def _body(self) -> tuple[bytes, float]:
        expires = self._storage._clock() + self._storage.lease_secs
        body = {"owner": self._owner, "expires": expires, "expires_at": _when(expires)}
        return json.dumps(body).encode(), expires

    def _put(self, mode: PutMode) -> tuple[UpdateVersion, float]:
        """PUT this holder's lease (``_NO_CONDITIONS``: the store has no such condition)."""
        data, expires = self._body()
        self._storage._probe("write", self.path)
        result = obstore.put(self._storage._store, self._key, data, mode=mode)
        return _version(result), expires

    def _put_unconditionally(self) -> tuple[UpdateVersion, float]:
        """On a store without conditional PUTs: overwrite the lease, then read it back, so
        that of two writers the one whose PUT landed last knows it holds it (the other may
        hold it too, until it reads: see ``ObjectStorage``'s docstring).

        Raises:
            CheckpointLockedError: another writer's PUT landed after this one's.
        """
        version, expires = self._put("overwrite")
        found = self._read()
        if found is None or found[0] != self._owner:
            raise CheckpointLockedError(
                self.directory,
                f"another writer took {self._held_error()} at the same time (this store has no "
                "conditional writes); stop it or use another directory",
            )
        return found[2] or version, expires

    def _read(self) -> tuple[str, float, UpdateVersion] | None:
        """The holder, expiry and version of the lease there now (None when there is none)."""
        self._storage._probe("read", self.path)
        try:
            result = obstore.get(self._storage._store, self._key)
            meta = result.meta
            data = bytes(result.bytes())[:_LEASE_READ_BYTES]
        except FileNotFoundError:
            return None
        holder, expires = "unknown", _wall(meta) + self._storage.lease_secs
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            body = json.loads(data)
            if isinstance(body, dict):
                if isinstance(body.get("owner"), str):
                    holder = body["owner"]
                if isinstance(body.get("expires"), int | float):
                    expires = float(body["expires"])
        return holder, expires, _version(meta)

    def _held_error(self) -> str:
        held = "this checkpoint directory"
        if self.name != LOCK_NAME:
            held = f"the lock {self.name} of {held}"
        return held

    def acquire(self) -> None:
        """Take the lease (blocking call). A failed call holds nothing.

        Raises:
            CheckpointLockedError: another writer holds an unexpired lease (the message names
                it and when it expires), or took over the expired one at the same time.
            CheckpointWriteError: the lease cannot be read or written (``__cause__``: the
                client's error).
        """
        with self._lock:
            try:
                self._acquire()
            except (BaseError, OSError) as exc:
                raise _write_error(self.path, exc, "cannot take the lease") from exc
            self._lost = None
            self._storage._leases.add(self)

    def _acquire(self) -> None:
        unconditional = False  # the store refused a conditional PUT
        for _attempt in range(3):
            if not unconditional:
                try:
                    self._version, self.expires = self._put("create")
                    return
                except AlreadyExistsError:
                    pass
                except _NO_CONDITIONS:
                    unconditional = True
            found = self._read()
            if (
                found is not None
                and found[1] > self._storage._clock()
                and not _holder_exited(found[0])
            ):
                holder, expires = found[0], found[1]
                raise CheckpointLockedError(
                    self.directory,
                    f"another writer holds {self._held_error()} (lease {holder}, until "
                    f"{_when(expires)}); stop it, use another directory, or wait until "
                    f"{_when(expires)} for the lease to expire",
                )
            if unconditional:
                self._version, self.expires = self._put_unconditionally()
                return
            if found is None:
                continue  # released meanwhile: create it again
            holder, expires, version = found
            try:
                self._version, self.expires = self._put(version or "create")
                return
            except (PreconditionError, AlreadyExistsError):
                raise CheckpointLockedError(
                    self.directory,
                    f"another writer took over the expired lease of {self._held_error()} "
                    f"(held by {holder} until {_when(expires)}) at the same time; stop it or "
                    "use another directory",
                ) from None
            except FileNotFoundError:
                continue  # deleted meanwhile: create it again
        raise CheckpointLockedError(
            self.directory,
            f"the lease of {self._held_error()} kept changing hands while this writer tried to "
            "take it; stop the other writers or use another directory",
        )

    def renew(self) -> None:
        """Extend the lease by ``lease_secs`` from now (blocking call).

        Raises:
            CheckpointLockedError: it was lost (it expired and another writer took it over,
                or it was deleted); this object holds nothing any more.
            CheckpointWriteError: it could not be renewed (``__cause__``: the client's
                error); it is still held until it expires.
            RuntimeError: it was never taken, or was released.
        """
        with self._lock:
            version = self._version
            if version is None and self._lost is not None:
                # A renewal from the holder's timer after one from a write lost it.
                raise CheckpointLockedError(self._lost.path, self._lost.detail)
            if version is None:
                raise RuntimeError(f"renew() of a lease not held: acquire() it first ({self.path})")
            try:
                try:
                    self._version, self.expires = self._put(version or "overwrite")
                except _NO_CONDITIONS:
                    found = self._read()
                    if found is None or found[0] != self._owner:
                        raise FileNotFoundError(errno.ENOENT, "lost", self.path) from None
                    self._version, self.expires = self._put_unconditionally()
            except (
                CheckpointLockedError,
                PreconditionError,
                AlreadyExistsError,
                FileNotFoundError,
            ):
                self._version = self.expires = None
                self._storage._leases.discard(self)
                self._lost = CheckpointLockedError(
                    self.directory,
                    f"this writer lost the lease of {self._held_error()}: it expired and another "
                    "writer took it over (renew it more often than every "
                    f"{self._storage.lease_secs:g} s); stop the other writer or use another "
                    "directory",
                )
                raise self._lost from None
            except (BaseError, OSError) as exc:
                raise _write_error(self.path, exc, "cannot renew the lease") from exc

    def release(self) -> None:
        """Delete the lease if it is still this holder's (idempotent, blocking call).

        A lease that cannot be deleted (a network error) is left to expire, with a warning on
        the ``asyncckpt`` logger: the next writer takes it over then.
        """
        with self._lock:
            version, self._version, expires, self.expires = self._version, None, self.expires, None
            self._storage._leases.discard(self)
            if version is None:
                return
            try:
                self._storage._probe("open", self.path)
                now = obstore.head(self._storage._store, self._key)
                if _version(now) != version:
                    return  # taken over since it expired: the new holder's
                self._storage._probe("unlink", self.path)
                obstore.delete(self._storage._store, self._key)
            except FileNotFoundError:
                return
            except (BaseError, OSError) as exc:
                logger.warning(
                    "could not delete the lease %s (%s); it expires at %s, when the next writer "
                    "takes it over",
                    self.path,
                    _reason(exc),
                    _when(expires) if expires is not None else "its end",
                )
