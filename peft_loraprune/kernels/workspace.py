"""Reusable scratch buffers for the weight-sized temporaries of element-masked layers.

The element-masked product (:mod:`~peft_loraprune.kernels.masked_linear`) needs, in each layer's forward and backward pass,
a few temporaries the size of (a block of) that layer's weight: the unpacked mask, the masked weight, the masked
gradient ``G ⊙ M``. Allocated afresh for every layer they are short-lived, but they interleave with the activations that live
from the forward to the backward pass, and the C allocator's heap fragments around them: measured on a 0.5B model
at 1 x 128 tokens (``benchmarks/memory_profile.py``), the process then held 2.1 GB more resident memory than it
had live. One buffer per purpose, device and dtype, grown to the largest request and reused by every layer in
turn, costs a few such tensors in all and nothing that fragments. The passes ask for one block of the weight at a
time (about 1M weights at 128 tokens, see :func:`~peft_loraprune.kernels.masked_linear.block_elements`), so the buffers
are block-sized, not layer-sized.

Nothing handed out here may escape the pass that asked for it: outputs and gradients are always fresh tensors.
Layers run one at a time in a process (autograd runs a device's backward on one thread), so one set of buffers
per device serves all of them.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named flat buffers, grown on demand; :meth:`get` returns a view of the requested shape."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` tensor for ``slot``; valid until the next :meth:`get` of the same slot."""
        n = math.prod(shape)
        key = (slot, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < n:
            self._buffers.pop(key, None)  # let the smaller buffer go before the larger one is allocated
            buffer = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buffer[:n].view(shape)

    def slots(self) -> set[str]:
        """Names of the slots that hold a buffer now (what a pass has asked for since the last :meth:`clear`)."""
        return {key[0] for key in self._buffers}

    def clear(self) -> None:
        """Free every buffer (they are re-created at the next use)."""
        self._buffers.clear()


#: the process-wide workspace of element-masked layers
WORKSPACE = Workspace()
