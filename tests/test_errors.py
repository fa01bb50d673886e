"""The exceptions users catch: the tree they inherit from, pickling, and helpful messages.

Exceptions cross process boundaries (multiprocessing workers, a launcher collecting a
trainer's failure), so every class must survive pickle with its attributes and its message.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from typing import TYPE_CHECKING, Any

import pytest
from support import stepped_state

import asyncckpt
from asyncckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    NanLossDuringTrainingError,
    OutOfRangeError,
    PreemptedError,
    Saver,
)
from asyncckpt._core import _errors

if TYPE_CHECKING:
    from pathlib import Path

    from asyncckpt.testing import FaultyStorage

# One example of every exception class asyncckpt exports, with the attributes it must keep.
EXAMPLES: list[tuple[BaseException, dict[str, Any]]] = [
    (CheckpointError("/ckpt/model.ckpt-3", "something failed"), {"path": "/ckpt/model.ckpt-3"}),
    (
        CheckpointNotFoundError("/ckpt/model.ckpt-3", "no such checkpoint"),
        {"path": "/ckpt/model.ckpt-3", "detail": "no such checkpoint"},
    ),
    (
        CheckpointCorruptedError("/ckpt/model.ckpt-3", "array 0 ('w')", "checksum mismatch"),
        {"path": "/ckpt/model.ckpt-3", "part": "array 0 ('w')", "detail": "checksum mismatch"},
    ),
    (
        CheckpointFormatError("/ckpt/checkpoint", "refusing checkpoint name '../x'"),
        {"path": "/ckpt/checkpoint", "detail": "refusing checkpoint name '../x'"},
    ),
    (
        CheckpointReadError("/ckpt/model.ckpt-3", "Permission denied (errno 13)"),
        {"path": "/ckpt/model.ckpt-3", "detail": "Permission denied (errno 13)"},
    ),
    (
        CheckpointWriteError("/ckpt/model.ckpt-3", "No space left on device (errno 28)"),
        {"path": "/ckpt/model.ckpt-3", "detail": "No space left on device (errno 28)"},
    ),
    (
        CheckpointLockedError("/ckpt", "another writer holds this checkpoint directory (pid 7)"),
        {"path": "/ckpt", "detail": "another writer holds this checkpoint directory (pid 7)"},
    ),
    (OutOfRangeError("input exhausted"), {"args": ("input exhausted",)}),
    (PreemptedError("worker preempted"), {"args": ("worker preempted",)}),
    (NanLossDuringTrainingError(), {}),
]


def _exported_exception_classes() -> set[type[BaseException]]:
    classes = set()
    for name in asyncckpt.__all__:
        obj = getattr(asyncckpt, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            classes.add(obj)
    return classes


def _round_trip(exc: BaseException) -> BaseException:
    copy = pickle.loads(pickle.dumps(exc))
    assert isinstance(copy, BaseException)
    return copy


def test_examples_cover_every_exported_exception() -> None:
    # A new public exception without a pickling example fails here.
    assert {type(exc) for exc, _ in EXAMPLES} == _exported_exception_classes()


@pytest.mark.parametrize(("exc", "attrs"), EXAMPLES, ids=lambda v: type(v).__name__)
def test_exception_round_trips_through_pickle(exc: BaseException, attrs: dict[str, Any]) -> None:
    copy = _round_trip(exc)
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    for name, value in attrs.items():
        assert getattr(copy, name) == value
    if isinstance(exc, CheckpointError):
        assert vars(copy) == vars(exc)


def test_not_found_keeps_its_oserror_fields_through_pickle() -> None:
    exc = CheckpointNotFoundError("/ckpt/model.ckpt-3", "no such checkpoint")
    copy = _round_trip(exc)
    assert isinstance(copy, CheckpointNotFoundError)
    # `except OSError as e: e.errno, e.filename` handlers stay informative.
    assert (copy.errno, copy.filename) == (errno.ENOENT, "/ckpt/model.ckpt-3")
    assert (exc.errno, exc.filename) == (errno.ENOENT, "/ckpt/model.ckpt-3")


def test_pickle_keeps_notes() -> None:
    exc = CheckpointWriteError("/ckpt/model.ckpt-3", "disk full")
    exc.add_note("2 later write(s) also failed")
    copy = _round_trip(exc)
    assert copy.__notes__ == ["2 later write(s) also failed"]


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (CheckpointError, (Exception,)),
        (CheckpointNotFoundError, (CheckpointError, FileNotFoundError, OSError)),
        (CheckpointCorruptedError, (CheckpointError,)),
        (CheckpointFormatError, (CheckpointError, ValueError)),
        (CheckpointWriteError, (CheckpointError,)),
        (CheckpointLockedError, (CheckpointWriteError, CheckpointError)),
        (OutOfRangeError, (Exception,)),
        (PreemptedError, (Exception,)),
        (NanLossDuringTrainingError, (RuntimeError,)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_inheritance(cls: type[BaseException], bases: tuple[type[BaseException], ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)


@pytest.mark.parametrize(
    ("cls", "not_base"),
    [
        # End of input and preemption are not checkpoint failures: `except CheckpointError`
        # around a save must not swallow them.
        (OutOfRangeError, CheckpointError),
        (PreemptedError, CheckpointError),
        (NanLossDuringTrainingError, CheckpointError),
        # A damaged file is not a failed write, and a failed write is not a bad argument.
        (CheckpointCorruptedError, CheckpointWriteError),
        (CheckpointFormatError, CheckpointWriteError),
        (CheckpointWriteError, ValueError),
        (CheckpointWriteError, OSError),
        (CheckpointCorruptedError, ValueError),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_not_inherited(cls: type[BaseException], not_base: type[BaseException]) -> None:
    assert not issubclass(cls, not_base)


def test_docstring_tree_matches_the_classes() -> None:
    """Every ``Name(Base, ...)`` drawn in ``_errors``' docstring is the class's real bases."""
    doc = _errors.__doc__
    assert doc is not None
    drawn = re.findall(r"(\w+Error)\(([\w, ]+)\)", doc)
    assert len(drawn) >= 8
    for name, bases in drawn:
        cls = getattr(asyncckpt, name)
        assert [b.__name__ for b in cls.__bases__] == [b.strip() for b in bases.split(",")]
    # The one class drawn without parentheses hangs under CheckpointWriteError.
    assert re.search(r"CheckpointWriteError\(.*\n\s+└── CheckpointLockedError", doc)
    assert CheckpointLockedError.__bases__ == (CheckpointWriteError,)


def test_builtin_handlers_catch_checkpoint_errors() -> None:
    with pytest.raises(FileNotFoundError) as not_found:
        raise CheckpointNotFoundError("/ckpt/model.ckpt-9", "no such checkpoint")
    assert not_found.value.errno == errno.ENOENT
    assert not_found.value.filename == "/ckpt/model.ckpt-9"
    with pytest.raises(ValueError, match="unknown format version"):
        raise CheckpointFormatError("/ckpt/model.ckpt-9", "unknown format version 99")


def test_str_names_the_path_and_detail() -> None:
    assert str(CheckpointError("/ckpt/x", "")) == "/ckpt/x"
    assert str(CheckpointWriteError("/ckpt/x", "disk full")) == "/ckpt/x: disk full"
    assert str(CheckpointNotFoundError("/ckpt/x", "gone")) == "/ckpt/x: gone"
    message = str(CheckpointCorruptedError("/ckpt/x", "header", "checksum mismatch"))
    assert message.startswith("/ckpt/x: corrupted header (checksum mismatch)")
    # What to do about a damaged file: commands that work as printed, for its directory.
    assert "`asyncckpt verify /ckpt`" in message
    assert 'on_corrupt="fallback"' in message
    assert "`asyncckpt prune /ckpt --keep 5`" in message
    assert str(NanLossDuringTrainingError()) == "NaN loss during training."


@pytest.mark.anyio
async def test_errors_raised_by_real_operations_pickle_with_their_advice(
    tmp_path: Path, storage: FaultyStorage
) -> None:
    """Errors as the library raises them keep their message (and its advice) across pickle."""
    directory = tmp_path / "run"
    prefix = str(directory / "model.ckpt")
    saver = Saver(storage=storage)
    await saver.save(stepped_state(1), prefix, global_step=1)
    raised: list[CheckpointError] = []

    storage.fail("fsync", errno.ENOSPC, match="model.ckpt-2")
    with pytest.raises(CheckpointWriteError) as write_error:
        await saver.save(stepped_state(2), prefix, global_step=2)
    storage.clear()
    raised.append(write_error.value)
    assert "the previous checkpoint is still the latest" in str(write_error.value)

    async with CheckpointManager(directory):
        with pytest.raises(CheckpointLockedError) as locked:
            await saver.save(stepped_state(2), prefix, global_step=2)
    raised.append(locked.value)
    assert f"pid {os.getpid()}" in str(locked.value)
    assert "stop it or use another directory" in str(locked.value)

    with pytest.raises(CheckpointNotFoundError) as not_found:
        await saver.restore(prefix + "-7")
    raised.append(not_found.value)

    damaged = bytearray((directory / "model.ckpt-1").read_bytes())
    damaged[-1] ^= 0xFF  # the last byte of the array data
    (directory / "model.ckpt-1").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptedError) as corrupted:
        await saver.restore(prefix + "-1")
    raised.append(corrupted.value)
    assert corrupted.value.part.startswith("array")
    assert f"asyncckpt prune {directory} --keep" in str(corrupted.value)

    (directory / "checkpoint").write_text('model_checkpoint_path: "../elsewhere"\n')
    with pytest.raises(CheckpointFormatError) as bad_name:
        asyncckpt.latest_checkpoint(directory)
    raised.append(bad_name.value)
    assert "names must stay inside the directory" in str(bad_name.value)

    for exc in raised:
        copy = _round_trip(exc)
        assert type(copy) is type(exc)
        assert str(copy) == str(exc)
        assert vars(copy) == vars(exc)
        assert str(directory) in str(copy)
