"""The ``asyncckpt`` command: ls / inspect / verify / prune checkpoint directories.

Uses the saver, format and storage layers; never a session. Human-readable output by
default, ``--json`` for scripts. Exit status: 0 success, 1 corruption found (verify) or a
checkpoint error (an unreadable file or directory included), 2 wrong usage, 141 (128 +
SIGPIPE) the reader of the output went away.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO

from ._checkpoint import (
    CheckpointState,
    FoundCheckpoint,
    Manifest,
    _format,
    get_checkpoint_state,
    is_state_file_name,
    prune,
    read_header_sync,
    scan_directory,
    verify_file,
)
from ._core._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointReadError,
)
from ._storage import TEMP_MARKER, is_url, resolve_storage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._storage import Storage

__all__ = ["main"]

_EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# How many checkpoints the advice to rebuild a state file keeps: the library's messages say 5.
_KEEP_ADVISED: Final = 5


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def _error_json(exc: Exception) -> dict[str, Any]:
    return {"type": type(exc).__name__, "part": getattr(exc, "part", None), "message": str(exc)}


def _problem(exc: CheckpointError) -> str:
    """Say what is wrong without the advice a corrupted checkpoint's message ends with: that
    advice runs ``verify``, which verify's own report must not tell its reader to do."""
    return exc.problem if isinstance(exc, CheckpointCorruptedError) else str(exc)


def _prune_command(directory: str) -> str:
    """The command that rebuilds ``directory``'s state file, as it can be pasted."""
    return f"`asyncckpt prune {shlex.quote(directory)} --keep {_KEEP_ADVISED}`"


def _read_state_files(
    storage: Storage, directory: str
) -> tuple[list[CheckpointState], list[CheckpointError]]:
    """Read the model's state file, and any other writer's in the directory (the input
    pipeline's checkpoint_input, a worker's checkpoint_input_worker_1...).

    Returns:
        The states of the readable ones, and the errors of the damaged ones.

    Raises:
        OSError: the directory cannot be listed.
    """
    states: list[CheckpointState] = []
    errors: list[CheckpointError] = []
    for name in storage.list_names(directory):
        if not is_state_file_name(name):
            continue
        try:
            state = get_checkpoint_state(directory, name, storage=storage)
        except CheckpointError as exc:
            errors.append(exc)
        else:
            if state is not None:
                states.append(state)
    return states, errors


# -- ls ---------------------------------------------------------------------------------------


def _temporary_files(storage: Storage, directory: str) -> dict[str, int]:
    """Count the temporary files in ``directory`` and their bytes: saves in progress, or what
    interrupted writers left (a writer removes its own when it next opens the directory)."""
    sizes = [
        info.st_size
        for name in storage.list_names(directory)
        if TEMP_MARKER in name
        if (info := storage.file_info(os.path.join(directory, name))) is not None
    ]
    return {"count": len(sizes), "bytes": sum(sizes)}


def _is_directory(storage: Storage, path: str) -> bool:
    """Whether ``path`` is a directory: a local one (symlinks followed), or a URL's prefix
    that holds objects."""
    if not is_url(path):
        return os.path.isdir(path)
    info = storage.file_info(path)
    return info is not None and stat.S_ISDIR(info.st_mode)


def _cmd_ls(args: argparse.Namespace, out: TextIO, storage: Storage) -> int:
    directory: str = args.directory
    if not _is_directory(storage, directory):
        raise UsageError(f"{directory}: not a directory")
    states, damaged = _read_state_files(storage, directory)
    if damaged:
        raise damaged[0]
    model_state = next((st for st in states if st.latest is not None), None)
    latest = model_state.latest if model_state is not None else None
    listed = {name for st in states for name in st.names}
    latests = {st.latest for st in states if st.latest is not None}
    stamps = {
        name: stamp for st in states for name, stamp in zip(st.names, st.timestamps, strict=True)
    }
    rows: list[dict[str, Any]] = []
    scanned = scan_directory(storage, directory, listed=listed)
    owners = {
        shard: (found.name, rank) for found in scanned for rank, shard in enumerate(_shards(found))
    }
    for found in scanned:
        if found.retired:
            continue  # a writer deleted it since the directory was listed: it is not there
        header = found.header
        rows.append(
            {
                "name": found.name,
                "step": header.step if header else None,
                "bytes": found.size,
                "time": stamps.get(found.name, header.time if header else found.mtime),
                "listed": found.name in listed,
                "shard_of": owners[found.name][0] if found.name in owners else None,
                "latest": found.name in latests,
                "arrays": len(header.arrays) if header else None,
                "error": _error_json(found.error) if found.error else None,
            }
        )
    rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["name"]))
    temporary = _temporary_files(storage, directory)
    if args.json:
        json.dump(
            {
                "directory": directory,
                "latest": latest,
                "checkpoints": rows,
                "temporary_files": temporary,
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    if not rows:
        out.write(f"{directory}: no checkpoints\n")
    else:
        out.write(f"{'step':>10}  {'size':>10}  {'saved':19}  name\n")
    for row in rows:
        marks = []
        if row["latest"]:
            marks.append("latest")
        if row["shard_of"] is not None:
            marks.append(f"rank {owners[row['name']][1]}'s shard of {row['shard_of']}")
        elif not row["listed"]:
            marks.append("unlisted")
        if row["error"]:
            marks.append(f"unreadable: {row['error']['message']}")
        step = "-" if row["step"] is None else str(row["step"])
        note = f"  ({', '.join(marks)})" if marks else ""
        out.write(
            f"{step:>10}  {_size(row['bytes']):>10}  {_when(row['time'])}  {row['name']}{note}\n"
        )
    if temporary["count"]:
        files = "temporary file" if temporary["count"] == 1 else "temporary files"
        out.write(
            f"{temporary['count']} {files} ({_size(temporary['bytes'])}) left by an "
            "interrupted writer or a save in progress; the next writer to open the directory "
            "removes them\n"
        )
    return 0


# -- inspect ----------------------------------------------------------------------------------


def _resolve(path: str, storage: Storage) -> str:
    """Return the checkpoint ``path`` names: itself, or a directory's latest.

    Raises:
        UsageError: the directory has no checkpoint.
        CheckpointNotFoundError: its state file names a latest checkpoint that is missing.
        CheckpointCorruptedError, CheckpointFormatError: its state file is damaged.
    """
    if not _is_directory(storage, path):
        return path
    state = get_checkpoint_state(path, storage=storage)
    if state is None or state.latest is None:
        raise UsageError(f"{path}: no checkpoint in this directory")
    latest = os.path.join(path, state.latest)
    # latest_checkpoint() checks this too, but its advice lacks the --keep that prune requires.
    if storage.file_info(latest) is None:
        raise CheckpointNotFoundError(
            latest,
            "the state file names this checkpoint but it is missing; restore it, or run "
            f"{_prune_command(path)} to rebuild the state file from the checkpoints present",
        )
    return latest


# What each array leaf of a tree was when saved (the tags are _tree's spec).
_LEAF_KINDS: Final = {
    "a": "array",
    "g": "numpy scalar",
    "y": "bytes",
    "T": "torch tensor",
    "J": "jax array",
}


def _describe_tree(
    node: list[Any],
    arrays: Sequence[_format.ArrayEntry],
    indent: str,
    lines: list[str],
    label: str,
) -> None:
    tag = node[0]
    if tag in _LEAF_KINDS:
        entry = arrays[node[1]]
        shape = "x".join(map(str, entry.shape)) or "scalar"
        lines.append(
            f"{indent}{label}{_LEAF_KINDS[tag]} {entry.dtype_name} [{shape}] {_size(entry.nbytes)}"
        )
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
    if tag in _LEAF_KINDS:
        entry = arrays[node[1]]
        return {
            "kind": _LEAF_KINDS[tag],
            "dtype": entry.dtype_name,
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


def _cmd_inspect(args: argparse.Namespace, out: TextIO, storage: Storage) -> int:
    path = _resolve(args.path, storage)
    header = read_header_sync(storage, path)
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


@dataclass(slots=True)
class _Verification:
    """What verify found: a result per file checked (or missing), the files a live writer
    retired meanwhile, and what to do about the failures."""

    results: list[dict[str, Any]] = field(default_factory=list)
    checked: int = 0
    retired: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def check(
        self, path: str, header: _format.Header | None, error: CheckpointError | None
    ) -> None:
        """Record a file that was checked, with its header or its error."""
        self.checked += 1
        if error is not None:
            self.fail(path, error)
        elif header is not None:
            self.results.append(
                {
                    "path": path,
                    "ok": True,
                    "step": header.step,
                    "arrays": len(header.arrays),
                    "bytes": header.file_size,
                }
            )

    def fail(self, path: str, error: CheckpointError) -> None:
        """Record a failure (a checked file's, a state file's, a missing file's)."""
        message = {**_error_json(error), "message": _problem(error)}
        self.results.append({"path": path, "ok": False, "error": message})


# A checkpoint that must not be loaded, as opposed to one that is missing or cannot be read.
_DAMAGE: Final = (CheckpointCorruptedError, CheckpointFormatError)


def _state_file_advice(directory: str) -> str:
    return (
        f"to repair the state file: run {_prune_command(directory)}; it rebuilds the list "
        f"from the intact checkpoints present, keeping the newest {_KEEP_ADVISED}"
    )


def _damage_advice(directory: str) -> str:
    return (
        'to go on from damaged checkpoints: restore with on_corrupt="fallback" to take the '
        "newest intact checkpoint instead, or move the damaged files away and run "
        f"{_prune_command(directory)} to rewrite the state file"
    )


def _still_missing(storage: Storage, directory: str, names: set[str]) -> set[str]:
    """Return which of ``names`` (listed, but not in the directory) the state files still
    list when read again, and are still absent.

    A live writer lists its new checkpoint before retiring old ones, so a name it dropped
    since the first read was retired, not lost. A state file damaged since the first read
    lists nothing here: that read's verdict on it stands.
    """
    states, _damaged = _read_state_files(storage, directory)
    relisted = {name for st in states for name in st.names}
    return {
        name
        for name in names & relisted
        if storage.file_info(os.path.join(directory, name)) is None
    }


def _shards(found: FoundCheckpoint) -> tuple[str, ...]:
    """The shards a sharded checkpoint's manifest names (none for any other file)."""
    if found.header is None:
        return ()
    try:
        manifest = Manifest.from_metadata(found.header.metadata, found.path)
    except CheckpointFormatError:
        return ()  # verify reports the manifest itself as damaged
    return manifest.shards if manifest is not None and manifest.world_size > 1 else ()


def _verify_directory(storage: Storage, directory: str) -> _Verification:
    report = _Verification()
    # The state files first: a checkpoint saved after this read is not listed in it, and one
    # retired after it shows as gone, never as a listed file that is missing.
    states, damaged = _read_state_files(storage, directory)
    for exc in damaged:
        report.fail(exc.path, exc)
    listed = {name for st in states for name in st.names}
    found = scan_directory(storage, directory, listed=listed, verify=True)
    for checkpoint in found:
        if not checkpoint.retired:
            report.check(checkpoint.path, checkpoint.header, checkpoint.error)
    not_found = listed - {f.name for f in found if not f.retired}
    missing = _still_missing(storage, directory, not_found) if not_found else set()
    for name in sorted(missing):
        path = os.path.join(directory, name)
        report.fail(path, CheckpointNotFoundError(path, "listed in the state file but missing"))
    present = {f.name for f in found if not f.retired}
    for checkpoint in found:
        if checkpoint.name not in listed:
            continue
        for rank, shard in enumerate(_shards(checkpoint)):
            if shard not in present and storage.file_info(os.path.join(directory, shard)) is None:
                path = os.path.join(directory, shard)
                report.fail(
                    path,
                    CheckpointNotFoundError(
                        path, f"rank {rank}'s shard of {checkpoint.name} is missing"
                    ),
                )
                missing.add(shard)
    retired = {f.name for f in found if f.retired} | not_found
    report.retired = sorted(os.path.join(directory, name) for name in retired - missing)
    if damaged or missing:
        report.advice.append(_state_file_advice(directory))
    # An unreadable file's own message says what to check; damage needs a way around it.
    if any(isinstance(f.error, _DAMAGE) for f in found):
        report.advice.append(_damage_advice(directory))
    return report


def _verify_file(storage: Storage, path: str) -> _Verification:
    report = _Verification()
    # Only damage is a result: a file that is missing or cannot be read fails the command
    # itself (exit 1, one line on stderr), as inspect does.
    try:
        header = verify_file(storage, path)
    except _DAMAGE as exc:
        report.check(path, None, exc)
        report.advice.append(_damage_advice(os.path.dirname(path) or "."))
    else:
        report.check(path, header, None)
    return report


# How verify labels a failure, by the error's type (anything else cannot be read).
_FAILURE_LABELS: Final = {
    "CheckpointCorruptedError": "CORRUPT",
    "CheckpointFormatError": "CORRUPT",
    "CheckpointNotFoundError": "MISSING",
}


def _cmd_verify(args: argparse.Namespace, out: TextIO, storage: Storage) -> int:
    target: str = args.path
    if _is_directory(storage, target):
        report = _verify_directory(storage, target)
    else:
        report = _verify_file(storage, target)
    failed = [r for r in report.results if not r["ok"]]
    if args.json:
        json.dump(
            {
                "ok": not failed,
                "checked": report.checked,
                "results": report.results,
                "retired": report.retired,
                "advice": report.advice,
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 1 if failed else 0
    for result in report.results:
        if result["ok"]:
            out.write(
                f"ok       {result['path']} (step {result['step']}, {result['arrays']} arrays)\n"
            )
        else:
            label = _FAILURE_LABELS.get(result["error"]["type"], "ERROR")
            out.write(f"{label:8} {result['error']['message']}\n")
    for path in report.retired:
        out.write(f"retired  {path} (a writer removed it during the check)\n")
    for line in report.advice:
        out.write(line + "\n")
    summary = f"{report.checked} checked, {len(failed)} failed"
    if report.retired:
        summary += f", {len(report.retired)} retired"
    out.write(summary + "\n")  # last, for scripts that read only the last line
    return 1 if failed else 0


# -- prune ------------------------------------------------------------------------------------


def _cmd_prune(args: argparse.Namespace, out: TextIO, storage: Storage) -> int:
    if not _is_directory(storage, args.directory):
        raise UsageError(f"{args.directory}: not a directory")
    kept, deleted = prune(storage, args.directory, args.keep)
    if args.json:
        json.dump({"kept": kept, "deleted": deleted}, out, indent=2)
        out.write("\n")
    else:
        for name in deleted:
            out.write(f"deleted  {name}\n")
        out.write(f"{len(kept)} kept, {len(deleted)} deleted\n")
    return 0


class UsageError(Exception):
    """A mistake in what was asked: exit status 2 (``--json`` reports it by this name)."""


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


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, *, storage: Storage | None = None
) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: the arguments (``sys.argv[1:]`` by default).
        out: where the output goes (standard output by default).
        storage: where the checkpoints are (by default local files for a path, the object
            store of a URL: ``asyncckpt ls s3://bucket/prefix``).

    Raises:
        SystemExit: the arguments are wrong (status 2, with argparse's usage message).
    """
    args = _parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        status = _run(args, stream, storage)
        stream.flush()  # a reader that went away shows up here, not at interpreter exit
    except BrokenPipeError:
        # `asyncckpt ls --json DIR | head -1`: stop quietly as Unix tools do, with the status
        # a shell reports for SIGPIPE, and keep Python from failing again when it flushes
        # stdout at exit.
        _silence(stream)
        return _EXIT_BROKEN_PIPE
    return status


def _run(args: argparse.Namespace, stream: TextIO, storage: Storage | None) -> int:
    try:
        return _COMMANDS[args.command](args, stream, resolve_storage(_target(args), storage))
    except UsageError as exc:
        return _fail(args, stream, exc, 2)
    except CheckpointError as exc:
        return _fail(args, stream, exc, 1)
    except BrokenPipeError:
        raise  # the reader of the output went away: main() ends quietly
    except OSError as exc:
        # The last resort for an I/O error the library left untranslated (a directory or a
        # file that cannot be read): a data problem, reported as the library reports one.
        path = exc.filename if isinstance(exc.filename, str) else _target(args)
        error = CheckpointReadError(path, f"cannot read it: {exc.strerror or exc}")
        error.__cause__ = exc
        return _fail(args, stream, error, 1)
    except ValueError as exc:
        return _fail(args, stream, exc, 2)


def _target(args: argparse.Namespace) -> str:
    """The path the command was given."""
    return str(args.path if args.command in ("inspect", "verify") else args.directory)


def _fail(args: argparse.Namespace, stream: TextIO, exc: Exception, status: int) -> int:
    """End the command on an error: one line on stderr and, with --json, the JSON on stdout."""
    if args.json:
        json.dump({"ok": False, "error": _error_json(exc)}, stream, indent=2)
        stream.write("\n")
    sys.stderr.write(f"asyncckpt: {exc}\n")
    return status


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
