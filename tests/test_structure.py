"""The package's shape holds: no import cycles (every import counts, those inside
functions and under TYPE_CHECKING too), one module composes engine and store, and the
code explains itself without documents outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "slurm_mm"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                deps.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {d for d in deps if d in modules and d != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["slurm_mm.agent.supervisor"], "the graph was read"
    assert cycles(graph) == []


def _imported_names(path: Path) -> set[str]:
    return {alias.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) for alias in node.names}


def test_one_module_composes_engine_and_store():
    """Outside the engine, only the checkpointer runs a dump, a restore or a launch, and it
    is the one that commits their images; the agent and the CLI reach both through it."""
    process_ops = {"checkpoint_tree", "restore_tree", "launch"}
    outside = {n: p for n, p in _modules().items() if not n.startswith(("slurm_mm.engine", "slurm_mm.store"))}
    assert {n for n, p in outside.items() if _imported_names(p) & process_ops} == {"slurm_mm.checkpointer"}
    builds_store = {n for n, p in outside.items() for node in ast.walk(ast.parse(p.read_text()))
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ImageStore"}
    assert builds_store == {"slurm_mm.checkpointer"}, "the store is built from config in one place"
    graph = import_graph()
    for user in ("slurm_mm.agent.supervisor", "slurm_mm.agent.node_agent", "slurm_mm.cli.pid_cmds",
                 "slurm_mm.hooks"):
        assert "slurm_mm.checkpointer" in graph[user], user


def test_comments_point_at_nothing_outside_the_repository():
    pattern = re.compile(r"FACTS\.md|this VM|issue [0-9]|DESIGN invariant")
    roots = [PACKAGE, REPO / "spank", REPO / "prolog_epilog"]
    hits = [f"{p.relative_to(REPO)}:{n}" for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".py", ".c", ".h", ".sh", "") and "__pycache__" not in p.parts
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert hits == []
