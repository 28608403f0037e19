"""No module of the package or of the benchmarks reaches for a ``_private`` name of another of the project's
modules: neither ``from rails_lightning.x import _name`` nor ``x._name`` on an imported project module.
What another module needs is public (``rails_lightning.runtime.keep_freed_memory``, ``reports.format_cell``)."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO

SOURCES = sorted([*(REPO / "rails_lightning").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")])
BENCHMARK_MODULES = {path.stem for path in (REPO / "benchmarks").glob("*.py")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_module(name: str | None) -> bool:
    return bool(name) and (name.split(".")[0] == "rails_lightning" or name.split(".")[0] in BENCHMARK_MODULES)


def private_imports(source: str) -> list[str]:
    """``module.name`` for every private name of a project module that ``source`` imports or reads off a module."""
    tree = ast.parse(source)
    found, modules = [], {}  # modules: local name -> the project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _project_module(node.module):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{node.module}.{alias.name}")
                else:  # `from rails_lightning import report` binds a module as well
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _project_module(alias.name):
                    found += [f"{alias.name} ({part})" for part in alias.name.split(".") if _private(part)]
                    if alias.asname:  # `import rails_lightning.runs as runs`
                        modules[alias.asname] = alias.name
                    else:  # `import rails_lightning.runs` binds `rails_lightning`
                        modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules and _private(node.attr):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return found


def test_the_check_finds_each_way_of_reaching_a_private_name():
    source = ("from rails_lightning.cli import _keep_freed_memory, main\n"
              "from rails_lightning import report\n"
              "import rails_lightning.runs as runs\n"
              "import train_step_cost\n"
              "report._fmt(1); runs._read(); train_step_cost._setup(); main.__doc__\n")
    assert sorted(private_imports(source)) == ["rails_lightning.cli._keep_freed_memory", "rails_lightning.report._fmt",
                                               "rails_lightning.runs._read", "train_step_cost._setup"]
    assert private_imports("import torch\ntorch._C\nfrom torch._dynamo import config\n") == []  # not the project's


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_no_private_name_of_another_module(path):
    assert private_imports(path.read_text()) == []
