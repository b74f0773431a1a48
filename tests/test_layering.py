"""The package reads top-down: each layer imports only from layers below it, no decoding method imports
another, and no library module hides an import inside a function (docs/engine.md has the map)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lower numbers are lower layers; a module may import from its own layer and the ones below.
LAYERS = {
    "eej.config": 0, "eej.settings": 0, "eej.jsonl": 0, "eej.local_cache": 0, "eej.files": 0,
    "eej.model": 1,
    "eej.weights": 2, "eej.parallel": 2, "eej.kernels": 2,
    "eej.decoding": 3,
    "eej.experts": 4, "eej.train": 4,
    "eej.bench": 5,
    "eej.api": 6, "eej.testing": 6,
    "eej.cli": 7, "eej.__main__": 7, "eej": 7,
}
METHOD_MODULES = ("kangaroo", "skipdecode", "specee", "m2r2")


def _modules() -> list[tuple[str, str]]:
    """(module name, path) of every module of the eej package (kernels/ installs as eej.kernels)."""
    out = []
    for folder, package in (("eej", "eej"), ("kernels", "eej.kernels")):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(directory, name), os.path.join(ROOT, folder))[:-3].split(os.sep)
                    module = ".".join([package, *rel])
                    out.append((module.removesuffix(".__init__"), os.path.join(directory, name)))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def _imports(path: str) -> list[tuple[str, bool]]:
    """(imported eej module, whether the import sits inside a function) for every eej import in the file."""
    tree = ast.parse(open(path).read())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eej":
            out += [(node.module, id(node) in local)]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in local) for a in node.names if a.name.split(".")[0] == "eej"]
    return out


MODULES = _modules()


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_run_down_the_layers(module, path):
    for target, _ in _imports(path):
        assert _layer(target) <= _layer(module), f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_eej_import_inside_a_function(module, path):
    local = [target for target, inside in _imports(path) if inside]
    assert not local, f"{module} imports {', '.join(local)} inside a function"


@pytest.mark.parametrize("method", METHOD_MODULES)
def test_no_decoding_method_imports_another(method):
    path = os.path.join(ROOT, "eej", "decoding", f"{method}.py")
    others = {f"eej.decoding.{m}" for m in METHOD_MODULES if m != method}
    assert not others & {target for target, _ in _imports(path)}
