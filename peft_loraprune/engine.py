"""The pruning engine of one adapter: importance updates and mask rewrites.

One :class:`PruningEngine` per adapter (``peft_model.base_model.pruning_engine()``) does the two things a
training loop needs, in this order at every optimizer step::

    loss.backward()
    engine.update_importance()     # gradients of the step are complete (accumulated, clipped, unscaled)
    optimizer.step(); optimizer.zero_grad()
    engine.pruning_step(step, total_steps)   # rewrites masks when the schedule says so

:class:`~peft_loraprune.LoRAPruneCallback` calls exactly these from the Trainer. The maths lives in
:mod:`~peft_loraprune.importance` and :mod:`~peft_loraprune.selection`; which modules couple, in
:mod:`~peft_loraprune.structure`; this module only walks the layers and keeps the state.

State kept between steps (in the layers' non-persistent buffers): per-row and per-column sums of the averaged
element scores for structured pruning (``d_out + d_in`` floats per layer), and one score per weight for
unstructured and N:M (in ``importance_dtype``). :meth:`state_dict` / :meth:`load_state_dict` carry it through
checkpoints.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .distributed import all_ranks_agree, all_reduce_mean_, full_tensor, local_tensor
from .importance import all_finite, element_scores, lora_gradient_factors, moving_average_, normalized
from .group_ops import sum_over_groups
from .layer import LoRAPruneLayer, ScoringFactors
from .mask_packing import pack_bits
from .schedule import PruningSchedule
from .selection import keep_top, keep_top_global, keep_top_per_row, n_m_mask, prune_count
from .structure import find_structured_groups, resolve_dense_layers

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _gradient(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The full gradient of a parameter: ``p.grad``, or DeepSpeed's accessor when ZeRO keeps it elsewhere."""
    if param.grad is not None:
        return param.grad
    try:  # pragma: no cover - only under DeepSpeed ZeRO
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    except Exception:
        return None


class PruningEngine:
    """Importance averaging and mask rewriting for one LoRAPrune adapter of a model."""

    def __init__(self, tuner, adapter_name: str) -> None:
        self.tuner = tuner
        self.adapter = adapter_name
        self.config = tuner.peft_config[adapter_name]
        self.layers: list[tuple[str, LoRAPruneLayer]] = list(tuner.prune_layers(adapter_name))
        if not self.layers:
            raise ValueError(f"Adapter {adapter_name!r} adapts no module; nothing to prune.")
        if any(hasattr(layer.get_base_layer().weight, "ds_tensor") for _, layer in self.layers):
            raise RuntimeError(
                "DeepSpeed ZeRO stage 3 partitions the pretrained weights, and LoRAPrune's importance needs each "
                "adapted layer's whole weight (|W ⊙ G|). Use ZeRO stage 1 or 2 (gradients are read with "
                "deepspeed.utils.safe_get_full_grad), or FSDP2, which the engine gathers layer by layer."
            )
        self.structured = not self.config.is_element_granularity
        self.groups = find_structured_groups(tuner, adapter_name) if self.structured else []
        if self.structured and self.config.budget == "global" and any(g.spec.partitions > 1 for g in self.groups):
            raise ValueError(
                "budget='global' with head_grouping='query_head' is not supported (each KV group must lose the "
                "same number of query heads in every layer); use budget='local' or head_grouping='kv_group'."
            )
        blocks = [b for b in (tuner.block_index(n) for n, _ in self.layers) if b is not None]
        dense = resolve_dense_layers(self.config, blocks)
        # the layers whose element masks are pruned (unstructured / N:M); structured pruning goes through groups
        self.element_layers = [(n, l) for n, l in self.layers if tuner.block_index(n) not in dense]
        self.n_updates = 0
        self.n_skipped = 0
        self.last_update_ok = True  # False after a skipped (non-finite) update: masks wait for a finite step
        self.pending_rewrite = False
        self.last_sparsity = 0.0
        self._warned_nonfinite = False
        self._score_dtype = _DTYPES[self.config.importance_dtype]
        self.set_true_gradient_capture(self.config.importance == "grad")

    # ------------------------------------------------------------------ "grad" criterion
    def set_true_gradient_capture(self, enabled: bool) -> None:
        """Allocate (or free) the full-size gradient buffers the "grad" criterion needs."""
        for _, layer in self.layers:
            if enabled and self.adapter not in layer.lora_weight_grad:
                device = layer.get_base_weight().device
                layer.lora_weight_grad[self.adapter] = torch.zeros(
                    layer.out_features, layer.in_features, device=device
                )
            elif not enabled and self.adapter in layer.lora_weight_grad:
                del layer.lora_weight_grad[self.adapter]

    # ------------------------------------------------------------------ importance
    def gradient_rows(self, layer: LoRAPruneLayer, criterion: Optional[str] = None,
                      factors: Optional[ScoringFactors] = None):
        """A function ``rows -> gradient block`` (float32) for a criterion (default: the config's), None for
        "magnitude", or ``"missing"`` when the layer got no adapter gradient this step. ``factors``: the layer's
        :meth:`~peft_loraprune.layer.LoRAPruneLayer.scoring_factors`, when the caller already has them."""
        criterion = criterion or self.config.importance
        if criterion == "magnitude":
            return None
        if criterion == "grad":
            g = layer.lora_weight_grad[self.adapter]
            return lambda rows: g[rows]
        da = _gradient(layer.lora_A[self.adapter].weight)
        db = _gradient(layer.lora_B[self.adapter].weight)
        if da is None or db is None:
            return "missing"
        f = factors if factors is not None else layer.scoring_factors(self.adapter)
        # whole tensors: FSDP2 keeps shards (see distributed.py); a no-op otherwise
        da, db = full_tensor(da.detach()), full_tensor(db.detach())
        sequential = layer.adaptation[self.adapter] == "sequential"
        p, q = lora_gradient_factors(f.a, da, f.w0 if sequential else None)
        # G_hat = dB·P + B·Q as one rank-2r product: [dB | B] @ [P; Q] (one weight-sized write, not two)
        left = torch.cat([db.float(), f.b.float()], dim=1)
        right = torch.cat([p, q], dim=0)
        return lambda rows: left[rows] @ right

    def element_score_chunks(self, layer: LoRAPruneLayer, criterion: Optional[str] = None):
        """``(rows, |W ⊙ G|)`` chunks of one layer for a criterion (see :func:`importance.element_scores`)."""
        factors = layer.scoring_factors(self.adapter)  # gathered once, read by both sides of the product
        gradient_rows = self.gradient_rows(layer, criterion, factors)
        if gradient_rows == "missing":
            return None
        shape = (layer.out_features, layer.in_features)
        return element_scores(
            lambda r: layer.merged_weight_rows(self.adapter, r.start, r.stop, factors), gradient_rows, shape
        )

    def _inputs_finite(self) -> bool:
        # no early exit: every rank reads every gradient in the same order (DeepSpeed's accessor is a collective)
        finite = True
        for _, layer in self.layers:
            tensors = [layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight]
            if self.config.importance == "lora":
                tensors += [g for g in (_gradient(t) for t in tensors) if g is not None]
            elif self.config.importance == "grad":
                tensors.append(layer.lora_weight_grad[self.adapter])
            finite = all_finite(*(local_tensor(t) for t in tensors)) and finite
        return finite

    @torch.no_grad()
    def update_importance(self) -> bool:
        """Fold this step's scores into the moving averages. Returns False when the step was skipped.

        Call after the backward pass(es) of an optimizer step and before ``optimizer.zero_grad()``, on every rank
        of a distributed run (see :mod:`~peft_loraprune.distributed`). A NaN or infinite gradient or weight on any
        rank skips the whole update (masks stay as they are) with one warning.
        """
        if self.config.importance == "grad":  # accumulated from this rank's activations: average over ranks
            all_reduce_mean_(layer.lora_weight_grad[self.adapter] for _, layer in self.layers)
        if not all_ranks_agree(self._inputs_finite(), self.layers[0][1].get_base_weight().device):
            self.n_skipped += 1
            if not self._warned_nonfinite:
                warnings.warn(
                    "LoRAPrune: NaN or infinite gradients or adapter weights; the importance update of this step is "
                    "skipped and masks are left unchanged (warned once)."
                )
                self._warned_nonfinite = True
            self._reset_true_gradients()
            self.last_update_ok = False
            return False
        beta = self.config.importance_beta
        for _, layer in self.layers:
            chunks = self.element_score_chunks(layer)
            if chunks is None:  # module not used in this step's graph
                continue
            shape = (layer.out_features, layer.in_features)
            row_sums = torch.zeros(shape[0], device=layer.base_weight_2d().device)
            col_sums = torch.zeros(shape[1], device=row_sums.device)
            elements = None
            if not self.structured:
                if self.adapter not in layer.lora_importance_elements:
                    layer.lora_importance_elements[self.adapter] = torch.zeros(
                        shape, dtype=self._score_dtype, device=row_sums.device
                    )
                elements = layer.lora_importance_elements[self.adapter]
            for rows, block in chunks:
                if elements is not None:
                    moving_average_(elements[rows], block, beta)
                else:
                    row_sums[rows] = block.sum(dim=1)
                    col_sums += block.sum(dim=0)
            if elements is None:
                moving_average_(layer.lora_importance_rows[self.adapter], row_sums, beta)
                moving_average_(layer.lora_importance_cols[self.adapter], col_sums, beta)
            layer.importance_updates[self.adapter] = layer.importance_updates.get(self.adapter, 0) + 1
        self._reset_true_gradients()
        self.n_updates += 1
        self.last_update_ok = True
        return True

    def _reset_true_gradients(self) -> None:
        for _, layer in self.layers:
            if self.adapter in layer.lora_weight_grad:
                layer.lora_weight_grad[self.adapter].zero_()

    # ------------------------------------------------------------------ masks
    def group_scores(self, groups, axis_scores: Optional[dict] = None) -> torch.Tensor:
        """Score of every group of one ``BlockGroups``: per member, group sums of its row or column scores
        divided by their L2 norm; then summed over the members (the reference code's rule).

        ``axis_scores`` maps a member's module name to its ``(row scores, column scores)``; by default the
        layers' averaged importance."""
        total = None
        for member, name, layer in groups.members:
            if axis_scores is not None:
                vector = axis_scores[name][0 if member.axis == "rows" else 1]
            else:
                axis = layer.lora_importance_rows if member.axis == "rows" else layer.lora_importance_cols
                vector = axis[self.adapter]
            v = normalized(sum_over_groups(vector.float(), member.layout))
            total = v if total is None else total + v.to(total.device)
        return total

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Rewrite the masks so that ``sparsity`` of the prunable units are removed (never regrowing any)."""
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
            raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if self.structured:
            self._prune_groups(sparsity)
        elif self.config.n_m is not None:
            n_keep_nm = self.config.n_m[1] - prune_count(self.config.n_m[1], sparsity, keep_at_least_one=False)
            for _, layer in self.element_layers:
                kept = layer.element_mask(self.adapter)
                new = n_m_mask(self._element_scores(layer), kept, n_keep_nm, self.config.n_m[1])
                layer.set_masks(self.adapter, elements_packed=pack_bits(new))
        elif self.config.budget == "local":
            for _, layer in self.element_layers:
                kept = layer.element_mask(self.adapter)
                n = kept.numel()
                new = keep_top(self._element_scores(layer).flatten(), kept.flatten(), n - prune_count(n, sparsity))
                layer.set_masks(self.adapter, elements_packed=pack_bits(new.reshape(kept.shape)))
        else:
            kept = [layer.element_mask(self.adapter).flatten() for _, layer in self.element_layers]
            scores = [normalized(self._element_scores(layer).flatten()) for _, layer in self.element_layers]
            total = sum(k.numel() for k in kept)
            new = keep_top_global(scores, kept, total - prune_count(total, sparsity))
            for (_, layer), mask in zip(self.element_layers, new):
                layer.set_masks(self.adapter, elements_packed=pack_bits(mask.reshape(layer.out_features, -1)))
        self.last_sparsity = sparsity

    def _element_scores(self, layer: LoRAPruneLayer) -> torch.Tensor:
        if self.adapter not in layer.lora_importance_elements:  # no update yet: every weight ties
            return torch.zeros(layer.out_features, layer.in_features, device=layer.get_base_weight().device)
        return layer.lora_importance_elements[self.adapter].float()

    def _prune_groups(self, sparsity: float) -> None:
        for structure in sorted({g.spec.structure for g in self.groups}):
            groups = [g for g in self.groups if g.spec.structure == structure]
            scores = [self.group_scores(g) for g in groups]
            kept = [g.kept(self.adapter) for g in groups]
            if self.config.budget == "local":
                new = []
                for g, s, k in zip(groups, scores, kept):
                    parts = g.spec.partitions
                    if parts > 1:
                        per = g.spec.n_groups // parts
                        n_keep = per - prune_count(per, sparsity)
                        new.append(keep_top_per_row(s.reshape(parts, per), k.reshape(parts, per), n_keep).flatten())
                    else:
                        new.append(keep_top(s, k, g.spec.n_groups - prune_count(g.spec.n_groups, sparsity)))
            else:
                total = sum(g.spec.n_groups for g in groups)
                new = keep_top_global(scores, kept, total - prune_count(total, sparsity, keep_at_least_one=False))
            for g, mask in zip(groups, new):
                g.apply(self.adapter, mask)

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
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Importance averages and counters, keyed by module name (for a checkpoint file)."""
        state = {
            "n_updates": torch.tensor(self.n_updates),
            "n_skipped": torch.tensor(self.n_skipped),
            "last_sparsity": torch.tensor(self.last_sparsity, dtype=torch.float64),
            "pending_rewrite": torch.tensor(int(self.pending_rewrite)),
            "last_update_ok": torch.tensor(int(self.last_update_ok)),
        }
        for name, layer in self.layers:
            for key in ("lora_importance_rows", "lora_importance_cols", "lora_importance_elements"):
                buf = getattr(layer, key)
                if self.adapter in buf:
                    state[f"{name}.{key}"] = buf[self.adapter].detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.n_updates = int(state["n_updates"])
        self.n_skipped = int(state["n_skipped"])
        self.last_sparsity = float(state["last_sparsity"])
        self.pending_rewrite = bool(int(state["pending_rewrite"]))
        self.last_update_ok = bool(int(state["last_update_ok"]))
        for name, layer in self.layers:
            for key in ("lora_importance_rows", "lora_importance_cols", "lora_importance_elements"):
                value = state.get(f"{name}.{key}")
                if value is None:
                    continue
                buf = getattr(layer, key)
                device = layer.get_base_weight().device
                if self.adapter in buf and buf[self.adapter].shape != value.shape:
                    raise ValueError(
                        f"Importance state '{name}.{key}' has shape {tuple(value.shape)}, the model expects "
                        f"{tuple(buf[self.adapter].shape)}: the checkpoint belongs to another model."
                    )
                buf[self.adapter] = value.to(device)
