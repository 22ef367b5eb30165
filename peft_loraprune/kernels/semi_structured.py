"""2:4 exports on sparse tensor cores: turn the Linear weights of an exported model into PyTorch's
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``).

An "N:M" LoRAPrune adapter exports as a dense model whose weights hold the pattern with exact zeros; PyTorch's dense
kernels run it at dense speed. NVIDIA GPUs from Ampere on (compute capability 8.0+) have kernels that skip the zeros
of a 2:4 pattern (two of every four consecutive weights along the input dimension are zero), in float16 and
bfloat16. :func:`to_semi_structured` checks the pattern of every Linear weight and swaps in the sparse form, in
place; everywhere else it refuses with a message saying why (CPU, an older GPU, a dtype the kernels do not take, a
weight that breaks the pattern). There is no file format for the result: save the dense export (``save_pretrained``)
and convert after loading.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.sparse import (
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
    to_sparse_semi_structured,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: PyTorch's two implementations of 2:4 sparse products; None lets PyTorch choose (``to_sparse_semi_structured``)
BACKENDS = {
    None: to_sparse_semi_structured,
    "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense,
    "cusparselt": SparseSemiStructuredTensorCUSPARSELT.from_dense,
}


def violates_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> Optional[tuple[int, int]]:
    """``(row, first column)`` of the first run of ``m`` weights along the input dimension with more than ``n``
    non-zeros, or None when the whole ``(out, in)`` weight follows the ``n:m`` pattern."""
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(
            f"an n:m pattern needs a 2-D weight whose input size is a multiple of {m}, got {tuple(weight.shape)}"
        )
    counts = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel() == 0:
        return None
    row, group = bad[0].tolist()
    return row, group * m


def _linears(model: torch.nn.Module, skip: tuple[str, ...]):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            yield name, module


def check_semi_structured_support(device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> None:
    """Raise a ``RuntimeError`` saying why 2:4 sparse kernels (of ``backend``, see :data:`BACKENDS`) cannot run on
    ``device`` / ``dtype``."""
    if device.type != "cuda":
        raise RuntimeError(
            f"2:4 semi-structured sparse kernels run on NVIDIA GPUs (compute capability 8.0 or newer); the model is on "
            f"{device.type}. Keep the dense export there (the zeros are exact, the speed is dense speed)."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(
            f"2:4 semi-structured sparse kernels need compute capability 8.0 or newer (Ampere+); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}."
        )
    if backend == "cutlass" and major != 8:
        # seen on an H100 (9.0) with torch 2.11: the conversion succeeds, the first product fails
        raise RuntimeError(
            f"PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only (Ampere, Ada); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use backend='cusparselt' or None."
        )
    if dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"2:4 semi-structured kernels take float16 or bfloat16 weights; the model is in {dtype}.")


def to_semi_structured(
    model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",), backend: Optional[str] = None
) -> list[str]:
    """Replace the weight of every ``nn.Linear`` (names containing a ``skip`` entry aside) with its 2:4
    semi-structured sparse form, in place; returns the converted module names.

    ``backend``: ``"cutlass"`` or ``"cusparselt"`` picks PyTorch's implementation; None (default) takes PyTorch's
    own choice. Their speed differs by GPU, shape and PyTorch version: ``benchmarks/export_speed.py`` times both.

    Every weight is checked first (nothing is converted if one breaks the pattern: a ``ValueError`` names the module,
    row and column); the device and dtype are checked before any work (``RuntimeError``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of None, 'cutlass', 'cusparselt'; got {backend!r}.")
    linears = list(_linears(model, skip))
    if not linears:
        raise ValueError("the model has no nn.Linear module to convert")
    first = linears[0][1].weight
    check_semi_structured_support(first.device, first.dtype, backend)
    for name, module in linears:
        where = violates_n_m(module.weight.detach(), 2, 4)
        if where is not None:
            raise ValueError(
                f"{name}.weight breaks the 2:4 pattern at row {where[0]}, columns {where[1]}-{where[1] + 3} (more "
                "than two non-zeros): export an adapter trained with granularity='2:4', or add the module to skip."
            )
    converted = []
    for name, module in linears:
        module.weight = torch.nn.Parameter(BACKENDS[backend](module.weight.detach()), requires_grad=False)
        converted.append(name)
    return converted
