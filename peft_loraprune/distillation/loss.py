"""The distillation loss of one batch: the teacher's pass, the positions that count, the chunked KL.

For a causal language model the teacher's logits are never materialised whole. The teacher pass runs the
backbone only (``model.base_model`` of the transformers model: the decoder without its output head) and keeps
its last hidden states, ``batch × sequence × hidden`` in the model's dtype; the KL applies the output head to one
chunk of positions at a time (:func:`~peft_loraprune.kernels.distill_loss.chunked_kl_divergence`). The first batch
checks once that the head applied to those hidden states reproduces the model's own logits (a family with logit
scaling or soft-capping would not); if it does not, the teacher's full logits are used, with a warning naming
the extra memory. Other tasks (sequence classification, a logits tensor of ``batch × labels``) run the whole
teacher model; its logits are small.

:attr:`Distiller.teacher_bytes` records what the last teacher pass held: the hidden states (or full logits) plus
one chunk of teacher logits in float32.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

from ..kernels.distill_loss import chunked_kl_divergence
from .config import DistillationConfig
from .teachers import _peft_model, check_teacher, teacher_mode

IGNORE_INDEX = -100


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}


def _current_precision(device_type: str):
    """A context factory that re-enters the autocast in force now (or none): the KL's backward pass recomputes
    teacher logits outside any autocast, and must compute them as the forward pass did."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return lambda: torch.autocast(device_type, dtype=dtype)
    return contextlib.nullcontext


class Distiller:
    """Distillation toward ``config.teacher`` for one model (see the module docstring)."""

    def __init__(self, model, config: DistillationConfig) -> None:
        self.config = config
        if not isinstance(self.config, DistillationConfig):
            raise TypeError(f"config must be a DistillationConfig(teacher=...), got {type(self.config).__name__}")
        check_teacher(model, self.config.teacher)
        self._head_checked = False
        self._use_hidden_states = True
        self.teacher_bytes = 0

    # ------------------------------------------------------------------ the teacher's pass
    def _transformers_model(self, model):
        return _peft_model(model).get_base_model()

    def _causal_head(self, model, logits: torch.Tensor):
        """The output head when ``logits`` are a causal LM's (batch × sequence × vocabulary), else None."""
        base = self._transformers_model(model)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if logits.dim() != 3 or not isinstance(head, torch.nn.Linear) or head.out_features != logits.shape[-1]:
            return None
        if getattr(base, "base_model", base) is base:
            return None
        return head

    @torch.no_grad()
    def _teacher_hidden(self, model, inputs: dict) -> torch.Tensor:
        base = self._transformers_model(model)
        with teacher_mode(model, self.config.teacher):
            out = base.base_model(**_model_inputs(inputs))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @torch.no_grad()
    def _teacher_logits(self, model, inputs: dict) -> torch.Tensor:
        with teacher_mode(model, self.config.teacher):
            return _peft_model(model)(**_model_inputs(inputs)).logits

    # ------------------------------------------------------------------ positions that count
    @staticmethod
    def _rows(logits: torch.Tensor, inputs: dict, causal: bool) -> torch.Tensor:
        """Indices into the flattened rows of ``logits`` that the KL averages over."""
        labels = inputs.get("labels")
        if logits.dim() == 2:  # one row per example
            return torch.arange(logits.shape[0], device=logits.device)
        batch, seq = logits.shape[:2]
        if labels is not None and labels.shape[:2] == (batch, seq):
            keep = labels != IGNORE_INDEX
            if causal:  # the logits at t predict the token at t + 1
                keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
        elif inputs.get("attention_mask") is not None:
            keep = inputs["attention_mask"].bool()
        else:
            keep = torch.ones(batch, seq, dtype=torch.bool, device=logits.device)
        return keep.reshape(-1).nonzero().squeeze(1).to(logits.device)

    # ------------------------------------------------------------------ the loss
    def kl(self, model, inputs: dict, student_logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``T²·KL(teacher ‖ student)`` averaged over the positions that count, and how many there were."""
        head = self._causal_head(model, student_logits)
        rows = self._rows(student_logits, inputs, causal=head is not None)
        chunk = self.config.chunk_rows
        vocab = student_logits.shape[-1]
        if head is not None and self._use_hidden_states:
            hidden = self._teacher_hidden(model, inputs)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if not self._head_checked:
                self._check_head(model, inputs, head, flat)
            if self._use_hidden_states:
                precision = _current_precision(student_logits.device.type)

                def teacher_rows(index):
                    with precision():
                        return head(flat.index_select(0, index).to(head.weight.dtype))

                self.teacher_bytes = flat.numel() * flat.element_size() + min(chunk, rows.numel()) * vocab * 4
                loss = chunked_kl_divergence(student_logits, teacher_rows, rows, self.config.temperature, chunk)
                return loss, rows.numel()
        teacher = self._teacher_logits(model, inputs)
        flat_teacher = teacher.reshape(-1, teacher.shape[-1])
        self.teacher_bytes = flat_teacher.numel() * flat_teacher.element_size()
        loss = chunked_kl_divergence(
            student_logits, lambda index: flat_teacher.index_select(0, index), rows, self.config.temperature, chunk
        )
        return loss, rows.numel()

    @torch.no_grad()
    def _check_head(self, model, inputs, head, flat_hidden) -> None:
        """Once: the head on the backbone's hidden states must give the model's own teacher logits."""
        self._head_checked = True
        full = self._teacher_logits(model, inputs)
        n = min(8, flat_hidden.shape[0])
        from_hidden = head(flat_hidden[:n])
        # the same product computed on 8 rows instead of all of them may round differently in its last place: a few
        # units of the logits' precision (bfloat16: 2^-7 of the largest logit) pass, a logit scaling or soft-cap
        # (a change of the largest logits by a factor) does not
        device = flat_hidden.device.type
        computed = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else full.dtype
        tolerance = max(1e-3, 4 * torch.finfo(computed).eps, 4 * torch.finfo(from_hidden.dtype).eps)
        reference = full.reshape(-1, full.shape[-1])[:n].float()
        from_hidden = from_hidden.float()
        if not torch.allclose(from_hidden, reference, rtol=tolerance, atol=tolerance * reference.abs().max().item()):
            self._use_hidden_states = False
            warnings.warn(
                f"{type(self._transformers_model(model)).__name__}: the output head applied to the last hidden "
                "states does not reproduce the model's logits (logit scaling or soft-capping?); distillation "
                "uses the teacher's full logits, batch x sequence x vocabulary, held for the whole step.",
                stacklevel=3,
            )

    def loss(
        self,
        model,
        inputs: dict,
        outputs,
        task_loss: Optional[torch.Tensor],
        num_items_in_batch=None,
        device_scale: int = 1,
    ) -> tuple[torch.Tensor, dict]:
        """``(1 − weight)·task_loss + weight·KL`` and its parts (detached tensors, for logging).

        ``num_items_in_batch``: when the task loss is a sum over the accumulated batch divided by this count (the
        Trainer's gradient-accumulation normalisation), the KL is normalised the same way; ``device_scale``: the
        factor the Trainer multiplies that loss by when it averages tokens across devices.
        """
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        kl, n_rows = self.kl(model, inputs, logits)
        if num_items_in_batch is not None:
            kl = kl * (n_rows * device_scale / max(int(num_items_in_batch), 1))
        w = self.config.weight
        if task_loss is None or w == 1.0:
            total = w * kl
        else:
            total = (1.0 - w) * task_loss + w * kl
        parts = {"distill_kl": kl.detach().float()}
        if task_loss is not None:
            parts["task_loss"] = task_loss.detach().float()
        return total, parts
