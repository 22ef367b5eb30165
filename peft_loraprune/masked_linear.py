"""The forward and backward pass of a linear layer under an element (per-weight) mask.

Computes ``y = (W0 ⊙ M)·x + s·((B·R) ⊙ M)·x_lora + b`` where ``R`` is ``A`` (parallel adaptation) or ``A·W0``
(sequential adaptation). Written as an autograd Function so that nothing weight-sized outlives the layer's own
forward or backward: plain autograd would save ``W0 ⊙ M`` and ``B·R`` (two weight-sized tensors per layer) from
the forward to the backward pass, and a cached unpacked mask costs a byte per weight for the whole run. Here the
mask travels bit-packed (an eighth of a byte per weight) and is unpacked, used and dropped inside each pass, and
every weight-sized temporary lives in a buffer reused by all layers (:mod:`~peft_loraprune.workspace`), so
nothing fragments the heap between activations.

Work per pass, for a layer of ``n`` weights (the floor for an exact masked update is the extra product
``G = grad_yᵀ·x_lora`` that the masked factor gradients need, and rebuilding the masked weight in each pass):

* forward: unpack the mask, ``(W0 + s·B·R) ⊙ M`` in two passes over ``n`` (one ``addmm``, one in-place mask),
  one product. With adapter dropout the adapter path has its own input, so ``W0 ⊙ M`` and ``s·(B·R) ⊙ M`` are
  built apart and multiplied apart: a second weight-sized product.

Pruned weights are zeroed by multiplying with the mask as 0/1 values of the compute dtype (unpacked once per pass
into the workspace): a bool mask is converted to the weight's dtype at every use (a weight-sized copy; measured a
fifth of the step on a 0.5B model) and ``masked_fill_`` is slower still on the CPU.
* backward: the same rebuild for ``grad_x`` (and ``grad_x_lora``), ``G ⊙ M`` (one product, one pass), and the
  factor gradients ``s·(G ⊙ M)·Rᵀ`` and ``s·Bᵀ·(G ⊙ M)``.

With ``straight_through=True`` (``element_mask_gradient="straight_through"``, an opt-in approximation) the
factor gradients are those of the unmasked update: ``s·grad_yᵀ·(x_lora·Rᵀ)`` and ``s·(grad_y·B)ᵀ·x_lora``, rank-r
products with nothing weight-sized, so the backward pass skips ``G`` and its mask pass. The output and every input
gradient are still those of the masked layer.

Structured (row and column) masks never come here: they are applied to the layer's input and output, which
costs nothing weight-sized at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask_packing import unpack_values_into
from .workspace import WORKSPACE


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer's products run in: autocast's when it is on (so the masked weight is built once, in
    that dtype, rather than built in float32 and cast by ``F.linear``), the input's otherwise."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _mask_values(packed: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask as 0/1 values of ``dtype`` (``d_out x d_in``), unpacked into the workspace."""
    rows, packed_cols = packed.shape
    index = WORKSPACE.get("mask_index", (rows * packed_cols,), torch.int64, packed.device)
    values = WORKSPACE.get("mask_values", (rows, packed_cols * 8), dtype, packed.device)
    return unpack_values_into(packed, n_cols, values, index)


def _weight_buffer(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return WORKSPACE.get("weight", tuple(weight.shape), dtype, weight.device)


def _masked_merged(weight, lora_B, lora_R, scaling, mask, dtype) -> torch.Tensor:
    """``(W0 + s·B·R) ⊙ M`` in ``dtype``, in the workspace."""
    out = _weight_buffer(weight, dtype)
    if weight.dtype == dtype:
        torch.addmm(weight, lora_B.to(dtype), lora_R.to(dtype), alpha=scaling, out=out)
    else:  # cast while copying, then add the low-rank term in place
        out.copy_(weight).addmm_(lora_B.to(dtype), lora_R.to(dtype), alpha=scaling)
    return out.mul_(mask)


def _masked_base(weight, mask, dtype) -> torch.Tensor:
    """``W0 ⊙ M`` in ``dtype``, in the workspace."""
    out = _weight_buffer(weight, dtype)
    if weight.dtype == dtype:
        return torch.mul(weight, mask, out=out)
    return out.copy_(weight).mul_(mask)


def _masked_delta(weight, lora_B, lora_R, scaling, mask, dtype) -> torch.Tensor:
    """``s·(B·R) ⊙ M`` in ``dtype``, in the workspace (the scale folded into the small factor)."""
    out = _weight_buffer(weight, dtype)
    return torch.mm(lora_B.to(dtype) * scaling, lora_R.to(dtype), out=out).mul_(mask)


class _ElementMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, x_lora, weight, bias, lora_B, lora_R, scaling: float, packed_mask, n_cols: int, straight_through: bool
    ):
        shared_input = x_lora is x
        dtype = _compute_dtype(x)
        mask = _mask_values(packed_mask, n_cols, dtype)
        bias_ = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if shared_input:
                y = F.linear(x.to(dtype), _masked_merged(weight, lora_B, lora_R, scaling, mask, dtype), bias_)
            else:
                y = F.linear(x.to(dtype), _masked_base(weight, mask, dtype), bias_)
                y += F.linear(x_lora.to(dtype), _masked_delta(weight, lora_B, lora_R, scaling, mask, dtype))
        ctx.shared_input = shared_input
        ctx.straight_through = straight_through
        ctx.scaling = scaling
        ctx.n_cols = n_cols
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_dtypes = (x.dtype, x_lora.dtype)
        ctx.save_for_backward(x, None if shared_input else x_lora, weight, lora_B, lora_R, packed_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_lora, weight, lora_B, lora_R, packed_mask = ctx.saved_tensors
        if ctx.shared_input:
            x_lora = x
        need_x, need_xl, need_w, need_b, need_B, need_R = ctx.needs_input_grad[:6]
        dtype, s = ctx.dtype, ctx.scaling
        mask = _mask_values(packed_mask, ctx.n_cols, dtype)
        gy = grad_y.to(dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_xl = grad_w = grad_bias = grad_B = grad_R = None

        if ctx.shared_input:
            if need_x or need_xl:
                grad_x = (gy @ _masked_merged(weight, lora_B, lora_R, s, mask, dtype)).to(ctx.input_dtypes[0])
        else:
            if need_x:
                grad_x = (gy @ _masked_base(weight, mask, dtype)).to(ctx.input_dtypes[0])
            if need_xl:
                grad_xl = (gy @ _masked_delta(weight, lora_B, lora_R, s, mask, dtype)).to(ctx.input_dtypes[1])
        if (need_B or need_R) and ctx.straight_through:
            # gradients of the unmasked update s·B·R, associated so that nothing weight-sized is formed
            xl2 = x_lora.reshape(-1, x_lora.shape[-1]).to(dtype)
            if need_B:
                grad_B = (gy2.t() @ (xl2 @ lora_R.to(dtype).t())).mul_(s).to(lora_B.dtype)
            if need_R:
                grad_R = ((gy2 @ lora_B.to(dtype)).t() @ xl2).mul_(s).to(lora_R.dtype)
        elif need_B or need_R:
            # gradient of the loss w.r.t. the masked delta B·R, without the scale (applied to the small results)
            g = WORKSPACE.get("gradient", tuple(weight.shape), dtype, weight.device)
            torch.mm(gy2.t(), x_lora.reshape(-1, x_lora.shape[-1]).to(dtype), out=g).mul_(mask)
            if need_B:
                grad_B = (g @ lora_R.to(dtype).t()).mul_(s).to(lora_B.dtype)
            if need_R:
                grad_R = (lora_B.to(dtype).t() @ g).mul_(s).to(lora_R.dtype)
        if need_w:  # a fresh tensor: it is returned
            grad_w = (gy2.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).mul_(mask).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_bias = gy2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_xl, grad_w, grad_bias, grad_B, grad_R, None, None, None, None


def element_masked_linear(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor,
    scaling: float,
    packed_mask: torch.Tensor,
    n_cols: int,
    straight_through: bool = False,
) -> torch.Tensor:
    """``(W0 ⊙ M)·x + s·((B·R) ⊙ M)·x_lora + b`` with nothing weight-sized kept between passes.

    Args:
        x: layer input, ``(..., d_in)``.
        x_lora: input of the adapter path (``x`` after dropout); pass ``x`` itself when there is no dropout so
            one product serves both paths.
        weight: pretrained weight as ``(d_out, d_in)`` (a transposed view is fine).
        bias: ``(d_out,)`` or None.
        lora_B: ``(d_out, r)``; lora_R: ``(r, d_in)``.
        scaling: the adapter scale s.
        packed_mask: the mask bit-packed along rows (:func:`~peft_loraprune.mask_packing.pack_bits`), set bits
            where the weight is kept.
        n_cols: ``d_in`` (the packed rows may be padded to a multiple of 8).
        straight_through: give ``lora_B`` and ``lora_R`` the gradients of the unmasked update (see above).
    """
    return _ElementMaskedLinear.apply(
        x, x_lora, weight, bias, lora_B, lora_R, float(scaling), packed_mask, n_cols, bool(straight_through)
    )
