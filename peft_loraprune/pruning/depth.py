"""Depth units: whole transformer blocks, gated through the modules that write into the residual stream.

A pre-norm block adds its attention output and its MLP output to the residual stream (``h + o_proj(...)``,
``h + down_proj(...)``). With every output row of those *residual writers* masked (their ``lora_mask_rows``, bias
included) the block adds nothing: the masked model computes exactly what the model without that block computes,
and export deletes it. So a block's gate needs no new tensor: it is stored in masks that are already saved,
reloaded, broadcast and checkpointed, and a block counts as kept while any writer row is kept.

The family registry names the writers (``ArchitectureSpec.residual_writers``); :func:`find_block_gates` binds them to
the adapted layers of one adapter, as :func:`~peft_loraprune.pruning.structure.find_structured_groups` binds groups.

Two block scores (``LoRAPruneConfig.layer_importance``): ``"taylor"`` is the criterion's Taylor estimate of closing
the gate (read by the group pruner from the writers' taps); ``"influence"`` is ShortGPT's Block Influence,
``1 - cos(h_in, h_out)`` averaged over the training tokens, measured by :class:`BlockInfluence` on the adapted,
masked model as it trains: no gradient of any weight, and it follows the blocks already closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.distributed import all_reduce_mean_
from ..layer import LoRAPruneLayer
from .architectures import registered_specs, require_architecture
from .structure import resolve_dense_layers


@dataclass
class BlockGate:
    """The residual writers of one transformer block, bound to their layers."""

    block: int
    writers: list[tuple[str, LoRAPruneLayer]]  # (full module name, layer), in the registry's order
    relative_name: str  # block-relative name of the first writer, to find the block's own module name
    block_weights: int  # weights of the block's adapted modules: what removing the block removes, besides norms

    @property
    def prefix(self) -> str:
        """Module name of the block (``model.layers.3``)."""
        return self.writers[0][0][: -len(self.relative_name) - 1]

    def kept(self, adapter_name: str) -> bool:
        """True while any output row of any writer is kept."""
        return any(bool(layer.lora_mask_rows[adapter_name].any()) for _, layer in self.writers)

    def close(self, adapter_name: str) -> None:
        """Mask every output row of every writer: the block adds nothing to the residual stream."""
        for _, layer in self.writers:
            layer.set_masks(adapter_name, rows=torch.zeros_like(layer.lora_mask_rows[adapter_name]))


def find_block_gates(tuner, adapter_name: str, include_all: bool = False) -> list[BlockGate]:
    """The gate of every block of ``adapter_name`` in order, skipping ``dense_layers`` unless ``include_all``.

    Raises ``ValueError`` when the family has no residual writers (post-norm blocks, unknown families) or when a
    writer of some block is not adapted."""
    spec = require_architecture(tuner.model_type)
    if not spec.residual_writers:
        raise ValueError(
            f"prune_structures with 'layers' removes whole blocks, which the {spec.name} family cannot do exactly: its "
            "blocks normalise after the residual sum (post-norm), so no module's output can be masked to make a block "
            "the identity. Families with whole-layer pruning: "
            f"{sorted({s.name for s in registered_specs() if s.residual_writers})}; prune 'heads' and 'channels' here."
        )
    if spec.export is None or spec.export.layer_config_updates is None:
        raise ValueError(
            f"prune_structures with 'layers': the {spec.name} family's registry entry cannot express removed blocks in "
            "its config (ExportSpec.layer_config_updates is not set), so the export could not delete them; set it "
            "in the family's ArchitectureSpec, or drop 'layers'."
        )
    config = tuner.peft_config[adapter_name]
    by_block: dict[int, dict[str, tuple[str, LoRAPruneLayer]]] = {}
    for name, layer in tuner.prune_layers(adapter_name):
        located = spec.locate(name)
        if located is not None:
            by_block.setdefault(located[0], {})[located[1]] = (name, layer)
    dense = set() if include_all else resolve_dense_layers(config, sorted(by_block))
    gates = []
    for block in sorted(by_block):
        if block in dense:
            continue
        missing = [w for w in spec.residual_writers if w not in by_block[block]]
        if missing:
            raise ValueError(
                f"Pruning whole layers needs the residual writers {list(spec.residual_writers)} of every block "
                f"adapted, but {missing} of block {block} are not in target_modules. Add them, or drop 'layers' "
                "from prune_structures."
            )
        weights = sum(layer.in_features * layer.out_features for _, layer in by_block[block].values())
        writers = [by_block[block][w] for w in spec.residual_writers]
        gates.append(BlockGate(block, writers, spec.residual_writers[0], weights))
    return gates


class BlockInfluence:
    """Block Influence of every gated block, ``1 - mean_tokens cos(h_in, h_out)``, accumulated over training passes.

    A forward hook on each block's module (``BlockGate.prefix``) computes the summed cosine between the hidden
    states entering and leaving the block, detached, and adds it with its token count when that pass's backward
    reaches the block's output: evaluation passes, passes under ``no_grad`` (a distillation teacher) and the forward
    of non-reentrant gradient checkpointing, whose recomputed output gets no gradient, are not counted. Micro-batches
    of one step add up; :meth:`step_scores` reads the step and :meth:`reset` starts the next. One float pair per
    block: nothing of this is saved (the averages it feeds are).
    """

    def __init__(self, model: torch.nn.Module, gates: list[BlockGate]) -> None:
        device = gates[0].writers[0][1].base_weight_2d().device if gates else None
        # on the blocks' device: no host sync per forward, and NCCL reduces device tensors
        self.sums = torch.zeros(len(gates), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(gates), dtype=torch.float64, device=device)
        self._handles = [
            model.get_submodule(gate.prefix).register_forward_hook(self._hook(i), with_kwargs=True)
            for i, gate in enumerate(gates)
        ]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output) -> None:
            h_out = output[0] if isinstance(output, tuple) else output
            if not (torch.is_grad_enabled() and h_out.requires_grad):
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)
                pending, tokens = cos.sum().to(self.sums.device, torch.float64), cos.numel()

            def count(grad: torch.Tensor) -> None:
                self.sums[index] += pending
                self.counts[index] += tokens

            h_out.register_hook(count)

        return hook

    def step_scores(self) -> Optional[torch.Tensor]:
        """This step's influence of every gated block (float32), averaged over ranks; None when no block was
        backpropagated since the last :meth:`reset`."""
        totals = torch.stack([self.sums, self.counts])
        all_reduce_mean_([totals])
        if bool((totals[1] == 0).any()):
            return None
        return (1 - totals[0] / totals[1]).float()

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def remove(self) -> None:
        """Remove the hooks (the adapter is being deleted or unloaded)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
