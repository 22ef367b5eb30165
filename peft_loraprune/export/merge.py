"""Export: a really smaller model that plain ``from_pretrained`` loads.

``peft_model.merge_and_prune()`` (or :func:`export_pruned_model`) merges the adapter (pruned weights become exact
zeros), then physically removes the pruned heads and channels that the family's config can express, updates the
config, and reports parameters and size before and after (latency on the model's device, when asked).

What can be removed is planned by :mod:`~peft_loraprune.export.plan` (configs hold one width per model, so uneven
blocks are widened to the widest; structures a config cannot express, such as BERT's and GPT-2's heads, stay
zeroed), modules are shrunk by :mod:`~peft_loraprune.export.shrinking`, latency is timed by
:mod:`~peft_loraprune.export.latency`; this module orchestrates and reports.

Unstructured and N:M adapters export as the merged model with exact zeros (N:M pattern intact): the dense kernels
of PyTorch do not run faster on zeros; the pattern pays off with sparse kernels (e.g. 2:4 on recent NVIDIA GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..kernels.quantized import dense_weight, describe, quantization_kind
from ..lookup import find_tuner
from .checkpoint_io import CheckpointReader
from .latency import default_example_inputs, measure_latency_ms
from .plan import plan_export
from .shrinking import remove_pruned


@dataclass
class ExportReport:
    """What export did and what it gained. ``model`` is the exported transformers model."""

    model: Optional[torch.nn.Module] = field(repr=False)
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
    latency_device: str = "cpu"  # where the latency was measured (the example inputs' device type)
    merged_into: str = "the base model's weights"  # what the adapter was merged into (see dense_base)
    heads_before: Optional[tuple[int, int]] = None  # (query heads, KV heads) per block before export (head_counts)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_plan(cls, plan, granularity: str, model, params: tuple[int, int], size: tuple[int, int], **measured):
        """The report of an export that carried out ``plan`` (an :class:`ExportPlan`): what it removed, kept
        zeroed and rewrote in the config, with the parameter counts and bytes ``(before, after)``; ``measured``:
        the latency fields and ``merged_into``. Both exports, in memory and streaming, build their report here."""
        params_before, params_after = params
        return cls(
            model=model,
            granularity=granularity,
            removed=plan.removed,
            kept_zeroed=plan.kept_zeroed,
            config_updates=plan.config_updates,
            params_before=params_before,
            params_after=params_after,
            params_per_layer_widths=params_after - plan.per_layer_savings,
            bytes_before=size[0],
            bytes_after=size[1],
            notes=plan.notes,
            **measured,
        )

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_before_ms and self.latency_after_ms:
            return self.latency_before_ms / self.latency_after_ms
        return None

    def removed_per_block(self) -> dict[str, str]:
        """What export removed from each block, in words, by structure: heads are counted as the config counts
        them, e.g. ``"1 KV group (3 query heads)"`` when a grouped-query model lost one key/value head with the
        three query heads sharing it."""
        return {s: self._heads_removed(n) if s == "heads" else f"{n} {s}" for s, n in self.removed.items()}

    def _heads_removed(self, groups: int) -> str:
        q_after = self.config_updates.get("num_attention_heads")
        if self.heads_before is None or q_after is None:
            return f"{groups} heads"
        q_before, kv_before = self.heads_before
        kv_after = self.config_updates.get("num_key_value_heads", kv_before)
        queries = _count(q_before - q_after, "query head")
        if q_before == kv_before:  # every head has its own key and value
            return _count(q_before - q_after, "attention head")
        if kv_after != kv_before:  # whole groups: a key/value head and the query heads that share it
            return f"{_count(kv_before - kv_after, 'KV group')} ({queries})"
        return f"{queries} ({groups} in each of the {kv_before} KV groups; key and value heads kept)"

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
            f"  merged into: {self.merged_into}",
        ]
        if self.latency_before_ms is not None:
            lines.append(
                f"  {self.latency_device.upper()} latency: {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms "
                f"(x{self.speedup:.2f})"
            )
        for removed in self.removed_per_block().values():
            lines.append(f"  removed per block: {removed}")
        for structure, n in self.kept_zeroed.items():
            lines.append(f"  kept in place as zeros: {n} pruned {structure} (the config cannot express removing them)")
        if self.params_per_layer_widths and self.params_per_layer_widths < self.params_after:
            lines.append(
                f"  uniform widths cost {self.params_after - self.params_per_layer_widths:,d} parameters over "
                "per-layer widths"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def head_counts(config) -> Optional[tuple[int, int]]:
    """``(query heads, key/value heads)`` of one block as a transformers config states them (None without heads);
    the export report words removed heads with them."""
    n_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(n_heads, int):
        return None
    return n_heads, getattr(config, "num_key_value_heads", None) or n_heads


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


def cast_saved_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and saved buffers to ``dtype`` in place; buffers that are not saved keep theirs.

    Buffers outside the state dict (rotary ``inv_freq``) are recomputed by ``from_pretrained``, in float32 whatever
    the dtype loaded; ``model.to(dtype)`` would round them, and the exported model in memory would then compute
    something else than the same model reloaded from its folder.
    """
    computed = [
        (module, name, module._buffers[name])
        for module in model.modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]
    model.to(dtype)
    for module, name, tensor in computed:
        module._buffers[name] = tensor


def dense_base(tuner, base_weights: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
    """Make a quantized base dense before merging; returns what the adapter will be merged into (for the report).

    Every bitsandbytes layer of the model, adapted or not, becomes a plain ``nn.Linear``: with the tensor of the same
    name read from ``base_weights`` (a local folder of the original-precision checkpoint, e.g. the model the
    quantized base was loaded from) when given, else with its dequantized weight. The model's quantization config
    is removed (transformers' own ``remove_quantization_config``), so ``save_pretrained`` writes a plain model.
    ``dtype``: of the dense weights (default: the input embedding's dtype, which quantization leaves alone).
    A float base is left as it is."""
    model = tuner.model
    quantized = [(name, module) for name, module in model.named_modules() if quantization_kind(module) is not None]
    if not quantized:
        if base_weights is not None:
            raise ValueError(
                "base_weights is for an adapter trained on a quantized base; this model's base is not quantized"
            )
        return "the base model's weights"
    reader = CheckpointReader(base_weights) if base_weights is not None else None
    dtype = dtype or model.get_input_embeddings().weight.dtype
    kind = describe(quantized[0][1])
    for name, module in quantized:
        owner_name = name.removesuffix(".base_layer")
        owner = model.get_submodule(owner_name)
        original = None
        if reader is not None:
            key = f"{owner_name}.weight"
            if key not in reader:
                raise ValueError(
                    f"base_weights: {base_weights} has no tensor {key!r} for the quantized layer {owner_name}"
                )
            original = reader.get(key)
        if getattr(owner, "quantization", None) is not None:  # a LoRAPrune layer around it
            owner.use_dense_base(original, dtype)
            continue
        parent_name, _, child = name.rpartition(".")
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        weight = original if original is not None else dense_weight(module)
        dense.weight = torch.nn.Parameter(weight.detach().to(module.weight.device, dtype), requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        model.config.__dict__.pop("quantization_config", None)
    if reader is not None:
        return f"the original-precision weights read from {base_weights}"
    return (
        f"dequantized {kind} weights ({str(dtype).removeprefix('torch.')}); give the original-precision checkpoint "
        "(base_weights=, or --base for the command line) to merge into the weights before quantization"
    )


def export_pruned_model(
    peft_model: torch.nn.Module,
    adapter_name: Optional[str] = None,
    example_inputs: Optional[dict] = None,
    measure_latency: bool = False,
    save_directory: Optional[str] = None,
    progressbar: bool = True,
    dtype: Optional[torch.dtype] = None,
    base_weights: Optional[str] = None,
    tokenizer: Optional[Any] = None,
) -> ExportReport:
    """Merge the adapter and physically remove what the config can express; see the module docstring.

    Like ``merge_and_unload``, this consumes ``peft_model``: its base model becomes the exported model, and saving
    it, reporting its sparsity or exporting it again raise afterwards. Save the adapter first.

    Args:
        peft_model: a LoRAPrune ``PeftModel`` (or its ``LoRAPruneModel``).
        adapter_name: the adapter to export (default: the active one).
        example_inputs: the inputs latency is measured on (with ``measure_latency=True``; default: one random
            sequence of 128 tokens, or one image, on the model's device).
        measure_latency: time forward passes before and after removing the pruned units (``report.speedup``).
            Off by default: on a real model it takes longer than the export itself.
        save_directory: also save the exported model there (``report.bytes_after`` is then the files' size).
        progressbar: show PEFT's merge progress bar.
        dtype: cast the exported model (e.g. ``torch.bfloat16`` halves a float32 file; pruned weights stay exact
            zeros); latency is measured before the cast.
        base_weights: for an adapter trained on a quantized (bitsandbytes) base: a local folder of the
            original-precision checkpoint to merge into; without it the adapter is merged into the dequantized
            weights (see :func:`dense_base`; ``report.merged_into`` says which).
        tokenizer: a tokenizer (or processor: anything with ``save_pretrained``) saved into ``save_directory``
            beside the model, so the folder is complete: ``pipeline(model=save_directory)`` and
            ``AutoTokenizer.from_pretrained(save_directory)`` load it.

    Returns:
        An :class:`ExportReport`; ``report.model`` is the exported ``transformers`` model.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
    if example_inputs is not None and not measure_latency:
        raise ValueError("example_inputs are what latency is measured on: pass measure_latency=True with them.")
    if tokenizer is not None:
        if save_directory is None:
            raise ValueError(
                "tokenizer is saved into save_directory beside the exported model: pass save_directory too."
            )
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError(f"tokenizer must have a save_pretrained method, got {type(tokenizer).__name__}.")
    tuner = find_tuner(peft_model, "export")
    tuner.check_not_consumed("another export")
    adapter_name = tuner.resolve_adapter(adapter_name)
    config = tuner.peft_config[adapter_name]
    if tuner.active_adapters != [adapter_name]:
        tuner.set_adapter(adapter_name)
    plan = plan_export(tuner, adapter_name)
    heads_before = head_counts(tuner.model.config)

    merged_into = dense_base(tuner, base_weights, dtype)  # (counted after: a packed 4-bit weight counts half)
    params_before, bytes_before = _parameter_count_and_bytes(tuner.model)
    tuner.derived.consumed_by = "export_pruned_model"  # saves, reports and exports of it now refuse
    merged = tuner.merge_and_unload(progressbar=progressbar)
    inputs = None
    if measure_latency:
        inputs = example_inputs if example_inputs is not None else default_example_inputs(merged)
    latency_before = measure_latency_ms(merged, inputs) if inputs is not None else None
    remove_pruned(merged, plan.removals, progressbar)
    for key, value in plan.config_updates.items():
        setattr(merged.config, key, value)
    for prefix in plan.block_prefixes:
        plan.refresh_block(merged.get_submodule(prefix), merged.config)
    if plan.refresh_model is not None:
        plan.refresh_model(merged)
    latency_after = measure_latency_ms(merged, inputs) if inputs is not None else None
    if dtype is not None:
        cast_saved_tensors(merged, dtype)
        merged.config.dtype = str(dtype).removeprefix("torch.")

    params_after, bytes_after = _parameter_count_and_bytes(merged)
    report = ExportReport.from_plan(
        plan,
        config.granularity,
        merged,
        (params_before, params_after),
        (bytes_before, bytes_after),
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
        latency_device=next((v.device.type for v in (inputs or {}).values() if isinstance(v, torch.Tensor)), "cpu"),
        merged_into=merged_into,
        heads_before=heads_before,
    )
    if save_directory is not None:
        merged.save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        report.bytes_after = sum(
            os.path.getsize(os.path.join(save_directory, f))
            for f in os.listdir(save_directory)
            if f.endswith(".safetensors")
        )
    return report
