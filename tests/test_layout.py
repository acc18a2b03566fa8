"""The layout shows the architecture (docs/DESIGN.md §5): pipeline/ is one package per stage, and the import graph
(every import, at module level or inside a function) follows the package rule below, with no arrow back up and no
circle between modules. The stages meet only at the cache: teacher, negatives and student import core and cache,
never each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"

# Which packages each package's modules may import (itself included). `pipeline/__init__.py` itself (the version)
# imports nothing and may be read by all.
ALLOWED = {
    "core": {"core"},  # shared by every stage
    "cache": {"core", "cache"},  # the contract between the stages
    "teacher": {"core", "cache", "teacher"},  # stages zero and one: teacher -> cache
    "negatives": {"core", "cache", "negatives"},  # build-negatives: cache -> negatives file
    "student": {"core", "cache", "student"},  # stage two: cache -> student
    "apps": {"core", "cache", "teacher", "negatives", "student", "apps"},  # tools over the whole pipeline
}
STAGES = ("teacher", "negatives", "student")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for pipeline/ and its packages ("pipeline.core" is pipeline/core/__init__.py)."""
    found = {}
    for path in PIPELINE.rglob("*.py"):
        parts = ["pipeline", *path.relative_to(PIPELINE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Dotted module -> the pipeline modules it imports (a package when the name is no module of it)."""
    known = modules()

    def resolve(module: str, names: list[str]) -> set[str]:
        if not names:
            return {module}
        return {f"{module}.{n}" if f"{module}.{n}" in known else module for n in names}

    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from its package, one level up per extra dot
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([module] if module else []))
                if module == "pipeline" or module.startswith("pipeline."):
                    deps |= resolve(module, [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name == "pipeline" or a.name.startswith("pipeline.")}
        graph[name] = deps - {name}
    return graph


def package_of(module: str) -> str | None:
    """"core" for pipeline.core and pipeline.core.config; None for pipeline/__init__.py."""
    return module.split(".")[1] if "." in module else None


def arrows_against_the_rule(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for every import the package rule forbids: an arrow back up or across the stages."""
    wrong = []
    for module, deps in sorted(graph.items()):
        if package_of(module) is None:  # pipeline/__init__.py (the version) imports nothing of pipeline
            wrong += [(module, dep) for dep in sorted(deps)]
        else:  # and every package may read it
            allowed = ALLOWED[package_of(module)] | {None}
            wrong += [(module, dep) for dep in sorted(deps) if package_of(dep) not in allowed]
    return wrong


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def circles(graph: dict[str, set[str]]) -> list[str]:
    return sorted(module for module in graph if module in reachable(graph, module))


def test_every_module_is_in_a_package_of_the_rule() -> None:
    """A new module goes into one of the packages (DESIGN.md §5 says which); a new package is added to ALLOWED."""
    names = modules()
    assert {package_of(m) for m in names} == {None, *ALLOWED}, "a package without a rule, or one of the rule's gone"
    assert [m for m in names if package_of(m) is None] == ["pipeline"], "a module left directly in pipeline/"
    for package in ALLOWED:
        assert ast.get_docstring(ast.parse((PIPELINE / package / "__init__.py").read_text())), f"{package} says nothing"


def test_the_import_graph_has_no_circle() -> None:
    assert not circles(import_graph()), f"modules on an import circle: {circles(import_graph())}"


def test_every_import_follows_the_package_rule() -> None:
    """core imports no other package; cache only core; teacher, negatives and student only core and cache; apps any."""
    graph = import_graph()
    assert {"pipeline.cache.format", "pipeline.teacher.extract", "pipeline.student.train"} <= graph.keys()
    assert not arrows_against_the_rule(graph)


def test_the_stages_meet_only_at_the_cache() -> None:
    """Not even through another module: nothing a stage's module reaches belongs to another stage or to apps."""
    graph = import_graph()
    for module in graph:
        if package_of(module) in STAGES:
            others = {package_of(dep) for dep in reachable(graph, module)} - {package_of(module), "core", "cache", None}
            assert not others, f"{module} reaches {others}"


def plant(root: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """A pipeline/ of the given files (relative path -> source), every package with its __init__.py."""
    (root / "__init__.py").write_text("")
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(body)
    monkeypatch.setattr(sys.modules[__name__], "PIPELINE", root)
    return import_graph()


def test_the_check_sees_a_planted_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph reader finds an import inside a function, the kind that hid the old circles."""
    graph = plant(tmp_path, {"core/a.py": "def f():\n    from pipeline.core.b import g\n",
                             "core/b.py": "from pipeline.core import a\n"}, monkeypatch)
    assert graph["pipeline.core.a"] == {"pipeline.core.b"} and graph["pipeline.core.b"] == {"pipeline.core.a"}
    assert circles(graph) == ["pipeline.core.a", "pipeline.core.b"]
    assert not arrows_against_the_rule(graph)


@pytest.mark.parametrize("body", [
    "def f():\n    from pipeline.student.train import g\n",  # inside a function
    "import pipeline.student.train as train\n",
    "from pipeline.student import train\n",
    "from ..student import train\n",  # relative
])
def test_the_check_sees_a_planted_arrow_back_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """A core module importing stage two is an arrow back up, however it is written, even with no circle."""
    graph = plant(tmp_path, {"core/config.py": body, "student/train.py": "from pipeline.core import config\n",
                             "teacher/extract.py": "from pipeline.cache import format\n", "cache/format.py": ""},
                  monkeypatch)
    assert graph["pipeline.core.config"] == {"pipeline.student.train"}
    assert arrows_against_the_rule(graph) == [("pipeline.core.config", "pipeline.student.train")]


def test_the_check_sees_a_planted_arrow_across_the_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage two reading stage one, directly or through apps, breaks the rule; apps reading both does not."""
    graph = plant(tmp_path, {"student/train.py": "from pipeline.teacher.extract import extract\n",
                             "teacher/extract.py": "", "apps/demo.py": "from pipeline.student import train\n"},
                  monkeypatch)
    assert arrows_against_the_rule(graph) == [("pipeline.student.train", "pipeline.teacher.extract")]
