"""Binding of the architecture registry to the layers of one adapted model.

:func:`find_structured_groups` answers, for one adapter: which groups (heads, channels) does each transformer
block have, and which LoRAPrune layers and axes make up each of them. The pruning engine, the sparsity report and
export all read the model's structure through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.group_ops import expand_groups, groups_kept
from ..layer import LoRAPruneLayer
from .architectures import GroupMember, GroupSpec, require_architecture


@dataclass
class BlockGroups:  # noqa: D101 (documented below)
    """The groups of one kind (e.g. heads) in one transformer block, bound to the layers that hold them."""

    block: int
    spec: GroupSpec
    members: list[tuple[GroupMember, str, LoRAPruneLayer]]  # (member, full module name, layer)
    input_factor: Optional[LoRAPruneLayer] = None  # the layer named by ``spec.input_factor``, when adapted

    def consumers(self) -> list[tuple[str, LoRAPruneLayer]]:
        """``(full name, layer)`` of the members scored on their input columns."""
        return [(name, layer) for member, name, layer in self.members if member.axis == "cols"]

    @property
    def block_prefix(self) -> str:
        """Module name of the block itself (the member's full name without its block-relative part)."""
        member, full_name, _ = self.members[0]
        return full_name[: -len(member.module) - 1]

    def weights_per_group(self) -> int:
        """Weights one group holds in this block: its rows or columns in every member module."""
        return sum(
            member.layout[0] * member.layout[2] * (layer.in_features if member.axis == "rows" else layer.out_features)
            for member, _, layer in self.members
        )

    def kept(self, adapter_name: str) -> torch.Tensor:
        """Per-group bool: kept in the first member (every member holds the same group mask)."""
        member, _, layer = self.members[0]
        return groups_kept(_axis_mask(layer, adapter_name, member.axis), member.layout)

    def apply(self, adapter_name: str, group_mask: torch.Tensor) -> None:
        """Write a per-group keep mask into every member's row or column mask (AND with what is there)."""
        for member, _, layer in self.members:
            current = _axis_mask(layer, adapter_name, member.axis)
            new = current & expand_groups(group_mask.to(current.device), member.layout)
            layer.set_masks(adapter_name, **{member.axis: new})


def _axis_mask(layer: LoRAPruneLayer, adapter_name: str, axis: str) -> torch.Tensor:
    return (layer.lora_mask_rows if axis == "rows" else layer.lora_mask_cols)[adapter_name]


def mark_rows_masked_downstream(groups: list[BlockGroups], adapter_name: str) -> None:
    """Tell row members of groups that also have a column member that their row mask need not be applied in
    the forward pass (the column mask of the consumer removes those rows' contribution exactly)."""
    for groups_of_block in groups:
        if not any(member.axis == "cols" for member, _, _ in groups_of_block.members):
            continue
        for member, _, layer in groups_of_block.members:
            if member.axis == "rows":
                layer.rows_masked_downstream.add(adapter_name)


def resolve_dense_layers(config, block_indices: list[int]) -> set[int]:
    """Blocks never pruned: the config's list, or for ``"reference"`` the first 10% of blocks and the last."""
    if config.dense_layers is None or not block_indices:
        return set()
    if config.dense_layers == "reference":
        n_blocks = max(block_indices) + 1
        return set(range(int(0.1 * n_blocks))) | {n_blocks - 1}
    return set(config.dense_layers)


def find_structured_groups(tuner, adapter_name: str, include_all: bool = False) -> list[BlockGroups]:
    """All prunable groups of ``adapter_name``, blocks in order, skipping ``dense_layers`` and unselected kinds
    (``include_all=True`` keeps them: export needs every block's width).

    Raises ``ValueError`` when the family is unknown, or when a module that must lose a group together with the
    others is not adapted (structured pruning needs every member of a group).
    """
    config = tuner.peft_config[adapter_name]
    spec = require_architecture(tuner.model_type)
    hf_config = getattr(tuner.model, "config", None)

    by_block: dict[int, dict[str, tuple[str, LoRAPruneLayer]]] = {}
    for name, layer in tuner.prune_layers(adapter_name):
        located = spec.locate(name)
        if located is not None:
            by_block.setdefault(located[0], {})[located[1]] = (name, layer)
    if not by_block:
        raise ValueError(
            f"No adapted module of this {spec.name} model lies in a transformer block; structured pruning needs "
            f"the block modules {list(spec.prunable_modules)} in target_modules."
        )
    dense = set() if include_all else resolve_dense_layers(config, sorted(by_block))
    result = []
    for block in sorted(by_block):
        if block in dense:
            continue
        for group_spec in spec.groups(hf_config, config.head_grouping):
            if group_spec.structure not in config.prune_structures and not include_all:
                continue
            members = []
            missing = []
            for member in group_spec.members:
                found = by_block[block].get(member.module)
                if found is None:
                    missing.append(member.module)
                else:
                    members.append((member, found[0], found[1]))
            if missing and include_all:
                continue  # a structure that could not have been pruned: nothing to export for it
            if missing:
                raise ValueError(
                    f"Structured pruning of {group_spec.structure} in block {block} needs the modules "
                    f"{[m.module for m in group_spec.members]} adapted, but {missing} are not in target_modules. "
                    "Add them, or restrict prune_structures."
                )
            factor = by_block[block].get(group_spec.input_factor) if group_spec.input_factor else None
            result.append(BlockGroups(block, group_spec, members, factor[1] if factor else None))
    return result
