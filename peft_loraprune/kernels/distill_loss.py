"""Temperature-scaled KL divergence from a teacher's logits to a student's, computed in chunks of rows.

For rows ``i`` (token positions, or examples for classification) with student logits ``s_i`` and teacher logits
``t_i`` over ``V`` classes, temperature ``T``::

    loss = T² / n · Σ_i KL(softmax(t_i / T) ‖ softmax(s_i / T))
    ∂loss/∂s_i = T / n · (softmax(s_i / T) − softmax(t_i / T))

(Hinton et al.'s ``T²`` keeps the gradient's scale independent of ``T``.) The teacher's logits are never held
whole: ``teacher_rows(index)`` returns them for a chunk of rows (for a causal LM, the output head applied to the
teacher's last hidden states of those rows), in the forward pass and again in the backward pass (when all rows fit
in one chunk, that chunk's teacher probabilities are kept from the forward pass instead). Memory beyond the
student's own logits and the gradient autograd already allocates for them: one chunk of teacher logits and a few
chunk-sized float32 temporaries, ``chunk_rows × V`` each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TeacherRows = Callable[[torch.Tensor], torch.Tensor]  # row indices -> teacher logits of those rows (rows x V)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, rows, teacher_rows, temperature, chunk_rows):
        flat = student.reshape(-1, student.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        ctx.teacher_probs = None
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start : start + chunk_rows]
            log_q = torch.log_softmax(flat.index_select(0, index).float() / temperature, dim=-1)
            log_p = torch.log_softmax(teacher_rows(index).float() / temperature, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if rows.numel() <= chunk_rows:  # a single chunk: keep it for backward instead of recomputing it
                ctx.teacher_probs = p
        ctx.save_for_backward(student, rows)
        ctx.teacher_rows, ctx.temperature, ctx.chunk_rows = teacher_rows, temperature, chunk_rows
        n = max(rows.numel(), 1)
        return total * (temperature**2 / n)

    @staticmethod
    def backward(ctx, grad_output):
        student, rows = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        flat = student.reshape(-1, student.shape[-1])
        grad = torch.zeros_like(flat)
        scale = grad_output.float() * (temperature / max(rows.numel(), 1))
        with torch.no_grad():
            for start in range(0, rows.numel(), chunk_rows):
                index = rows[start : start + chunk_rows]
                q = torch.softmax(flat.index_select(0, index).float() / temperature, dim=-1)
                p = ctx.teacher_probs
                if p is None:
                    p = torch.softmax(ctx.teacher_rows(index).float() / temperature, dim=-1)
                grad.index_copy_(0, index, ((q - p) * scale).to(grad.dtype))
        ctx.teacher_probs = None
        return grad.reshape(student.shape), None, None, None, None


def chunked_kl_divergence(
    student_logits: torch.Tensor,
    teacher_rows: TeacherRows,
    rows: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Mean over ``rows`` of ``T²·KL(teacher ‖ student)`` (see the module docstring).

    ``student_logits``: ``(..., V)``, flattened to rows; ``rows``: indices into the flattened rows that count
    (padding and ignored positions left out); ``teacher_rows``: called with a chunk of those indices, returns the
    teacher's logits for them (no gradient is taken through it).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    return _ChunkedKL.apply(student_logits, rows, teacher_rows, float(temperature), int(chunk_rows))
