"""Normalisation layers as ``modules_to_save``: the names that make them train with the adapter.

Training the norms beside the LoRA factors helps a pruned model recover (the distillation study,
``benchmarks/RESULTS.md``): removing heads and channels changes the scale of what each block adds to the residual
stream, and a norm's weight is where that scale is set. They are small (one vector per norm) and are saved whole in
the adapter through PEFT's ``modules_to_save``; export writes the trained copies in place of the base's.
"""

from __future__ import annotations

import torch


def norm_module_names(model: torch.nn.Module) -> list[str]:
    """The ``modules_to_save`` entries that make every normalisation layer of ``model`` train: the last name
    component of each module whose class name ends in ``Norm`` (Llama's ``LlamaRMSNorm``, BERT's and GPT-2's
    ``LayerNorm``), sorted. Call it on the base model, before ``get_peft_model`` wraps the modules; PEFT matches an
    entry against the end of every module name, so ``"norm"`` alone also matches ``input_layernorm``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"norm_module_names needs the base model (a torch.nn.Module), got {type(model).__name__}")
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__.endswith("Norm")}
    return sorted(names)
