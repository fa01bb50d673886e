"""asyncckpt: TensorFlow-style checkpointing for async/await trainers and services.

Summary builders live in ``asyncckpt.summary``; the test kit in ``asyncckpt.testing``.

Public names are re-exported here from private modules; import them from ``asyncckpt``.
"""

from __future__ import annotations

from ._checkpoint import ArrayMetadata as ArrayMetadata
from ._checkpoint import CheckpointManager as CheckpointManager
from ._checkpoint import CheckpointManagerStatistics as CheckpointManagerStatistics
from ._checkpoint import CheckpointMetadata as CheckpointMetadata
from ._checkpoint import CheckpointState as CheckpointState
from ._checkpoint import SaveOutcome as SaveOutcome
from ._checkpoint import Saver as Saver
from ._checkpoint import StorageCoordinator as StorageCoordinator
from ._checkpoint import TorchDistributedCoordinator as TorchDistributedCoordinator
from ._checkpoint import get_checkpoint_state as get_checkpoint_state
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._core._errors import CheckpointCorruptedError as CheckpointCorruptedError
from ._core._errors import CheckpointError as CheckpointError
from ._core._errors import CheckpointFormatError as CheckpointFormatError
from ._core._errors import CheckpointLockedError as CheckpointLockedError
from ._core._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._core._errors import CheckpointReadError as CheckpointReadError
from ._core._errors import CheckpointWriteError as CheckpointWriteError
from ._core._errors import NanLossDuringTrainingError as NanLossDuringTrainingError
from ._core._errors import OutOfRangeError as OutOfRangeError
from ._core._errors import PreemptedError as PreemptedError
from ._core._types import StateTree as StateTree
from ._core._types import SupportsStateDict as SupportsStateDict
from ._hooks._base import CheckpointSaverListener as CheckpointSaverListener
from ._hooks._base import SessionRunArgs as SessionRunArgs
from ._hooks._base import SessionRunContext as SessionRunContext
from ._hooks._base import SessionRunHook as SessionRunHook
from ._hooks._base import SessionRunValues as SessionRunValues
from ._hooks._basic import FinalOpsHook as FinalOpsHook
from ._hooks._basic import LoggingTensorHook as LoggingTensorHook
from ._hooks._basic import NanTensorHook as NanTensorHook
from ._hooks._basic import StepCounterHook as StepCounterHook
from ._hooks._basic import StopAtStepHook as StopAtStepHook
from ._hooks._checkpoint import CheckpointSaverHook as CheckpointSaverHook
from ._hooks._input import CheckpointInputPipelineHook as CheckpointInputPipelineHook
from ._hooks._iterators import AsyncCountingIterator as AsyncCountingIterator
from ._hooks._iterators import BatchIterator as BatchIterator
from ._hooks._iterators import CountingIterator as CountingIterator
from ._hooks._iterators import ResumableIterator as ResumableIterator
from ._hooks._iterators import SequenceIterator as SequenceIterator
from ._hooks._iterators import ShuffledIterator as ShuffledIterator
from ._hooks._summary import SummarySaverHook as SummarySaverHook
from ._hooks._timer import NeverTriggerTimer as NeverTriggerTimer
from ._hooks._timer import SecondOrStepTimer as SecondOrStepTimer
from ._session._coordinator import Coordinator as Coordinator
from ._session._creators import ChiefSessionCreator as ChiefSessionCreator
from ._session._creators import StepSession as StepSession
from ._session._monitored import MonitoredSession as MonitoredSession
from ._session._monitored import MonitoredTrainingSession as MonitoredTrainingSession
from ._session._scaffold import Scaffold as Scaffold
from ._session._signals import stop_on_signals as stop_on_signals
from ._summary._proto import SessionLog as SessionLog
from ._summary._writer import SummaryWriter as SummaryWriter

__version__ = "0.1.0"

__all__ = [
    "ArrayMetadata",
    "AsyncCountingIterator",
    "BatchIterator",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInputPipelineHook",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointManagerStatistics",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointSaverHook",
    "CheckpointSaverListener",
    "CheckpointState",
    "CheckpointWriteError",
    "ChiefSessionCreator",
    "Coordinator",
    "CountingIterator",
    "FinalOpsHook",
    "LoggingTensorHook",
    "MonitoredSession",
    "MonitoredTrainingSession",
    "NanLossDuringTrainingError",
    "NanTensorHook",
    "NeverTriggerTimer",
    "OutOfRangeError",
    "PreemptedError",
    "ResumableIterator",
    "SaveOutcome",
    "Saver",
    "Scaffold",
    "SecondOrStepTimer",
    "SequenceIterator",
    "SessionLog",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "ShuffledIterator",
    "StateTree",
    "StepCounterHook",
    "StepSession",
    "StopAtStepHook",
    "StorageCoordinator",
    "SummarySaverHook",
    "SummaryWriter",
    "SupportsStateDict",
    "TorchDistributedCoordinator",
    "get_checkpoint_state",
    "latest_checkpoint",
    "stop_on_signals",
]

# Tracebacks and reprs show the public path, not the private module (as trio does).
for _name in __all__:
    if getattr(globals()[_name], "__module__", "").startswith(__name__ + "."):
        globals()[_name].__module__ = __name__
del _name
