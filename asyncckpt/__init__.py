"""asyncckpt: TensorFlow-style checkpointing for async/await trainers and services.

Public names are re-exported here from private modules; import them from ``asyncckpt``.
"""

from __future__ import annotations

from ._errors import CheckpointCorruptedError as CheckpointCorruptedError
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointFormatError as CheckpointFormatError
from ._errors import CheckpointLockedError as CheckpointLockedError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._errors import CheckpointWriteError as CheckpointWriteError
from ._errors import NanLossDuringTrainingError as NanLossDuringTrainingError
from ._errors import OutOfRangeError as OutOfRangeError
from ._errors import PreemptedError as PreemptedError
from ._saver import CheckpointState as CheckpointState
from ._saver import Saver as Saver
from ._saver import get_checkpoint_state as get_checkpoint_state
from ._saver import latest_checkpoint as latest_checkpoint
from ._types import StateTree as StateTree
from ._types import SupportsStateDict as SupportsStateDict
from ._writer import CheckpointManager as CheckpointManager
from ._writer import CheckpointManagerStatistics as CheckpointManagerStatistics

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointManagerStatistics",
    "CheckpointNotFoundError",
    "CheckpointState",
    "CheckpointWriteError",
    "NanLossDuringTrainingError",
    "OutOfRangeError",
    "PreemptedError",
    "Saver",
    "StateTree",
    "SupportsStateDict",
    "get_checkpoint_state",
    "latest_checkpoint",
]

# Tracebacks and reprs show the public path, not the private module (as trio does).
for _name in __all__:
    if getattr(globals()[_name], "__module__", "").startswith(__name__ + "."):
        globals()[_name].__module__ = __name__
del _name
