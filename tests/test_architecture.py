"""The package's layering (docs/architecture.md, "Layers"): every module imports only from its own
layer or the layers below, the entry modules do not import one another, and no module imports a
module of the package inside a function (the lazy import that dodges an import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import safespot

PACKAGE = Path(safespot.__file__).parent

#: (layer, the modules or packages in it), lowest first; the longest matching prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("safespot", "safespot.errors", "safespot.paths", "safespot.stats", "safespot.utils")),
    ("geometry and data", ("safespot.threat", "safespot.data")),
    ("models", ("safespot.smoothing", "safespot.models")),
    ("attacks and defenses", ("safespot.attacks", "safespot.defenses")),
    ("runs", ("safespot.runs", "safespot.checks")),
    (
        "methods, evaluations, detectors",
        ("safespot.methods", "safespot.evaluation", "safespot.robustification", "safespot.ood"),
    ),
    (
        "entry points",
        (
            "safespot.train",
            "safespot.evaluate",
            "safespot.robustify_files",
            "safespot.ood.evaluate",
            "safespot.report",
            "safespot.reproduce",
        ),
    ),
    ("orchestration", ("safespot.demo", "safespot.cli", "safespot.api")),
]
ENTRIES = ("safespot.train", "safespot.evaluate", "safespot.robustify_files", "safespot.ood.evaluate")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of LAYERS: add it"
    return rank


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, imported safespot module, inside a function)`` of every import in ``path``."""
    return imports_in(path.read_text())


def imports_in(source: str) -> list[tuple[int, str, bool]]:
    tree = ast.parse(source)
    in_function = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n, id(node) in in_function) for n in names if n.split(".")[0] == "safespot"]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_modules_import_only_their_layer_or_below(path):
    name = module_name(path)
    upward = [
        f"{name}:{line} imports {target} ({LAYERS[layer(target)][0]} above {LAYERS[layer(name)][0]})"
        for line, target, _ in imports(path)
        if layer(target) > layer(name)
    ]
    assert upward == []


def test_entry_modules_do_not_import_one_another():
    crossing = [
        f"{module_name(path)}:{line} imports {target}"
        for path in MODULES
        if module_name(path) in ENTRIES
        for line, target, _ in imports(path)
        if any(target == e or target.startswith(e + ".") for e in ENTRIES if e != module_name(path))
    ]
    assert crossing == []


def test_no_module_imports_the_package_inside_a_function():
    lazy = [
        f"{module_name(path)}:{line} imports {target} inside a function"
        for path in MODULES
        for line, target, inside in imports(path)
        if inside
    ]
    assert lazy == []


def test_the_checks_catch_an_upward_import_and_a_lazy_one():
    """The helpers see what they must: an import from a higher layer, and one inside a function."""
    assert layer("safespot.utils.rng") < layer("safespot.attacks.pgd") < layer("safespot.train")
    assert layer("safespot.ood.evaluate") > layer("safespot.ood.detectors")
    source = "import torch\nfrom safespot.attacks import PGD\n\ndef f():\n    import safespot.runs\n"
    assert imports_in(source) == [(2, "safespot.attacks", False), (5, "safespot.runs", True)]


def test_config_error_is_imported_from_its_own_module_only():
    """``ConfigError`` has one home, ``safespot.errors``; no module takes it from a re-export
    (e.g. ``safespot.utils.task``), so a reader finds the base of every setting error in one place."""
    elsewhere = [
        f"{module_name(path)}:{node.lineno} imports ConfigError from {node.module}"
        for path in MODULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("safespot")
        and node.module != "safespot.errors"
        and any(alias.name == "ConfigError" for alias in node.names)
    ]
    assert elsewhere == []
