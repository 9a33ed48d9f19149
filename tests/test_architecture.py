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
