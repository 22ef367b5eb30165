"""Import paths from before the subpackages (0.4.0 and earlier), kept working with a ``DeprecationWarning``.

``import peft_loraprune.engine`` or ``from peft_loraprune.masked_linear import ...`` resolve to the module's new
home (the same module object, so monkeypatching either name patches both). Only the names below are aliased;
they are removed in 0.6.0.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{
        m: f"kernels.{m}"
        for m in (
            "adaptation",
            "distributed",
            "group_ops",
            "importance",
            "mask_packing",
            "masked_linear",
            "quantized",
            "semi_structured",
            "workspace",
        )
    },
    **{
        m: f"pruning.{m}"
        for m in (
            "architectures",
            "criteria",
            "engine",
            "schedule",
            "selection",
            "structure",
        )
    },
    "environment": "hub.versions",
    "export_plan": "export.plan",
    "shrinking": "export.shrinking",
    "latency": "export.latency",
    "checkpoint_io": "export.checkpoint_io",
    "streaming_export": "export.streaming",
    **{
        m: f"hub.{m}"
        for m in (
            "evaluation",
            "integrity",
            "model_card",
            "reporting",
            "saving",
            "skeleton",
        )
    },
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``peft_loraprune.<old name>`` and hands back the module at its new path."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix) or fullname[len(self.prefix) :] not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        old = spec.name[len(self.prefix) :]
        new = self.prefix + MOVED[old]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path is removed in 0.6.0", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the module is already executed at its new path
        pass


def install(package: str) -> None:
    """Put the alias finder on ``sys.meta_path`` once (idempotent across ``importlib.reload``)."""
    if not any(isinstance(f, _Alias) and f.prefix == package + "." for f in sys.meta_path):
        sys.meta_path.append(_Alias(package))
