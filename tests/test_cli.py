"""The ``asyncckpt`` command: ls / inspect / verify / prune, exit statuses, pipes, entry points.

Most tests call ``asyncckpt.cli.main(argv, out=...)`` in-process; the slow ones run the
installed console script and ``python -m asyncckpt`` as subprocesses.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
from support import TEMP_MARKER

from asyncckpt import CheckpointManager, Saver, get_checkpoint_state
from asyncckpt._checkpoint import scan_directory
from asyncckpt._storage import LocalStorage
from asyncckpt.cli import main

if TYPE_CHECKING:
    import mmap

    from asyncckpt.testing import FaultyStorage

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
    assert json.loads(out) == {
        "directory": str(tmp_path),
        "latest": None,
        "checkpoints": [],
        "temporary_files": {"count": 0, "bytes": 0},
    }


# The ls of a real service's directory: tests/test_service_example.py (its SIGTERM test).


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


@pytest.mark.parametrize("damage", ["missing", "corrupt", "empty", "names a missing file"])
def test_prune_rebuilds_a_bad_state_file_from_the_files(tmp_path: Path, damage: str) -> None:
    build(tmp_path, [3, 1, 2, 4])  # listed in save order; steps decide after a rebuild
    state_file = tmp_path / "checkpoint"
    if damage == "missing":
        state_file.unlink()
    elif damage == "corrupt":
        flip_byte(state_file, 3)
    elif damage == "empty":
        state_file.write_bytes(b"")  # truncated: not a list of no checkpoints
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


# -- damage the scan must not miss ----------------------------------------------------------------

FIRST_BYTES_DAMAGE = [
    "byte 0 overwritten",
    *(f"magic byte {index} flipped" for index in range(8)),
    "first 4 KiB zeroed",
    *(f"truncated to {size} bytes" for size in (0, 1, 7)),
]


def damage_first_bytes(path: Path, damage: str) -> None:
    """Damage the start of ``path`` as ``damage`` (one of ``FIRST_BYTES_DAMAGE``) says."""
    words = damage.split()
    if damage == "byte 0 overwritten":
        with path.open("r+b") as file:
            file.write(b"\0")
    elif words[0] == "magic":
        flip_byte(path, int(words[2]))
    elif words[0] == "first":
        with path.open("r+b") as file:
            file.write(bytes(min(4096, path.stat().st_size)))
    else:
        os.truncate(path, int(words[2]))


@pytest.mark.parametrize("damage", FIRST_BYTES_DAMAGE)
def test_verify_and_ls_report_a_latest_checkpoint_damaged_at_its_first_bytes(
    tmp_path: Path, damage: str
) -> None:
    build(tmp_path, [1, 2])
    latest = tmp_path / "model.ckpt-2"
    damage_first_bytes(latest, damage)
    status, out = run("verify", str(tmp_path))
    assert status == 1
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("CORRUPT")] == [
        line for line in lines if f"{latest}: " in line
    ]
    assert lines[-1] == "2 checked, 1 failed"
    status, out = run("verify", "--json", str(tmp_path))
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert [r["path"] for r in report["results"] if not r["ok"]] == [str(latest)]
    status, out = run("ls", str(tmp_path))
    assert status == 0
    [row] = [line for line in out.splitlines() if line.endswith(")") and "model.ckpt-2" in line]
    assert row.split()[0] == "-"
    assert "model.ckpt-2  (latest, unreadable: " in row


def test_verify_checks_every_file_named_like_a_checkpoint_whatever_its_bytes(
    ckpt_dir: Path,
) -> None:
    (ckpt_dir / "model.ckpt-9").write_bytes(b"")  # unlisted, and empty
    (ckpt_dir / "input.ckpt-9").write_bytes(bytes(64))  # another writer's prefix, zeros
    status, out = run("verify", "--json", str(ckpt_dir))
    assert status == 1
    report = json.loads(out)
    assert report["checked"] == 5
    assert sorted(r["path"] for r in report["results"] if not r["ok"]) == [
        str(ckpt_dir / "input.ckpt-9"),
        str(ckpt_dir / "model.ckpt-9"),
    ]


def test_verify_and_ls_leave_the_other_files_of_the_directory_alone(ckpt_dir: Path) -> None:
    others = {
        # Names that end in "-<step>" too, none of them a checkpoint.
        "events.out.tfevents.1700000000.worker-7": b"an event file",
        f".model.ckpt-9{TEMP_MARKER}x1y2z3": b"half a checkpoint",
        ".notes-3": b"hidden",
        "checkpoint_worker-1": (ckpt_dir / "checkpoint").read_bytes(),  # a state file
        "README": b"named like nothing",
    }
    for name, data in others.items():
        (ckpt_dir / name).write_bytes(data)
    (ckpt_dir / "eval-1").mkdir()
    status, out = run("verify", str(ckpt_dir))
    assert (status, out.splitlines()[-1]) == (0, "3 checked, 0 failed")
    status, out = run("ls", str(ckpt_dir))
    assert status == 0
    assert [line.split()[-1] for line in out.splitlines()[1:4]] == [
        "model.ckpt-2",
        "model.ckpt-3",
        "(latest)",
    ]
    assert out.splitlines()[4:] == [
        "1 temporary file (17 B) left by an interrupted writer or a save in progress; "
        "the next writer to open the directory removes them"
    ]


# -- temporary files ------------------------------------------------------------------------------


def test_ls_reports_leftover_temporary_files_that_the_next_writer_removes(ckpt_dir: Path) -> None:
    (ckpt_dir / f".model.ckpt-5{TEMP_MARKER}a1b2c3").write_bytes(bytes(1024 * 1024))
    (ckpt_dir / f".checkpoint{TEMP_MARKER}d4e5f6").write_bytes(bytes(512 * 1024))
    status, out = run("ls", str(ckpt_dir))
    assert status == 0
    assert out.splitlines()[-1] == (
        "2 temporary files (1.5 MiB) left by an interrupted writer or a save in progress; "
        "the next writer to open the directory removes them"
    )
    status, out = run("ls", "--json", str(ckpt_dir))
    assert status == 0
    assert json.loads(out)["temporary_files"] == {"count": 2, "bytes": 1536 * 1024}
    build(ckpt_dir, [], max_to_keep=3)  # a writer opens the directory, as the line says
    status, out = run("ls", str(ckpt_dir))
    assert (status, len(out.splitlines())) == (0, 4)  # the heading and three checkpoints


# -- files that cannot be read --------------------------------------------------------------------

needs_non_root = pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files and lists directories whatever their mode"
)


def test_verify_and_ls_report_a_checkpoint_that_cannot_be_read(
    ckpt_dir: Path, storage: FaultyStorage
) -> None:
    # Permission denied as the kernel says it (the injected errno works even as root).
    latest = ckpt_dir / "model.ckpt-4"
    storage.fail("open", errno.EACCES, match=str(latest), times=None)
    out = io.StringIO()
    assert main(["verify", str(ckpt_dir)], out=out, storage=storage) == 1
    lines = out.getvalue().splitlines()
    [failure] = [line for line in lines if line.startswith("ERROR ")]
    assert failure.startswith(f"ERROR    {latest}: ")
    assert "Permission denied" in failure
    assert lines[-1] == "3 checked, 1 failed"
    out = io.StringIO()
    assert main(["verify", "--json", str(ckpt_dir)], out=out, storage=storage) == 1
    [result] = [r for r in json.loads(out.getvalue())["results"] if not r["ok"]]
    assert (result["path"], result["error"]["type"]) == (str(latest), "CheckpointReadError")
    out = io.StringIO()
    assert main(["ls", str(ckpt_dir)], out=out, storage=storage) == 0
    [row] = [line for line in out.getvalue().splitlines() if "model.ckpt-4" in line]
    assert row.split()[0] == "-"
    assert f"model.ckpt-4  (latest, unreadable: {latest}: " in row
    assert "Permission denied" in row


def assert_one_line_about(err: str, path: Path | str, reason: str) -> None:
    """``err`` is one line, ``asyncckpt: <path>: ...``, that gives the system's ``reason``."""
    assert err.startswith(f"asyncckpt: {path}: ")
    assert err.count("\n") == 1
    assert err.endswith("\n")
    assert reason in err


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_file_that_cannot_be_read_fails_the_command_in_one_line(
    ckpt_dir: Path, storage: FaultyStorage, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = ckpt_dir / "model.ckpt-4"
    storage.fail("open", errno.EACCES, match=str(path), times=None)
    assert main([command, str(path)], out=io.StringIO(), storage=storage) == 1
    assert_one_line_about(capsys.readouterr().err, path, "Permission denied")
    out = io.StringIO()
    assert main([command, "--json", str(path)], out=out, storage=storage) == 1
    report = json.loads(out.getvalue())
    assert report["ok"] is False
    assert report["error"]["type"] == "CheckpointReadError"
    assert report["error"]["message"].startswith(f"{path}: ")


class UnlistableStorage(LocalStorage):
    """Local files in directories that cannot be listed, as the kernel refuses it."""

    def list_names(self, directory: str) -> list[str]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_a_directory_that_cannot_be_listed_fails_the_command_in_one_line(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # The OSError escapes the library: the command's last resort reports it.
    assert main([command, str(ckpt_dir)], out=io.StringIO(), storage=UnlistableStorage()) == 1
    assert_one_line_about(capsys.readouterr().err, ckpt_dir, "Permission denied")
    out = io.StringIO()
    assert main([command, "--json", str(ckpt_dir)], out=out, storage=UnlistableStorage()) == 1
    assert json.loads(out.getvalue()) == {
        "ok": False,
        "error": {
            "type": "CheckpointReadError",
            "part": None,
            "message": f"{ckpt_dir}: cannot read it: Permission denied",
        },
    }


@needs_non_root
def test_verify_reports_a_checkpoint_whose_mode_is_000(ckpt_dir: Path) -> None:
    latest = ckpt_dir / "model.ckpt-4"
    latest.chmod(0)
    status, out = run("verify", str(ckpt_dir))
    assert status == 1
    [failure] = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert failure.startswith(f"ERROR    {latest}: ")
    assert "Permission denied" in failure


@needs_non_root
@pytest.mark.parametrize(
    ("command", "target"),
    [("verify", "file"), ("inspect", "file"), ("ls", "directory"), ("verify", "directory")],
)
def test_modes_000_fail_the_command_in_one_line(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str], command: str, target: str
) -> None:
    path = ckpt_dir / "model.ckpt-4" if target == "file" else ckpt_dir
    path.chmod(0)
    try:
        status, out = run(command, "--json", str(path))
    finally:
        path.chmod(0o755)
    assert status == 1
    assert json.loads(out)["error"]["type"] == "CheckpointReadError"
    assert_one_line_about(capsys.readouterr().err, path, "Permission denied")


# -- expected failures: one line, no traceback ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "status", "error_type"),
    [
        (["verify", "{missing}"], 1, "CheckpointNotFoundError"),
        (["inspect", "{missing}"], 1, "CheckpointNotFoundError"),
        (["ls", "{missing}"], 2, "UsageError"),
        # ENOTDIR: the storage calls it not found; the command's last resort, unreadable.
        (["verify", "{under_a_file}"], 1, "CheckpointNotFoundError|CheckpointReadError"),
        (["inspect", "{under_a_file}"], 1, "CheckpointNotFoundError|CheckpointReadError"),
        (["ls", "{a_file}"], 2, "UsageError"),
        (["prune", "{a_file}", "--keep", "1"], 2, "UsageError"),
        (["prune", "{damaged}", "--keep", "-1"], 2, "ValueError"),
        (["ls", "{damaged}"], 1, "CheckpointCorruptedError"),
        (["inspect", "{damaged}"], 1, "CheckpointCorruptedError"),
        (["ls", "{empty}"], 1, "CheckpointCorruptedError"),
        (["inspect", "{empty}"], 1, "CheckpointCorruptedError"),
    ],
)
def test_expected_failures_print_one_line_and_no_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    error_type: str,
) -> None:
    build(tmp_path / "damaged", [1])
    flip_byte(tmp_path / "damaged" / "checkpoint", 3)
    build(tmp_path / "empty", [1])
    (tmp_path / "empty" / "checkpoint").write_bytes(b"")
    (tmp_path / "a-file").write_text("not a directory\n")
    paths = {
        "missing": str(tmp_path / "nope"),
        "a_file": str(tmp_path / "a-file"),
        "under_a_file": str(tmp_path / "a-file" / "model.ckpt-1"),
        "damaged": str(tmp_path / "damaged"),
        "empty": str(tmp_path / "empty"),
    }
    command, *rest = (arg.format(**paths) for arg in argv)
    assert run(command, *rest) == (status, "")
    err = capsys.readouterr().err
    assert err.startswith("asyncckpt: ")
    assert err.count("\n") == 1
    status_json, out = run(command, "--json", *rest)
    assert status_json == status
    report = json.loads(out)
    assert report["ok"] is False
    assert report["error"]["type"] in error_type.split("|")


# -- state files ----------------------------------------------------------------------------------


def advised_commands(text: str) -> list[list[str]]:
    """The ``asyncckpt`` commands that ``text`` advises (between backticks), as arguments."""
    return [shlex.split(command) for command in re.findall(r"`asyncckpt ([^`]*)`", text)]


def test_verify_fails_on_an_empty_state_file_and_prints_the_repair_that_works(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "my checkpoints"  # the advice must survive a space in the path
    build(directory, [1, 2, 3])
    state_file = directory / "checkpoint"
    state_file.write_bytes(b"")
    status, out = run("verify", str(directory))
    assert status == 1
    assert f"CORRUPT  {state_file}: corrupted state file (the file is empty)" in out.splitlines()
    assert out.splitlines()[-1] == "3 checked, 1 failed"
    [repair] = advised_commands(out)
    assert repair == ["prune", str(directory), "--keep", "5"]
    assert "asyncckpt verify" not in out
    status, out = run(*repair)
    assert (status, out) == (0, "3 kept, 0 deleted\n")
    state = get_checkpoint_state(directory)
    assert state is not None
    assert state.names == ("model.ckpt-1", "model.ckpt-2", "model.ckpt-3")
    assert run("verify", str(directory))[0] == 0


def test_verify_advises_a_prune_that_works_and_never_verify_itself(tmp_path: Path) -> None:
    directory = tmp_path / "my checkpoints"
    build(directory, [1, 2, 3])
    damaged = directory / "model.ckpt-2"
    flip_byte(damaged, weights_offset(damaged, 2))
    status, out = run("verify", str(directory))
    assert status == 1
    assert "asyncckpt verify" not in out
    [repair] = advised_commands(out)
    assert repair == ["prune", str(directory), "--keep", "5"]
    status, out = run("verify", "--json", str(directory))
    report = json.loads(out)
    assert "asyncckpt verify" not in out
    assert [advised_commands(line) for line in report["advice"]] == [[repair]]
    damaged.rename(tmp_path / "model.ckpt-2.damaged")  # "move the damaged files away"
    assert run(*repair) == (0, "2 kept, 0 deleted\n")
    assert run("verify", str(directory)) == (
        0,
        "".join(f"ok       {directory / f'model.ckpt-{s}'} (step {s}, 2 arrays)\n" for s in (1, 3))
        + "2 checked, 0 failed\n",
    )


def test_inspect_of_a_missing_latest_advises_a_prune_that_works(
    ckpt_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ckpt_dir / "model.ckpt-4").unlink()
    assert run("inspect", str(ckpt_dir)) == (1, "")
    [repair] = advised_commands(capsys.readouterr().err)
    assert repair == ["prune", str(ckpt_dir), "--keep", "5"]
    assert run(*repair)[0] == 0
    status, out = run("inspect", str(ckpt_dir))
    assert (status, out.splitlines()[0]) == (0, str(ckpt_dir / "model.ckpt-3"))


# -- beside a live writer -------------------------------------------------------------------------


class WriterBeside(LocalStorage):
    """Local files, beside a live writer that saves ``step`` with ``max_to_keep=3`` once (its
    retention retiring the oldest checkpoint), right after this storage reads ``moment`` (a
    state file) or right before it opens ``moment`` (a checkpoint)."""

    def __init__(self, moment: Path, step: int) -> None:
        super().__init__()
        self.moment = str(moment)
        self.step = step
        self.saved = False

    def _save_once(self, path: str) -> None:
        if path == self.moment and not self.saved:
            self.saved = True
            build(Path(os.path.dirname(path)), [self.step], max_to_keep=3)

    def read_small_file(self, path: str) -> bytes | None:
        data = super().read_small_file(path)
        self._save_once(path)
        return data

    def open_mmap(self, path: str) -> mmap.mmap:
        self._save_once(path)
        return super().open_mmap(path)


@pytest.mark.parametrize(
    ("moment", "checked"),
    [
        ("checkpoint", ["model.ckpt-3", "model.ckpt-4", "model.ckpt-5"]),  # before the listing
        ("model.ckpt-2", ["model.ckpt-3", "model.ckpt-4"]),  # between the listing and the read
    ],
)
def test_verify_beside_a_writer_reports_the_checkpoint_it_retired(
    ckpt_dir: Path, moment: str, checked: list[str]
) -> None:
    writer = WriterBeside(ckpt_dir / moment, step=5)
    out = io.StringIO()
    assert main(["verify", str(ckpt_dir)], out=out, storage=writer) == 0
    assert writer.saved
    retired = ckpt_dir / "model.ckpt-2"
    assert out.getvalue().splitlines() == [
        *(line for line in out.getvalue().splitlines() if line.startswith("ok ")),
        f"retired  {retired} (a writer removed it during the check)",
        f"{len(checked)} checked, 0 failed, 1 retired",
    ]
    assert [line.split()[1] for line in out.getvalue().splitlines()[:-2]] == [
        str(ckpt_dir / name) for name in checked
    ]
    # Again, the writer retiring step 3 as it saves step 6, reported in the JSON.
    next_moment = ckpt_dir / ("checkpoint" if moment == "checkpoint" else "model.ckpt-3")
    writer = WriterBeside(next_moment, step=6)
    out = io.StringIO()
    assert main(["verify", "--json", str(ckpt_dir)], out=out, storage=writer) == 0
    report = json.loads(out.getvalue())
    assert (report["ok"], report["retired"]) == (True, [str(ckpt_dir / "model.ckpt-3")])


class RetiringAfterListing(LocalStorage):
    """Local files, where a writer's retention deletes ``victim`` just after each listing."""

    def __init__(self, victim: Path) -> None:
        super().__init__()
        self.victim = victim

    def list_names(self, directory: str) -> list[str]:
        names = super().list_names(directory)
        self.victim.unlink(missing_ok=True)
        return names


def test_scan_reports_a_file_gone_since_the_listing_as_retired(ckpt_dir: Path) -> None:
    victim = ckpt_dir / "model.ckpt-3"
    found = scan_directory(RetiringAfterListing(victim), str(ckpt_dir), verify=True)
    assert [(f.name, f.retired, f.error, f.header is not None) for f in found] == [
        ("model.ckpt-2", False, None, True),
        ("model.ckpt-3", True, None, False),
        ("model.ckpt-4", False, None, True),
    ]


def test_inspect_names_torch_tensors_jax_arrays_and_ml_dtypes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    state = {"t": torch.ones(2, 3, dtype=torch.bfloat16), "j": jnp.zeros(4, jnp.float32)}
    anyio.run(Saver().save, state, str(tmp_path / "model.ckpt"), 1)
    out = io.StringIO()
    assert main(["inspect", str(tmp_path / "model.ckpt-1")], out=out) == 0
    text = out.getvalue()
    assert "'t': torch tensor bfloat16 [2x3]" in text
    assert "'j': jax array float32 [4]" in text
    out = io.StringIO()
    assert main(["inspect", "--json", str(tmp_path / "model.ckpt-1")], out=out) == 0
    kinds = {key: leaf["kind"] for key, leaf in json.loads(out.getvalue())["tree"]["items"]}
    assert kinds == {"t": "torch tensor", "j": "jax array"}
