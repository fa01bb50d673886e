"""The summary layer: TensorBoard event files (protobuf bytes, TFRecord framing, writer).

Built on the storage layer; knows nothing of checkpoints, hooks or sessions.
"""

from ._proto import SessionLog as SessionLog
from ._proto import SummaryValue as SummaryValue
from ._proto import histogram as histogram
from ._proto import image as image
from ._proto import scalar as scalar
from ._proto import text as text
from ._writer import SummaryWriter as SummaryWriter

__all__ = [
    "SessionLog",
    "SummaryValue",
    "SummaryWriter",
    "histogram",
    "image",
    "scalar",
    "text",
]
