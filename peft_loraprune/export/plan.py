"""What export can remove, decided from the masks and the family's registry entry, before anything is merged.

A config holds one width per model (``num_attention_heads``, ``intermediate_size``...), not one per layer. When
blocks keep different numbers of heads or channels (``budget="global"``, ``dense_layers``), every block is widened
to the widest one by keeping some pruned (all-zero) groups: outputs stay exact, and the plan counts what that costs
against per-layer widths. Structures the config cannot express stay zeroed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.group_ops import expand_groups
from ..pruning.architectures import require_architecture


@dataclass
class ExportPlan:
    """Removals ``(module name, axis, kept index)``, config updates and what stays zeroed, per structure."""

    removals: list = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)  # structure -> groups removed per block
    kept_zeroed: dict[str, int] = field(default_factory=dict)  # structure -> pruned groups left as zeros
    config_updates: dict = field(default_factory=dict)
    per_layer_savings: int = 0  # parameters per-layer widths would save beyond the equalised plan
    block_prefixes: list[str] = field(default_factory=list)  # blocks whose derived attributes need refreshing
    refresh_block: object = None
    refresh_model: object = None  # called with the model once blocks were deleted and the config updated
    notes: list[str] = field(default_factory=list)


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


def plan_export(tuner, adapter_name: str) -> ExportPlan:
    """The export plan of ``adapter_name`` (nothing is modified)."""
    config = tuner.peft_config[adapter_name]
    plan = ExportPlan()
    if config.is_element_granularity:
        plan.notes.append(
            f"{config.granularity} sparsity is exported as exact zeros in dense weights: same size and dense-kernel "
            "speed; it needs sparse kernels or compression to pay off"
        )
        return plan
    spec = require_architecture(tuner.model_type)
    export = spec.export
    closed, container, kept_blocks = _closed_blocks(tuner, adapter_name, spec)
    groups = [g for g in tuner.structured_groups(adapter_name, include_all=True) if g.block not in closed]
    removable = [g for g in groups if export is not None and g.spec.structure in export.removable]
    masks, widths = _equalised_keep_masks(removable, adapter_name)
    for structure in sorted({g.spec.structure for g in groups}):
        of_kind = [g for g in groups if g.spec.structure == structure]
        pruned_counts = [g.spec.n_groups - int(g.kept(adapter_name).sum()) for g in of_kind]
        if structure in masks:
            plan.removed[structure] = of_kind[0].spec.n_groups // of_kind[0].spec.partitions - widths[structure]
            for g, mask in zip(of_kind, masks[structure]):
                extra = int(mask.sum()) - int(g.kept(adapter_name).sum())
                for member, name, _ in g.members:
                    index = expand_groups(mask, member.layout).nonzero().flatten()
                    plan.removals.append((name, member.axis, index))
                plan.per_layer_savings += extra * g.weights_per_group()
            if any(int(m.sum()) != int(g.kept(adapter_name).sum()) for g, m in zip(of_kind, masks[structure])):
                plan.notes.append(
                    f"blocks keep different numbers of {structure}; all were widened to {widths[structure]} "
                    "(per partition) so one config value describes them"
                )
        elif any(pruned_counts):
            plan.kept_zeroed[structure] = max(pruned_counts)
    if masks:
        plan.config_updates = export.config_updates(tuner.model.config, widths, config.head_grouping)
    if plan.removals and export.refresh_block is not None:
        renumbered = {old: new for new, old in enumerate(kept_blocks)} if closed else {}
        plan.block_prefixes = sorted(
            {f"{container}.{renumbered[g.block]}" if closed else g.block_prefix for g in removable}
        )
        plan.refresh_block = export.refresh_block
    hidden = _removed_stream_channels(tuner, adapter_name, closed)
    if hidden is not None:
        stream, index = hidden
        if export is None or "hidden" not in export.removable:
            plan.kept_zeroed["hidden"] = stream.size - len(index)
        else:
            open_block = _not_in_blocks(tuner, closed)
            plan.removals += [(name, "rows", index) for name, _ in stream.writers if open_block(name)]
            plan.removals += [(name, "cols", index) for name, _ in stream.readers if open_block(name)]
            plan.removals += [(name, "norm", index) for name in stream.norms if open_block(name)]
            plan.removals.append((stream.embedding, "embedding", index))
            if stream.output is not None:
                plan.removals.append((stream.output, "cols", index))
            plan.removed["hidden"] = stream.size - len(index)
            plan.refresh_model = export.refresh_model
            plan.config_updates.update(
                export.config_updates(tuner.model.config, {**widths, "hidden": len(index)}, config.head_grouping)
            )
    if closed:
        if export is None or export.layer_config_updates is None:
            plan.kept_zeroed["layers"] = len(closed)
        else:
            plan.removed["layers"] = len(closed)
            plan.removals.append((container, "blocks", torch.tensor(kept_blocks)))
            plan.config_updates.update(export.layer_config_updates(tuner.model.config, kept_blocks))
            plan.refresh_model = export.refresh_model
    if plan.kept_zeroed:
        plan.notes.append(
            f"{spec.name}: {', '.join(plan.kept_zeroed)} cannot be removed through the config and stay zeroed; "
            "prune_structures=['channels'] prunes only what export removes"
        )
    return plan


def _closed_blocks(tuner, adapter_name, spec) -> tuple[set[int], str, list[int]]:
    """``(closed block indices, module name of the block list, indices of the blocks that stay)``; nothing closed
    when the family has no residual writers or the adapter prunes no layers."""
    if not spec.residual_writers or "layers" not in tuner.peft_config[adapter_name].prune_structures:
        return set(), "", []
    gates = tuner.block_gates(adapter_name, include_all=True)
    closed = {gate.block for gate in gates if not gate.kept(adapter_name)}
    if not closed:
        return closed, "", []
    container = gates[0].prefix.rpartition(".")[0]
    n_blocks = len(tuner.model.get_submodule(container))
    return closed, container, [i for i in range(n_blocks) if i not in closed]


def _removed_stream_channels(tuner, adapter_name, closed: set[int]):
    """``(stream, kept channel indices)`` when the adapter removed channels of the residual stream, else None."""
    if "hidden" not in tuner.peft_config[adapter_name].prune_structures:
        return None
    stream = tuner.residual_stream(adapter_name)
    kept = stream.kept(adapter_name)
    if bool(kept.all()):
        return None
    return stream, kept.nonzero().flatten().cpu()


def _not_in_blocks(tuner, blocks: set[int]):
    """A predicate on module names: True unless the module lies in one of ``blocks`` (deleted ones)."""
    return lambda name: tuner.block_index(name) not in blocks
