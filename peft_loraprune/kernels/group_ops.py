"""Pure tensor operations between a module axis (rows or columns) and the groups laid out along it.

A group axis of length ``L = outer * n_groups * inner`` is viewed as ``(outer, n_groups, inner)``; group ``g``
is every ``[o, g, i]`` (see :mod:`peft_loraprune.pruning.architectures`).
"""

from __future__ import annotations

import torch


def _view(vector: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    outer, n_groups, inner = layout
    if vector.numel() != outer * n_groups * inner:
        raise ValueError(
            f"axis of length {vector.numel()} does not fit the group layout {layout} "
            f"({outer} x {n_groups} x {inner} = {outer * n_groups * inner})"
        )
    return vector.reshape(outer, n_groups, inner)


def sum_over_groups(vector: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """Per-group sums of a per-row (or per-column) vector: shape ``(n_groups,)``."""
    return _view(vector, layout).sum(dim=(0, 2))


def groups_kept(mask: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """Per-group bool: True when any entry of the group is still kept."""
    return _view(mask, layout).any(dim=2).any(dim=0)


def expand_groups(group_mask: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """Per-row (or per-column) bool mask from a per-group bool mask."""
    outer, n_groups, inner = layout
    return group_mask.reshape(1, n_groups, 1).expand(outer, n_groups, inner).reshape(-1)
