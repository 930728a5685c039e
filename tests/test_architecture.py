"""The design's rules, read from the source: data -> training -> index -> app, no import cycles, short files.

Every module under vdsh/ is parsed with `ast`; every import counts, including those inside functions.
Only explicit imports are edges: importing `vdsh.index.codes` does not count as importing `vdsh.index`.
A broken rule fails with the offending edges, cycle or file named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vdsh"
MAX_LINES = 400
LONG_FILE_REASON = "over 400 lines"  # a longer module's docstring says why, with these words


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The vdsh modules that `name`'s source imports: `from pkg import module` is the module itself,
    `from module import name` is the module, relative imports are resolved against `name`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                      for alias in node.names}
    return {module for module in found if module == "vdsh" or module.startswith("vdsh.")}


GRAPH: dict[str, set[str]] = {
    name: imported_modules(name, path.name == "__init__.py", path.read_text(), set(MODULES))
    for name, path in MODULES.items()
}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return sorted(found)


def describe_cycles(graph: dict[str, set[str]]) -> str:
    return "; ".join(", ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component)
                     for component in cycles(graph))


def test_the_parser_sees_imports_inside_functions_relative_ones_and_submodules():
    source = (
        "import os\nimport vdsh.files\nfrom vdsh.index import codes, KINDS\nfrom . import sibling\n"
        "from ..data.paths import data_root\n\ndef f():\n    from vdsh.app.server import catalog\n"
    )
    known = {"vdsh.files", "vdsh.index", "vdsh.index.codes", "vdsh.training.sibling", "vdsh.data.paths",
             "vdsh.app.server.catalog"}
    assert imported_modules("vdsh.training.trainer", False, source, known) == {
        "vdsh.files", "vdsh.index.codes", "vdsh.index", "vdsh.training.sibling", "vdsh.data.paths",
        "vdsh.app.server.catalog"}
    assert imported_modules("vdsh.training", True, "from . import sibling\n", known) == {"vdsh.training.sibling"}


def test_cycles_finds_every_loop_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d"]]
    assert describe_cycles(graph) == "a -> b, b -> c, c -> a; d -> d"
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert not cycles(GRAPH), f"import cycles: {describe_cycles(GRAPH)}"


ALLOWED_FROM_INDEX_IN_TRAINING = {"vdsh.index.codes", "vdsh.index.metrics"}
RULES = {
    "index imports nothing from training or app": (
        "vdsh.index", lambda m: under(m, "vdsh.training") or under(m, "vdsh.app")),
    "data imports nothing from training, index or app": (
        "vdsh.data", lambda m: any(under(m, p) for p in ("vdsh.training", "vdsh.index", "vdsh.app"))),
    "training imports nothing from app, and from index only codes and metrics": (
        "vdsh.training",
        lambda m: under(m, "vdsh.app") or (under(m, "vdsh.index") and m not in ALLOWED_FROM_INDEX_IN_TRAINING)),
    "the server imports no trainer": (
        "vdsh.app.server", lambda m: under(m, "vdsh.training.trainers")),
}


@pytest.mark.parametrize("rule", RULES)
def test_layering(rule):
    package, forbidden = RULES[rule]
    assert package in MODULES, f"{package} is gone: update this rule"
    edges = [f"{source} -> {target}" for source in sorted(GRAPH) if under(source, package)
             for target in sorted(GRAPH[source]) if forbidden(target)]
    assert not edges, f"{rule}, but: " + ", ".join(edges)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE.parent).as_posix())
def test_no_file_over_400_lines_without_a_reason(path):
    source = path.read_text()
    lines = len(source.splitlines())
    docstring = ast.get_docstring(ast.parse(source)) or ""
    assert lines <= MAX_LINES or LONG_FILE_REASON in docstring, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines and its docstring does not say why "
        f"(with the words {LONG_FILE_REASON!r})")
