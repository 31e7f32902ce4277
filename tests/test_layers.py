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
