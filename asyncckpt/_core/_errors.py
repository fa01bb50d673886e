"""The exceptions users catch; imports nothing from the package.

```
CheckpointError(Exception)
├── CheckpointNotFoundError(CheckpointError, FileNotFoundError)  .path
├── CheckpointCorruptedError(CheckpointError)                    .path .part
├── CheckpointFormatError(CheckpointError, ValueError)           bad version, absurd size, bad name
├── CheckpointReadError(CheckpointError)                         .path; __cause__ = the OSError
└── CheckpointWriteError(CheckpointError)                        .path; __cause__ = the OSError
    └── CheckpointLockedError                                    another writer holds the directory
OutOfRangeError(Exception)   end of input -> normal end      PreemptedError(Exception)  -> recover
NanLossDuringTrainingError(RuntimeError)
```

Every exception pickles: constructors take only plain values, and ``__reduce__``
rebuilds them from exactly those (OSError's own reduce would not, because it
reinterprets its first two arguments as errno and strerror).
"""

from __future__ import annotations

import errno
import os
import shlex
from typing import Any

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "NanLossDuringTrainingError",
    "OutOfRangeError",
    "PreemptedError",
]


class CheckpointError(Exception):
    """Base class of every error about reading or writing checkpoints."""

    def __init__(self, path: str, detail: str = "") -> None:
        super().__init__(path, detail)
        self.path = path
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.detail), self.__dict__)

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.detail else self.path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists where one was asked for."""

    def __init__(self, path: str, detail: str = "") -> None:
        # OSError's (errno, strerror, filename) form keeps `except OSError` handlers informative.
        FileNotFoundError.__init__(self, errno.ENOENT, detail or "no checkpoint found", path)
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return CheckpointError.__str__(self)


class CheckpointCorruptedError(CheckpointError):
    """A checksum did not match, or the file is truncated: the file must not be loaded.

    ``part`` names the region: ``"prelude"``, ``"header"``, ``"array 3 ('a/b')"``,
    ``"padding"``, ``"size"``, or ``"state file"``.
    """

    def __init__(self, path: str, part: str, detail: str = "") -> None:
        Exception.__init__(self, path, part, detail)
        self.path = path
        self.part = part
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.part, self.detail), self.__dict__)

    @property
    def problem(self) -> str:
        """What is wrong, without the advice ``str()`` adds."""
        message = f"{self.path}: corrupted {self.part}"
        return f"{message} ({self.detail})" if self.detail else message

    def __str__(self) -> str:
        directory = shlex.quote(os.path.dirname(self.path) or ".")
        if self.part == "state file":
            return self.problem + (
                f"; `asyncckpt prune {directory} --keep 5` rebuilds it from the checkpoints "
                "present (keeping the newest 5)"
            )
        return self.problem + (
            f"; `asyncckpt verify {directory}` lists every damaged file; restore with "
            'on_corrupt="fallback" to take the newest intact checkpoint instead, or move this '
            f"file away and run `asyncckpt prune {directory} --keep 5` to rewrite the state file"
        )


class CheckpointFormatError(CheckpointError, ValueError):
    """The file is not a checkpoint this version can read, or it declares impossible values."""


class CheckpointReadError(CheckpointError):
    """An I/O error while reading a checkpoint or a state file (permission denied, a failing
    disk): the file may be fine, but it could not be read. ``__cause__`` is the OSError."""


class CheckpointWriteError(CheckpointError):
    """A save failed; the previous checkpoint is still the latest. ``__cause__`` is the OSError."""


class CheckpointLockedError(CheckpointWriteError):
    """Another writer (in this process or another) holds the checkpoint directory."""


class OutOfRangeError(Exception):
    """The input is exhausted: raised by a step, it ends the session normally."""


class PreemptedError(Exception):
    """A recoverable failure: the session restores the latest checkpoint and retries the step."""


class NanLossDuringTrainingError(RuntimeError):
    """The loss became NaN (raised by ``NanTensorHook``)."""

    def __str__(self) -> str:
        return "NaN loss during training."
