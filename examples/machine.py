"""The machine and library versions a result was produced with, written beside every result of the examples and
benchmarks (the package itself records only library versions, in the model card)."""

from __future__ import annotations

import os
import platform
import time

import torch

from peft_loraprune.hub.versions import LIBRARIES, library_versions


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
