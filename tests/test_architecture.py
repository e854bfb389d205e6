"""The shape of the code: imports flow one way without circles, and distributed/ stays a thin shell."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("groundtruth", "training", "eval", "distributed")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a package may import only those before it


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(("selfexplain", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return mods


def _layer(module: str) -> int:
    return LAYER[module.split(".")[1]]


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (a function-level import counts too)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in mods and m != name}


def test_no_import_circles_and_no_import_runs_back_up_the_layers():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if _layer(b) > _layer(a))
    assert not upward, upward
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join(path[path.index(dep):] + [dep]) \
                if dep in path else dep
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_import_of_the_project_goes_through_the_selfexplain_package():
    """A bare `import training...` would load a second copy of a module (and its registries) beside the
    installed `selfexplain.training`, or find another distribution's top-level package of that name."""
    bare = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] in (".venv", "runs", ".cache", "build"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names if name.split(".")[0] in LAYER]
    assert not bare, bare


def test_no_function_in_distributed_is_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "distributed").rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_every_registry_refuses_a_second_item_of_one_name():
    from selfexplain.eval.rows import ROW_KINDS, register_row_kind
    from selfexplain.groundtruth.tasks import TASKS, register_task
    from selfexplain.training.controls import TRAINED_CONTROLS, register_trained_control

    for register_one, registry in ((register_task, TASKS), (register_row_kind, ROW_KINDS),
                                   (register_trained_control, TRAINED_CONTROLS)):
        before = dict(registry)
        with pytest.raises(ValueError, match="registered twice"):
            register_one(next(iter(registry.values())))
        assert registry == before


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string constants of a file that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    # a field's docstring is the string statement after it: documentation too
    docstrings |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                   and isinstance(node.value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_code_outside_a_tasks_own_module_names_it():
    """A task is its module (or its subpackage) plus one registry line: nothing else in the tree tells tasks
    apart by name (capabilities of the spec do). Docstrings may name one as an example."""
    import sys

    from selfexplain.groundtruth.tasks import TASKS

    named = []
    for task, spec in TASKS.items():
        home = Path(sys.modules[spec.config.__module__].__file__)
        if home.parent != ROOT / "groundtruth":
            home = home.parent  # a task of its own subpackage (groundtruth/features/)
        for pkg in PACKAGES:
            for path in sorted((ROOT / pkg).rglob("*.py")):
                if path == home or home in path.parents:
                    continue
                named += [f"{path.relative_to(ROOT)}:{line} names {task}" for line, text in _code_strings(path)
                          if task in text]
    assert not named, named
