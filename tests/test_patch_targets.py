"""Every name that a test or benchmark patches or reads on one of the package's modules exists there.

The CUDA tier and the GPU benchmarks run only on a GPU, so a name left behind when code moves between modules
(``monkeypatch.setattr(module, "name", ...)`` raises for a missing name; ``module.name`` too) would first fail on a
lent GPU's few minutes: session 18 moved ``_RECORDED`` out of ``lora_linear`` and a CUDA test kept patching it there.
This reads the test and benchmark files (no test runs) and checks each such name against the module it names.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")])
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _module(name: str) -> types.ModuleType | None:
    return importlib.import_module(name) if name.startswith("adapter_engine") else None


def _bound_here(node: ast.AST) -> dict[str, types.ModuleType | None]:
    """Names a statement binds in its scope: a module of the package, or None (anything else, which hides an outer
    alias of that name)."""
    bound: dict[str, types.ModuleType | None] = {}
    if isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
            obj = None
            if node.module.startswith("adapter_engine"):
                obj = getattr(_module(node.module), alias.name, None)
                if obj is None:  # a submodule not imported by its package
                    obj = _module(f"{node.module}.{alias.name}")
            bound[alias.asname or alias.name] = obj if isinstance(obj, types.ModuleType) else None
    elif isinstance(node, ast.Import):
        for alias in node.names:
            bound[alias.asname or alias.name.split(".")[0]] = None
    elif isinstance(node, ast.Assign):
        value = node.value
        is_import = (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr == "import_module" and value.args and isinstance(value.args[0], ast.Constant)
        )  # fmt: skip
        for target in node.targets:
            if isinstance(target, ast.Name):
                bound[target.id] = _module(value.args[0].value) if is_import else None
    return bound


def _references(tree: ast.Module):
    """(line, alias, module, name) of every ``alias.name`` and ``*.setattr(alias, "name", ...)`` whose alias is a
    module of the package in its scope."""
    found = []

    def visit(scope: ast.AST, aliases: dict):
        body = [scope.body] if isinstance(scope, ast.Lambda) else getattr(scope, "body", [])
        own = dict(aliases)
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):  # parameters hide outer names
            own.update({a.arg: None for a in (*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs)})
        nodes, nested = [], []
        for stmt in body:
            for node in _walk_scope(stmt):
                (nested if isinstance(node, SCOPES) else nodes).append(node)
        for node in nodes:  # the scope's bindings, wherever they are (tests import inside functions)
            own.update(_bound_here(node))
        own = {k: v for k, v in own.items() if v is not None}
        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in own:
                found.append((node.lineno, node.value.id, own[node.value.id], node.attr))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr":
                args = node.args
                if len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id in own:
                    if isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
                        found.append((node.lineno, args[0].id, own[args[0].id], args[1].value))
        for node in nested:
            visit(node, own)

    visit(tree, {})
    return found


def _walk_scope(node: ast.AST):
    """``node`` and what it holds; a nested function, lambda or class is yielded but not entered (its own scope)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if not isinstance(current, SCOPES):
            stack.extend(ast.iter_child_nodes(current))


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_names_patched_or_read_on_package_modules_exist(path):
    missing = [
        f"{path.name}:{line}: {alias}.{name} ({module.__name__} has no {name!r})"
        for line, alias, module, name in _references(ast.parse(path.read_text()))
        if not hasattr(module, name)
    ]
    assert not missing, "\n".join(missing)


def test_a_stale_name_is_found():
    """The check itself: session 18's stale patch, in a function that imports its module locally, and a module alias
    hidden by a local name of something else (not checked)."""
    code = (
        "import importlib\n"
        "ll = importlib.import_module('adapter_engine.kernels.lora_linear')\n"
        "def test_a(monkeypatch):\n"
        "    monkeypatch.setattr(ll, '_RECORDED', {})\n"
        "def test_b(monkeypatch):\n"
        "    from adapter_engine.kernels import lora_linear_tiled, lora_linear_dispatch\n"
        "    monkeypatch.setattr(lora_linear_tiled, '_RECORDED', {})\n"
        "    lora_linear_dispatch._no_such_table.clear()\n"
        "def test_c():\n"
        "    ll = object()\n"
        "    ll.anything\n"
    )
    missing = [(line, name) for line, _, module, name in _references(ast.parse(code)) if not hasattr(module, name)]
    assert missing == [(4, "_RECORDED"), (8, "_no_such_table")]
