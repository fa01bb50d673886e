"""Test kit for code that uses asyncckpt: storage fault injection (more fakes come with hooks).

``FaultyStorage`` makes chosen storage operations fail with an OSError, exactly as a full
disk, a read-only file system or a failing device would, so that tests can check what a
user sees (``CheckpointWriteError``, the previous checkpoint intact) without a real fault.
"""

from __future__ import annotations

import errno as errno_codes
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Self

from . import _storage

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["FaultyStorage", "StorageOp"]

StorageOp = Literal["open", "write", "fsync", "rename", "fsync_dir", "unlink", "read"]
_OPS: Final = ("open", "write", "fsync", "rename", "fsync_dir", "unlink", "read")


@dataclass(slots=True)
class _Rule:
    op: str
    errno: int
    match: str | None
    skip: int
    times: int | None


class FaultyStorage:
    """Inject OSErrors into asyncckpt's storage operations while the context is active.

    Operations: ``"open"`` (creating a temp file or opening one to read), ``"write"`` (of a
    temp file), ``"fsync"`` (of a temp file), ``"rename"`` (the atomic replace, seen with the
    final path), ``"fsync_dir"`` (after a rename it is seen with the renamed file's path, so
    ``match`` picks which commit fails; after deletions, with the directory's), ``"unlink"``
    (retention and pruning) and ``"read"`` (the state file). Every operation is recorded in
    ``calls`` as ``(op, path)``, so a test can also fail the k-th one it observed.

    Example::

        with FaultyStorage() as faults:
            faults.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
            with pytest.raises(CheckpointWriteError):
                await saver.save(state, prefix, global_step=2)
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._previous: _storage.FaultPlan | None = None

    def fail(
        self,
        op: StorageOp,
        errno: int = errno_codes.EIO,
        *,
        match: str | None = None,
        skip: int = 0,
        times: int | None = 1,
    ) -> None:
        """Make ``op`` fail with ``errno``.

        Args:
            op: which operation.
            errno: the error number (``errno.ENOSPC``, ``EIO``, ``EACCES``, ``EROFS``...).
            match: only paths containing this text (a temp file's name contains its target's).
            skip: let this many matching calls succeed first.
            times: how many calls fail (None: all of them).
        """
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, not {op!r}")
        with self._lock:
            self._rules.append(_Rule(op, errno, match, skip, times))

    def clear(self) -> None:
        """Remove every rule (recorded calls are kept)."""
        with self._lock:
            self._rules.clear()

    def check(self, op: str, path: str) -> None:
        """Record ``op`` on ``path`` and raise the OSError a matching rule asks for."""
        with self._lock:
            self.calls.append((op, path))
            for rule in self._rules:
                if rule.op != op or (rule.match is not None and rule.match not in path):
                    continue
                if rule.skip:
                    rule.skip -= 1
                    continue
                if rule.times is not None:
                    if rule.times == 0:
                        continue
                    rule.times -= 1
                raise OSError(rule.errno, os.strerror(rule.errno), path)

    def __enter__(self) -> Self:
        self._previous = _storage.install_faults(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _storage.install_faults(self._previous)
