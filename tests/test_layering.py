"""The package's layers import downward only (CONTRIBUTING, "Where things live"): checked on every module's top-level imports.

A module may import its own layer and the layers below it at import time. An upward dependency must be a lazy
import inside the function that needs it, so that each layer can be imported, read and tested without the ones
above it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_loraprune"

# lowest first; a module belongs to the first entry whose name is its name or a parent package of it
LAYERS = [
    ("kernels", ["peft_loraprune.kernels"]),
    (
        "core",
        [
            "peft_loraprune.validation",
            "peft_loraprune.lookup",
            "peft_loraprune.registration",
            "peft_loraprune.layer",
            "peft_loraprune.config",
            "peft_loraprune.norms",
        ],
    ),
    ("pruning", ["peft_loraprune.pruning"]),
    ("tuner", ["peft_loraprune.model"]),
    ("hub", ["peft_loraprune.hub"]),
    ("training", ["peft_loraprune.callback", "peft_loraprune.distillation"]),
    ("export", ["peft_loraprune.export"]),
    ("entry points", ["peft_loraprune.cli", "peft_loraprune._moved", "peft_loraprune"]),
]


def layer_of(module: str) -> int:
    for level, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "peft_loraprune" and module.startswith(prefix + ".")):
                return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and CONTRIBUTING's table)")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """Package modules imported when module ``name`` (with this ``source``) is imported: top-level statements
    only, not those inside functions."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("peft_loraprune"):
                # "from . import x" names a submodule; "from .x import y" names module x
                found += [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("peft_loraprune")]
    return found


def imports_of(path: Path) -> list[str]:
    return top_level_imports(path.read_text(), module_name(path), path.name == "__init__.py")


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_a_layer_above_it(path):
    here = layer_of(module_name(path))
    for target in imports_of(path):
        assert layer_of(target) <= here, (
            f"{module_name(path)} ({LAYERS[here][0]}) imports {target} ({LAYERS[layer_of(target)][0]}) at import "
            "time: import it lazily inside the function that needs it"
        )


def test_kernels_import_nothing_else_from_the_package():
    for path in (PACKAGE / "kernels").glob("*.py"):
        assert all(t.startswith("peft_loraprune.kernels") for t in imports_of(path)), path


def test_the_checker_resolves_relative_imports_and_ignores_lazy_ones():
    source = (
        "from __future__ import annotations\n"
        "from ..model import LoRAPruneModel\n"
        "from . import workspace\n"
        "def f():\n    from ..export import export_pruned_model\n"
    )
    found = top_level_imports(source, "peft_loraprune.kernels.masked_linear")
    assert found == ["peft_loraprune.model", "peft_loraprune.kernels.workspace"]
    assert layer_of(found[0]) > layer_of("peft_loraprune.kernels.masked_linear")


def test_the_import_paths_from_before_the_subpackages_still_work_with_a_warning():
    """0.4.0's flat module paths resolve to the same module objects (monkeypatching either name patches both)."""
    import importlib
    import sys

    import peft_loraprune.kernels.masked_linear as new

    sys.modules.pop("peft_loraprune.masked_linear", None)
    with pytest.warns(DeprecationWarning, match="moved to peft_loraprune.kernels.masked_linear"):
        old = importlib.import_module("peft_loraprune.masked_linear")
    assert old is new
    with pytest.warns(DeprecationWarning, match="peft_loraprune.pruning.engine"):
        from peft_loraprune.engine import PruningEngine  # noqa: F401
    from peft_loraprune.export import export_pruned_model  # a package now; the documented names stay
    from peft_loraprune.hub import push_to_hub  # noqa: F401

    assert export_pruned_model is peft_loraprune_export()


def peft_loraprune_export():
    import peft_loraprune

    return peft_loraprune.export_pruned_model


@pytest.mark.parametrize("old", sorted(__import__("peft_loraprune._moved", fromlist=["MOVED"]).MOVED))
def test_every_old_path_resolves_to_an_existing_module(old):
    import importlib
    import warnings

    from peft_loraprune._moved import MOVED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(f"peft_loraprune.{old}")
    assert module is importlib.import_module(f"peft_loraprune.{MOVED[old]}")
