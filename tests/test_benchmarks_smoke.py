"""The benchmark suite's smoke run works, so the suite never rots between full runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out), "--markdown",
         str(table)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["cases"], report
    for case in report["cases"]:
        for figure in ("copy_all", "write+fsync", "readinto_warm", "stall", "durable"):
            summary = case["seconds"][figure]
            assert 0 < summary["min"] <= summary["median"] <= summary["max"], (figure, summary)
        assert case["ratios"]["durable / write+fsync"] > 0
    assert "| " in table.read_text()
