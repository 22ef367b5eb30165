"""The machine and library versions a result was produced with: for model cards, examples and benchmarks."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import torch

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


def machine_info(extra_libraries=("datasets",)) -> dict:
    """Platform, CPU count, torch threads, accelerator, date and the versions of the libraries that matter."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **library_versions(LIBRARIES + tuple(extra_libraries)),
    }
