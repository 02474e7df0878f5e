"""The layering docs/design.md draws, checked on the source: which package imports which, no reach
into another package's private modules, and no module too big to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "genie"
KERNELS = Path(__file__).resolve().parent.parent / "kernels"
MAX_LINES = 600
# package -> the packages it may import (docs/design.md's arrows); the shared modules below them all
# (_errors, _dtypes, _profile) may be imported by anyone
ALLOWED = {
    "graph": set(),
    "semantic": {"graph"},
    "transport": set(),
    "runtime": {"graph", "semantic", "transport"},
    "lazy": {"graph", "runtime"},
    "server": {"graph", "transport", "kernels"},
    "ray": {"transport"},  # the pool runs `genie serve` processes; it picks their ports by transport's helper
}
SHARED = {"_errors", "_dtypes", "_profile"}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def _modules() -> list[tuple[Path, str]]:
    """Each source file and the package it belongs to ("" for genie's top-level modules)."""
    return [(f, f.relative_to(SRC).parts[0] if len(f.relative_to(SRC).parts) > 1 else "")
            for f in sorted(SRC.rglob("*.py"))]


def test_no_package_reaches_into_another_packages_private_modules():
    bad = []
    for f, pkg in _modules():
        for line, name in _imports(f):
            parts = name.split(".")
            if parts[0] != "genie" or len(parts) < 3:
                continue
            if parts[1] != pkg and parts[2].startswith("_") and not parts[2].startswith("__"):
                bad.append(f"{f.relative_to(SRC)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_imports_follow_the_layers():
    bad = []
    for f, pkg in _modules():
        if pkg not in ALLOWED:
            continue
        for line, name in _imports(f):
            parts = name.split(".")
            if parts[0] != "genie" or len(parts) < 2 or parts[1] in (pkg, *SHARED):
                continue
            if parts[1] not in ALLOWED[pkg]:
                bad.append(f"{f.relative_to(SRC)}:{line}: {pkg} imports {parts[1]}")
    assert not bad, "\n".join(bad)


def test_kernels_import_nothing_from_genie():
    for f in KERNELS.rglob("*.py"):
        assert not [n for _, n in _imports(f) if n.split(".")[0] == "genie"], f


@pytest.mark.parametrize("root", [SRC, KERNELS], ids=["src", "kernels"])
def test_no_module_is_over_600_lines(root):
    long = {str(f.relative_to(root)): n for f in root.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long
