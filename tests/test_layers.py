"""Imports point downward only: each module's layer must not import a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "asyncckpt"

# Rank of each layer from DESIGN.md, lowest first; equal ranks may not import each other.
LAYER_RANKS = {
    "_errors": 0, "_types": 0, "_util": 0, "_crc32c": 0,
    "_tree": 1, "_iterators": 1,
    "_format": 2, "_storage": 2,
    "_saver": 3,
    "_writer": 4, "_summary": 4,
    "_hooks": 5,
    "_session": 6,
    "cli": 7,
    "testing": 8, "summary": 8, "__init__": 8, "__main__": 8,
}  # fmt: skip
BASE = {"_errors", "_types", "_util", "_crc32c"}


def _top_module(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_modules(path: Path) -> set[str]:
    """Return the top-level package modules that ``path`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth_in_package = len(path.relative_to(PACKAGE).parts) - 1
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 < depth_in_package:
                    continue  # an import inside the module's own sub-package
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "asyncckpt":
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "asyncckpt":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unknown = {_top_module(p) for p in MODULES} - set(LAYER_RANKS)
    assert not unknown, f"add these modules to LAYER_RANKS: {sorted(unknown)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    module = _top_module(path)
    rank = LAYER_RANKS[module]
    for imported in _imported_modules(path) - {module}:
        imported_rank = LAYER_RANKS[imported]
        if module in BASE and imported in BASE:
            continue  # the base modules form one layer that may share helpers
        assert imported_rank < rank, (
            f"{module} (layer {rank}) imports {imported} (layer {imported_rank}): "
            "imports must point to lower layers only"
        )


def test_cli_never_reaches_sessions_or_hooks() -> None:
    imported = _imported_modules(PACKAGE / "cli.py")
    assert not imported & {"_session", "_hooks", "_writer"}


def test_the_parser_sees_imports() -> None:
    # Guards the checks above against passing vacuously on a parser that misses imports.
    assert {"_format", "_storage", "_tree", "_errors"} <= _imported_modules(PACKAGE / "_saver.py")
    assert "_saver" in _imported_modules(PACKAGE / "cli.py")
