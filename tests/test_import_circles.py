"""No import circle in the package: every module imports when it is the first of the package a process imports, and
the import graph -- type-only imports (``if TYPE_CHECKING:``) and imports inside functions included -- has no cycle.

A circle can hide behind the order in which modules happen to be imported (``import rails_lightning.x`` works when
something imported ``rails_lightning.y`` first); a type-only or deferred one runs nothing at import but still ties
two modules together. The first test catches the former by importing each module first in a fresh process, the
second the latter by reading the imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "rails_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}

# Runs in a fresh interpreter: the third-party modules the package imports are loaded once, then each module of the
# package is imported in a forked child of that interpreter, with no module of the package loaded before it.
EACH_FIRST = """
import importlib, os, sys, traceback
for name in sys.argv[2].split():
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not any(m.split(".")[0] == "rails_lightning" for m in sys.modules)
failed = []
for name in sys.argv[1].split():
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
"""


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every absolute import statement in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def dependencies(name: str) -> set[str]:
    """The package's modules that importing ``name`` runs: each imported module, the packages above it that ``name``
    is not inside itself (those are being initialised already), and for ``from P import n`` both P and P.n."""
    targets = set()
    for module, names in imports(MODULES[name]):
        targets.add(module)
        targets.update(f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES)
    runs = set()
    for target in targets:
        parts = target.split(".")
        runs.update(".".join(parts[:i]) for i in range(1, len(parts)) if not name.startswith(".".join(parts[:i]) + "."))
        runs.add(target)
    return {module for module in runs if module in MODULES and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node), on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_finds_a_circle_through_a_package_and_a_type_only_one(tmp_path):
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": {"r"}, "r": set()}
    assert cycles(graph) == [["p", "p.a", "p.b"]]
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rails_lightning.models import RetrievalModule\n"
                      "def f():\n    import rails_lightning.similarity.mol.scoring as scoring\n")  # fmt: skip
    assert imports(module) == [("typing", ["TYPE_CHECKING"]), ("rails_lightning.models", ["RetrievalModule"]),
                               ("rails_lightning.similarity.mol.scoring", [])]  # fmt: skip


def test_the_package_imports_have_no_cycle():
    graph = {name: dependencies(name) for name in MODULES}
    assert cycles(graph) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first_in_a_fresh_process():
    third_party = sorted(
        {module.split(".")[0] for path in MODULES.values() for module, _ in imports(path)} - {"rails_lightning", "__future__"}
    )
    result = subprocess.run([sys.executable, "-c", EACH_FIRST, " ".join(MODULES), " ".join(third_party)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    failed = result.stdout.strip().splitlines()[-1].removeprefix("FAILED:").split()
    assert failed == [], result.stderr[-3000:]
