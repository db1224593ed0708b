"""The tree's promises about itself: the README's module map names every module, raydb has no import
cycle (function-level imports count), and the pipeline is the only registrar. Read from the source
(AST), nothing imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAYDB = REPO / "raydb"


def _modules() -> dict[str, Path]:
    """``raydb.a.b`` -> its file, packages by their ``__init__.py``."""
    out = {}
    for path in sorted(RAYDB.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The raydb modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from raydb.x import name` -> raydb.x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_raydb_has_no_import_cycle_counting_function_level_imports():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 60 and graph["raydb.pipeline"]  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_leaves_stay_leaves():
    """Error types, ids, storage (the URI parser) and config import nothing above them."""
    modules = _modules()
    allowed = {"raydb.errors": set(), "raydb.ids": set(), "raydb.storage": set(),
               "raydb.config": {"raydb.ids", "raydb.storage"}}
    for name, ok in allowed.items():
        family = {m: p for m, p in modules.items() if m == name or m.startswith(name + ".")}
        found = set().union(*(_imports(m, p, modules) for m, p in family.items())) - set(family)
        assert found <= ok, f"{name} imports {sorted(found - ok)}"


def test_the_pipeline_is_the_only_registrar():
    """Only ``raydb/pipeline.py`` calls the registry's ``register_adapter`` or ``claim_subject``."""
    callers = set()
    for name, path in _modules().items():
        if name == "raydb.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("register_adapter", "claim_subject"):
                    callers.add(name)
    assert callers == {"raydb.pipeline"}


def test_readme_module_map_names_every_module():
    """Every module appears in the README's "How it works" table: a top-level module by its path,
    a package's module by name in the row of its package (``__init__.py`` files are the rows)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## How it works"):]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`raydb/" in line]
    missing = []
    for path in _modules().values():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(REPO).as_posix()
        folder = path.parent.relative_to(REPO).as_posix() + "/"
        covered = any(f"`{rel}`" in row for row in rows) or (folder != "raydb/" and any(
            re.search(rf"`{re.escape(folder)}`", row) and f"`{path.name}`" in row for row in rows))
        if not covered:
            missing.append(rel)
    assert not missing, f"README's module map (## How it works) lacks {missing}"
