"""The package's plan, checked: every module of `helpers/` sits in one layer and imports only from its own layer or
the layers below it, and no modules import each other in a circle (function-level imports count too)."""
import ast
from pathlib import Path

from helpers.core.paths import PACKAGE_DIR

LAYERS = ("core", "sources", "tasks", "models", "techniques", "studies", "notebook")
"""Bottom to top: the base every layer shares, registry files, data, models, techniques, studies, notebook plumbing."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_helpers(path: Path, modules: set[str]) -> set[str]:
    """The modules of `helpers` that `path` imports anywhere in its body (`from helpers.x import y` counts `x.y`
    where that is a module, else `x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("helpers.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    return {name: imported_helpers(path, modules) - {name} for name, path in paths.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    assert len(parts) > 2 and parts[1] in LAYERS or module == "helpers" or module.endswith("__init__"), (
        f"{module} sits in no layer: put it in one of helpers/{{{','.join(LAYERS)}}}/")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} imports {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(module)]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle a depth-first walk meets (each as the modules around it, the first repeated at the end)."""
    state: dict[str, str] = {}
    found = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_sits_in_a_layer_and_imports_nothing_above_it():
    assert not upward_imports(import_graph())


def test_no_modules_import_each_other_in_a_circle():
    assert not circles(import_graph())


def test_the_checks_see_a_planted_upward_import_and_circle():
    graph = {"helpers.core.a": {"helpers.studies.b"}, "helpers.studies.b": {"helpers.techniques.c"},
             "helpers.techniques.c": {"helpers.core.a"}}
    assert upward_imports(graph) == ["helpers.core.a imports helpers.studies.b"]
    assert circles(graph) == [["helpers.core.a", "helpers.studies.b", "helpers.techniques.c", "helpers.core.a"]]
