"""The pruning engine of one adapter: importance updates and mask rewrites.

One engine per adapter (``peft_model.base_model.pruning_engine()``) does the two things a training loop needs, in
this order at every optimizer step::

    loss.backward()
    engine.update_importance()     # gradients of the step are complete (accumulated, clipped, unscaled)
    optimizer.step(); optimizer.zero_grad()
    engine.pruning_step(step, total_steps)   # rewrites masks when the schedule says so

:class:`~peft_loraprune.LoRAPruneCallback` calls exactly these from the Trainer. How a step's gradients become
scores is the criterion's business (:mod:`~peft_loraprune.pruning.criteria`); the maths lives in
:mod:`~peft_loraprune.kernels.importance` and :mod:`~peft_loraprune.pruning.selection`.

This module holds what every granularity shares: the criterion and its taps, the finiteness check that skips a
step, the schedule position, the counters and the checkpoint format. The granularity families each add their own
importance state and selection, chosen once when the engine is made (:meth:`PruningEngine.for_adapter`):

* :class:`~peft_loraprune.pruning.group_pruner.GroupPruner`: structured heads and channels;
* :class:`~peft_loraprune.pruning.element_pruner.ElementPruner`: single weights, unstructured and N:M.

All importance state lives in the engine, none in the layers. :meth:`state_dict` / :meth:`load_state_dict` carry
it through checkpoints as flat tensors keyed ``<kind>.<module>...``, the same keys for every family.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..kernels.distributed import all_ranks_agree, local_tensor
from ..kernels.importance import all_finite
from ..layer import LoRAPruneLayer
from .criteria import Consumer, make_criterion
from .schedule import PruningSchedule

#: Prefixes of the importance tensors of every family (a checkpoint of another family must not fit silently).
STATE_PREFIXES = ("member.", "scale.", "element.", "feature.", "depth.", "stream.")


class PruningEngine:
    """What every granularity family shares; a subclass adds its importance state and its selection.

    Subclasses implement :meth:`_scored_layers` (what the criterion reads), :meth:`_fold` (one finite step into
    the averages), :meth:`_select` (rewrite masks to a sparsity), :attr:`stores` and :meth:`_state_shapes`
    (checkpoint contents), and may refuse a criterion in :meth:`_check_criterion`.
    """

    def __init__(self, tuner, adapter_name: str) -> None:
        self.tuner = tuner
        self.adapter = adapter_name
        self.config = tuner.peft_config[adapter_name]
        self.layers: list[tuple[str, LoRAPruneLayer]] = list(tuner.prune_layers(adapter_name))
        if not self.layers:
            raise ValueError(f"Adapter {adapter_name!r} adapts no module; nothing to prune.")
        self.n_updates = 0
        self.n_skipped = 0
        self.last_update_ok = True  # False after a skipped (non-finite) update: masks wait for a finite step
        self.pending_rewrite = False
        self.last_sparsity = 0.0
        self._warned_nonfinite = False
        self.criterion = None

    @staticmethod
    def for_adapter(tuner, adapter_name: str) -> PruningEngine:
        """The engine of the adapter's granularity family, with the config's criterion installed."""
        from .element_pruner import ElementPruner
        from .group_pruner import GroupPruner

        config = tuner.peft_config[adapter_name]
        engine = (ElementPruner if config.is_element_granularity else GroupPruner)(tuner, adapter_name)
        engine.use_criterion(config.importance)
        return engine

    # ------------------------------------------------------------------ criterion
    def use_criterion(self, criterion) -> None:
        """Score with ``criterion``: a name (see :mod:`~peft_loraprune.pruning.criteria`; the config's
        ``importance`` at creation) or a :class:`~peft_loraprune.pruning.criteria.Criterion` object. Installs its
        taps on the layers it reads; averages already folded are kept."""
        if isinstance(criterion, str):
            criterion = make_criterion(criterion, self.adapter)
        self._check_criterion(criterion)
        if self.criterion is not None:
            self.criterion.detach()
        self.criterion = criterion
        self.scored_layers = self._scored_layers(criterion)
        criterion.attach(self.scored_layers, self.consumers())

    def _check_criterion(self, criterion) -> None:
        pass

    def _scored_layers(self, criterion) -> list[tuple[str, LoRAPruneLayer]]:
        raise NotImplementedError

    def consumers(self) -> list[Consumer]:
        """Layers the criterion reads on their input columns (group criteria); none for element pruning."""
        return []

    def _check_weights_readable(self) -> None:
        """DeepSpeed ZeRO-3 partitions pretrained weights (after ``get_peft_model``: ``deepspeed.initialize`` comes
        later), which criteria that read whole weights cannot score; checked at every update (an attribute look-up
        per layer)."""
        if self.criterion.reads_weights and any(
            hasattr(layer.get_base_layer().weight, "ds_tensor") for _, layer in self.scored_layers
        ):
            raise RuntimeError(
                f"DeepSpeed ZeRO stage 3 partitions the pretrained weights, and importance={self.criterion.name!r} "
                "needs each adapted layer's whole weight (|W ⊙ G|). Use importance='activation' (structured; it reads "
                "no weight), ZeRO stage 1 or 2 (gradients are read with deepspeed.utils.safe_get_full_grad), or "
                "FSDP2, which the engine gathers layer by layer."
            )

    def close(self) -> None:
        """Remove the criterion's taps from the layers (the adapter is being deleted)."""
        self.criterion.detach()

    # ------------------------------------------------------------------ importance
    def _inputs_finite(self) -> bool:
        # no early exit: every rank reads every gradient in the same order (DeepSpeed's accessor is a collective)
        finite = True
        for name, layer in self.scored_layers:
            tensors = self.criterion.finite_inputs(name, layer)
            finite = all_finite(*(local_tensor(t) for t in tensors)) and finite
        return finite

    @torch.no_grad()
    def update_importance(self) -> bool:
        """Fold this step's scores into the moving averages. Returns False when the step was skipped.

        Call after the backward pass(es) of an optimizer step and before ``optimizer.zero_grad()``, on every rank
        of a distributed run (see :mod:`~peft_loraprune.kernels.distributed`). A NaN or infinite gradient or weight
        on any rank skips the whole update (masks stay as they are) with one warning.
        """
        self._check_weights_readable()
        self.criterion.synchronize()
        if not all_ranks_agree(self._inputs_finite(), self.layers[0][1].get_base_weight().device):
            self.n_skipped += 1
            if not self._warned_nonfinite:
                warnings.warn(
                    "LoRAPrune: NaN or infinite gradients or adapter weights; the importance update of this step is "
                    "skipped and masks are left unchanged (warned once).",
                    stacklevel=2,
                )
                self._warned_nonfinite = True
            self._reset_step()
            self.last_update_ok = False
            return False
        self._fold(self.config.importance_beta)
        self._reset_step()
        self.n_updates += 1
        self.last_update_ok = True
        return True

    def _fold(self, beta: float) -> None:
        raise NotImplementedError

    def _reset_step(self) -> None:
        """Start the next step's accumulation (the criterion's sums; subclasses add their own)."""
        self.criterion.reset()

    @staticmethod
    def _average(store, key, shape, device, dtype=torch.float32) -> torch.Tensor:
        """The moving average ``store[key]``: created at zero, moved along when the model changed device."""
        average = store.get(key)
        if average is None:
            average = store[key] = torch.zeros(shape, dtype=dtype, device=device)
        elif average.device != device:
            average = store[key] = average.to(device)
        return average

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Rewrite the masks so that ``sparsity`` of the prunable units are removed (never regrowing any)."""
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
            raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        self._select(sparsity)
        self.last_sparsity = sparsity

    def _select(self, sparsity: float) -> None:
        raise NotImplementedError

    def pruning_step(self, step: int, total_steps: int) -> Optional[float]:
        """Prune if the schedule rewrites masks at ``step`` (completed optimizer steps); returns the sparsity.

        A rewrite due on a step whose importance update was skipped (NaN/inf) waits for the next finite step,
        and then prunes to the sparsity scheduled for that step.
        """
        schedule = PruningSchedule.from_config(self.config, total_steps)
        due = schedule.is_pruning_step(step) or self.pending_rewrite
        if not due:
            return None
        if not self.last_update_ok:
            self.pending_rewrite = True
            return None
        self.pending_rewrite = False
        target = schedule.sparsity_at(step)
        self.prune_to(target)
        return target

    def finish(self, total_steps: int) -> Optional[float]:
        """At the end of training: apply a rewrite still waiting for a finite step, so the run ends on target."""
        if not self.pending_rewrite:
            return None
        self.pending_rewrite = False
        target = PruningSchedule.from_config(self.config, total_steps).sparsity_at(total_steps)
        self.prune_to(target)
        return target

    # ------------------------------------------------------------------ checkpointing
    @property
    def stores(self) -> dict[str, dict[str, torch.Tensor]]:
        """The family's averages by checkpoint prefix (``{"member": {...}}``), each a key -> tensor dict."""
        raise NotImplementedError

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key this adapter's family can hold, with its shape."""
        raise NotImplementedError

    def _restored(self, kind: str, key: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A checkpoint tensor as this family stores it (dtype and device)."""
        return value.float().to(device)

    def _device_of(self, kind: str, key: str) -> torch.device:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counters and importance averages (``member.<module>.<axis>``, ``scale.<module>.<axis>``,
        ``element.<module>``, ``feature.<module>``), for a checkpoint."""
        state = {
            "n_updates": torch.tensor(self.n_updates),
            "n_skipped": torch.tensor(self.n_skipped),
            "last_sparsity": torch.tensor(self.last_sparsity, dtype=torch.float64),
            "pending_rewrite": torch.tensor(int(self.pending_rewrite)),
            "last_update_ok": torch.tensor(int(self.last_update_ok)),
        }
        for kind, store in self.stores.items():
            for key, value in store.items():
                state[f"{kind}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; a ``ValueError`` names any tensor that does not fit."""
        expected = self._state_shapes()
        tensors = {k: v for k, v in state.items() if k.startswith(STATE_PREFIXES)}
        for key, value in tensors.items():
            if key not in expected or tuple(value.shape) != expected[key]:
                raise ValueError(
                    f"Importance state '{key}' (shape {tuple(value.shape)}) does not fit this adapter "
                    f"(expected {expected.get(key, 'no such entry')}): the checkpoint belongs to another model, "
                    "another importance criterion, another granularity or another version of peft_loraprune."
                )
        self.n_updates = int(state["n_updates"])
        self.n_skipped = int(state["n_skipped"])
        self.last_sparsity = float(state["last_sparsity"])
        self.pending_rewrite = bool(int(state["pending_rewrite"]))
        self.last_update_ok = bool(int(state["last_update_ok"]))
        for store in self.stores.values():
            store.clear()
        for key, value in tensors.items():
            kind, rest = key.split(".", 1)
            self.stores[kind][rest] = self._restored(kind, rest, value, self._device_of(kind, rest))
