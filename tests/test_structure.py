"""The project's structure holds: no import circle between its modules, the space loader and the
model import no Ray, and no source file grows into several jobs again.

The import graph is read from the source (``ast``), function-level imports included: a circle
hidden inside a function still ties two layers together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "coatnet"
MAX_LINES = 450  # "about 400": one idea per module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from a import b`` counts ``a.b`` when that is a
    module). Importing ``a.b`` also runs ``a/__init__``; that implicit edge is left out."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                found.add(full if full in modules else source)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_project_modules() -> None:
    modules = project_modules()
    graph = {name: imported(path, modules) for name, path in modules.items()}
    assert "coatnet.search.runner" in graph and graph["coatnet.search.runner"], graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_runner_or_the_cli() -> None:
    """The runner sits on top: nothing below it imports it (its exceptions live in errors)."""
    modules = project_modules()
    users = sorted(name for name, path in modules.items()
                   if "coatnet.search.runner" in imported(path, modules))
    assert users == [], users


@pytest.mark.parametrize("module", ["coatnet.search.space", "coatnet.search.contracts",
                                    "coatnet.search.errors", "coatnet"])
def test_module_imports_no_ray(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')"
            " or m == 'mlflow' or m.startswith('mlflow.'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_no_source_file_holds_several_jobs() -> None:
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "experiments").glob("*.py"),
               *(REPO / "benchmarks").glob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in sources
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"
