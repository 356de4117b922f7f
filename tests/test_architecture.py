"""The house rules of the package layout (docs/ARCHITECTURE.md), checked on the source itself.

Imports between the package's own modules point down the layers (no cycle; a layer never imports a layer
above it), no module is longer than 600 lines, and at most 10 imports of the package's own modules are made
inside functions.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "linadapt"

# bottom to top; a module may import its own layer and the layers below it. Top-level modules not listed
# (the private helpers, metrics, distributed) are the foundation every layer may use.
LAYERS = ["jacobian", "kernels", "likelihoods", "inference", "estimators", "io", "experiments", "app"]
FOUNDATION = {
    "_blocks",
    "_files",
    "_inputs",
    "_memory",
    "_progress",
    "_validation",
    "_version",
    "metrics",
    "distributed",
}
MAX_LINES = 600
MAX_LAZY = 10


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported linadapt module, whether inside a function) for every import of the package's own modules;
    relative imports are resolved against the file's package, and imports under ``if TYPE_CHECKING:`` (its
    body, not its ``else``) are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside_src = SRC.parent in path.resolve().parents
    name = _module_name(path) if inside_src else "linadapt._probe"
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = _modules()
    out: list[tuple[str, bool]] = []

    def absolute(node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def record(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.ImportFrom):
            module = absolute(node)
            if module and module.split(".")[0] == "linadapt":
                # ``from pkg import mod`` depends on the module mod; ``from mod import name`` on mod
                subs = [f"{module}.{a.name}" for a in node.names]
                out.extend((s if s in known else module, in_function) for s in subs)
        elif isinstance(node, ast.Import):
            out.extend((a.name, in_function) for a in node.names if a.name.split(".")[0] == "linadapt")

    def visit(nodes: list[ast.AST], in_function: bool) -> None:
        for child in nodes:
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                visit(child.orelse, in_function)
                continue
            record(child, in_function)
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(list(ast.iter_child_nodes(child)), inside)

    visit(tree.body, False)
    return out


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (``linadapt.x.y`` of ``from linadapt.x import y``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in FOUNDATION or parts[1] in ("__init__", "__main__"):
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_subpackage_is_a_known_layer() -> None:
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(LAYERS)
    top = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert top == FOUNDATION


def test_imports_point_down_the_layers_and_have_no_cycle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    upward = []
    for name, path in modules.items():
        deps = set()
        for imported, _ in _imports(path):
            target = _resolve(imported, modules)
            if target == "linadapt" and name not in ("linadapt", "linadapt.__main__"):
                upward.append(f"{name} -> linadapt (the package's public face is above every layer)")
                continue
            if target is None or target == name or target == "linadapt":
                continue
            if target.startswith(name + ".") and path.name == "__init__.py":
                deps.add(target)  # a package importing its own modules (re-exports)
                continue
            deps.add(target)
            mine, theirs = _layer(name), _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
            if mine is None and theirs is not None and name.split(".")[1] in FOUNDATION:
                upward.append(f"{name} (foundation) -> {target}")
        graph[name] = deps
    assert not upward, "imports pointing up the layers: " + ", ".join(sorted(upward))
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_longer_than_the_limit(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (at most {MAX_LINES})"


def test_few_imports_of_the_package_inside_functions() -> None:
    statements = _lazy_statements()
    assert len(statements) <= MAX_LAZY, "imports of linadapt inside functions:\n" + "\n".join(statements)


def _lazy_statements() -> list[str]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("linadapt"):
                        out.append(f"{name}:{inner.lineno} from {inner.module}")
                    elif isinstance(inner, ast.Import) and any(a.name.startswith("linadapt") for a in inner.names):
                        out.append(f"{name}:{inner.lineno} import")
    return sorted(set(out))


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The cycle finder and the lazy-import counter see what they are meant to see."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from linadapt.jacobian import held\n\nfrom linadapt.app import cli\n")
    found = _imports(a)
    assert ("linadapt.jacobian.held", True) in found and ("linadapt.app.cli", False) in found
    guarded = tmp_path / "b.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from linadapt.app import cli\n")
    assert _imports(guarded) == []
    guarded.write_text("if TYPE_CHECKING:\n    pass\nelse:\n    from linadapt.app import cli\n")
    assert _imports(guarded) == [("linadapt.app.cli", False)]
    relative = SRC / "jacobian" / "_relative_probe.py"  # resolved against its package, then removed
    try:
        relative.write_text("from .held import HeldJacobian\nfrom ..app import cli\n")
        assert _imports(relative) == [("linadapt.jacobian.held", False), ("linadapt.app.cli", False)]
    finally:
        relative.unlink()
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
