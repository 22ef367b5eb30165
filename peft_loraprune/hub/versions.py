"""The versions of the libraries an adapter was trained with, as the model card records them."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("peft_loraprune", "peft", "transformers", "torch", "accelerate")


def library_version(name: str) -> str:
    """The ``__version__`` of the module of that name when it is imported (the code that actually runs: an editable
    install's metadata keeps the version it was installed at, and a source checkout on ``PYTHONPATH`` has none);
    else the installed distribution's version; else "not installed"."""
    module = sys.modules.get(name.replace("-", "_"))
    if isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def library_versions(names=LIBRARIES) -> dict[str, str]:
    return {name: library_version(name) for name in names}
