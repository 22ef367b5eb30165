"""Compact storage of element masks: 8 mask entries per byte.

An unstructured or N:M mask has one entry per weight. Kept as ``bool`` it costs a byte per weight, as much as an
int8 model; packed into bits it costs an eighth of that, which is what keeps a pruned adapter a small fraction
of the base model on disk. The layer keeps the packed tensor as its persistent (saved) state and unpacks it
when the forward pass needs it.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def packed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the packed form of a ``(rows, cols)`` bool mask: ``(rows, ceil(cols / 8))``."""
    rows, cols = shape
    return rows, (cols + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask along its last dimension into ``uint8`` (most significant bit first)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D bool tensor, got dtype={mask.dtype}, shape={tuple(mask.shape)}.")
    rows, cols = mask.shape
    pad = (-cols) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    bits = mask.reshape(rows, -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a ``(rows, cols)`` bool mask."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_bits expects a 2-D uint8 tensor, got dtype={packed.dtype}, shape={tuple(packed.shape)}."
        )
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(packed.shape[0], -1)[:, :cols]
