"""Test kit for code that uses asyncckpt: storage faults and stalls, a fake clock, and hooks
and listeners that record their calls.

``FaultyStorage`` wraps a ``Storage`` (local files by default) and makes chosen storage
operations fail with an OSError, exactly as a full disk, a read-only file system or a
failing device would, so that tests can check what a user sees (``CheckpointWriteError``,
the previous checkpoint intact) without a real fault. Pass it as ``storage=`` to what is
under test. It can also hold one storage call in its worker thread, as a slow disk would,
until the test releases it (``FaultyStorage.stall()``, a ``StorageStall``), to test
backpressure and cancellation mid-write without a single real sleep.

``local_s3()`` starts a real S3 server (moto's) on loopback with a fresh bucket, for code
that checkpoints to ``s3://`` (needs ``moto[server]``).
"""

from __future__ import annotations

from ._clock import FakeClock as FakeClock
from ._faults import FaultyStorage as FaultyStorage
from ._faults import StorageOp as StorageOp
from ._faults import StorageStall as StorageStall
from ._recorders import RecordingHook as RecordingHook
from ._recorders import RecordingListener as RecordingListener
from ._s3 import LocalS3 as LocalS3
from ._s3 import local_s3 as local_s3

__all__ = [
    "FakeClock",
    "FaultyStorage",
    "LocalS3",
    "RecordingHook",
    "RecordingListener",
    "StorageOp",
    "StorageStall",
    "local_s3",
]

# Tracebacks and reprs show the public path, not the private module.
for _name in __all__:
    if getattr(globals()[_name], "__module__", "").startswith(__name__ + "."):
        globals()[_name].__module__ = __name__
del _name
