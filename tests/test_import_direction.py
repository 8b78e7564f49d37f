"""Imports go one way (shared/ARCHITECTURE.md): protocol <- phatgoose <- client, coordinator
<- app. The client and the coordinator meet only in `protocol`; nothing imports `app`.

Every module is read with `ast` (not imported), so an import inside a function, under
`TYPE_CHECKING` or through `importlib.import_module("...")` counts as well.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the project's packages it must never import
FORBIDDEN = {
    "protocol": {"phatgoose", "client", "coordinator", "benchmarks", "app"},
    "phatgoose": {"client", "coordinator", "benchmarks", "app"},
    "client": {"coordinator", "benchmarks", "app"},
    "coordinator": {"client", "benchmarks", "app"},
    "benchmarks": {"app"},
}


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """`(line, module)` of every absolute import in a module's syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN[package]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_the_packages_above_or_beside_it(package):
    assert violations(package) == []


def test_the_check_sees_imports_wherever_they_are():
    tree = ast.parse(
        "import client.cli\n"
        "def f():\n"
        "    from coordinator import demo\n"
        "    importlib.import_module('app.cli')\n"
        "from . import sibling\n"
    )
    assert list(imported_modules(tree)) == [(1, "client.cli"), (3, "coordinator"), (4, "app.cli")]
