"""What to distil from, and how much."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..validation import check_fraction, check_int

TEACHER_KINDS = ("base", "unmasked")


@dataclass
class DistillationConfig:
    """Logit distillation toward a teacher held in the same model (no second copy of the base weights).

    Args:
        teacher: required, there is no default: ``"unmasked"`` (the adapter being trained, masks off: the dense
            model it would be without pruning, improving as training goes), ``"base"`` (adapters off: the
            pretrained model; for a classifier its head is untrained, so this is refused there), or the name of
            another adapter the model holds, for example a dense LoRAPrune adapter (``target_sparsity=0``)
            trained beforehand on the same data and loaded with ``load_adapter(path, adapter_name="teacher")``.
            Measured (``benchmarks/RESULTS.md``, distillation study): only the dense adapter has helped so far;
            ``"unmasked"`` made the pruned model worse on both tasks measured, ``"base"`` on the one measured.
        weight: the KL term's share of the loss, in [0, 1]: ``(1 − weight)·task + weight·T²·KL``. 1.0 trains on
            the teacher alone (labels then only select the positions that count).
        temperature: softmax temperature ``T`` of both distributions (> 0).
        chunk_rows: token positions (or examples) per chunk of the KL: the teacher's logits are materialised for
            this many rows at a time (memory ``chunk_rows × vocabulary × 4`` bytes, a few times).
    """

    teacher: Optional[str] = None
    weight: float = 0.5
    temperature: float = 2.0
    chunk_rows: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(
                "teacher is required: 'unmasked', 'base' or the name of an adapter the model holds (a dense "
                f"adapter trained first is the one that has helped in our measurements), got {self.teacher!r}"
            )
        check_fraction("weight", self.weight, upper_inclusive=True)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or self.temperature <= 0
        ):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        check_int("chunk_rows", self.chunk_rows, 1)
