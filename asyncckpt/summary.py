"""Summary values for TensorBoard: ``scalar``, ``histogram``, ``text``, ``image``.

Each builder returns a ``SummaryValue`` to pass to ``SummaryWriter.add_summary`` or to
return from a ``SummarySaverHook``'s ``summary_op``::

    from asyncckpt import summary

    await writer.add_summary([summary.scalar("loss", 0.3), summary.histogram("w", w)], step)
"""

from __future__ import annotations

from ._summary._proto import SessionLog as SessionLog
from ._summary._proto import SummaryValue as SummaryValue
from ._summary._proto import histogram as histogram
from ._summary._proto import image as image
from ._summary._proto import scalar as scalar
from ._summary._proto import text as text
from ._summary._writer import SummaryWriter as SummaryWriter

__all__ = ["SessionLog", "SummaryValue", "SummaryWriter", "histogram", "image", "scalar", "text"]

for _name in __all__:
    if getattr(globals()[_name], "__module__", "").startswith("asyncckpt._"):
        globals()[_name].__module__ = __name__
del _name
