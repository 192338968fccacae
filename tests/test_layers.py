"""The layer table of docs/DESIGN.md, read off the code: who may import whom, no circles.

Every `import` and `from ... import` of the product's own packages is read with `ast` (those
inside functions too: a late import is still a dependency), so the picture cannot drift from
the design without this test saying where.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("agent", "session", "training", "handoff", "kernels", "state_schema", "export", "scripts",
        "tests")
# Product code reaches its folders only as `baton.<folder>` (baton/__init__.py, DESIGN.md "Import
# names"): a bare `kernels` is Hugging Face's package, and the other folder names are common words.
# `agent` (the entry script) and `tests` (pytest's package) are the two bare names.
BARE_OK = ("agent", "tests")

# layer -> the layers it may import (itself always). Mirrors DESIGN.md's layer table.
ALLOWED = {
    "state_schema": set(),
    "kernels": set(),
    "handoff": {"state_schema"},
    "training": {"state_schema", "kernels"},
    "session": {"state_schema", "kernels", "training", "handoff"},
    "agent": {"state_schema", "handoff", "session"},
    "export": set(),
    "scripts": {"state_schema", "kernels", "training", "handoff", "session", "export"},
    "tests": set(OURS),
}
MAX_LINES = 500


def product_files(root: Path = ROOT) -> list[Path]:
    files = [root / "agent.py"] if (root / "agent.py").is_file() else []
    for layer in ("session", "training", "handoff", "kernels", "state_schema", "export", "scripts"):
        files += sorted((root / layer).rglob("*.py"))
    return files


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def absolute_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every dotted name that `path` imports, relative imports resolved against its folder
    (as `baton.<folder>...`, the name they have at run time)."""
    package = ["baton"] + module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Our own modules that `path` imports, by folder (`training.engine` for
    `baton.training.engine`), plus the two bare names (`agent`, `tests...`)."""
    found = set()
    for name in absolute_imports(path, root):
        if name.startswith("baton."):
            name = name[len("baton."):]
        elif name.split(".")[0] not in BARE_OK:
            continue
        if name.split(".")[0] in OURS and is_module(name, root):
            found.add(name)
    return found


def bare_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Imports of our folders by their bare names (`from training import x`): at run time
    these would be another module object, or another distribution's package altogether."""
    return {name for name in absolute_imports(path, root)
            if name.split(".")[0] in OURS and name.split(".")[0] not in BARE_OK}


def is_module(name: str, root: Path = ROOT) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> str:
    return module.split(".")[0]


def layer_violations(root: Path = ROOT) -> list[str]:
    broken = []
    for path in product_files(root):
        mine = layer_of(module_name(path, root))
        for target in imported_modules(path, root):
            theirs = layer_of(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                broken.append(f"{path.relative_to(root)} imports {target} ({mine} -> {theirs})")
    return broken


def test_every_import_follows_the_layer_table():
    broken = layer_violations()
    assert not broken, "imports that break DESIGN.md's layer table:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", product_files() + sorted((ROOT / "tests").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_our_folders_are_imported_only_as_baton(path):
    assert not bare_imports(path), f"{path.relative_to(ROOT)}: import these as baton.<name>"


def test_no_product_file_imports_tests():
    offenders = [str(p.relative_to(ROOT)) for p in product_files()
                 if any(layer_of(m) == "tests" for m in imported_modules(p))]
    assert not offenders, f"product files importing tests/: {offenders}"


def test_no_import_cycles_between_product_modules():
    graph = {module_name(p): {m for m in imported_modules(p) if m != module_name(p)}
             for p in product_files()}
    cycles = [cycle for cycle in (find_cycle(graph, start) for start in graph) if cycle]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def find_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """A path start -> ... -> start through the graph, or []. A package's __init__ importing
    its own submodules is how packages export names, not a cycle."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start and not start.startswith(nxt + "."):
                return path + [nxt]
            if nxt not in seen and not nxt.startswith(start + ".") and nxt in graph:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return []


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_files_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"


def test_the_checker_sees_broken_imports_and_cycles(tmp_path):
    """The reader itself, on a made-up tree: a store importing the engine (late, inside a
    function, relative or absolute) is caught, and so is a circle through two modules."""
    for folder in ("handoff", "training", "session"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "training" / "engine.py").write_text("X = 1\n")
    (tmp_path / "handoff" / "store.py").write_text("def f():\n    from baton.training import engine\n"
                                                   "from training import engine\n")
    (tmp_path / "session" / "a.py").write_text("from . import b\n")
    (tmp_path / "session" / "b.py").write_text("from .a import thing\n")
    assert sorted(layer_violations(tmp_path)) == [
        "handoff/store.py imports training (handoff -> training)",
        "handoff/store.py imports training.engine (handoff -> training)"]
    graph = {module_name(p, tmp_path): imported_modules(p, tmp_path)
             for p in product_files(tmp_path)}
    assert find_cycle(graph, "session.a") == ["session.a", "session.b", "session.a"]
    assert find_cycle(graph, "training.engine") == []
    assert bare_imports(tmp_path / "handoff" / "store.py", tmp_path) == {
        "training", "training.engine"}
