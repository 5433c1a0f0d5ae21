"""The package's layers: each folder of ``frmdn_worldmodels`` imports only itself and the folders before
it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "frmdn_worldmodels"
LAYERS = ("runtime", "models", "data", "games", "dream", "agent", "train", "stages", "benchmarks", "cli")


def _layer(module: str) -> str:
    """The layer of a dotted module inside the package: its first folder, or ``cli``."""
    return module.split(".")[1].removesuffix(".py") if "." in module else module


def _imports(path: Path) -> set[str]:
    """Every ``frmdn_worldmodels.*`` module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("frmdn_worldmodels."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "frmdn_worldmodels":
            found.update(f"frmdn_worldmodels.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("frmdn_worldmodels."))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name == "cli.py")


def test_every_folder_of_the_package_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders - {"configs"} == set(LAYERS) - {"cli"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    own = LAYERS.index(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
    upward = {m for m in _imports(path) if LAYERS.index(_layer(m)) > own}
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a later layer: {sorted(upward)}"


MAX_FUNCTION_LINES = 80
"""A function fits on a screen."""


def function_lengths(package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(lines, ``file:line name``) of every function and method in the package, nested ones included,
    longest first (``docs/results/layout.md`` prints the ten longest with it)."""
    lengths = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(package)}:{node.lineno} {node.name}"
                lengths.append((node.end_lineno - node.lineno + 1, where))
    return sorted(lengths, reverse=True)


def test_no_function_is_longer_than_a_screen():
    assert [item for item in function_lengths() if item[0] > MAX_FUNCTION_LINES] == []
    assert len(function_lengths()) > 500  # the walk found the package's functions
