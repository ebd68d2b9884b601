"""The import directions (``LAYERS`` below, lowest first; the README's Layout section): every module imports only
from its own layer or the layers below it (function-level imports included), so kernels know nothing of models,
the objective nothing of processes, and nothing imports the demo."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the first layer that names it or a package above it.
LAYERS = [
    ("fastjepa", "fastjepa.choices", "fastjepa.mask_geometry", "fastjepa.config_sections", "fastjepa.config",
     "fastjepa.schedules", "fastjepa.spec"),
    ("fastjepa.kernels", "fastjepa.mask_batch", "fastjepa.masks"),
    ("fastjepa.modules",),
    ("fastjepa.models",),
    ("fastjepa.ijepa",),
    ("fastjepa.optim", "fastjepa.metrics", "fastjepa.checkpoint", "fastjepa.parallel", "fastjepa.data",
     "fastjepa.eval", "fastjepa.compat"),
    ("fastjepa.step", "fastjepa.resume", "fastjepa.trainer"),
    ("fastjepa.train",),
    ("fastjepa.demo",),
]


def layer_of(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it where it belongs")
    return best[0]


def package_modules():
    for path in sorted((ROOT / "fastjepa").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield "fastjepa." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


MODULES = {m for m, _ in package_modules()}


def fastjepa_imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "fastjepa":
                yield node.lineno, name


def upward_imports(modules=None):
    found = []
    for module, path in modules or package_modules():
        rank = layer_of(module)
        for line, name in fastjepa_imports(path, module):
            target = layer_of(name)
            if target > rank:
                found.append(f"{path}:{line} ({module}, layer {rank}) imports {name} (layer {target})")
    return found


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def load():\n    from fastjepa.demo import main\n")
    assert upward_imports([("fastjepa.eval.probe", probe)]) == [
        f"{probe}:2 (fastjepa.eval.probe, layer 5) imports fastjepa.demo (layer 8)"]


@pytest.mark.parametrize("module", [m for m, _ in package_modules()])
def test_every_module_has_a_layer(module):
    layer_of(module)
