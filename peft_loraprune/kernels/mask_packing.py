"""Compact storage of element masks: 8 mask entries per byte.

An unstructured or N:M mask has one entry per weight. Kept as ``bool`` it costs a byte per weight, as much as an
int8 model; packed into bits it costs an eighth of that, which is what keeps a pruned adapter a small fraction
of the base model on disk. The layer keeps the packed tensor as its persistent (saved) state and unpacks it
when the forward pass needs it.

On the CPU, packing and unpacking go through NumPy's ``packbits`` / ``unpackbits`` (same bit order, most
significant first), which work on the tensor's memory without a copy: on a 2816 x 1024 mask they took 0.14 and
0.21 ms against 2.0 and 2.1 ms for the tensor formulation below (which serves every other device). Every mask
rewrite unpacks and repacks each pruned layer's mask, so on a 0.5B model this was about half of a rewrite.
"""

from __future__ import annotations

import numpy as np
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
    if _numpy_can_read(mask):
        return torch.from_numpy(np.packbits(mask.detach().numpy(), axis=-1))
    return _pack_bits_tensor(mask)


def _numpy_can_read(t: torch.Tensor) -> bool:
    """A plain CPU tensor outside tracing: NumPy can work on its memory (not a tensor subclass such as a fake or
    distributed tensor, and not while ``torch.compile`` traces)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()


def _pack_bits_tensor(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` in tensor operations (any device)."""
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
    if packed.shape[1] != (cols + 7) // 8:
        raise ValueError(
            f"a packed mask of {packed.shape[1]} bytes per row holds {packed.shape[1] * 8 - 7} to "
            f"{packed.shape[1] * 8} columns, not cols={cols}."
        )
    if _numpy_can_read(packed):
        return torch.from_numpy(np.unpackbits(packed.detach().numpy(), axis=-1, count=cols)).view(torch.bool)
    return _unpack_bits_tensor(packed, cols)


def _unpack_bits_tensor(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """:func:`unpack_bits` in tensor operations (any device)."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(packed.shape[0], -1)[:, :cols]


_VALUE_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _value_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(256, 8)``: row ``b`` holds the 8 mask entries of byte ``b`` as 0/1 values of ``dtype``."""
    key = (dtype, device)
    if key not in _VALUE_TABLES:
        byte = torch.arange(256, dtype=torch.uint8).unsqueeze(-1)
        _VALUE_TABLES[key] = byte.bitwise_and(_BIT_WEIGHTS).ne(0).to(device=device, dtype=dtype)
    return _VALUE_TABLES[key]


def unpack_values_into(packed: torch.Tensor, cols: int, out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The mask as 0/1 values of ``out``'s dtype, written into ``out`` (``rows x 8 · packed columns``); returns the
    ``out[:, :cols]`` view. ``index``: an int64 buffer of ``packed.numel()`` entries.

    One table look-up per packed byte and nothing allocated: the element-masked product unpacks into reused buffers
    at every pass (see :mod:`~peft_loraprune.kernels.workspace`), as values of its compute dtype because multiplying by a
    mask of the same floating dtype is several times faster than by a bool mask, or than ``masked_fill_``, on the
    CPU; the look-up is about twice as fast as shifting bits out."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_values_into expects a 2-D uint8 tensor, got dtype={packed.dtype}, shape={tuple(packed.shape)}."
        )
    rows, packed_cols = packed.shape
    if tuple(out.shape) != (rows, packed_cols * 8) or not out.is_floating_point():
        raise ValueError(
            f"out must be a floating tensor of shape {(rows, packed_cols * 8)}, got {out.dtype} {tuple(out.shape)}."
        )
    index.copy_(packed.reshape(-1))
    torch.index_select(_value_table(out.dtype, out.device), 0, index, out=out.view(-1, 8))
    return out[:, :cols]
