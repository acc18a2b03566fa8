"""The stages meet only at the cache: the import graph of pipeline/ (every import, at module level or inside a
function) has no circle, stage one reaches nothing of stage two, and stage two nothing of stage one
(docs/DESIGN.md §5)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
STAGE_ONE = {"finetune", "extract", "corpus", "teacher_pass"}  # teacher -> cache
STAGE_TWO = {"train", "step", "losses", "student", "select", "batches", "gather", "general", "checkpoint", "report"}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PIPELINE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                deps |= {a.name for a in node.names if (PIPELINE / f"{a.name}.py").exists()}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    circles = sorted(module for module in graph if module in reachable(graph, module))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_stages_meet_only_at_the_cache() -> None:
    graph = import_graph()
    assert STAGE_ONE | STAGE_TWO <= graph.keys()  # a renamed module must be renamed here too
    for module in STAGE_ONE:
        assert not reachable(graph, module) & STAGE_TWO, f"stage one's {module} reaches stage two"
    for module in STAGE_TWO:
        assert not reachable(graph, module) & STAGE_ONE, f"stage two's {module} reaches stage one"


def test_the_check_sees_a_planted_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph reader finds an import inside a function, the kind that hid the old circles."""
    for name, body in {"a": "def f():\n    from pipeline.b import g\n", "b": "from pipeline import a\n"}.items():
        (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.setattr(sys.modules[__name__], "PIPELINE", tmp_path)
    graph = import_graph()
    assert graph == {"a": {"b"}, "b": {"a"}} and "a" in reachable(graph, "a")
