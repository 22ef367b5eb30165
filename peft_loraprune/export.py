"""Export: a really smaller model that plain ``from_pretrained`` loads.

``peft_model.merge_and_prune()`` (or :func:`export_pruned_model`) merges the adapter (pruned weights become exact
zeros), then physically removes the pruned heads and channels that the family's config can express, updates the
config, and reports parameters, size and CPU latency before and after.

Configs hold one width per model (``num_attention_heads``, ``intermediate_size``...), not one per layer. When
blocks keep different numbers of heads or channels (``budget="global"``, ``dense_layers``), every block is widened
to the widest one by keeping some pruned (all-zero) groups: outputs stay exact, and the report says how many
parameters that costs compared to per-layer widths. Structures the config cannot express (BERT and GPT-2 heads,
whose size is derived from the hidden size) stay zeroed in place.

Unstructured and N:M adapters export as the merged model with exact zeros (N:M pattern intact): the dense kernels
of PyTorch do not run faster on zeros; the pattern pays off with sparse kernels (e.g. 2:4 on recent NVIDIA GPUs).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .architectures import require_architecture
from .group_ops import expand_groups
from .lookup import find_tuner


@dataclass
class ExportReport:
    """What export did and what it gained. ``model`` is the exported transformers model."""

    model: torch.nn.Module = field(repr=False)
    granularity: str
    removed: dict[str, int] = field(default_factory=dict)  # structure -> groups removed per block
    kept_zeroed: dict[str, int] = field(default_factory=dict)  # structure -> pruned groups left in place (zeros)
    config_updates: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    params_per_layer_widths: int = 0  # what per-layer widths would have kept (equal to params_after when uniform)
    bytes_before: int = 0
    bytes_after: int = 0
    latency_before_ms: Optional[float] = None
    latency_after_ms: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_before_ms and self.latency_after_ms:
            return self.latency_before_ms / self.latency_after_ms
        return None

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "model"}
        out["speedup"] = self.speedup
        return out

    def __str__(self) -> str:
        mib = 1024 * 1024
        lines = [
            f"LoRAPrune export ({self.granularity})",
            f"  parameters: {self.params_before:,d} -> {self.params_after:,d} "
            f"({self.params_after / max(1, self.params_before):.1%})",
            f"  size:       {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB",
        ]
        if self.latency_before_ms is not None:
            lines.append(
                f"  CPU latency: {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms "
                f"(x{self.speedup:.2f})"
            )
        for structure, n in self.removed.items():
            lines.append(f"  removed per block: {n} {structure}")
        for structure, n in self.kept_zeroed.items():
            lines.append(f"  kept in place as zeros: {n} pruned {structure} (the config cannot express removing them)")
        if self.params_per_layer_widths and self.params_per_layer_widths < self.params_after:
            lines.append(
                f"  uniform widths cost {self.params_after - self.params_per_layer_widths:,d} parameters over "
                "per-layer widths"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parameter_count_and_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Parameters and bytes of the model as it will be exported: adapter tensors and the originals that
    `modules_to_save` replaces are excluded, tied weights are counted once."""
    seen, n, size = set(), 0, 0
    for name, p in model.named_parameters():
        if "lora_" in name or ".original_module." in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
        size += p.numel() * p.element_size()
    return n, size


def default_example_inputs(model: torch.nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict:
    """Inputs for a latency measurement: random tokens, or random pixels for vision models."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if name == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(batch_size, config.num_channels, size, size, generator=g)}
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", seq_len)
    length = min(seq_len, max_len)
    return {"input_ids": torch.randint(0, config.vocab_size, (batch_size, length), generator=g)}


@torch.no_grad()
def measure_latency_ms(model: torch.nn.Module, inputs: dict, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of a forward pass in milliseconds (no grad, eval mode)."""
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return statistics.median(times)


def _shrunk(module: torch.nn.Module, axis: str, index: torch.Tensor) -> torch.nn.Module:
    """A new Linear/Conv1D keeping only rows (output features) or columns (input features) ``index``."""
    weight = module.weight.data
    bias = module.bias.data if module.bias is not None else None
    if isinstance(module, Conv1D):  # weight is (in, out)
        if axis == "rows":
            new_w, new_b = weight[:, index], (bias[index] if bias is not None else None)
        else:
            new_w, new_b = weight[index, :], bias
        new = Conv1D(new_w.shape[1], new_w.shape[0])
    else:
        if axis == "rows":
            new_w, new_b = weight[index, :], (bias[index] if bias is not None else None)
        else:
            new_w, new_b = weight[:, index], bias
        new = torch.nn.Linear(new_w.shape[1], new_w.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.data = new_w.contiguous().clone()
    if bias is not None:
        new.bias.data = new_b.contiguous().clone()
    return new


def _equalised_keep_masks(groups, adapter_name) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
    """Per structure: a keep mask per block, widened so every block keeps the same number (per partition)."""
    masks: dict[str, list[torch.Tensor]] = {}
    widths: dict[str, int] = {}
    for structure in sorted({g.spec.structure for g in groups}):
        of_kind = [g for g in groups if g.spec.structure == structure]
        parts = of_kind[0].spec.partitions
        kept = [g.kept(adapter_name).reshape(parts, -1) for g in of_kind]
        width = max(int(k.sum(dim=1).max()) for k in kept)
        widened = []
        for k in kept:
            k = k.clone()
            for row in k:
                missing = width - int(row.sum())
                if missing > 0:  # re-include the first pruned groups (all zeros after merging)
                    row[(~row).nonzero().flatten()[:missing]] = True
            widened.append(k.flatten())
        masks[structure] = widened
        widths[structure] = width
    return masks, widths


def export_pruned_model(
    peft_model,
    adapter_name: Optional[str] = None,
    example_inputs: Optional[dict] = None,
    measure_latency: bool = True,
    save_directory: Optional[str] = None,
    progressbar: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> ExportReport:
    """Merge the adapter and physically remove what the config can express; see the module docstring.

    ``peft_model`` is a LoRAPrune ``PeftModel`` (or its ``LoRAPruneModel``). Like ``merge_and_unload``, this
    consumes it: its base model becomes the exported model. ``dtype`` casts the exported model (e.g.
    ``torch.bfloat16`` halves a float32 file; pruned weights stay exact zeros); latency is measured before the cast.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
    tuner = find_tuner(peft_model, "export")
    adapter_name = tuner.resolve_adapter(adapter_name)
    config = tuner.peft_config[adapter_name]
    if tuner.active_adapters != [adapter_name]:
        tuner.set_adapter(adapter_name)

    plan = []  # (module name, axis, kept index)
    removed, kept_zeroed, updates = {}, {}, {}
    per_layer_savings = 0
    notes = []
    if not config.is_element_granularity:
        spec = require_architecture(tuner.model_type)
        export = spec.export
        groups = tuner.structured_groups(adapter_name, include_all=True)
        removable = [g for g in groups if export is not None and g.spec.structure in export.removable]
        masks, widths = _equalised_keep_masks(removable, adapter_name)
        for structure in sorted({g.spec.structure for g in groups}):
            of_kind = [g for g in groups if g.spec.structure == structure]
            pruned_counts = [g.spec.n_groups - int(g.kept(adapter_name).sum()) for g in of_kind]
            if structure in masks:
                removed[structure] = of_kind[0].spec.n_groups // of_kind[0].spec.partitions - widths[structure]
                for g, mask in zip(of_kind, masks[structure]):
                    extra = int(mask.sum()) - int(g.kept(adapter_name).sum())
                    for member, name, layer in g.members:
                        index = expand_groups(mask, member.layout).nonzero().flatten()
                        plan.append((name, member.axis, index))
                        other = layer.in_features if member.axis == "rows" else layer.out_features
                        per_layer_savings += extra * (member.layout[0] * member.layout[2]) * other
                if any(int(m.sum()) != int(g.kept(adapter_name).sum()) for g, m in zip(of_kind, masks[structure])):
                    notes.append(
                        f"blocks keep different numbers of {structure}; all were widened to {widths[structure]} "
                        "(per partition) so one config value describes them"
                    )
            elif any(pruned_counts):
                kept_zeroed[structure] = max(pruned_counts)
        if masks:
            updates = export.config_updates(tuner.model.config, widths, config.head_grouping)
        if kept_zeroed:
            notes.append(
                f"{spec.name}: {', '.join(kept_zeroed)} cannot be removed through the config and stay zeroed; "
                "prune_structures=['channels'] prunes only what export removes"
            )
    else:
        notes.append(
            f"{config.granularity} sparsity is exported as exact zeros in dense weights: same size and dense-kernel "
            "speed; it needs sparse kernels or compression to pay off"
        )

    params_before, bytes_before = _parameter_count_and_bytes(tuner.model)
    merged = tuner.merge_and_unload(progressbar=progressbar)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(merged)
    latency_before = measure_latency_ms(merged, inputs) if measure_latency else None

    for name, axis, index in tqdm(plan, desc="Removing pruned structures", disable=not progressbar or not plan):
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name)
        setattr(parent, child, _shrunk(getattr(parent, child), axis, index.to(getattr(parent, child).weight.device)))
    for key, value in updates.items():
        setattr(merged.config, key, value)
    if plan and spec.export.refresh_block is not None:
        for prefix in sorted({g.block_prefix for g in removable}):
            spec.export.refresh_block(merged.get_submodule(prefix), merged.config)

    latency_after = measure_latency_ms(merged, inputs) if measure_latency else None
    if dtype is not None:
        merged = merged.to(dtype)
        merged.config.dtype = str(dtype).removeprefix("torch.")
    params_after, bytes_after = _parameter_count_and_bytes(merged)
    report = ExportReport(
        model=merged,
        granularity=config.granularity,
        removed=removed,
        kept_zeroed=kept_zeroed,
        config_updates=updates,
        params_before=params_before,
        params_after=params_after,
        params_per_layer_widths=params_after - per_layer_savings,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
        notes=notes,
    )
    if save_directory is not None:
        merged.save_pretrained(save_directory)
        report.bytes_after = sum(
            os.path.getsize(os.path.join(save_directory, f))
            for f in os.listdir(save_directory)
            if f.endswith(".safetensors")
        )
    return report
