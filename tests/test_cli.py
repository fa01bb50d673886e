"""The ``asyncckpt`` command: ls / inspect / verify / prune, exit statuses, pipes, entry points.

Most tests call ``asyncckpt.cli.main(argv, out=...)`` in-process; the slow ones run the
installed console script and ``python -m asyncckpt`` as subprocesses.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest

from asyncckpt import CheckpointManager, get_checkpoint_state
from asyncckpt.cli import main

if TYPE_CHECKING:
    from pathlib import Path
    from types import ModuleType

METADATA = {"run": "cli-test", "lr": 0.5}


def run(*argv: str) -> tuple[int, str]:
    """Run the command in-process; return its exit status and standard output."""
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def state_at(step: int) -> dict[str, Any]:
    return {
        "weights": np.full((4, 8), step, np.float32),
        "step": step,
        "opt": {"momentum": [np.arange(3, dtype=np.int16), None], "name": "sgd"},
    }


def build(directory: Path, steps: list[int], *, max_to_keep: int | None = None) -> None:
    async def save_all() -> None:
        async with CheckpointManager(directory, max_to_keep=max_to_keep) as manager:
            for step in steps:
                await manager.save(state_at(step), step, metadata=METADATA)

    anyio.run(save_all)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def weights_offset(path: Path, step: int) -> int:
    offset = path.read_bytes().find(np.full((4, 8), step, np.float32).tobytes())
    assert offset > 0
    return offset


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """Checkpoints 2, 3, 4 kept (max_to_keep=3), 4 the latest."""
    directory = tmp_path / "ckpt"
    build(directory, [1, 2, 3, 4], max_to_keep=3)
    return directory


# -- ls -------------------------------------------------------------------------------------------


def test_ls_lists_steps_sizes_times_and_marks_latest(ckpt_dir: Path) -> None:
    status, out = run("ls", str(ckpt_dir))
    assert status == 0
    state = get_checkpoint_state(ckpt_dir)
    assert state is not None
    header, *rows = out.splitlines()
    assert header.split() == ["step", "size", "saved", "name"]
    assert len(rows) == 3
    for row, step, stamp in zip(rows, (2, 3, 4), state.timestamps, strict=True):
        name = f"model.ckpt-{step}"
        size = os.path.getsize(ckpt_dir / name)
        assert size < 1024
        assert row.split()[:3] == [str(step), str(size), "B"]
        assert when(stamp) in row
        assert name in row
        assert row.endswith("(latest)") == (step == 4)


def test_ls_sizes_in_binary_units(tmp_path: Path) -> None:
    async def save_large() -> None:
        async with CheckpointManager(tmp_path) as manager:
            await manager.save({"big": np.zeros(512 * 1024, np.float32)}, 7)

    anyio.run(save_large)
    status, out = run("ls", str(tmp_path))
    assert status == 0
    assert out.splitlines()[1].split()[:3] == ["7", "2.0", "MiB"]


def test_ls_json_reports_the_same_facts(ckpt_dir: Path) -> None:
    status, out = run("ls", "--json", str(ckpt_dir))
    assert status == 0
    listing = json.loads(out)
    state = get_checkpoint_state(ckpt_dir)
    assert state is not None
    assert listing["directory"] == str(ckpt_dir)
    assert listing["latest"] == "model.ckpt-4"
    rows = listing["checkpoints"]
    assert [row["step"] for row in rows] == [2, 3, 4]
    assert [row["time"] for row in rows] == list(state.timestamps)
    for row in rows:
        assert row["name"] == f"model.ckpt-{row['step']}"
        assert row["bytes"] == os.path.getsize(ckpt_dir / row["name"])
        assert row["latest"] == (row["step"] == 4)
        assert row["listed"] is True
        assert row["arrays"] == 2
        assert row["error"] is None


def test_ls_marks_unlisted_and_unreadable_files(ckpt_dir: Path) -> None:
    shutil.copy(ckpt_dir / "model.ckpt-3", ckpt_dir / "copy.ckpt")
    (ckpt_dir / "torn.ckpt").write_bytes((ckpt_dir / "model.ckpt-4").read_bytes()[:40])
    status, out = run("ls", str(ckpt_dir))
    assert status == 0
    rows = out.splitlines()[1:]
    assert len(rows) == 5
    [copy_line] = [line for line in rows if "copy.ckpt" in line]
    assert copy_line.split()[0] == "3"
    assert copy_line.endswith("copy.ckpt  (unlisted)")
    [torn_line] = [line for line in rows if "torn.ckpt" in line]
    assert torn_line.split()[0] == "-"
    assert "torn.ckpt  (unlisted, unreadable: " in torn_line
    assert [line for line in rows if "(latest)" in line] == [rows[-1]]
    status, out = run("ls", "--json", str(ckpt_dir))
    assert status == 0
    by_name = {row["name"]: row for row in json.loads(out)["checkpoints"]}
    assert by_name["copy.ckpt"]["listed"] is False
    assert by_name["copy.ckpt"]["step"] == 3
    assert by_name["torn.ckpt"]["step"] is None
    assert by_name["torn.ckpt"]["error"]["type"] == "CheckpointCorruptedError"


def test_ls_empty_directory(tmp_path: Path) -> None:
    assert run("ls", str(tmp_path)) == (0, f"{tmp_path}: no checkpoints\n")
    status, out = run("ls", "--json", str(tmp_path))
    assert status == 0
    assert json.loads(out) == {"directory": str(tmp_path), "latest": None, "checkpoints": []}


def test_ls_of_a_service_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], service_example: ModuleType
) -> None:
    directory = tmp_path / "svc"
    final = asyncio.run(service_example.serve(str(directory), 40, 10))
    assert final["requests"] == 40
    capsys.readouterr()
    status, out = run("ls", "--json", str(directory))
    assert status == 0
    listing = json.loads(out)
    state = get_checkpoint_state(directory)
    assert state is not None
    assert [row["name"] for row in listing["checkpoints"]] == list(state.names)
    assert listing["latest"] == "model.ckpt-40"
    assert listing["checkpoints"][-1]["step"] == 40
    assert len(listing["checkpoints"]) <= 3  # the example keeps three
    status, out = run("ls", str(directory))
    assert out.splitlines()[-1].split()[0] == "40"
    assert out.splitlines()[-1].endswith("model.ckpt-40  (latest)")


# -- inspect --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["directory", "file"])
def test_inspect_shows_tree_dtypes_shapes_and_metadata(ckpt_dir: Path, target: str) -> None:
    path = ckpt_dir if target == "directory" else ckpt_dir / "model.ckpt-3"
    step = 4 if target == "directory" else 3
    status, out = run("inspect", str(path))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == str(ckpt_dir / f"model.ckpt-{step}")
    assert lines[1].startswith(f"  step {step}, saved ")
    assert "2 arrays" in lines[1]
    assert f"{os.path.getsize(ckpt_dir / f'model.ckpt-{step}')} B on disk" in lines[1]
    assert lines[2] == f"  metadata: {METADATA!r}"
    assert lines[3:] == [
        "  dict (3 keys)",
        "    'weights': array float32 [4x8] 128 B",
        f"    'step': {step}",
        "    'opt': dict (2 keys)",
        "      'momentum': list (2 items)",
        "        [0] array int16 [3] 6 B",
        "        [1] None",
        "      'name': 'sgd'",
    ]


def test_inspect_json(ckpt_dir: Path) -> None:
    status, out = run("inspect", "--json", str(ckpt_dir))
    assert status == 0
    info = json.loads(out)
    assert info["path"] == str(ckpt_dir / "model.ckpt-4")
    assert info["step"] == 4
    assert info["metadata"] == METADATA
    assert info["bytes"] == os.path.getsize(ckpt_dir / "model.ckpt-4")
    assert info["array_bytes"] == 128 + 6
    weights = {"kind": "array", "dtype": "float32", "shape": [4, 8], "bytes": 128}
    momentum = {"kind": "array", "dtype": "int16", "shape": [3], "bytes": 6}
    assert info["tree"] == {
        "kind": "dict",
        "items": [
            ["weights", weights],
            ["step", {"kind": "value", "value": 4}],
            [
                "opt",
                {
                    "kind": "dict",
                    "items": [
                        [
                            "momentum",
                            {"kind": "list", "items": [momentum, {"kind": "value", "value": None}]},
                        ],
                        ["name", {"kind": "value", "value": "sgd"}],
                    ],
                },
            ],
        ],
    }


def test_inspect_missing_file_is_a_checkpoint_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "model.ckpt-9"
    assert run("inspect", str(missing)) == (1, "")
    assert str(missing) in capsys.readouterr().err
    status, out = run("inspect", "--json", str(missing))
    assert status == 1
    assert json.loads(out)["error"]["type"] == "CheckpointNotFoundError"


# -- verify ---------------------------------------------------------------------------------------


def test_verify_clean_directory_and_file(ckpt_dir: Path) -> None:
    status, out = run("verify", str(ckpt_dir))
    assert status == 0
    assert out.splitlines() == [
        *(f"ok       {ckpt_dir / f'model.ckpt-{s}'} (step {s}, 2 arrays)" for s in (2, 3, 4)),
        "3 checked, 0 failed",
    ]
    status, out = run("verify", "--json", str(ckpt_dir / "model.ckpt-2"))
    assert status == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert report["checked"] == 1
    assert report["results"] == [
        {
            "path": str(ckpt_dir / "model.ckpt-2"),
            "ok": True,
            "step": 2,
            "arrays": 2,
            "bytes": os.path.getsize(ckpt_dir / "model.ckpt-2"),
        }
    ]


def test_verify_flipped_array_byte_names_file_and_part(ckpt_dir: Path) -> None:
    bad = ckpt_dir / "model.ckpt-3"
    flip_byte(bad, weights_offset(bad, 3) + 5)
    status, out = run("verify", str(ckpt_dir))
    assert status == 1
    lines = out.splitlines()
    corrupt = [line for line in lines if line.startswith("CORRUPT")]
    assert len(corrupt) == 1
    assert f"{bad}: corrupted array 0 ('weights')" in corrupt[0]
    assert sum(line.startswith("ok ") for line in lines) == 2
    assert lines[-1] == "3 checked, 1 failed"

    status, out = run("verify", "--json", str(bad))
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False
    [result] = report["results"]
    assert result["path"] == str(bad)
    assert result["ok"] is False
    assert result["error"]["type"] == "CheckpointCorruptedError"
    assert result["error"]["part"] == "array 0 ('weights')"


def test_verify_flipped_header_byte(ckpt_dir: Path) -> None:
    bad = ckpt_dir / "model.ckpt-4"
    flip_byte(bad, bad.read_bytes().find(b"cli-test"))
    status, out = run("verify", "--json", str(ckpt_dir))
    assert status == 1
    failed = [r for r in json.loads(out)["results"] if not r["ok"]]
    assert [(r["path"], r["error"]["part"]) for r in failed] == [(str(bad), "header")]


def test_verify_reports_a_listed_checkpoint_that_is_missing(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.ckpt-3").unlink()
    status, out = run("verify", str(ckpt_dir))
    assert status == 1
    assert f"{ckpt_dir / 'model.ckpt-3'}: listed in the state file but missing" in out


# -- prune ----------------------------------------------------------------------------------------


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(
        (p.name for p in directory.iterdir() if p.name.startswith("model.ckpt-")),
        key=lambda name: int(name.rsplit("-", 1)[1]),
    )


def test_prune_keeps_the_newest_and_rewrites_the_state_file(tmp_path: Path) -> None:
    build(tmp_path, [1, 2, 3, 4, 5])
    status, out = run("prune", str(tmp_path), "--keep", "2")
    assert status == 0
    assert out.splitlines() == [
        "deleted  model.ckpt-1",
        "deleted  model.ckpt-2",
        "deleted  model.ckpt-3",
        "2 kept, 3 deleted",
    ]
    assert checkpoint_files(tmp_path) == ["model.ckpt-4", "model.ckpt-5"]
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert state.names == ("model.ckpt-4", "model.ckpt-5")
    # Pruning again to the same count changes nothing.
    status, out = run("prune", "--json", str(tmp_path), "--keep", "2")
    assert status == 0
    assert json.loads(out) == {"kept": ["model.ckpt-4", "model.ckpt-5"], "deleted": []}

    # A manager opened afterwards continues from the pruned list.
    async def reopen() -> tuple[int | None, list[int]]:
        async with CheckpointManager(tmp_path) as manager:
            return manager.latest_step(), manager.all_steps()

    assert anyio.run(reopen) == (5, [4, 5])


@pytest.mark.parametrize("damage", ["missing", "corrupt", "names a missing file"])
def test_prune_rebuilds_a_bad_state_file_from_the_files(tmp_path: Path, damage: str) -> None:
    build(tmp_path, [3, 1, 2, 4])  # listed in save order; steps decide after a rebuild
    state_file = tmp_path / "checkpoint"
    if damage == "missing":
        state_file.unlink()
    elif damage == "corrupt":
        flip_byte(state_file, 3)
    else:
        (tmp_path / "model.ckpt-1").unlink()
    status, out = run("prune", "--json", str(tmp_path), "--keep", "2")
    assert status == 0
    assert json.loads(out)["kept"] == ["model.ckpt-3", "model.ckpt-4"]
    assert checkpoint_files(tmp_path) == ["model.ckpt-3", "model.ckpt-4"]
    state = get_checkpoint_state(tmp_path)
    assert state is not None
    assert state.names == ("model.ckpt-3", "model.ckpt-4")
    assert run("verify", str(tmp_path))[0] == 0


def test_prune_refuses_a_directory_a_writer_holds(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def prune_while_open() -> int:
        async with CheckpointManager(ckpt_dir):
            return run("prune", str(ckpt_dir), "--keep", "1")[0]

    assert anyio.run(prune_while_open) == 1
    assert "another writer holds this checkpoint directory" in capsys.readouterr().err
    assert checkpoint_files(ckpt_dir) == ["model.ckpt-2", "model.ckpt-3", "model.ckpt-4"]


# -- usage errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "{missing}"], "{missing}: not a directory"),
        (["prune", "{missing}", "--keep", "1"], "{missing}: not a directory"),
        (["prune", "{empty}", "--keep", "-1"], "--keep must be >= 0, not -1"),
        (["inspect", "{empty}"], "{empty}: no checkpoint in this directory"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path)}
    status, out = run(*(arg.format(**names) for arg in argv))
    assert (status, out) == (2, "")
    assert capsys.readouterr().err == f"asyncckpt: {message.format(**names)}\n"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["ls"],
        ["prune", "."],
        ["prune", ".", "--keep", "two"],
        ["ls", "--jsn", "."],
    ],
)
def test_argument_errors_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv, out=io.StringIO())
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: asyncckpt")
    assert "error:" in err


def test_corrupt_state_file_is_reported_by_ls(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_byte(ckpt_dir / "checkpoint", 3)
    assert run("ls", str(ckpt_dir)) == (1, "")
    assert "corrupted state file" in capsys.readouterr().err


# -- pipes and entry points -----------------------------------------------------------------------


class ClosedPipe(io.StringIO):
    def write(self, text: str, /) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_ends_quietly(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "--json", str(ckpt_dir)], out=ClosedPipe()) == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""


def console_script() -> str:
    script = shutil.which("asyncckpt", path=os.path.dirname(sys.executable))
    assert script is not None, "the package's console script is not installed"
    return script


@pytest.mark.slow
def test_broken_pipe_in_a_real_pipe_prints_no_traceback(ckpt_dir: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        result = subprocess.run(
            [console_script(), "ls", "--json", str(ckpt_dir)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


@pytest.mark.slow
@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_entry_points(ckpt_dir: Path, how: str) -> None:
    command = [console_script()] if how == "console script" else [sys.executable, "-m", "asyncckpt"]

    def call(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *argv], capture_output=True, text=True, timeout=60, check=False
        )

    listed = call("ls", "--json", str(ckpt_dir))
    assert listed.returncode == 0
    assert listed.stdout == run("ls", "--json", str(ckpt_dir))[1]
    assert call("verify", str(ckpt_dir)).returncode == 0
    usage = call()
    assert usage.returncode == 2
    assert "usage: asyncckpt" in usage.stderr
    flip_byte(ckpt_dir / "model.ckpt-2", weights_offset(ckpt_dir / "model.ckpt-2", 2))
    corrupt = call("verify", str(ckpt_dir))
    assert corrupt.returncode == 1
    assert "corrupted array 0 ('weights')" in corrupt.stdout


async def _model_and_input_checkpoints(directory: Path) -> None:
    async with (
        CheckpointManager(directory, max_to_keep=None) as model,
        CheckpointManager(
            directory, max_to_keep=None, basename="input.ckpt", latest_filename="checkpoint_input"
        ) as inputs,
    ):
        for step in (1, 2, 3):
            await model.save({"w": np.full(2, step)}, step)
            await inputs.save({"position": step}, step)


def test_ls_lists_every_writer_of_the_directory(tmp_path: Path) -> None:
    anyio.run(_model_and_input_checkpoints, tmp_path)
    out = io.StringIO()
    assert main(["ls", "--json", str(tmp_path)], out=out) == 0
    rows = {row["name"]: row for row in json.loads(out.getvalue())["checkpoints"]}
    assert sorted(rows) == [f"{kind}.ckpt-{s}" for kind in ("input", "model") for s in (1, 2, 3)]
    assert all(row["listed"] for row in rows.values())
    assert [name for name, row in rows.items() if row["latest"]] == [
        "input.ckpt-3",
        "model.ckpt-3",
    ]


def test_prune_rebuilding_a_damaged_state_file_leaves_other_writers_alone(tmp_path: Path) -> None:
    anyio.run(_model_and_input_checkpoints, tmp_path)
    (tmp_path / "checkpoint").write_bytes(b"garbage\n")
    out = io.StringIO()
    assert main(["prune", "--json", str(tmp_path), "--keep", "1"], out=out) == 0
    assert json.loads(out.getvalue()) == {
        "kept": ["model.ckpt-3"],
        "deleted": ["model.ckpt-1", "model.ckpt-2"],
    }
    remaining = sorted(name for name in os.listdir(tmp_path) if ".ckpt-" in name)
    assert remaining == ["input.ckpt-1", "input.ckpt-2", "input.ckpt-3", "model.ckpt-3"]
