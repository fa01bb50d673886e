"""Loading a checkpoint never imports or runs anything, whatever names its header holds.

(Also the regressions ``benchmarks/fuzz.py`` found in state file reading, at the end.)

Each hostile file is a valid checkpoint whose header was rewritten (with valid checksums) to
name modules, callables or object dtypes. Restoring it, on both read paths, must either
refuse it with a ``CheckpointFormatError`` or return plain data, and must not import a
module (a finder first in ``sys.meta_path`` sees every import the restore attempts), nor
call ``eval``, ``exec``, ``compile`` or any pickle entry point. A scan of the
package's source checks that no such path exists at all.
"""

from __future__ import annotations

import builtins
import importlib.abc
import pickle
import re
import struct
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import pytest

import asyncckpt
from asyncckpt import CheckpointFormatError, Saver, get_checkpoint_state, latest_checkpoint
from asyncckpt._checkpoint._format import ALIGNMENT, MAGIC, PRELUDE_SIZE, decode_header
from asyncckpt._core._crc32c import crc32c

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

pytestmark = pytest.mark.anyio

_PRELUDE = struct.Struct("<8sIIQII")
_CANARY = "asyncckpt_canary_module_never_imported"


class _ImportSpy(importlib.abc.MetaPathFinder):
    """Records every import that reaches the finders (modules not yet in sys.modules)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        self.names.append(fullname)
        return None


def _state() -> dict[str, Any]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "rec": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "n": 1,
        "s": "text",
    }


def _rewrite(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Return ``data`` with its header changed by ``change`` and every checksum valid."""
    header_len = _PRELUDE.unpack(data[:PRELUDE_SIZE])[3]
    old_start = -(-(PRELUDE_SIZE + header_len) // ALIGNMENT) * ALIGNMENT
    body = data[old_start:]
    header = msgpack.unpackb(data[PRELUDE_SIZE : PRELUDE_SIZE + header_len], raw=False)
    change(header)
    packed, start = b"", old_start
    for _ in range(4):  # file_size is part of the header it measures
        packed = msgpack.packb(header, use_bin_type=True)
        start = -(-(PRELUDE_SIZE + len(packed)) // ALIGNMENT) * ALIGNMENT
        shift = start - old_start
        if shift:
            for entry in header["arrays"]:
                entry[2] += shift
            old_start = start
            continue
        if header["file_size"] == start + len(body):
            break
        header["file_size"] = start + len(body)
    head = _PRELUDE.pack(MAGIC, 1, 0, len(packed), crc32c(packed), 0)
    head = head[:28] + struct.pack("<I", crc32c(head[:28]))
    gap = start - PRELUDE_SIZE - len(packed)
    return head + packed + bytes(gap) + body


def _set_dtype(index: int, dtype: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header["arrays"][index][0] = dtype

    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header[key] = value

    return change


def _set_tree_key(header: dict[str, Any]) -> None:
    # A dict entry whose key and value name a callable: data, never looked up.
    header["tree"][1].append(["__reduce__", ["s", f"os.system {_CANARY}"]])


def _rename_field(header: dict[str, Any]) -> None:
    header["arrays"][1][0][0][0] = f"{_CANARY}.os.system"


# Files that must be refused: object dtypes spelled every way, and names where tags go.
_REFUSED: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("object-dtype-|O", _set_dtype(0, "|O")),
    ("object-dtype-O", _set_dtype(0, "O")),
    ("object-dtype-|O8", _set_dtype(0, "|O8")),
    ("object-dtype-name", _set_dtype(0, "object")),
    ("dtype-names-a-callable", _set_dtype(0, "os.system")),
    ("dtype-names-a-module", _set_dtype(0, _CANARY)),
    ("dtype-import-expression", _set_dtype(0, f"__import__('{_CANARY}')")),
    ("object-field", _set_dtype(1, [["a", "|O"], ["b", "<f8"]])),
    ("nested-object-field", _set_dtype(1, [["a", [["x", "O"]]], ["b", "<f8"]])),
    ("field-dtype-names-a-module", _set_dtype(1, [["a", _CANARY], ["b", "<f8"]])),
    ("tree-tag-names-a-callable", _set("tree", ["os.system", ["s", "rm -rf /"]])),
    ("tree-tag-names-a-module", _set("tree", [_CANARY])),
    ("tree-is-a-string", _set("tree", f"{_CANARY}.load")),
    ("step-names-a-callable", _set("step", "os.system")),
]
# Files that load: the names are plain data and come back as such.
_LOADED: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("metadata-names-callables", _set("metadata", {"__class__": "os.system", _CANARY: [1]})),
    ("dict-key-names-a-callable", _set_tree_key),
    ("field-names-a-module", _rename_field),
]


@pytest.fixture
async def valid_file(tmp_path: Path) -> bytes:
    return _read(await Saver().save(_state(), str(tmp_path / "base"), 1))


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def no_code_paths(monkeypatch: pytest.MonkeyPatch) -> _ImportSpy:
    """Fail on eval, exec, compile or pickle; record imports reaching the finders."""

    def forbidden(name: str) -> Callable[..., Any]:
        def call(*args: object, **kwargs: object) -> Any:
            raise AssertionError(f"restoring a checkpoint called {name}")

        return call

    # __import__ itself runs for every import statement, even of loaded modules; the finder
    # spy below sees the imports that would load something.
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden(name))
    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden(f"pickle.{name}"))
    monkeypatch.setattr(np, "load", forbidden("numpy.load"))
    spy = _ImportSpy()
    monkeypatch.setattr(sys, "meta_path", [spy, *sys.meta_path])
    return spy


async def _restore_both(path: Path) -> list[object]:
    """Restore on both read paths; each result is the tree or the CheckpointFormatError."""
    results: list[object] = []
    for use_mmap in (False, True):
        try:
            results.append(await Saver().restore(path, mmap=use_mmap))
        except CheckpointFormatError as exc:
            results.append(exc)
    return results


async def _warm_up(path: Path) -> None:
    # Whatever a first restore imports lazily (numpy internals) is imported before watching.
    await _restore_both(path)


async def _restore_watched(
    tmp_path: Path,
    valid_file: bytes,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[dict[str, Any]], None],
) -> list[Any]:
    """Restore a rewritten file on both read paths; assert nothing was imported or run."""
    (tmp_path / "warm").write_bytes(valid_file)
    await _warm_up(tmp_path / "warm")
    hostile = tmp_path / "hostile"
    hostile.write_bytes(_rewrite(valid_file, change))
    modules = set(sys.modules)
    spy = no_code_paths(monkeypatch)
    try:
        results = await _restore_both(hostile)
    finally:
        monkeypatch.undo()
    assert spy.names == []
    assert set(sys.modules) == modules
    return list(results)


@pytest.mark.parametrize(("name", "change"), _REFUSED, ids=[name for name, _ in _REFUSED])
async def test_hostile_names_are_refused_without_importing_anything(
    tmp_path: Path,
    valid_file: bytes,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    change: Callable[[dict[str, Any]], None],
) -> None:
    results = await _restore_watched(tmp_path, valid_file, monkeypatch, change)
    assert all(isinstance(r, CheckpointFormatError) for r in results), results
    assert _CANARY not in sys.modules


@pytest.mark.parametrize(("name", "change"), _LOADED, ids=[name for name, _ in _LOADED])
async def test_names_in_data_load_as_plain_data_without_importing_anything(
    tmp_path: Path,
    valid_file: bytes,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    change: Callable[[dict[str, Any]], None],
) -> None:
    results = await _restore_watched(tmp_path, valid_file, monkeypatch, change)
    for tree in results:
        assert isinstance(tree, dict), tree
        np.testing.assert_array_equal(tree["w"], _state()["w"])
        assert all(isinstance(v, np.ndarray | int | str) for v in tree.values())
    if name == "dict-key-names-a-callable":
        assert all(tree["__reduce__"] == f"os.system {_CANARY}" for tree in results)


async def test_the_rewriter_keeps_a_valid_file_valid(tmp_path: Path, valid_file: bytes) -> None:
    (tmp_path / "same").write_bytes(_rewrite(valid_file, lambda header: None))
    for tree in await _restore_both(tmp_path / "same"):
        assert isinstance(tree, dict)
        assert tree["s"] == "text"


def test_an_extension_type_header_is_refused() -> None:
    # msgpack extension types could carry anything; the decoder refuses them outright.
    packed = b"\x86" + b"".join(
        msgpack.packb(key) + value
        for key, value in [
            ("arrays", b"\x90"),
            ("file_size", b"\x00"),
            ("metadata", b"\xc7\x03\x05abc"),  # ext type 5
            ("step", b"\xc0"),
            ("time", msgpack.packb(1.0)),
            ("tree", b"\x91\xa1n"),
        ]
    )
    with pytest.raises(CheckpointFormatError, match="extension type"):
        decode_header(packed, crc32c(packed), PRELUDE_SIZE + len(packed), "x")


# Calls that would run code or unpickle, spelled as they would appear in the source.
_CODE_PATHS = re.compile(
    r"(?<![.\w])(?:eval|exec|compile|__import__|loads?)\s*\(|\bimport_module\b|\bfind_spec\b|"
    r"\bpickle\b|\bmarshal\b|\bshelve\b|allow_pickle\s*=\s*True|\bnp\.load\b|\bnumpy\.load\b|"
    r"\bgetattr\s*\(\s*(?:builtins|sys\.modules)|\bsys\.modules\s*\["
)


def test_the_package_source_has_no_code_running_load_path() -> None:
    package = Path(asyncckpt.__file__).parent
    # Every module a restore runs through, from the file to the tree.
    readers = [
        "_checkpoint/_format.py",
        "_checkpoint/_state_file.py",
        "_checkpoint/_file.py",
        "_checkpoint/_directory.py",
        *(f"_tree/{path.name}" for path in sorted((package / "_tree").glob("*.py"))),
        "_storage/_base.py",
        "_storage/_local.py",
        "_core/_crc32c.py",
        "_core/_errors.py",
    ]
    hits = []
    for name in readers:
        for number, line in enumerate((package / name).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _CODE_PATHS.search(code) and not re.match(r"\s*[fr]?[\"']", code):
                hits.append(f"{name}:{number}: {line.strip()}")
    # Docstrings mention pickle to say it is absent; only code lines count.
    assert [h for h in hits if "pickle-free" not in h and "no pickle" not in h] == []


# -- hostile state files (found by benchmarks/fuzz.py) ---------------------------------------


def _write_state(directory: Path, body: str) -> None:
    text = body + f"# crc32c: {crc32c(body.encode()):08x}\n"
    (directory / "checkpoint").write_text(text)


@pytest.mark.parametrize("number", ["1.2.3", "+-", "e", "--1", ".", "1e5e5"])
def test_a_malformed_timestamp_is_a_format_error(tmp_path: Path, number: str) -> None:
    # The line pattern admits any run of digits, signs, dots and e's; float() then failed
    # with a bare ValueError instead of the documented CheckpointFormatError.
    _write_state(
        tmp_path,
        'model_checkpoint_path: "model.ckpt-1"\n'
        'all_model_checkpoint_paths: "model.ckpt-1"\n'
        f"all_model_checkpoint_timestamps: {number}\n",
    )
    with pytest.raises(CheckpointFormatError, match="unreadable number"):
        get_checkpoint_state(tmp_path)
    with pytest.raises(CheckpointFormatError, match="unreadable number"):
        latest_checkpoint(tmp_path)


def test_reading_a_small_state_file_allocates_little(tmp_path: Path) -> None:
    # read_small_file used to read(16 MiB + 1): 16 MiB allocated for every state file read.
    _write_state(
        tmp_path,
        'model_checkpoint_path: "model.ckpt-1"\nall_model_checkpoint_paths: "model.ckpt-1"\n',
    )
    get_checkpoint_state(tmp_path)  # warm up
    tracemalloc.start()
    try:
        state = get_checkpoint_state(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state is not None
    assert state.names == ("model.ckpt-1",)
    assert peak < 256 * 1024
