"""The hooks layer: the hook protocol, the timer, the standard hooks, the checkpoint,
summary and input-pipeline hooks, and the resumable iterators they save.

Built on the checkpoint and summary layers; knows nothing of how sessions run.
"""

from ._base import CheckpointSaverListener as CheckpointSaverListener
from ._base import CoordinatorLike as CoordinatorLike
from ._base import SessionLike as SessionLike
from ._base import SessionRunArgs as SessionRunArgs
from ._base import SessionRunContext as SessionRunContext
from ._base import SessionRunHook as SessionRunHook
from ._base import SessionRunValues as SessionRunValues
from ._basic import FinalOpsHook as FinalOpsHook
from ._basic import LoggingTensorHook as LoggingTensorHook
from ._basic import NanTensorHook as NanTensorHook
from ._basic import StepCounterHook as StepCounterHook
from ._basic import StopAtStepHook as StopAtStepHook
from ._checkpoint import CheckpointSaverHook as CheckpointSaverHook
from ._input import CheckpointInputPipelineHook as CheckpointInputPipelineHook
from ._input import input_pipeline_listeners as input_pipeline_listeners
from ._summary import SummarySaverHook as SummarySaverHook

__all__ = [
    "CheckpointInputPipelineHook",
    "CheckpointSaverHook",
    "CheckpointSaverListener",
    "CoordinatorLike",
    "FinalOpsHook",
    "LoggingTensorHook",
    "NanTensorHook",
    "SessionLike",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "StepCounterHook",
    "StopAtStepHook",
    "SummarySaverHook",
    "input_pipeline_listeners",
]
