"""The forward and backward pass of a linear layer under an element (per-weight) mask.

Computes ``y = (W0 ⊙ M)·x + s·((B·R) ⊙ M)·x_lora + b`` where ``R`` is ``A`` (parallel adaptation) or ``A·W0``
(sequential adaptation). Written as an autograd Function so that nothing weight-sized outlives the layer's own
forward or backward: plain autograd would save ``W0 ⊙ M`` and ``B·R`` (two weight-sized tensors per layer) from
the forward to the backward pass, and a cached unpacked mask costs a byte per weight for the whole run. Here the
mask travels bit-packed (an eighth of a byte per weight) and is unpacked, used and dropped inside each pass, and
every weight-sized temporary lives in a buffer reused by all layers (:mod:`~peft_loraprune.kernels.workspace`), so
nothing fragments the heap between activations.

Work per pass, for a layer of ``n`` weights (the floor for an exact masked update is the extra product
``G = grad_yᵀ·x_lora`` that the masked factor gradients need, and rebuilding the masked weight in each pass):

* forward: unpack the mask, ``(W0 + s·B·R) ⊙ M`` in two passes over ``n`` (one ``addmm``, one in-place mask),
  one product. With adapter dropout the adapter path has its own input, so ``W0 ⊙ M`` and ``s·(B·R) ⊙ M`` are
  built apart and multiplied apart: a second weight-sized product.
* backward: the same rebuild for ``grad_x`` (and ``grad_x_lora``), ``G ⊙ M`` (one product, one pass), and the
  factor gradients ``s·(G ⊙ M)·Rᵀ`` and ``s·Bᵀ·(G ⊙ M)``.

Pruned weights are zeroed by multiplying with the mask as 0/1 values of the compute dtype (unpacked once per pass
into the workspace): a bool mask is converted to the weight's dtype at every use (a weight-sized copy; measured a
fifth of the step on a 0.5B model) and ``masked_fill_`` is slower still on the CPU.

With ``straight_through=True`` (``element_mask_gradient="straight_through"``, an opt-in approximation) the
factor gradients are those of the unmasked update: ``s·grad_yᵀ·(x_lora·Rᵀ)`` and ``s·(grad_y·B)ᵀ·x_lora``, rank-r
products with nothing weight-sized, so the backward pass skips ``G`` and its mask pass. The output and every input
gradient are still those of the masked layer.

Both passes walk the weight in blocks (rows in the forward pass, so each block fills its own output rows;
columns in the backward pass, so each block fills its own input-gradient columns and needs no accumulation), and
every weight-sized temporary above is one block's, built and consumed while it is in cache (see
:func:`block_elements`).

Structured (row and column) masks never come here: they are applied to the layer's input and output, which
costs nothing weight-sized at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .importance import row_chunks
from .mask_packing import unpack_values_into
from .workspace import WORKSPACE


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer's products run in: autocast's when it is on (so the masked weight is built once, in
    that dtype, rather than built in float32 and cast by ``F.linear``), the input's otherwise."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


#: Blocking: each pass walks the weight block by block, so that a block's temporaries (mask values, masked
#: weight, masked gradient) stay in cache from the pass that builds them to the product that reads them. Every
#: block re-reads the activations (tokens x d floats), so a block grows with the tokens: 8,192 weights per token
#: (1M weights, 4 MB in float32, at 128 tokens), at least MIN_BLOCK_ELEMENTS. Measured on one CPU core pair
#: (0.5B-model layer shapes, forward + backward): 8-12% faster than unblocked at 128 tokens; smaller blocks lost
#: to the re-reads, and at 512 tokens 1M-weight blocks were 3-8% slower than one block.
ELEMENTS_PER_TOKEN = 8192
MIN_BLOCK_ELEMENTS = 1 << 18


def block_elements(tokens: int) -> int:
    """Weights per block of a pass over ``tokens`` rows of activations."""
    return max(MIN_BLOCK_ELEMENTS, ELEMENTS_PER_TOKEN * tokens)


def column_blocks(n_rows: int, n_cols: int, elements: int) -> Iterator[slice]:
    """Consecutive column slices of at most ``elements`` weights, each starting on a packed byte (a multiple of 8
    columns) so that the bit-packed mask splits with them; at least 8 columns."""
    step = max(8, (elements // max(1, n_rows)) // 8 * 8)
    for start in range(0, n_cols, step):
        yield slice(start, min(n_cols, start + step))


def _mask_values(packed: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A block of the mask as 0/1 values of ``dtype`` (``rows x n_cols``), unpacked into the workspace."""
    rows, packed_cols = packed.shape
    index = WORKSPACE.get("mask_index", (rows * packed_cols,), torch.int64, packed.device)
    values = WORKSPACE.get("mask_values", (rows, packed_cols * 8), dtype, packed.device)
    return unpack_values_into(packed, n_cols, values, index)


def _packed_columns(packed: torch.Tensor, cols: slice) -> torch.Tensor:
    """The bytes of the packed mask that hold columns ``cols`` (which start on a byte)."""
    return packed[:, cols.start // 8 : (cols.stop + 7) // 8]


def _weight_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return WORKSPACE.get("weight", tuple(shape), dtype, device)


def _masked_merged(weight, lora_B, lora_R, scaling, mask, dtype) -> torch.Tensor:
    """A block of ``(W0 + s·B·R) ⊙ M`` in ``dtype``, in the workspace."""
    out = _weight_buffer(weight.shape, dtype, weight.device)
    if weight.dtype == dtype:
        torch.addmm(weight, lora_B, lora_R, alpha=scaling, out=out)
    else:  # cast while copying, then add the low-rank term in place
        out.copy_(weight).addmm_(lora_B, lora_R, alpha=scaling)
    return out.mul_(mask)


def _masked_base(weight, mask, dtype) -> torch.Tensor:
    """A block of ``W0 ⊙ M`` in ``dtype``, in the workspace."""
    out = _weight_buffer(weight.shape, dtype, weight.device)
    if weight.dtype == dtype:
        return torch.mul(weight, mask, out=out)
    return out.copy_(weight).mul_(mask)


def _masked_delta(weight, lora_B, lora_R, scaling, mask, dtype) -> torch.Tensor:
    """A block of ``s·(B·R) ⊙ M`` in ``dtype``, in the workspace (the scale folded into the small factor)."""
    out = _weight_buffer(weight.shape, dtype, weight.device)
    return torch.mm(lora_B * scaling, lora_R, out=out).mul_(mask)


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype``, in one copy. The input gradients are built transposed; handed on
    as strided views they made the elementwise backward of the layer below (activation, gating product) several
    times slower (``silu_backward`` 33 against 7 ms per step on the 0.5B model)."""
    if t.dtype == dtype:
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


class _ElementMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, x_lora, weight, bias, lora_B, lora_R, scaling: float, packed_mask, n_cols: int, straight_through: bool
    ):
        shared_input = x_lora is x
        dtype = _compute_dtype(x)
        # a quantized base hands a source that dequantizes inside each pass (see quantized.DequantizingWeight)
        source = None if isinstance(weight, torch.Tensor) else weight
        if source is not None:
            weight = source.materialize()
        d_out = weight.shape[0]
        x2 = x.reshape(-1, n_cols).to(dtype)
        xl2 = x2 if shared_input else x_lora.reshape(-1, n_cols).to(dtype)
        B, R = lora_B.to(dtype), lora_R.to(dtype)
        # the output is built transposed, so that each row block of the weight fills a contiguous block of it
        y_t = torch.empty(d_out, x2.shape[0], dtype=dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for rows in row_chunks(d_out, n_cols, block_elements(x2.shape[0])):
                mask = _mask_values(packed_mask[rows], n_cols, dtype)
                if shared_input:
                    torch.mm(_masked_merged(weight[rows], B[rows], R, scaling, mask, dtype), x2.t(), out=y_t[rows])
                else:
                    torch.mm(_masked_base(weight[rows], mask, dtype), x2.t(), out=y_t[rows])
                    y_t[rows].addmm_(_masked_delta(weight[rows], B[rows], R, scaling, mask, dtype), xl2.t())
        y = y_t.t().contiguous()
        if bias is not None:
            y.add_(bias.to(dtype))
        ctx.shared_input = shared_input
        ctx.straight_through = straight_through
        ctx.scaling = scaling
        ctx.n_cols = n_cols
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_dtypes = (x.dtype, x_lora.dtype)
        ctx.weight_source = source
        ctx.save_for_backward(
            x, None if shared_input else x_lora, weight if source is None else None, lora_B, lora_R, packed_mask
        )
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, x_lora, weight, lora_B, lora_R, packed_mask = ctx.saved_tensors
        if ctx.weight_source is not None:
            weight = ctx.weight_source.materialize()
        need_x, need_xl, need_w, need_b, need_B, need_R = ctx.needs_input_grad[:6]
        dtype, s, n_cols = ctx.dtype, ctx.scaling, ctx.n_cols
        if ctx.shared_input:
            need_x = need_x or need_xl
            need_xl = False
        d_out = weight.shape[0]
        gy2 = grad_y.reshape(-1, d_out).to(dtype)
        x2 = x.reshape(-1, n_cols).to(dtype)
        xl2 = x2 if ctx.shared_input else x_lora.reshape(-1, n_cols).to(dtype)
        B, R = lora_B.to(dtype), lora_R.to(dtype)
        exact_factors = (need_B or need_R) and not ctx.straight_through
        # input gradients are built transposed (each column block of the weight fills a contiguous block)
        new = lambda: torch.empty(n_cols, gy2.shape[0], dtype=dtype, device=gy2.device)  # noqa: E731
        grad_x_t = new() if need_x else None
        grad_xl_t = new() if need_xl else None
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        grad_B = torch.zeros(B.shape, dtype=torch.float32, device=B.device) if exact_factors and need_B else None
        grad_R = torch.empty(R.shape, dtype=dtype, device=R.device) if exact_factors and need_R else None
        for cols in column_blocks(d_out, n_cols, block_elements(gy2.shape[0])):
            width = cols.stop - cols.start
            mask = _mask_values(_packed_columns(packed_mask, cols), width, dtype)
            w, r = weight[:, cols], R[:, cols]
            if need_x and ctx.shared_input:
                torch.mm(_masked_merged(w, B, r, s, mask, dtype).t(), gy2.t(), out=grad_x_t[cols])
            elif need_x:
                torch.mm(_masked_base(w, mask, dtype).t(), gy2.t(), out=grad_x_t[cols])
            if need_xl:
                torch.mm(_masked_delta(w, B, r, s, mask, dtype).t(), gy2.t(), out=grad_xl_t[cols])
            if exact_factors:
                # this block of the gradient of the loss w.r.t. the masked delta B·R, without the scale
                g = WORKSPACE.get("gradient", (d_out, width), dtype, gy2.device)
                torch.mm(gy2.t(), xl2[:, cols], out=g).mul_(mask)
                if need_B:
                    grad_B.add_(g @ r.t())
                if need_R:
                    grad_R[:, cols] = B.t() @ g
            if need_w:
                grad_w[:, cols] = (gy2.t() @ x2[:, cols]).mul_(mask)
        grad_x = grad_xl = grad_bias = None
        if need_x:
            grad_x = _contiguous_as(grad_x_t.t(), ctx.input_dtypes[0]).reshape(x.shape)
        if need_xl:
            grad_xl = _contiguous_as(grad_xl_t.t(), ctx.input_dtypes[1]).reshape(x_lora.shape)
        if exact_factors:
            grad_B = grad_B.mul_(s).to(lora_B.dtype) if need_B else None
            grad_R = grad_R.mul_(s).to(lora_R.dtype) if need_R else None
        elif need_B or need_R:
            # straight through: the gradients of the unmasked update s·B·R, associated so that nothing
            # weight-sized is formed
            grad_B = (gy2.t() @ (xl2 @ R.t())).mul_(s).to(lora_B.dtype) if need_B else None
            grad_R = ((gy2 @ B).t() @ xl2).mul_(s).to(lora_R.dtype) if need_R else None
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
        weight: pretrained weight as ``(d_out, d_in)`` (a transposed view is fine), or an object with ``shape`` and
            ``materialize()`` (:class:`~peft_loraprune.kernels.quantized.DequantizingWeight`) that gives it inside each
            pass, so that a quantized base is dequantized in the pass and never kept from forward to backward.
        bias: ``(d_out,)`` or None.
        lora_B: ``(d_out, r)``; lora_R: ``(r, d_in)``.
        scaling: the adapter scale s.
        packed_mask: the mask bit-packed along rows (:func:`~peft_loraprune.kernels.mask_packing.pack_bits`), set bits
            where the weight is kept.
        n_cols: ``d_in`` (the packed rows may be padded to a multiple of 8).
        straight_through: give ``lora_B`` and ``lora_R`` the gradients of the unmasked update (see above).
    """
    return _ElementMaskedLinear.apply(
        x, x_lora, weight, bias, lora_B, lora_R, float(scaling), packed_mask, n_cols, bool(straight_through)
    )
