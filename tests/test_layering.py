"""The analyzer and the engine do not import each other (pagellm.cli and pagellm.bench may use both).

Checked statically over every import statement, those inside functions
included, followed through the pagellm modules they reach. Importing any
``pagellm.x`` runs the top-level ``pagellm/__init__`` (the public API, which
loads the engine), so that facade counts only where a module imports it by
name (``from pagellm import LLM``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pagellm

ROOT = Path(pagellm.__file__).parent


def _modules() -> dict[str, Path]:
    return {".".join(("pagellm", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): path
            for path in ROOT.rglob("*.py")}


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pagellm modules one file's import statements run: each named module and its parent packages."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):    # a submodule, or else a name defined in the module
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} | {name}
    return found & modules.keys()


def _reachable(package: str) -> set[str]:
    modules = _modules()
    todo = [name for name in modules if name.startswith(package + ".") or name == package]
    seen = set(todo)
    while todo:
        new = _imported(modules[todo.pop()], modules) - seen
        seen |= new
        todo += new
    return seen


@pytest.mark.parametrize("package, forbidden", [("pagellm.analysis", "pagellm.engine"),
                                                ("pagellm.engine", "pagellm.analysis")])
def test_package_imports_nothing_of_the_other(package, forbidden):
    reached = _reachable(package)
    assert not {name for name in reached if name == forbidden or name.startswith(forbidden + ".")}


def test_the_check_sees_imports_inside_functions_and_through_the_facade(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from pagellm import LLM, sizing\n\ndef f():\n    import pagellm.engine.llm_engine\n")
    assert _imported(path, _modules()) == {"pagellm", "pagellm.sizing", "pagellm.engine", "pagellm.engine.llm_engine"}
    assert "pagellm.engine.llm_engine" in _reachable("pagellm.llm")
