"""The house rules on module structure: no import cycles (lazy imports included), no long files.

A function-level import hides a cycle from Python (it resolves at call time) but not from a
reader: two modules that import each other are one module split in two. So the graph is read
from the source with `ast`, every import statement counted wherever it stands.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("batchserve", "batchserve_client")
MAX_LINES = 700
SOURCE_SUFFIXES = {".py", ".html", ".js", ".css"}


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its
    __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules a module's import statements name, at any depth of the tree."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b where there is one, else a name of a.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import a.b.c` of a module we do not know (an attribute path): its nearest module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules = module_names(root, packages)
    known = set(modules)
    return {
        name: imported_modules(
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path)),
            name,
            path.name == "__init__.py",
            known,
        )
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        # graphlib lists the cycle against the edges' direction (dependencies first).
        return list(reversed(err.args[1]))
    return None


def test_no_module_imports_one_that_imports_it() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 40 and graph["batchserve.api.cli"], "the graph did not read the tree"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.sub import b\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (tmp_path / "pkg" / "sub" / "c.py").write_text(
        "import json\n\ndef g():\n    if True:\n        from .. import a\n"
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) in (
        ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"],
        ["pkg.sub.b", "pkg.sub.c", "pkg.a", "pkg.sub.b"],
        ["pkg.sub.c", "pkg.a", "pkg.sub.b", "pkg.sub.c"],
    )
    (tmp_path / "pkg" / "sub" / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_source_file_is_over_700_lines(package: str) -> None:
    sources = [p for p in (ROOT / package).rglob("*") if p.suffix in SOURCE_SUFFIXES]
    assert len(sources) > 5
    lengths = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in sources
    }
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"split these by role (at most {MAX_LINES} lines): {too_long}"
