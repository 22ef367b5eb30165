"""Export without loading the model: merge, mask and slice one tensor at a time, from checkpoint to shards.

``peft-loraprune export ADAPTER --out DIR`` goes through here when the base is a local safetensors checkpoint. The
in-memory export (:func:`~peft_loraprune.export.merge.export_pruned_model`) merges the whole model, then slices it: a 70B
bfloat16 base needs about 140 GB of memory for that. Here:

1. the adapter is loaded on a weightless copy of its base (:func:`~peft_loraprune.hub.skeleton.load_adapter_skeleton`)
   and the export is planned from its masks (:func:`~peft_loraprune.export.plan.plan_export`, the same plan as the
   in-memory export);
2. every output tensor's name, dtype and shape follow from the plan and the checkpoint's header, so the shard
   headers are written before any data (:class:`~peft_loraprune.export.checkpoint_io.StreamingShardWriter`);
3. each tensor is read from the checkpoint, and for an adapted module merged with its factors and mask
   (:meth:`~peft_loraprune.layer.LoRAPruneLayer.masked_merged_weight`, the code the in-memory merge runs), sliced,
   cast, and written; a tensor of a module the adapter saves whole (``modules_to_save``: trained norms) is the
   adapter's copy; anything else is copied through in row pieces.

Peak memory is one adapted module's weight in float32 (the merge) or one piece of a copied tensor, plus the
adapter: not the model. The tensors written are exactly those of the in-memory export of the same adapter on the
same base loaded in the checkpoint's dtype (``tests/test_streaming_export.py`` compares them).

An adapter trained on a quantized base exports the same way: its tensors do not depend on the base's format, so
pointing ``--base`` at the original-precision checkpoint merges into the original weights. With ``quantized_as``
(``--quantized_as nf4-dq``) every Linear weight but the output layer's (what transformers' bitsandbytes integration
quantizes by default) is first rounded as that format stores it (:func:`~peft_loraprune.kernels.quantized.rounded_as`):
the export is then the model the adapter was trained with, as the in-memory export of the quantized model
computes it, without loading that model. Measured on SmolLM2 at structured 50% (``benchmarks/RESULTS.md``, quantized
bases) the original-precision merge scored worse than the model as trained.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..hub.skeleton import load_adapter_skeleton, saved_module_wrappers
from ..kernels.quantized import ROUNDING_FORMATS, rounded_as
from .checkpoint_io import CheckpointReader, StreamingShardWriter, parse_size, planned
from .merge import ExportReport, head_counts
from .plan import plan_export
from .shrinking import norm_weight_kept

#: files of a model folder copied as they are (tokenizer, generation settings); config.json is rewritten
_COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _module_edits(plan, layers: dict) -> tuple[dict, dict, Optional[tuple[str, list[int]]]]:
    """The plan's removals by kind: ``(adapted, plain, blocks)``. ``adapted``: module -> ``[(axis, index)]`` for the
    adapted modules (merged, then sliced); ``plain``: the same for the other tensors the plan edits (a norm's
    entries, an embedding's or an untied output layer's columns); ``blocks``: ``(block list name, kept block indices)``
    when blocks are deleted, else None."""
    adapted: dict[str, list[tuple[str, torch.Tensor]]] = {}
    plain: dict[str, list[tuple[str, torch.Tensor]]] = {}
    blocks = None
    for name, axis, index in plan.removals:
        if axis == "blocks":
            blocks = (name, index.tolist())
        elif name in layers:
            adapted.setdefault(name, []).append((axis, index))
        elif axis in ("norm", "embedding", "cols"):
            plain.setdefault(name, []).append((axis, index))
        else:
            raise ValueError(f"the export plan removes {axis} from {name!r}, which is not an adapted module")
    return adapted, plain, blocks


def _sliced(t: torch.Tensor, edits, is_bias: bool) -> torch.Tensor:
    """``t`` (a weight in ``(d_out, d_in)`` form, or a bias) with the removed rows/columns taken out; for a tensor
    the adapter does not adapt, also a norm's kept entries (scaled, :func:`norm_weight_kept`) and an embedding's
    kept columns."""
    for axis, index in edits:
        if axis == "norm":
            t = t if is_bias else norm_weight_kept(t, index)
        elif axis == "embedding":
            t = t[:, index]
        elif is_bias:
            if axis == "rows":
                t = t[index]
        else:
            t = t[index, :] if axis == "rows" else t[:, index]
    return t


def _renamer(blocks: Optional[tuple[str, list[int]]]):
    """Checkpoint key -> output key when blocks are deleted: None for a tensor of a deleted block, the key with the
    block's new index for a kept one."""
    if blocks is None:
        return lambda key: key
    container, kept = blocks
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = container + "."

    def rename(key: str) -> Optional[str]:
        if not key.startswith(prefix):
            return key
        index, _, rest = key[len(prefix) :].partition(".")
        if not index.isdigit():
            return key
        if int(index) not in new_index:
            return None
        return f"{prefix}{new_index[int(index)]}.{rest}"

    return rename


def saved_module_tensors(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The tensors of the modules the adapter saves whole (``modules_to_save``), by the checkpoint name of the
    base tensor each replaces (``model``: the tuner's model, whose module names are the checkpoint's)."""
    out = {}
    for name, wrapper in saved_module_wrappers(model):
        for tensor_name, tensor in wrapper.modules_to_save[adapter].state_dict().items():
            out[f"{name}.{tensor_name}"] = tensor
    return out


def replacement_mismatch(replaced: dict[str, torch.Tensor], reader: CheckpointReader) -> Optional[str]:
    """Why the saved modules cannot replace checkpoint tensors one for one (None when they can): every tensor must
    be in the checkpoint with the same shape (a head the base checkpoint lacks, or a tied one it stores once, is
    written by the in-memory export)."""
    for key, tensor in replaced.items():
        if key not in reader:
            return f"the adapter saves {key!r}, which the base checkpoint does not hold"
        if tuple(reader.shape(key)) != tuple(tensor.shape):
            return (
                f"the adapter saves {key!r} with shape {tuple(tensor.shape)}, the base checkpoint holds "
                f"{tuple(reader.shape(key))}"
            )
    return None


def quantized_linear_names(model: torch.nn.Module, adapted) -> set[str]:
    """The modules whose weights a bitsandbytes base holds quantized: every ``torch.nn.Linear`` and adapted layer,
    except the output layer (``get_output_embeddings``), as transformers' integration converts them by default."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set(adapted)
    for name, module in model.named_modules():
        if module is output:
            names.discard(name)
        elif type(module) is torch.nn.Linear:
            names.add(name)
    return names


def stream_export(
    adapter_path: str,
    out: str,
    base: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_size="5GB",
    progressbar: bool = True,
    skeleton=None,
    quantized_as: Optional[str] = None,
) -> ExportReport:
    """Export the adapter in ``adapter_path`` merged into the safetensors checkpoint folder ``base`` (default the
    adapter's ``base_model_name_or_path``) to ``out``, tensor by tensor; returns the report (``model`` is None).

    ``skeleton``: ``load_adapter_skeleton(adapter_path, base)`` when the caller has already built it (the command
    line does, to check the checkpoint and write the card); built here otherwise. ``quantized_as`` (one of
    ``ROUNDING_FORMATS``): merge into the checkpoint's Linear weights as a bitsandbytes base of that format held them
    (see the module docstring), not into the original-precision values."""
    if quantized_as is not None and quantized_as not in ROUNDING_FORMATS:
        raise ValueError(f"quantized_as={quantized_as!r}: allowed {', '.join(ROUNDING_FORMATS)}")
    peft_model = skeleton if skeleton is not None else load_adapter_skeleton(adapter_path, base)
    tuner = peft_model.base_model
    adapter = peft_model.active_adapter
    config = tuner.peft_config[adapter]
    base = base or config.base_model_name_or_path
    if not os.path.isdir(base):
        raise FileNotFoundError(f"the streaming export reads a local checkpoint folder; {base!r} is not one")
    reader = CheckpointReader(base)
    plan = plan_export(tuner, adapter)
    layers = dict(tuner.prune_layers(adapter))
    edits, plain_edits, blocks = _module_edits(plan, layers)
    rename = _renamer(blocks)
    missing = [f"{n}.weight" for n in layers if f"{n}.weight" not in reader]
    if missing:
        raise ValueError(
            f"{base} has no tensor {missing[0]!r} for an adapted module (its names differ from the model's); "
            "use the in-memory export (--in_memory)"
        )
    rounded = quantized_linear_names(tuner.model, layers) if quantized_as else set()
    replaced = saved_module_tensors(tuner.model, adapter)
    why_not = replacement_mismatch(replaced, reader)
    if why_not:
        raise ValueError(f"{why_not}; use the in-memory export (--in_memory)")

    # 1. the plan of every output tensor (named as it is written: blocks after deleted ones are renumbered)
    outputs = []
    source = {}  # output key -> checkpoint key
    params_before = params_after = bytes_before = 0
    for key in reader.keys():
        module, _, leaf = key.rpartition(".")
        src_dtype, shape = reader.dtype(key), reader.shape(key)
        out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
        n_before = int(torch.Size(reader.shape(key)).numel())
        params_before += n_before
        bytes_before += n_before * src_dtype.itemsize
        if module in layers and leaf in ("weight", "bias"):
            layer = layers[module]
            shape = (layer.out_features, layer.in_features) if leaf == "weight" else shape
            probe = torch.empty(shape, device="meta")
            shape = tuple(_sliced(probe, edits.get(module, ()), leaf == "bias").shape)
            if leaf == "weight" and layer.fan_in_fan_out:
                shape = shape[::-1]
        elif module in plain_edits and leaf in ("weight", "bias"):
            shape = tuple(_sliced(torch.empty(shape, device="meta"), plain_edits[module], leaf == "bias").shape)
        out_key = rename(key)
        if out_key is None:
            continue
        source[out_key] = key
        outputs.append(planned(out_key, out_dtype, shape))
        params_after += int(torch.Size(shape).numel())

    # 2. the data, tensor by tensor
    os.makedirs(out, exist_ok=True)
    writer = StreamingShardWriter(out, outputs, parse_size(max_shard_size))
    try:
        for target in tqdm(outputs, desc="Exporting tensors", disable=not progressbar):
            key = source[target.name]
            module, _, leaf = key.rpartition(".")
            layer = layers.get(module)
            if layer is not None and leaf == "weight":
                w0 = reader.get(key)
                w0_2d = w0.t() if layer.fan_in_fan_out else w0
                if quantized_as:  # the values the adapter was trained on, in the checkpoint's dtype
                    w0_2d = rounded_as(w0_2d, quantized_as).to(w0.dtype)
                merged = layer.masked_merged_weight(adapter, w0_2d).to(w0.dtype)  # rounded as merging into it does
                merged = _sliced(merged, edits.get(module, ()), False)
                merged = merged.t() if layer.fan_in_fan_out else merged
                writer.write(target.name, merged.to(target.dtype).contiguous())
            elif layer is not None and leaf == "bias":
                b0 = reader.get(key)
                merged = (layer.merged_bias(adapter, b0) * layer.lora_mask_rows[adapter]).to(b0.dtype)
                writer.write(target.name, _sliced(merged, edits.get(module, ()), True).to(target.dtype))
            elif key in replaced:  # a module the adapter saves whole: its trained copy replaces the base's
                tensor = _sliced(replaced[key], plain_edits.get(module, ()), leaf == "bias")
                writer.write(target.name, tensor.to(target.dtype).contiguous())
            elif module in rounded and leaf == "weight":  # a quantized Linear the adapter does not adapt
                w0 = _sliced(reader.get(key), plain_edits.get(module, ()), False)
                writer.write(target.name, rounded_as(w0, quantized_as).to(target.dtype).contiguous())
            elif module in plain_edits and leaf in ("weight", "bias"):
                tensor = _sliced(reader.get(key), plain_edits[module], leaf == "bias")
                writer.write(target.name, tensor.to(target.dtype).contiguous())
            else:
                for piece in reader.pieces(key):
                    writer.write(target.name, piece.to(target.dtype))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise

    # 3. the config and the files that travel with the model
    with open(os.path.join(base, "config.json")) as f:
        model_config = json.load(f)
    model_config.pop("quantization_config", None)
    model_config.update(plan.config_updates)
    if dtype is not None:
        model_config["dtype"] = str(dtype).removeprefix("torch.")
        model_config.pop("torch_dtype", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model_config, f, indent=2, sort_keys=True)
    for name in _COPIED_FILES:
        if os.path.isfile(os.path.join(base, name)):
            shutil.copyfile(os.path.join(base, name), os.path.join(out, name))

    bytes_after = sum(os.path.getsize(os.path.join(out, f)) for f in files if f.endswith(".safetensors"))
    return ExportReport.from_plan(
        plan,
        config.granularity,
        None,
        (params_before, params_after),
        (bytes_before, bytes_after),
        merged_into=f"the weights read tensor by tensor from {base}"
        + (f", rounded as bitsandbytes {quantized_as} stores them" if quantized_as else "")
        + " (streaming export)",
        heads_before=head_counts(tuner.model.config),
    )
