"""The HF Trainer with distillation: ``Trainer.compute_loss`` plus the KL toward a teacher in the same model.

Use it in place of ``Trainer`` with the usual :class:`~peft_loraprune.LoRAPruneCallback`::

    trainer = DistillationTrainer(
        model=peft_model, args=args, train_dataset=..., callbacks=[LoRAPruneCallback()],
        distillation=DistillationConfig(teacher="unmasked", weight=0.5, temperature=2.0),
    )

With TRL, put it first in a two-line subclass; the rest of the other trainer (dataset preparation, packing,
completion-only labels, collator, gradient-checkpointing set-up, logs) is unchanged::

    class DistillationSFTTrainer(DistillationTrainer, trl.SFTTrainer):
        pass

The task loss is always ``transformers.Trainer.compute_loss``, the model's own loss from its full logits (the KL
needs those logits, with their gradient): a ``compute_loss`` of the other class is not called. For
``SFTTrainer`` that is its fused LM head (it keeps no logits) and the entropy and token-accuracy metrics it logs;
the loss is the same mean over the counted tokens.

The KL is normalised like the task loss: a per-batch mean when the Trainer averages per batch, a sum over
the accumulated batch's counted positions divided by ``num_items_in_batch`` when the model takes loss kwargs (the
Trainer's gradient-accumulation normalisation), scaled across devices as the Trainer scales the task loss. The
logs gain ``distill_kl`` and ``task_loss`` (means over the logging interval) and ``distill_teacher_mib``.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .config import DistillationConfig
from .loss import Distiller


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``(1 − weight)·task + weight·T²·KL(teacher ‖ student)``."""

    def __init__(self, *args, distillation: Optional[DistillationConfig] = None, **kwargs) -> None:
        if not isinstance(distillation, DistillationConfig):
            raise TypeError(
                "DistillationTrainer needs distillation=DistillationConfig(teacher=...), got "
                f"{type(distillation).__name__}; for training without distillation use transformers.Trainer"
            )
        super().__init__(*args, **kwargs)
        self.distiller = Distiller(self.model, distillation)
        self._distill_sums: dict[str, torch.Tensor] = {}
        self._distill_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the model's own loss and logits, whatever other trainer class follows this one (see the module docstring)
        task_loss, outputs = Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if not model.training:  # evaluation reports the task loss
            return (task_loss, outputs) if return_outputs else task_loss
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        # accelerate autocasts the model's forward only; the teacher's passes run from here, under the same autocast
        # (a float32 teacher would cost more than the student's forward, and round its logits differently)
        with self.accelerator.autocast():
            loss, parts = self.distiller.loss(
                self.accelerator.unwrap_model(model),
                inputs,
                outputs,
                task_loss,
                num_items_in_batch=num_items_in_batch if scaled else None,
                device_scale=self.accelerator.num_processes
                if scaled and self.args.average_tokens_across_devices
                else 1,
            )
        for key, value in parts.items():
            self._distill_sums[key] = self._distill_sums.get(key, 0.0) + value
        self._distill_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._distill_count and "loss" in logs:
            for key, total in self._distill_sums.items():
                logs[key] = float(total) / self._distill_count
            logs["distill_teacher_mib"] = round(self.distiller.teacher_bytes / 2**20, 1)
            self._distill_sums.clear()
            self._distill_count = 0
        super().log(logs, *args, **kwargs)
