"""The benchmark suite's smoke run works, so the suite never rots between full runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    _check_service(report["service"])
    rows = [row for row in report["targets"] if row["case"].startswith("service")]
    assert {row["case"] for row in rows} == {"service, max_pending=0", "service, max_pending=1"}
    assert all(isinstance(row["met"], bool) for row in rows), rows
    assert "save during a write" in table.read_text()
    _check_remote(report["remote"])
    rows = [row for row in report["targets"] if row["case"].startswith("s3 ")]
    assert {row["case"] for row in rows} == {"s3 smoke-10MiB", "s3 smoke-small"}, rows
    assert all(isinstance(row["met"], bool) for row in rows), rows
    assert "obstore put (floor of save)" in table.read_text()


def _check_service(service: dict[str, Any]) -> None:
    """The service figures' shape (benchmarks/service.py): every figure, no speed asserted."""
    for max_pending in (0, 1):
        entry = service[f"max_pending={max_pending}"]
        assert set(entry["children"]) == {"callable", "int", "reserved"}, entry["children"]
        figures = entry["figures"]
        for name in (
            "first_stall_callable",
            "first_stall_int",
            "first_stall_reserved",
            "second_stall",
            "second_stall_reserved",
        ):
            figure = figures[name]
            assert figure["stall_s"] > 0, (name, figure)
            assert figure["loop_lag_s"] >= 0, (name, figure)
            assert entry["ratios"][f"{name} / warm_stall"] > 0, (name, entry["ratios"])
        for name in ("second_stall", "second_stall_reserved"):
            assert isinstance(figures[name]["overlapped"], bool), figures[name]
        warm = figures["warm_stall"]
        assert warm["saves"] > 0
        assert 0 < warm["stall_s"]["min"] <= warm["stall_s"]["median"] <= warm["stall_s"]["max"]
        assert figures["reserve"]["secs"] > 0
        rss = figures["peak_rss"]
        assert rss["limit_MiB"] > rss["snapshot_MiB"] > 0, rss
        assert set(rss["over_state_MiB"]) == {"callable", "int", "reserved"}, rss


def _check_remote(remote: dict[str, Any] | str) -> None:
    """The object-store figures' shape (benchmarks/remote.py): every figure, the requests
    behind them, no speed asserted."""
    if isinstance(remote, str):  # obstore or moto missing
        assert remote.startswith("skipped: "), remote
        return
    assert [case["case"] for case in remote["cases"]] == ["smoke-10MiB", "smoke-small"]
    for case in remote["cases"]:
        figures = ["raw_put", "save", "stall", "restore_into", "restore", "raw_get"]
        figures += ["raw_get_ranges", "ranged_gets", "memory_save", "memory_raw_put"]
        if case["dcp"] == "measured":
            figures += ["dcp_save", "dcp_load"]
        else:
            assert case["dcp"].startswith("skipped: "), case["dcp"]
        for figure in figures:
            summary = case["seconds"][figure]
            assert 0 < summary["min"] <= summary["median"] <= summary["max"], (figure, summary)
        for key in ("save / raw_put", "restore_into / raw_get", "restore / raw_get"):
            assert case["ratios"][key] > 0, (key, case["ratios"])
        requests = case["requests"]
        # The 10 MiB case is over one part: a multipart upload; the small one a single PUT.
        upload = "upload part" if case["bytes"] > case["part_bytes"] else "put"
        assert requests["raw_put"]["requests"][upload] > 0, requests["raw_put"]
        assert requests["save"]["requests"][upload] > 0, requests["save"]
        assert requests["raw_get"]["requests"] == {"get": 1}, requests["raw_get"]
        assert requests["restore_into"]["requests"]["ranged get"] > 0, requests["restore_into"]
        for profile in requests.values():
            assert profile["busy_s"]["median"] >= 0
            assert all(latency >= 0 for latency in profile["latency_s"].values()), profile


@pytest.mark.slow
def test_gpu_benchmark_prints_one_json_line(tmp_path: Path) -> None:
    # On the project's machines (no GPU) it says why it skipped; on one with CUDA the smoke
    # sizes run every figure.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    if "skipped" in report:
        assert set(report) == {"skipped"}, report
        assert report["skipped"].startswith("no CUDA device: "), report
        return
    (case,) = report["cases"]
    if "skipped" in case:  # the smoke case did not fit this machine's memory
        assert case["skipped"].startswith("needs "), case
        return
    figures = ["pinned_d2h", "asyncckpt_stall", "asyncckpt_durable", "asyncckpt_restore_into"]
    figures += ["torch_save", "torch_load_into"]
    if "dcp" not in case:
        figures += ["dcp_stall", "dcp_durable", "dcp_load_into"]
    for figure in figures:
        summary = case["seconds"][figure]
        assert 0 < summary["min"] <= summary["median"] <= summary["max"], (figure, summary)
    assert case["ratios"]["asyncckpt_stall / pinned_d2h"] > 0
    assert isinstance(case["target"]["met"], bool)
    assert case["asyncckpt"]["restored_matches"] is True


@pytest.mark.slow
def test_distributed_benchmark_reports_every_ratio(tmp_path: Path) -> None:
    # Two gloo ranks of 4 MiB each, one round: the report's shape, no speed asserted.
    pytest.importorskip("torch.distributed.checkpoint")
    out = tmp_path / "distributed.json"
    table = tmp_path / "distributed.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--mib", "4", "--repeats", "1",
         "--workdir", str(tmp_path), "--timeout", "120", "--json", str(out), "--markdown",
         str(table)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    if "skipped" in report:  # torch without gloo
        assert set(report) == {"skipped"}, report
        return
    for key in (
        "asyncckpt_stall / dcp_stall",
        "asyncckpt_durable / dcp_durable",
        "asyncckpt_stall / copy",
        "asyncckpt_durable / write+fsync",
    ):
        assert report["ratios"][key] > 0, (key, report["ratios"])
    for figure, entry in report["seconds"].items():
        assert set(entry) == {"rank0", "rank1", "max"}, (figure, entry)
        summary = entry["max"]
        assert 0 < summary["min"] <= summary["median"] <= summary["max"], (figure, summary)
    for checks in report["checks"].values():
        restored = [checks[f"{lib}_restored"] for lib in ("asyncckpt", "dcp", "dcp_reused")]
        assert all(restored), checks
    # Each rank's own tensors: DCP wrote both ranks' bytes (none deduplicated as replicated).
    written = report["checks"]["rank0"]["bytes_per_save"]
    assert written["dcp"] >= 2 * report["state_bytes_per_rank"], written
    assert all(isinstance(row["met"], bool) for row in report["targets"]), report["targets"]
    assert "DCP `async_save` stall" in table.read_text()
