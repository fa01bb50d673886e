"""The checkpoint stack: snapshots, the file format, the state file, one checkpoint file,
the directory a writer holds, ``Saver``, maintenance for the command line, and
``CheckpointManager`` with its background writer.

Built on the tree and storage layers; knows nothing of hooks or sessions.
"""

from ._coordination import Channel as Channel
from ._coordination import ShardCoordinator as ShardCoordinator
from ._coordination import StorageCoordinator as StorageCoordinator
from ._coordination import TorchDistributedCoordinator as TorchDistributedCoordinator
from ._coordination import check_coordinator as check_coordinator
from ._coordination import gather as gather
from ._coordination import wait_ready as wait_ready
from ._directory import CheckpointDirectory as CheckpointDirectory
from ._directory import unlist_checkpoints as unlist_checkpoints
from ._file import ArrayMetadata as ArrayMetadata
from ._file import CheckpointMetadata as CheckpointMetadata
from ._file import OnCorrupt as OnCorrupt
from ._file import check_on_corrupt as check_on_corrupt
from ._file import read_checkpoint as read_checkpoint
from ._file import read_first_intact as read_first_intact
from ._file import read_header_sync as read_header_sync
from ._file import verify_file as verify_file
from ._format import Header as Header
from ._maintenance import FoundCheckpoint as FoundCheckpoint
from ._maintenance import prune as prune
from ._maintenance import scan_directory as scan_directory
from ._manager import CheckpointManager as CheckpointManager
from ._manager import CheckpointManagerStatistics as CheckpointManagerStatistics
from ._manager import Policy as Policy
from ._manager import SaveOutcome as SaveOutcome
from ._saver import Saver as Saver
from ._saver import get_checkpoint_state as get_checkpoint_state
from ._saver import latest_checkpoint as latest_checkpoint
from ._sharded import read_shards as read_shards
from ._shards import Manifest as Manifest
from ._state_file import STATE_FILENAME as STATE_FILENAME
from ._state_file import CheckpointState as CheckpointState
from ._state_file import check_name as check_name
from ._state_file import is_state_file_name as is_state_file_name

__all__ = [
    "STATE_FILENAME",
    "ArrayMetadata",
    "Channel",
    "CheckpointDirectory",
    "CheckpointManager",
    "CheckpointManagerStatistics",
    "CheckpointMetadata",
    "CheckpointState",
    "FoundCheckpoint",
    "Header",
    "Manifest",
    "OnCorrupt",
    "Policy",
    "SaveOutcome",
    "Saver",
    "ShardCoordinator",
    "StorageCoordinator",
    "TorchDistributedCoordinator",
    "check_coordinator",
    "check_name",
    "check_on_corrupt",
    "gather",
    "get_checkpoint_state",
    "is_state_file_name",
    "latest_checkpoint",
    "prune",
    "read_checkpoint",
    "read_first_intact",
    "read_header_sync",
    "read_shards",
    "scan_directory",
    "unlist_checkpoints",
    "verify_file",
    "wait_ready",
]
