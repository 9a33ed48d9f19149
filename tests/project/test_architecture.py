"""The shape of the code: no import cycle between phitune's modules or packages (imports inside
functions count: they only hide a cycle), and the recipe's functions stay short."""

import ast
from pathlib import Path

from helpers import REPO

SRC = REPO / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "phitune").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {t for n in names if n.startswith("phitune") and (t := known(n)) and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules_or_packages():
    graph = _imports(_modules())
    assert _cycles(graph) == []

    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for m, targets in graph.items():
        packages.setdefault(package(m), set()).update(package(t) for t in targets if package(t) != package(m))
    assert _cycles(packages) == []


def test_functions_fit_a_screen_and_modules_stay_small():
    """Every function under ~60 lines (the recipe's loop included), every module under ~500."""
    long_functions, long_modules = [], []
    for path in sorted((SRC / "phitune").rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(SRC / "phitune"))
        if text.count("\n") > 500:
            long_modules.append((name, text.count("\n")))
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long_functions.append((name, n.name, n.end_lineno - n.lineno + 1))
    assert long_functions == []
    assert long_modules == []


def test_every_task_lives_in_its_own_module():
    """A name in registry.TASK_NAMES without tasks/<name>.py defining its TASK fails here (and at import)."""
    from phitune.registry import TASK_NAMES
    from phitune.tasks import TASKS

    for name in TASK_NAMES:
        assert (SRC / "phitune" / "tasks" / f"{name}.py").is_file(), name
        assert TASKS[name].name == name
        assert type(TASKS[name]).__module__ in (f"phitune.tasks.{name}", "phitune.tasks.base"), name


def _task_branches(path: Path, names: set[str]) -> list[str]:
    """`x == "ner"`, `name in ("qa", "creative")`: a comparison with a task's name. "none" (no
    task) is not one; "chat" is also a data format, so it counts only against a task or spec."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = set()
        for op in operands:
            items = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
            constants |= {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        source = ast.get_source_segment(text, node) or ""
        hits = constants & (names - {"none"})
        if hits - {"chat"} or (hits and ("task" in source or "spec" in source)):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {source}")
    return found


def test_no_branch_on_a_task_name_outside_tasks():
    """What a task does lives in its module; elsewhere code asks `TASKS[name]` (its preset, head,
    scoring, settings) instead of testing the name."""
    from phitune.registry import TASK_NAMES

    found = []
    for path in sorted((SRC / "phitune").rglob("*.py")):
        if path.parent.name != "tasks" and path.name != "registry.py":
            found += _task_branches(path, set(TASK_NAMES))
    assert found == []


def test_every_method_lives_in_a_module_of_methods():
    """Each method's settings, builder and limits are in methods/; the config's union has exactly
    the registered methods, each chosen by its name."""
    from typing import get_args

    from pydantic import TypeAdapter

    from phitune.methods import METHODS, MethodConfig

    union = TypeAdapter(MethodConfig)
    for name, method in METHODS.items():
        assert method.build.__module__.startswith("phitune.methods."), name
        assert method.settings.__module__ == method.build.__module__, name
        assert get_args(method.settings.model_fields["name"].annotation) == (name,)
        assert type(union.validate_python({"name": name})) is method.settings
    members = get_args(get_args(MethodConfig)[0])
    assert len(members) == len(METHODS)
