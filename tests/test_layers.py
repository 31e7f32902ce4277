"""The package's layers (src/stage1/base, data, model, train, cli): each imports only the layers below it, and data
and model not each other, so a newcomer can read one without the others."""

import json
import pkgutil
import subprocess
import sys

import pytest

import stage1

ALLOWED = {"base": {"base"}, "data": {"base", "data"}, "model": {"base", "model"},
           "train": {"base", "data", "model", "train"}}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    modules = [f"stage1.{layer}.{m.name}" for m in pkgutil.iter_modules([f"{stage1.__path__[0]}/{layer}"])]
    assert modules
    probe = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
             "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('stage1.')})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                                       check=True).stdout)
    assert set(loaded) <= ALLOWED[layer], (layer, sorted(set(loaded) - ALLOWED[layer]))


def imports_of(path, package: str) -> set[str]:
    """The stage1 modules one file imports, at any depth of its code (an import inside a function is still an edge)
    except under `if TYPE_CHECKING:` (annotations only)."""
    import ast

    found, tree = set(), ast.parse(open(path).read())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        found |= {f"{target}.{a.name}" for a in node.names} | {target}
    return found


def test_the_model_layer_has_no_import_cycle():
    import os

    root = os.path.join(stage1.__path__[0], "model")
    modules = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = ("stage1." + os.path.relpath(path[:-3], stage1.__path__[0]).replace(os.sep, ".")
                          ).removesuffix(".__init__")
                modules[dotted] = (path, dotted if name == "__init__.py" else dotted.rsplit(".", 1)[0])
    graph = {m: {t for t in imports_of(path, package) if t in modules and t != m}
             for m, (path, package) in modules.items()}
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "stage1.model.quantizers.single" in graph["stage1.model.quantizers"]  # the graph sees the imports
    assert cycles == []
