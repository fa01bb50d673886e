"""How every benchmark module reports: a table of targets, and the report written out.

Shared by ``python -m benchmarks`` and the modules it runs (``service``, ``remote``), so a
report reads the same whichever command made it.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


def version_of(dist: str) -> str:
    """An installed distribution's version, for a report's header ("not installed")."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def targets_table(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The Markdown lines of a table of targets: case, target, measured value, met or not."""
    return [
        "",
        "| case | target | measured | met |",
        "| --- | --- | --- | --- |",
        *(
            f"| {row['case']} | {row['target']} | {row['value']:.2f} | "
            f"{'met' if row['met'] else 'MISSED'} |"
            for row in rows
        ),
    ]


def write_report(
    report: dict[str, Any],
    json_path: str | None,
    markdown_path: str | None,
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Write the JSON report to ``json_path`` (standard output when None), and its Markdown
    tables to ``markdown_path`` when given."""
    text = json.dumps(report, indent=2)
    if json_path:
        with open(json_path, "w") as file:
            file.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if markdown_path:
        with open(markdown_path, "w") as file:
            file.write(markdown(report))
