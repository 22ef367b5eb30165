"""The pruning schedule: which optimizer steps rewrite masks, and to what sparsity. Pure functions.

The reference code's cubic schedule: sparsity goes from ``initial`` to ``target`` between the step
``round(start_fraction · total)`` and the step ``round(end_fraction · total)``::

    s(t) = target + (initial − target) · (1 − (t − start) / (end − start))³

Masks are rewritten every ``interval`` steps from ``start`` and always at ``end``, so the last rewrite lands on
the target exactly (the reference code never applies its final step). ``one_shot`` prunes everything at
``start``.

The field defaults below are the reference code's window (10% to 90%); training uses ``from_config``, whose
``LoRAPruneConfig`` defaults end pruning at 40% of the steps (the measured choice, see the config's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_fraction, check_int


@dataclass(frozen=True)
class PruningSchedule:
    total_steps: int
    target: float
    initial: float = 0.0
    start_fraction: float = 0.1
    end_fraction: float = 0.9
    interval: int = 10
    one_shot: bool = False

    def __post_init__(self):
        check_int("total_steps", self.total_steps, 1)
        check_int("interval", self.interval, 1)
        for name in ("target", "initial", "start_fraction"):
            check_fraction(name, getattr(self, name))
        check_fraction("end_fraction", self.end_fraction, upper_inclusive=True)
        if not isinstance(self.one_shot, bool):
            raise TypeError(f"one_shot must be True or False, got {self.one_shot!r}")

    @classmethod
    def from_config(cls, config, total_steps: int) -> PruningSchedule:
        return cls(
            total_steps=total_steps,
            target=config.effective_target_sparsity,
            initial=config.initial_sparsity,
            start_fraction=config.pruning_start,
            end_fraction=config.pruning_end,
            interval=config.pruning_interval,
            one_shot=config.schedule == "one_shot",
        )

    @property
    def start(self) -> int:
        """First optimizer step (1-based count of completed steps) that rewrites masks."""
        return max(1, round(self.start_fraction * self.total_steps))

    @property
    def end(self) -> int:
        """The step whose rewrite reaches the target."""
        if self.one_shot:
            return self.start
        return max(self.start, min(self.total_steps, round(self.end_fraction * self.total_steps)))

    def sparsity_at(self, step: int) -> float:
        """Scheduled sparsity after ``step`` completed optimizer steps (0 before the first rewrite)."""
        check_int("step", step, 0)
        if step < self.start:
            return 0.0
        if step >= self.end:
            return self.target
        progress = (step - self.start) / (self.end - self.start)
        return self.target + (self.initial - self.target) * (1.0 - progress) ** 3

    def is_pruning_step(self, step: int) -> bool:
        check_int("step", step, 0)
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.interval == 0

    def pruning_steps(self) -> list[int]:
        return [t for t in range(self.start, self.end + 1) if self.is_pruning_step(t)]
