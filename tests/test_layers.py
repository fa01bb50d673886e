"""The house as DESIGN.md draws it: one folder per layer, imports pointing down only, and no
module reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "asyncckpt"

# Rank of each layer from DESIGN.md, lowest first; equal ranks may not import each other.
LAYER_RANKS = {
    "_core": 0,
    "_tree": 1,
    "_storage": 2,
    "_checkpoint": 3, "_summary": 3,
    "_hooks": 4,
    "_session": 5,
    "cli": 6,
    "testing": 7, "summary": 7, "__init__": 7, "__main__": 7,
}  # fmt: skip

# Inside the checkpoint stack, the order of its modules (DESIGN.md: format below the saver,
# the saver below the manager); a module may import only those before it.
CHECKPOINT_ORDER = [
    "_format",
    "_shards",
    "_state_file",
    "_snapshot",
    "_file",
    "_coordination",
    "_directory",
    "_saver",
    "_maintenance",
    "_sharded",
    "_manager",
]


def _module_parts(path: Path) -> tuple[str, ...]:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = relative.parts
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def _top_module(path: Path) -> str:
    return _module_parts(path)[0]


def _imports(path: Path) -> list[tuple[str, ...]]:
    """Every package module ``path`` imports, as a path of names below ``asyncckpt``
    (``from . import _format`` inside ``_checkpoint`` gives ``("_checkpoint", "_format")``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    relative = path.relative_to(PACKAGE)
    package = list(relative.parts[:-1])
    found: list[tuple[str, ...]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "asyncckpt":
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:
                found.extend((*target, alias.name) for alias in node.names)
            else:
                found.append(tuple(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "asyncckpt":
                    found.append(tuple(parts[1:]) or ("__init__",))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _ids(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_every_module_has_a_layer() -> None:
    unknown = {_top_module(p) for p in MODULES} - set(LAYER_RANKS)
    assert not unknown, f"add these modules to LAYER_RANKS: {sorted(unknown)}"
    checkpoint = {p.stem for p in (PACKAGE / "_checkpoint").glob("_*.py")} - {"__init__"}
    assert checkpoint == set(CHECKPOINT_ORDER), "add the module to CHECKPOINT_ORDER"


def test_the_root_holds_only_entry_points() -> None:
    # One folder per layer: nothing else lies flat beside the public entry points.
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat == {"__init__", "__main__", "cli", "summary"}


# ARCHITECTURE.md: in the tree layer, each framework has its own module, and only that
# module imports it (the others ask it), so a numpy-only program never imports torch.
FRAMEWORK_MODULES = {"torch": "_torch", "jax": "_jax", "ml_dtypes": "_dtypes"}


@pytest.mark.parametrize("path", sorted((PACKAGE / "_tree").glob("*.py")), ids=_ids)
def test_each_framework_is_imported_by_its_own_tree_module_only(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            framework = name.split(".")[0]
            if framework in FRAMEWORK_MODULES:
                assert path.stem == FRAMEWORK_MODULES[framework], (
                    f"{_ids(path)} imports {name}; only {FRAMEWORK_MODULES[framework]}.py may"
                )


def test_nothing_outside_the_tree_layer_imports_a_framework() -> None:
    for path in MODULES:
        if _top_module(path) == "_tree":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & set(FRAMEWORK_MODULES), _ids(path)


@pytest.mark.parametrize("path", MODULES, ids=_ids)
def test_imports_point_down(path: Path) -> None:
    module = _top_module(path)
    rank = LAYER_RANKS[module]
    for imported in _imports(path):
        if imported[0] == module:
            continue
        imported_rank = LAYER_RANKS[imported[0]]
        assert imported_rank < rank, (
            f"{_ids(path)} (layer {rank}) imports {'.'.join(imported)} (layer "
            f"{imported_rank}): imports must point to lower layers only"
        )


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (PACKAGE / "_checkpoint").glob("_*.py") if p.stem != "__init__"),
    ids=_ids,
)
def test_the_checkpoint_stack_is_ordered(path: Path) -> None:
    position = CHECKPOINT_ORDER.index(path.stem)
    for imported in _imports(path):
        if imported[0] == "_checkpoint" and len(imported) > 1:
            assert CHECKPOINT_ORDER.index(imported[1]) < position, (
                f"{path.stem} imports {imported[1]}, which is above it in the checkpoint stack"
            )


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines: its functions, classes, methods, and attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("path", MODULES, ids=_ids)
def test_no_module_reaches_into_another_modules_private_names(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _defined_names(tree)
    reaches = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and node.attr not in own
        )
    ]
    assert not reaches, f"{_ids(path)} uses private names of other modules: {reaches}"


# The public facades re-export from private modules (STYLE.md); the base layer's modules
# are its interface.
_FACADES = {"__init__", "summary"}


@pytest.mark.parametrize("path", MODULES, ids=_ids)
def test_private_modules_are_reached_only_from_their_own_package(path: Path) -> None:
    module = _module_parts(path)
    if module[0] in _FACADES:
        return
    for imported in _imports(path):
        # Inside a layer's package, its private modules are that package's business: other
        # layers use what the package's __init__ re-exports.
        inner = imported[1:]
        if (
            imported[0] != "_core"
            and inner
            and inner[0].startswith("_")
            and imported[0] != module[0]
        ):
            pytest.fail(f"{_ids(path)} imports {'.'.join(imported)}; import it from {imported[0]}")


def test_cli_never_reaches_sessions_or_hooks() -> None:
    imported = {parts[0] for parts in _imports(PACKAGE / "cli.py")}
    assert not imported & {"_session", "_hooks"}


def test_the_parser_sees_imports() -> None:
    # Guards the checks above against passing vacuously on a parser that misses imports.
    saver = _imports(PACKAGE / "_checkpoint" / "_saver.py")
    assert ("_checkpoint", "_directory") in saver
    assert ("_storage",) in saver
    assert ("_checkpoint",) in _imports(PACKAGE / "cli.py")
    reach = ast.parse("self._a._b\nother._c\n")
    assert {n.attr for n in ast.walk(reach) if isinstance(n, ast.Attribute)} == {"_a", "_b", "_c"}
