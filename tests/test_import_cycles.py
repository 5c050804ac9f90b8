"""No import cycle among the project's packages, counting imports inside functions too.

A cycle hidden in a function (the command line importing the demo, the demo importing the
command line) works until someone moves an import to the top of a file; the graph here is read
from the source with `ast`, so it sees every `import`, `from ... import` and
`importlib.import_module("literal")`, wherever it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

from outputs import ROOT

PACKAGES = ("pipeline", "demo", "train", "queries", "bench")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of PACKAGES (a package's own name for its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name the file imports, resolved (relative imports) but not yet checked."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports. Importing a.b.c also runs the __init__ of a and
    a.b, except those of the importer's own packages, which are already being imported."""
    modules = project_modules(root)
    graph = {}
    for module, path in modules.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            targets.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                           if p in modules and p not in own)
        graph[module] = targets  # a module importing itself (a worker's warm-up) is no cycle
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_function_level_and_relative_imports(tmp_path: Path):
    """The checker itself: a cycle closed only by an import inside a function, or by a relative
    import, is found; a package whose __init__ imports its own submodules is not a cycle."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "cli.py").write_text("def main():\n    from demo.build import go\n")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "__init__.py").write_text("from . import server\n")
    (tmp_path / "demo" / "server.py").write_text("import demo.build\n")
    (tmp_path / "demo" / "build.py").write_text("from .server import X\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.cli"] == {"demo", "demo.build"}
    assert graph["demo"] == {"demo.server"}
    assert set(find_cycle(graph)) == {"demo.build", "demo.server"}
    (tmp_path / "demo" / "build.py").write_text("import importlib\nimportlib.import_module('pipeline.cli')\n")
    (tmp_path / "demo" / "server.py").write_text("")
    assert set(find_cycle(import_graph(tmp_path))) == {"demo.build", "pipeline.cli"}
    (tmp_path / "demo" / "build.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) is None


def test_the_two_halves_of_train_stay_apart():
    """train.pretraining and train.downstream never import each other, and neither imports a
    program (a module at train/'s top other than train.model, which both use)."""
    graph = import_graph()
    programs = {m for m in graph if m.count(".") == 1 and m.startswith("train.") and m != "train.model"}
    assert {"train.pretrain", "train.finetune", "train.transfer"} <= programs
    for half, other in (("train.pretraining", "train.downstream"), ("train.downstream", "train.pretraining")):
        modules = [m for m in graph if m == half or m.startswith(half + ".")]
        assert modules
        for module in modules:
            crossing = {t for t in graph[module] if t == other or t.startswith(other + ".") or t in programs}
            assert not crossing, f"{module} imports {sorted(crossing)}"
