"""The forward and backward pass of a linear layer under an element (per-weight) mask.

Computes ``y = (W0 ⊙ M)·x + s·((B·R) ⊙ M)·x_lora + b`` where ``R`` is ``A`` (parallel adaptation) or ``A·W0``
(sequential adaptation). Written as an autograd Function so that nothing full-size is kept between the forward
and the backward pass: plain autograd would save ``W0 ⊙ M`` and ``B·R`` (two weight-sized tensors per layer) for
the backward; here both are rebuilt transiently from ``W0``, ``M`` and the factors, which are alive anyway. The
cost is one extra elementwise pass over the weight in the backward, the floor for any masked update.

Structured (row and column) masks never come here: they are applied to the layer's input and output, which
costs nothing weight-sized at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ElementMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_B, lora_R, scaling: float, mask):
        shared_input = x_lora is x
        dtype = x.dtype
        masked_delta = ((lora_B @ lora_R) * mask).mul_(scaling).to(dtype)
        if shared_input:
            merged = (weight.to(dtype) * mask).add_(masked_delta)
            y = F.linear(x, merged, None if bias is None else bias.to(dtype))
        else:
            y = F.linear(x, weight.to(dtype) * mask, None if bias is None else bias.to(dtype))
            y = y + F.linear(x_lora, masked_delta)
        ctx.shared_input = shared_input
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_lora if not shared_input else None, weight, lora_B, lora_R, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_lora, weight, lora_B, lora_R, mask = ctx.saved_tensors
        if ctx.shared_input:
            x_lora = x
        need_x, need_xl, need_w, need_b, need_B, need_R = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
            ctx.needs_input_grad[5],
        )
        dtype = grad_y.dtype
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_xl = grad_w = grad_bias = grad_B = grad_R = None

        if need_x or need_xl:
            masked_delta = ((lora_B @ lora_R) * mask).mul_(ctx.scaling).to(dtype)
            if ctx.shared_input:
                if need_x:
                    grad_x = grad_y @ (weight.to(dtype) * mask).add_(masked_delta)
            else:
                if need_x:
                    grad_x = grad_y @ (weight.to(dtype) * mask)
                if need_xl:
                    grad_xl = grad_y @ masked_delta
            del masked_delta
        if need_B or need_R:
            xl = x_lora.reshape(-1, x_lora.shape[-1])
            # gradient of the loss w.r.t. the masked delta weight, in the factors' dtype
            g = (gy.t().to(lora_B.dtype) @ xl.to(lora_B.dtype)).mul_(mask).mul_(ctx.scaling)
            if need_B:
                grad_B = g @ lora_R.t()
            if need_R:
                grad_R = lora_B.t() @ g
            del g
        if need_w:
            xx = x.reshape(-1, x.shape[-1])
            grad_w = (gy.t() @ xx.to(dtype)).mul_(mask).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_bias = gy.sum(0)
        return grad_x, grad_xl, grad_w, grad_bias, grad_B, grad_R, None, None


def element_masked_linear(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_B: torch.Tensor,
    lora_R: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """``(W0 ⊙ M)·x + s·((B·R) ⊙ M)·x_lora + b`` with no weight-sized tensor saved for backward.

    Args:
        x: layer input, ``(..., d_in)``.
        x_lora: input of the adapter path (``x`` after dropout); pass ``x`` itself when there is no dropout so
            one matmul serves both paths.
        weight: pretrained weight as ``(d_out, d_in)`` (a transposed view is fine).
        bias: ``(d_out,)`` or None.
        lora_B: ``(d_out, r)``; lora_R: ``(r, d_in)``.
        scaling: the adapter scale s.
        mask: bool ``(d_out, d_in)``, True where the weight is kept.
    """
    return _ElementMaskedLinear.apply(x, x_lora, weight, bias, lora_B, lora_R, float(scaling), mask)
