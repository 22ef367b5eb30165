"""Metrics the classification examples share (computed directly: ``evaluate.load`` needs the Hub)."""

from __future__ import annotations

import numpy as np


def accuracy(trainer, dataset) -> float:
    """Fraction of ``dataset`` the trainer's model classifies correctly."""
    prediction = trainer.predict(dataset)
    return float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())
