"""The public namespace: complete, sorted, documented, and presented as ``asyncckpt``."""

from __future__ import annotations

import inspect
import typing

import asyncckpt
import asyncckpt.testing

# Names DESIGN.md promises for the core layers (more arrive with hooks and sessions).
DESIGN_NAMES = {
    "CheckpointCorruptedError", "CheckpointError", "CheckpointFormatError", "CheckpointManager",
    "CheckpointNotFoundError", "CheckpointReadError", "CheckpointWriteError", "OutOfRangeError",
    "PreemptedError",
    "NanLossDuringTrainingError", "Saver", "latest_checkpoint",
    "SessionRunHook", "SessionRunArgs", "SessionRunContext", "SessionRunValues",
    "MonitoredSession", "MonitoredTrainingSession", "Scaffold", "CheckpointSaverHook",
    "CheckpointSaverListener", "SecondOrStepTimer", "StopAtStepHook", "StepCounterHook",
    "NanTensorHook", "LoggingTensorHook", "FinalOpsHook",
}  # fmt: skip
TYPE_ALIASES = {"StateTree"}


def test_all_is_sorted_and_unique() -> None:
    assert list(asyncckpt.__all__) == sorted(set(asyncckpt.__all__))


def test_all_lists_every_public_name() -> None:
    public = {
        name
        for name, value in vars(asyncckpt).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(asyncckpt.__all__)


def test_design_names_exist() -> None:
    assert set(asyncckpt.__all__) >= DESIGN_NAMES


def test_exports_present_as_asyncckpt_with_docstrings() -> None:
    for name in asyncckpt.__all__:
        obj = getattr(asyncckpt, name)
        if name in TYPE_ALIASES:
            assert obj is typing.Any
            continue
        assert obj.__module__ == "asyncckpt", name
        assert inspect.getdoc(obj), f"{name} needs a docstring"


def test_public_methods_have_docstrings() -> None:
    for name in asyncckpt.__all__:
        obj = getattr(asyncckpt, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"{name}.{attr} needs a docstring"


def test_version() -> None:
    assert isinstance(asyncckpt.__version__, str)
    assert asyncckpt.__version__.count(".") == 2


def test_testing_kit_is_documented() -> None:
    for name in asyncckpt.testing.__all__:
        obj = getattr(asyncckpt.testing, name)
        assert inspect.getdoc(obj) or name == "StorageOp", name
