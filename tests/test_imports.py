"""The import picture: the layers of docs/layout.md, each importing only those below it; no cycles in
`cbd_cache` (function-level imports included), no import of `cli.py` from the library, and a cached student
that never loads teacher code."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, SMOKE

PACKAGE = ROOT / "cbd_cache"
LAYOUT = ROOT / "docs" / "layout.md"
# what a cached student must never import: teacher training, teacher loading, teacher runs
TEACHER_CODE = ("cbd_cache.stages.teachers", "cbd_cache.stages.imported", "cbd_cache.stages.export",
                "cbd_cache.stages.online", "cbd_cache.stages.crt", "cbd_cache.tools.verify", "cbd_cache.pipeline",
                "cbd_cache.experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement in the file, wherever it is."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for inner in ast.walk(node)}
    # `if TYPE_CHECKING:` imports never run: they name types for the reader, they are no edge of the graph
    typing_only = {id(inner) for node in tree.body
                   if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
        else:
            continue
        found += [(t, node.lineno, id(node) not in in_function) for t in targets]
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _, _ in imports_of(name, path, known) if t in known and t != name}
            for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; package __init__ edges count like any other."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layers() -> list[set[str]]:
    """The layer order, bottom to top, as docs/layout.md writes it once: `errors → config → ... → cli.py`,
    with `a | b` for two folders side by side (neither imports the other)."""
    line = next(m for m in re.findall(r"^(errors → .*)$", LAYOUT.read_text(), re.M))
    return [{name.strip() for name in layer.split("|")} for layer in line.split("→")]


def node(module: str) -> str:
    """A module's folder-level node: `cbd_cache.data.sources.cifar` -> `data`, `cbd_cache.views` -> `views`."""
    return module.split(".")[1]


def layer_violations(graph: dict[str, set[str]], order: list[set[str]]) -> list[str]:
    """Every import that does not point strictly down the order, and every node the order does not place."""
    rank = {name: i for i, layer in enumerate(order) for name in layer}
    bad = []
    for source, targets in sorted(graph.items()):
        if source not in rank and node(source) not in rank:
            bad.append(f"{source}: its folder {node(source)!r} has no layer in docs/layout.md")
            continue
        for target in sorted(targets):
            a, b = node(source), node(target)
            if a != b and b in rank and a in rank and rank[b] >= rank[a]:
                bad.append(f"{source} imports {target}: {b} is not below {a}")
    return bad


def folder_graph() -> dict[str, set[str]]:
    """The run-time import graph without the root package (`cbd_cache/__init__.py`: the version, no imports)."""
    return {name: {t for t in targets if t != "cbd_cache"} for name, targets in import_graph().items()
            if name != "cbd_cache"}


def test_the_layer_check_finds_an_import_that_climbs():
    order = [{"errors"}, {"config"}, {"data", "models"}, {"cache"}]
    assert layer_violations({"cbd_cache.cache.a": {"cbd_cache.data.b"}}, order) == []
    assert layer_violations({"cbd_cache.config.a": {"cbd_cache.data.b"}}, order) == [
        "cbd_cache.config.a imports cbd_cache.data.b: data is not below config"]
    assert layer_violations({"cbd_cache.data.a": {"cbd_cache.models.b"}}, order) == [      # side by side
        "cbd_cache.data.a imports cbd_cache.models.b: models is not below data"]
    assert layer_violations({"cbd_cache.grid.a": set()}, order) == [
        "cbd_cache.grid.a: its folder 'grid' has no layer in docs/layout.md"]


def test_every_folder_imports_only_the_layers_below_it():
    order = layers()
    assert order[0] == {"errors"} and order[-1] == {"cli.py"}
    graph = folder_graph()
    assert "cbd_cache.cache.reader" in graph["cbd_cache.loaders"]   # the walk sees edges
    assert not import_graph()["cbd_cache"], "cbd_cache/__init__.py holds the version and imports nothing"
    bad = layer_violations(graph, order)
    assert not bad, "\n".join(bad)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_cbd_cache_has_no_import_cycle():
    graph = import_graph()
    assert "cbd_cache.stages.student" in graph and "cbd_cache.cache.reader" in graph["cbd_cache.loaders"]   # the walk sees edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_function_level_import_of_project_code_and_others_say_why():
    mods = modules()
    bad = []
    for name, path in mods.items():
        lines = path.read_text().splitlines()
        for target, line, top in imports_of(name, path, set(mods)):
            if top:
                continue
            if target.split(".")[0] in ("cbd_cache", "cli") or "#" not in lines[line - 1]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_cli():
    mods = modules()
    offenders = [f"{name}:{line}" for name, path in mods.items()
                 for target, line, _ in imports_of(name, path, set(mods)) if target.split(".")[0] == "cli"]
    assert not offenders


CACHED_STUDENT = """
import json, sys
from cbd_cache.config import load_config
from cbd_cache.system.runtime import make_runtime
from cbd_cache.stages.student import plan_student, train_student
from cbd_cache.workdir import Workdir
cfg = load_config(sys.argv[1], ["student.epochs=1", "student.name=boundary"])
wd = Workdir(__import__("pathlib").Path(sys.argv[2]))
ckpt = train_student(cfg, wd, make_runtime(cfg.pipeline), plan_student(cfg, wd))
print(json.dumps({"checkpoint": str(ckpt), "modules": sorted(m for m in sys.modules if m.startswith("cbd_cache"))}))
"""


def test_a_cached_student_run_imports_no_teacher_code(smoke_copy):
    out = subprocess.run([sys.executable, "-c", CACHED_STUDENT, str(SMOKE), str(smoke_copy.root)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["checkpoint"]).is_file()                  # it really trained
    assert "cbd_cache.stages.student" in result["modules"] and "cbd_cache.cache.reader" in result["modules"]
    loaded = [m for m in result["modules"] if m.startswith(TEACHER_CODE)]
    assert not loaded, f"a cached student imported {loaded}"
