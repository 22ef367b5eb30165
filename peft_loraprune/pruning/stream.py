"""The hidden size: channels of the residual stream, one mask shared by every block (``prune_structures=["hidden"]``).

Every block reads the residual stream through an RMSNorm and writes into it through its residual writers
(``o_proj``, ``down_proj``). A channel ``c`` of the stream is removed by keeping it at zero everywhere: the
embedding's output is masked, and every writer's output row ``c`` is masked. Its norms then output zero at ``c``
(``x_c = 0``), so every reader (query, key, value, gate, up projections, and the output layer) gets nothing from it.

Where the mask lives: in the writers' row masks, which are already saved, reloaded, broadcast and checkpointed. The
stream's mask is their union over the blocks (a closed block's writers mask every row, see
:mod:`~peft_loraprune.pruning.depth`); the embedding is masked by a forward hook (:class:`StreamMask`) that reads
it. No new tensor is stored.

Export slices the channel out of the embedding, every reader's columns, every writer's rows, every norm's weight
and the output layer's columns. An RMSNorm over ``H'`` kept channels divides by ``sqrt(S/H' + eps)`` where the
masked model divided by ``sqrt(S/H + eps)`` (``S`` the sum of squares, zeros included): with the norm weights
multiplied by ``sqrt(H/H')`` and ``eps`` by ``H/H'`` the two are equal, exactly (Qwen3's query and key norms, which
normalise over a head, see the new ``eps`` too: a relative change below ``eps·H/H'``). LayerNorm subtracts the mean
over all channels, which a sliced model cannot reproduce: LayerNorm families are refused.

transformers' ``LlamaConfig`` requires the hidden size to be a multiple of the number of attention heads (even with
an explicit ``head_dim``), so the number of channels kept is always a multiple of the number of attention heads the
run ends with (:func:`width_multiple`): 50% of SmolLM2's 576 channels with its 9 heads keeps 288.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..layer import LoRAPruneLayer
from .architectures import registered_specs, require_architecture


class StreamMask:
    """A forward hook on the input embedding that masks the residual stream's removed channels, and lets a
    criterion observe the masked output (``add_tap``, as :meth:`~peft_loraprune.layer.LoRAPruneLayer.add_tap`).

    The mask is read from the writers' row masks at each pass (the union over blocks). It applies while the adapter
    is active, merged or not (merging writes the writers' zeros but not the embedding's), and not while adapters
    are disabled or a distillation teacher reads the model without masks."""

    def __init__(self, embedding: torch.nn.Module, stream: ResidualStream, adapter_name: str) -> None:
        self.embedding = embedding
        self.stream = stream
        self.adapter = adapter_name
        self.out_features = embedding.weight.shape[1]
        self._taps: list = []
        self._handle = embedding.register_forward_hook(self._hook)

    def base_weight_2d(self) -> torch.Tensor:
        """The embedding table (for the device of a criterion's accumulators)."""
        return self.embedding.weight

    def add_tap(self, adapter_name: str, tap) -> None:
        self._taps.append(tap)

    def remove_tap(self, adapter_name: str, tap) -> None:
        if tap in self._taps:
            self._taps.remove(tap)

    def remove(self) -> None:
        """Remove the hook (the adapter is unloaded or deleted)."""
        self._handle.remove()
        self._taps.clear()

    def active(self) -> bool:
        layer = self.stream.writers[0][1]
        return (
            not layer.disable_adapters
            and not layer.ignore_masks
            and self.adapter in layer.active_adapters
            and self.adapter in layer.lora_A
        )

    def _hook(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return output
        keep = self.stream.kept(self.adapter)
        if not bool(keep.all()):
            output = output * keep.to(device=output.device, dtype=output.dtype)
        if self._taps and torch.is_grad_enabled():
            if not output.requires_grad:  # a frozen embedding: a leaf, so that its gradient is computed
                output = output.detach().requires_grad_(True)
            for tap in self._taps:
                tap(args[0], output)
        return output


@dataclass
class ResidualStream:
    """The modules that read and write the residual stream of one adapted model, bound to their layers."""

    writers: list[tuple[str, LoRAPruneLayer]]  # every block's residual writers (rows = stream channels)
    readers: list[tuple[str, LoRAPruneLayer]]  # every block's modules reading a norm's output (columns)
    norms: list[str]  # every RMSNorm over the stream (module names in the wrapped model), the final one included
    embedding: str  # module name of the input embedding
    output: Optional[str]  # module name of the output layer when its weight is not the embedding's, else None
    eps_attribute: str  # the config attribute of the norms' epsilon
    size: int  # channels of the stream
    weights_per_channel: int  # an embedding (and untied output) column, a row of every writer, a column of every
    # reader, an entry of every norm: what removing one channel removes
    stream_only_weights: int  # the embedding's weights, and an untied output layer's: outside every block

    def kept(self, adapter_name: str) -> torch.Tensor:
        """Per channel: True while any writer keeps its row (the union over blocks)."""
        keep = self.writers[0][1].lora_mask_rows[adapter_name].clone()
        for _, layer in self.writers[1:]:
            keep |= layer.lora_mask_rows[adapter_name].to(keep.device)
        return keep

    def apply(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Remove the channels where ``keep`` is False from every writer's rows (AND with what is there)."""
        for _, layer in self.writers:
            current = layer.lora_mask_rows[adapter_name]
            layer.set_masks(adapter_name, rows=current & keep.to(current.device))


def find_residual_stream(tuner, adapter_name: str) -> ResidualStream:
    """The residual stream of ``adapter_name``'s model; ``ValueError`` when the family cannot prune it exactly
    (no RMSNorm stream in the registry) or when a reader or writer of some block is not adapted."""
    spec = require_architecture(tuner.model_type)
    stream = spec.stream
    if stream is None:
        allowed = sorted({s.name for s in registered_specs() if s.stream is not None})
        raise ValueError(
            f"prune_structures with 'hidden' removes channels of the residual stream, which the {spec.name} family "
            "cannot export exactly (its blocks normalise the stream with LayerNorm, whose mean over all channels a "
            f"smaller model cannot reproduce). Families with hidden-size pruning: {allowed}."
        )
    if spec.export is None or "hidden" not in spec.export.removable:
        raise ValueError(
            f"prune_structures with 'hidden': the {spec.name} family's registry entry cannot express a narrower stream "
            "in its config (ExportSpec.removable lacks 'hidden'), so the export could not slice it; add it there "
            "with the config updates, or drop 'hidden'."
        )
    model = tuner.model
    by_block: dict[int, dict[str, tuple[str, LoRAPruneLayer]]] = {}
    for name, layer in tuner.prune_layers(adapter_name):
        located = spec.locate(name)
        if located is not None:
            by_block.setdefault(located[0], {})[located[1]] = (name, layer)
    n_blocks = len(_block_list(model, by_block, spec))
    writers, readers, norms = [], [], []
    for block in range(n_blocks):
        modules = by_block.get(block, {})
        missing = [m for m in spec.residual_writers + stream.readers if m not in modules]
        if missing:
            raise ValueError(
                f"Pruning the hidden size needs every module that reads or writes the residual stream adapted, in "
                f"every block (the stream is shared): {missing} of block {block} are not in target_modules."
            )
        writers += [modules[m] for m in spec.residual_writers]
        readers += [modules[m] for m in stream.readers]
        prefix = modules[spec.residual_writers[0]][0][: -len(spec.residual_writers[0]) - 1]
        norms += [f"{prefix}.{n}" for n in stream.norms]
    container = writers[0][0][: -len(spec.residual_writers[0]) - 1].rpartition(".")[0]
    norms.append(_sibling(container, stream.final_norm))
    embedding = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embedding)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = None
    if output_layer is not None and output_layer.weight is not embedding.weight:
        output_name = next(name for name, module in model.named_modules() if module is output_layer)
    per_channel = (
        embedding.weight.shape[0] * (2 if output_name else 1)
        + sum(layer.in_features for _, layer in writers)
        + sum(layer.out_features for _, layer in readers)
        + len(norms)
    )
    return ResidualStream(
        writers,
        readers,
        norms,
        embedding_name,
        output_name,
        stream.eps_attribute,
        embedding.weight.shape[1],
        per_channel,
        embedding.weight.numel() * (2 if output_name else 1),
    )


def width_multiple(tuner, adapter_name: str) -> int:
    """Every count of kept stream channels is a multiple of this: the number of attention heads each block keeps at
    the end of the run. That is the config's ``num_attention_heads``, less the heads the target removes when heads
    are pruned per structure (per KV group with ``head_grouping="query_head"``); under ``allocation="joint"``,
    where the split decides the heads, the least common multiple of every head count the split can choose
    (SmolLM2's 9 heads in 3 KV groups: 3, 6 or 9 heads, so multiples of 18)."""
    config = tuner.peft_config[adapter_name]
    n_heads = int(tuner.model.config.num_attention_heads)
    if "heads" not in config.prune_structures:
        return n_heads
    from .selection import prune_count

    heads = next(g for g in tuner.structured_groups(adapter_name, include_all=True) if g.spec.structure == "heads")
    parts, n_groups = heads.spec.partitions, heads.spec.n_groups
    per = n_groups // parts
    per_kept_group = parts * (n_heads // n_groups)  # query heads that one kept group per partition holds
    if config.allocation == "joint":
        return math.lcm(*(kept * per_kept_group for kept in range(1, per + 1)))
    return (per - prune_count(per, config.effective_target_sparsity)) * per_kept_group


def round_to_multiple(n: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``n`` (halves rounded down), at least ``multiple``."""
    return max(multiple, multiple * math.ceil(n / multiple - 0.5))


def _sibling(container: str, name: str) -> str:
    parent = container.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


def _block_list(model, by_block, spec) -> torch.nn.ModuleList:
    block, modules = next(iter(sorted(by_block.items())))
    relative = spec.residual_writers[0]
    name = modules[relative][0][: -len(relative) - 1].rpartition(".")[0]
    return model.get_submodule(name)
