"""The two ways an adapter acts on a layer (the paper's two cases), as small objects with one interface.

For a frozen weight ``W0`` (``d_out x d_in``) with bias ``b``, factors ``A``, ``B`` and scale ``s``, every form
writes the merged weight as ``W0 + s·B·R`` for a right factor ``R``:

* :class:`Parallel` (plain LoRA): ``R = A`` (``r x d_in``); the adapter reads the layer's input; the bias is
  unchanged.
* :class:`Sequential`: the adapter acts on the layer's output, ``h' = h + s·B·A·h``, so ``R = A·W0`` with ``A``
  ``r x d_out``; the bias becomes ``(I + s·B·A)·b``; a masked merge cannot be undone by subtraction.

The layer, the criteria and merging ask the form; nothing compares strings (PEFT's ``LoraVariant`` is the
precedent).
"""

from __future__ import annotations

from typing import Optional

import torch


class Parallel:
    name = "parallel"
    #: merging can be undone by subtracting ``s·B·A`` (only pruned entries need a stash)
    invertible_merge = True
    #: ``right_factor`` reads the pretrained weight (a quantized base dequantizes it only when this is True)
    reads_w0 = False

    def a_in_features(self, in_features: int, out_features: int) -> int:
        """Input width of ``A``."""
        return in_features

    def right_factor(self, a: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """``R`` with merged weight ``W0 + s·B·R``."""
        return a

    def adapter_input(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What the low-rank path reads: the layer's input ``x`` or the base output ``h``."""
        return x

    def merged_bias(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return bias

    def gradient_w0(self, w0: torch.Tensor) -> Optional[torch.Tensor]:
        """The matrix that right-multiplies the adapter-gradient estimate ``G_hat`` (None: identity)."""
        return None

    def __repr__(self) -> str:
        return self.name


class Sequential(Parallel):
    name = "sequential"
    invertible_merge = False
    reads_w0 = True

    def a_in_features(self, in_features, out_features):
        return out_features

    def right_factor(self, a, w0):
        return a @ w0.to(a.dtype)

    def adapter_input(self, x, h):
        return h

    def merged_bias(self, bias, a, b, scaling):
        return bias + scaling * (b @ (a @ bias.to(a.dtype))).to(bias.dtype)

    def gradient_w0(self, w0):
        return w0


ADAPTATIONS = {form.name: form for form in (Parallel(), Sequential())}


def adaptation(name: str):
    """The form named ``name`` ("parallel" or "sequential")."""
    return ADAPTATIONS[name]
