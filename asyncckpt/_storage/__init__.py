"""The storage layer: the ``Storage`` interface and its backends; the only code that does I/O.

Knows nothing of trees, headers, hooks or sessions: it moves bytes and names, and turns
``OSError`` (and the object-store client's errors) into the package's errors at its boundary.
``ObjectStorage`` (``s3://``, ``gs://``, ``az://``, ``memory://``) needs obstore, the
``remote`` extra, and is imported from ``._object`` only when a URL asks for it.
"""

from ._base import LOCK_NAME as LOCK_NAME
from ._base import MAX_SMALL_FILE as MAX_SMALL_FILE
from ._base import TEMP_MARKER as TEMP_MARKER
from ._base import AppendFile as AppendFile
from ._base import DirectoryLock as DirectoryLock
from ._base import DirectorySyncError as DirectorySyncError
from ._base import Probe as Probe
from ._base import ReadFile as ReadFile
from ._base import Storage as Storage
from ._base import WriteAborted as WriteAborted
from ._local import LocalStorage as LocalStorage
from ._local import temp_target as temp_target
from ._resolve import OBJECT_SCHEMES as OBJECT_SCHEMES
from ._resolve import is_url as is_url
from ._resolve import resolve_storage as resolve_storage
from ._resolve import url_root as url_root

__all__ = [
    "LOCK_NAME",
    "MAX_SMALL_FILE",
    "OBJECT_SCHEMES",
    "TEMP_MARKER",
    "AppendFile",
    "DirectoryLock",
    "DirectorySyncError",
    "LocalStorage",
    "Probe",
    "ReadFile",
    "Storage",
    "WriteAborted",
    "is_url",
    "resolve_storage",
    "temp_target",
    "url_root",
]
