"""Recovering the pruned model toward a dense teacher that costs no weight memory.

The pretrained weights are never modified, so three teachers already live in a LoRAPrune model: the base with
adapters off (``teacher="base"``), the adapter being trained with its masks off (``"unmasked"``), and any other
adapter the model holds, such as a dense LoRA adapter trained beforehand (its name). The student is the model as
it trains, masks on. :class:`Distiller` computes ``(1 − weight)·task loss + weight·T²·KL(teacher ‖ student)``
with the teacher's logits consumed in chunks; :class:`DistillationTrainer` is the HF Trainer that uses it.
"""

from .config import DistillationConfig
from .loss import Distiller
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "Distiller"]
