"""The ``asyncckpt`` command: ls / inspect / verify / prune checkpoint directories.

Uses the saver, format and storage layers; never a session. Human-readable output by
default, ``--json`` for scripts. Exit status: 0 success, 1 corruption found (verify) or a
checkpoint error, 2 wrong usage, 141 (128 + SIGPIPE) the reader of the output went away.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, TextIO

from ._checkpoint import (
    STATE_FILENAME,
    FoundCheckpoint,
    _format,
    get_checkpoint_state,
    is_state_file_name,
    latest_checkpoint,
    prune,
    read_header_sync,
    scan_directory,
    verify_file,
)
from ._core._errors import CheckpointError
from ._storage import LocalStorage

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

_EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# Local paths only, for now; object-store URLs get their storage from the URL.
_STORAGE = LocalStorage()


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def _error_json(exc: CheckpointError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "part": getattr(exc, "part", None), "message": str(exc)}


# -- ls ---------------------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    directory: str = args.directory
    if not os.path.isdir(directory):
        raise _Usage(f"{directory}: not a directory")
    # The model's state file, and any other writer's in the directory (the input pipeline's
    # checkpoint_input, a worker's checkpoint_input_worker_1...).
    states = [
        state
        for name in _STORAGE.list_names(directory)
        if is_state_file_name(name)
        if (state := get_checkpoint_state(directory, name, storage=_STORAGE)) is not None
    ]
    model_state = next((st for st in states if st.latest is not None), None)
    latest = model_state.latest if model_state is not None else None
    listed = {name for st in states for name in st.names}
    latests = {st.latest for st in states if st.latest is not None}
    stamps = {
        name: stamp for st in states for name, stamp in zip(st.names, st.timestamps, strict=True)
    }
    rows: list[dict[str, Any]] = []
    for found in scan_directory(_STORAGE, directory):
        header = found.header
        rows.append(
            {
                "name": found.name,
                "step": header.step if header else None,
                "bytes": found.size,
                "time": stamps.get(found.name, header.time if header else found.mtime),
                "listed": found.name in listed,
                "latest": found.name in latests,
                "arrays": len(header.arrays) if header else None,
                "error": _error_json(found.error) if found.error else None,
            }
        )
    rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["name"]))
    if args.json:
        json.dump({"directory": directory, "latest": latest, "checkpoints": rows}, out, indent=2)
        out.write("\n")
        return 0
    if not rows:
        out.write(f"{directory}: no checkpoints\n")
        return 0
    out.write(f"{'step':>10}  {'size':>10}  {'saved':19}  name\n")
    for row in rows:
        marks = []
        if row["latest"]:
            marks.append("latest")
        if not row["listed"]:
            marks.append("unlisted")
        if row["error"]:
            marks.append(f"unreadable: {row['error']['message']}")
        step = "-" if row["step"] is None else str(row["step"])
        note = f"  ({', '.join(marks)})" if marks else ""
        out.write(
            f"{step:>10}  {_size(row['bytes']):>10}  {_when(row['time'])}  {row['name']}{note}\n"
        )
    return 0


# -- inspect ----------------------------------------------------------------------------------


def _resolve(path: str) -> str:
    if os.path.isdir(path):
        latest = latest_checkpoint(path, storage=_STORAGE)
        if latest is None:
            raise _Usage(f"{path}: no checkpoint in this directory")
        return latest
    return path


def _describe_tree(
    node: list[Any],
    arrays: Sequence[_format.ArrayEntry],
    indent: str,
    lines: list[str],
    label: str,
) -> None:
    tag = node[0]
    if tag in ("a", "g", "y"):
        entry = arrays[node[1]]
        kind = {"a": "array", "g": "numpy scalar", "y": "bytes"}[tag]
        shape = "x".join(map(str, entry.shape)) or "scalar"
        lines.append(f"{indent}{label}{kind} {entry.dtype} [{shape}] {_size(entry.nbytes)}")
    elif tag == "d":
        lines.append(f"{indent}{label}dict ({len(node[1])} keys)")
        for key, child in node[1]:
            _describe_tree(child, arrays, indent + "  ", lines, f"{key!r}: ")
    elif tag in ("l", "t"):
        kind = "list" if tag == "l" else "tuple"
        lines.append(f"{indent}{label}{kind} ({len(node[1])} items)")
        for i, child in enumerate(node[1]):
            _describe_tree(child, arrays, indent + "  ", lines, f"[{i}] ")
    elif tag == "o":
        _describe_tree(node[1], arrays, indent, lines, f"{label}state_dict ")
    else:
        value = None if tag == "n" else complex(*node[1:]) if tag == "c" else node[1]
        lines.append(f"{indent}{label}{value!r}")


def _tree_json(node: list[Any], arrays: Sequence[_format.ArrayEntry]) -> Any:
    tag = node[0]
    if tag in ("a", "g", "y"):
        entry = arrays[node[1]]
        return {
            "kind": {"a": "array", "g": "scalar", "y": "bytes"}[tag],
            "dtype": str(entry.dtype),
            "shape": list(entry.shape),
            "bytes": entry.nbytes,
        }
    if tag == "d":
        return {"kind": "dict", "items": [[k, _tree_json(c, arrays)] for k, c in node[1]]}
    if tag in ("l", "t"):
        return {
            "kind": "list" if tag == "l" else "tuple",
            "items": [_tree_json(c, arrays) for c in node[1]],
        }
    if tag == "o":
        return {"kind": "state_dict", "state": _tree_json(node[1], arrays)}
    if tag == "c":
        return {"kind": "complex", "real": node[1], "imag": node[2]}
    return {
        "kind": "value",
        "value": None if tag == "n" else node[1] if tag != "I" else str(node[1]),
    }


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    path = _resolve(args.path)
    header = read_header_sync(_STORAGE, path)
    total = sum(entry.nbytes for entry in header.arrays)
    if args.json:
        json.dump(
            {
                "path": path,
                "step": header.step,
                "time": header.time,
                "format_version": _format.FORMAT_VERSION,
                "bytes": header.file_size,
                "array_bytes": total,
                "metadata": header.metadata,
                "tree": _tree_json(header.tree, header.arrays),
            },
            out,
            indent=2,
            default=repr,
        )
        out.write("\n")
        return 0
    out.write(
        f"{path}\n  step {header.step}, saved {_when(header.time)}, "
        f"{len(header.arrays)} arrays, {_size(total)} of array data, "
        f"{_size(header.file_size)} on disk\n"
    )
    if header.metadata:
        out.write(f"  metadata: {header.metadata!r}\n")
    lines: list[str] = []
    _describe_tree(header.tree, header.arrays, "  ", lines, "")
    out.write("\n".join(lines) + "\n")
    return 0


# -- verify -----------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    target: str = args.path
    results: list[dict[str, Any]] = []
    if os.path.isdir(target):
        files: list[str] = []
        try:
            state = get_checkpoint_state(target, storage=_STORAGE)
            missing = [p for p in (state.paths() if state else ()) if not os.path.exists(p)]
            results.extend(
                {
                    "path": path,
                    "ok": False,
                    "error": {
                        "type": "CheckpointNotFoundError",
                        "part": None,
                        "message": f"{path}: listed in the state file but missing",
                    },
                }
                for path in missing
            )
        except CheckpointError as exc:
            results.append(
                {
                    "path": os.path.join(target, STATE_FILENAME),
                    "ok": False,
                    "error": _error_json(exc),
                }
            )
        found: list[FoundCheckpoint] = scan_directory(_STORAGE, target)
        files = [f.path for f in found]
    else:
        files = [target]
    for path in files:
        try:
            header = verify_file(_STORAGE, path)
        except CheckpointError as exc:
            results.append({"path": path, "ok": False, "error": _error_json(exc)})
        else:
            results.append(
                {
                    "path": path,
                    "ok": True,
                    "step": header.step,
                    "arrays": len(header.arrays),
                    "bytes": header.file_size,
                }
            )
    failed = [r for r in results if not r["ok"]]
    if args.json:
        json.dump({"ok": not failed, "checked": len(files), "results": results}, out, indent=2)
        out.write("\n")
    else:
        for result in results:
            if result["ok"]:
                out.write(
                    f"ok       {result['path']} (step {result['step']}, "
                    f"{result['arrays']} arrays)\n"
                )
            else:
                out.write(f"CORRUPT  {result['error']['message']}\n")
        out.write(f"{len(files)} checked, {len(failed)} failed\n")
    return 1 if failed else 0


# -- prune ------------------------------------------------------------------------------------


def _cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    if not os.path.isdir(args.directory):
        raise _Usage(f"{args.directory}: not a directory")
    kept, deleted = prune(_STORAGE, args.directory, args.keep)
    if args.json:
        json.dump({"kept": kept, "deleted": deleted}, out, indent=2)
        out.write("\n")
    else:
        for name in deleted:
            out.write(f"deleted  {name}\n")
        out.write(f"{len(kept)} kept, {len(deleted)} deleted\n")
    return 0


class _Usage(Exception):
    """A mistake in what was asked: exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncckpt", description="List, inspect, verify and prune asyncckpt checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    add("ls", "list the checkpoints of a directory").add_argument("directory")
    add("inspect", "show a checkpoint's tree, dtypes, shapes and metadata").add_argument(
        "path", help="a checkpoint file, or a directory for its latest checkpoint"
    )
    add("verify", "check every checksum; exit 1 on any corruption").add_argument(
        "path", help="a checkpoint file or a directory"
    )
    prune_parser = add("prune", "keep the newest N checkpoints, delete the rest")
    prune_parser.add_argument("directory")
    prune_parser.add_argument("--keep", type=int, required=True, metavar="N")
    return parser


_COMMANDS = {"ls": _cmd_ls, "inspect": _cmd_inspect, "verify": _cmd_verify, "prune": _cmd_prune}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        status = _run(args, stream)
        stream.flush()  # a reader that went away shows up here, not at interpreter exit
    except BrokenPipeError:
        # `asyncckpt ls --json DIR | head -1`: stop quietly as Unix tools do, with the status
        # a shell reports for SIGPIPE, and keep Python from failing again when it flushes
        # stdout at exit.
        _silence(stream)
        return _EXIT_BROKEN_PIPE
    return status


def _run(args: argparse.Namespace, stream: TextIO) -> int:
    try:
        return _COMMANDS[args.command](args, stream)
    except _Usage as exc:
        sys.stderr.write(f"asyncckpt: {exc}\n")
        return 2
    except CheckpointError as exc:
        if args.json:
            json.dump({"ok": False, "error": _error_json(exc)}, stream, indent=2)
            stream.write("\n")
        sys.stderr.write(f"asyncckpt: {exc}\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"asyncckpt: {exc}\n")
        return 2


def _silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that its buffered rest goes nowhere."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (StringIO): nothing will flush it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
