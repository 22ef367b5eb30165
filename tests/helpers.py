"""Test helpers: prune a model's masks at random, the way a pruning step would, without the engine."""

from __future__ import annotations

import torch

from peft_loraprune.mask_packing import pack_bits
from peft_loraprune.structure import find_structured_groups


def randomize_adapter(peft_model, seed: int = 0) -> None:
    """Give LoRA B (zero at init) random values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def random_prune(peft_model, fraction: float = 0.5, seed: int = 0, adapter_name: str = "default") -> None:
    """Prune about ``fraction`` of each layer's units at random (groups for structured, weights otherwise)."""
    g = torch.Generator().manual_seed(seed)
    tuner = peft_model.base_model
    config = tuner.peft_config[adapter_name]
    if config.is_element_granularity:
        for _, layer in tuner.prune_layers(adapter_name):
            keep = torch.rand(layer.out_features, layer.in_features, generator=g) >= fraction
            layer.set_masks(adapter_name, elements_packed=pack_bits(keep))
    else:
        for groups in find_structured_groups(tuner, adapter_name):
            n = groups.spec.n_groups
            keep = torch.ones(n, dtype=torch.bool)
            drop = torch.randperm(n, generator=g)[: max(1, int(n * fraction)) if n > 1 else 0]
            keep[drop] = False
            groups.apply(adapter_name, keep)
