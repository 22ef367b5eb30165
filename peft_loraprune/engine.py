"""The pruning engine of one adapter: importance updates and mask rewrites.

One :class:`PruningEngine` per adapter (``peft_model.base_model.pruning_engine()``) does the two things a
training loop needs, in this order at every optimizer step::

    loss.backward()
    engine.update_importance()     # gradients of the step are complete (accumulated, clipped, unscaled)
    optimizer.step(); optimizer.zero_grad()
    engine.pruning_step(step, total_steps)   # rewrites masks when the schedule says so

:class:`~peft_loraprune.LoRAPruneCallback` calls exactly these from the Trainer. How a step's gradients become
scores is the criterion's business (:mod:`~peft_loraprune.criteria`); the maths lives in
:mod:`~peft_loraprune.importance` and :mod:`~peft_loraprune.selection`; which modules couple, in
:mod:`~peft_loraprune.structure`. This module walks the groups and layers and owns all importance state.

State (all of it here, none in the layers; float32 whatever the model's dtype, following the model's device):

* structured pruning: per group member (a module's rows or columns), the moving average of its per-group scores
  (``n_groups`` floats). By default each step's member vector is divided by its L2 norm before it is averaged,
  as the reference code does, so that a step's overall gradient scale (gradient clipping, loss scaling, the
  spike after a mask rewrite) does not decide how much it counts; a group's score is the sum over its members.
* unstructured and N:M: one moving-average score per weight, in ``importance_dtype``, averaged raw; or, for a
  separable criterion (score ``|W_ij|·v_j``, e.g. ``"wanda"``), the moving average of ``v`` per layer (``d_in``
  floats), multiplied by the merged weight only when masks are rewritten.

:meth:`state_dict` / :meth:`load_state_dict` carry it through checkpoints.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .criteria import Consumer, make_criterion
from .distributed import all_ranks_agree, local_tensor
from .importance import all_finite, moving_average_, normalized
from .layer import LoRAPruneLayer
from .mask_packing import pack_bits
from .schedule import PruningSchedule
from .selection import keep_top, keep_top_global, keep_top_per_row, n_m_mask, prune_count
from .structure import BlockGroups, resolve_dense_layers
from .workspace import WORKSPACE

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _member_key(name: str, axis: str) -> str:
    return f"{name}.{axis}"


class PruningEngine:
    """Importance averaging and mask rewriting for one LoRAPrune adapter of a model."""

    #: divide each step's per-member group scores by their L2 norm before averaging (the reference code's
    #: order); False averages raw sums and normalises when ranking
    normalize_each_step: bool = True

    def __init__(self, tuner, adapter_name: str) -> None:
        self.tuner = tuner
        self.adapter = adapter_name
        self.config = tuner.peft_config[adapter_name]
        self.layers: list[tuple[str, LoRAPruneLayer]] = list(tuner.prune_layers(adapter_name))
        if not self.layers:
            raise ValueError(f"Adapter {adapter_name!r} adapts no module; nothing to prune.")
        self.structured = not self.config.is_element_granularity
        self.groups = tuner.structured_groups(adapter_name) if self.structured else []
        if self.structured and self.config.budget == "global" and any(g.spec.partitions > 1 for g in self.groups):
            raise ValueError(
                "budget='global' with head_grouping='query_head' is not supported (each KV group must lose the "
                "same number of query heads in every layer); use budget='local' or head_grouping='kv_group'."
            )
        blocks = [b for b in (tuner.block_index(n) for n, _ in self.layers) if b is not None]
        dense = resolve_dense_layers(self.config, blocks)
        # the layers whose element masks are pruned (unstructured / N:M); structured pruning goes through groups
        self.element_layers = [(n, l) for n, l in self.layers if tuner.block_index(n) not in dense]
        self.criterion = None
        self.use_criterion(self.config.importance)
        self.member_averages: dict[str, torch.Tensor] = {}  # structured: float32, n_groups per scored member
        self.element_averages: dict[str, torch.Tensor] = {}  # element granularities: importance_dtype, per weight
        self.feature_averages: dict[str, torch.Tensor] = {}  # separable criteria: float32, d_in per layer
        self.n_updates = 0
        self.n_skipped = 0
        self.last_update_ok = True  # False after a skipped (non-finite) update: masks wait for a finite step
        self.pending_rewrite = False
        self.last_sparsity = 0.0
        self._warned_nonfinite = False
        self._score_dtype = _DTYPES[self.config.importance_dtype]

    def use_criterion(self, criterion) -> None:
        """Score with ``criterion``: a name (see :mod:`~peft_loraprune.criteria`; the config's ``importance`` at
        creation) or a :class:`~peft_loraprune.criteria.Criterion` object. Installs its taps on the layers it
        reads; averages already folded are kept."""
        if isinstance(criterion, str):
            criterion = make_criterion(criterion, self.adapter)
        if not self.structured and not criterion.elementwise:
            raise ValueError(
                f"importance={criterion.name!r} scores whole heads and channels; granularity={self.config.granularity!r} "
                "needs a per-weight criterion: 'lora', 'grad' or 'magnitude'."
            )
        if self.criterion is not None:
            self.criterion.detach()
        self.criterion = criterion
        # what the criterion reads: structured, the group members it scores; else every element-pruned layer
        self.scored_members = [
            (member, name, layer)
            for g in self.groups
            for member, name, layer in g.members
            if criterion.scores_axis(member.axis)
        ]
        if self.structured:
            self.scored_layers = list({name: layer for _, name, layer in self.scored_members}.items())
        else:
            self.scored_layers = list(self.element_layers)
        criterion.attach(self.scored_layers, self.consumers())

    def consumers(self) -> list[Consumer]:
        """The scored members read on their input columns, each with its block's registered input factor."""
        scored = {name for _, name, _ in self.scored_members}
        consumers = {
            name: Consumer(name, layer, g.input_factor)
            for g in self.groups
            for name, layer in g.consumers()
            if name in scored
        }
        return list(consumers.values())

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

    def step_member_scores(self, criterion=None) -> dict[str, torch.Tensor]:
        """This step's per-member group scores (normalised when :attr:`normalize_each_step`), keyed like
        :attr:`member_averages`; members whose layer got no gradient this step are absent. ``criterion``: another
        criterion object to read instead of the engine's (the fidelity benchmark compares two)."""
        criterion = criterion or self.criterion
        out = {}
        for member, name, layer in self.scored_members:
            if not criterion.scores_axis(member.axis):
                continue
            raw = criterion.member_scores(name, layer, member.axis, member.layout)
            if raw is not None:
                out[_member_key(name, member.axis)] = normalized(raw) if self.normalize_each_step else raw
        return out

    @torch.no_grad()
    def update_importance(self) -> bool:
        """Fold this step's scores into the moving averages. Returns False when the step was skipped.

        Call after the backward pass(es) of an optimizer step and before ``optimizer.zero_grad()``, on every rank
        of a distributed run (see :mod:`~peft_loraprune.distributed`). A NaN or infinite gradient or weight on any
        rank skips the whole update (masks stay as they are) with one warning.
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
            self.criterion.reset()
            self.last_update_ok = False
            return False
        beta = self.config.importance_beta
        if self.structured:
            for key, step in self.step_member_scores().items():
                moving_average_(self._average(self.member_averages, key, step.shape, step.device), step, beta)
        elif self.criterion.separable:
            for name, _ in self.element_layers:
                step = self.criterion.step_features(name)
                if step is not None:  # None: module not used in this step's graph
                    moving_average_(self._average(self.feature_averages, name, step.shape, step.device), step, beta)
        else:
            for name, layer in self.element_layers:
                chunks = self.criterion.element_chunks(name, layer)
                if chunks is None:  # module not used in this step's graph
                    continue
                device = layer.base_weight_2d().device
                shape = (layer.out_features, layer.in_features)
                average = self._average(self.element_averages, name, shape, device, self._score_dtype)
                for rows, block in chunks:
                    if block.dtype != average.dtype:  # cast into scratch, not a fresh chunk-sized tensor per chunk
                        block = WORKSPACE.get("score_cast", tuple(block.shape), average.dtype, device).copy_(block)
                    moving_average_(average[rows], block, beta)
        self.criterion.reset()
        self.n_updates += 1
        self.last_update_ok = True
        return True

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
    def group_scores(self, groups: BlockGroups, member_scores: Optional[dict] = None) -> torch.Tensor:
        """Score of every group of one ``BlockGroups``: the sum over its scored members of their averaged
        per-group scores (each normalised to unit L2 norm first when steps were averaged raw).

        ``member_scores``: vectors keyed like :attr:`member_averages` to use instead of the averages."""
        source = self.member_averages if member_scores is None else member_scores
        total = torch.zeros(groups.spec.n_groups, device=groups.members[0][2].get_base_weight().device)
        for member, name, _ in groups.members:
            vector = source.get(_member_key(name, member.axis))
            if vector is None:
                continue
            vector = vector.float().to(total.device)
            total += vector if self.normalize_each_step else normalized(vector)
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
            for name, layer in self.element_layers:
                kept = layer.element_mask(self.adapter)
                new = n_m_mask(self._element_scores(name, layer), kept, n_keep_nm, self.config.n_m[1])
                layer.set_masks(self.adapter, elements_packed=pack_bits(new))
        elif self.config.budget == "local":
            for name, layer in self.element_layers:
                kept = layer.element_mask(self.adapter)
                n = kept.numel()
                new = keep_top(
                    self._element_scores(name, layer).flatten(), kept.flatten(), n - prune_count(n, sparsity)
                )
                layer.set_masks(self.adapter, elements_packed=pack_bits(new.reshape(kept.shape)))
        else:
            kept = [layer.element_mask(self.adapter).flatten() for _, layer in self.element_layers]
            scores = [normalized(self._element_scores(n, layer).flatten()) for n, layer in self.element_layers]
            total = sum(k.numel() for k in kept)
            new = keep_top_global(scores, kept, total - prune_count(total, sparsity))
            for (_, layer), mask in zip(self.element_layers, new):
                layer.set_masks(self.adapter, elements_packed=pack_bits(mask.reshape(layer.out_features, -1)))
        self.last_sparsity = sparsity

    def _element_scores(self, name: str, layer: LoRAPruneLayer) -> torch.Tensor:
        """Float32 scores of every weight of ``layer`` (a transient of the weight's size, one layer at a time)."""
        device = layer.get_base_weight().device
        if self.criterion.separable:
            features = self.feature_averages.get(name)
            if features is None:  # no update yet: every weight ties
                return torch.zeros(layer.out_features, layer.in_features, device=device)
            scores = torch.empty(layer.out_features, layer.in_features, device=device)
            for _ in self.criterion.chunks_for(layer, features.to(device), into=scores):
                pass  # each chunk is written in place
            return scores
        average = self.element_averages.get(name)
        if average is None:  # no update yet: every weight ties
            return torch.zeros(layer.out_features, layer.in_features, device=device)
        return average.to(device).float()

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
        """Counters and importance averages (``member.<module>.<axis>``, ``element.<module>``,
        ``feature.<module>``), for a checkpoint."""
        state = {
            "n_updates": torch.tensor(self.n_updates),
            "n_skipped": torch.tensor(self.n_skipped),
            "last_sparsity": torch.tensor(self.last_sparsity, dtype=torch.float64),
            "pending_rewrite": torch.tensor(int(self.pending_rewrite)),
            "last_update_ok": torch.tensor(int(self.last_update_ok)),
        }
        stores = (
            ("member", self.member_averages),
            ("element", self.element_averages),
            ("feature", self.feature_averages),
        )
        for prefix, store in stores:
            for key, value in store.items():
                state[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; a ``ValueError`` names any tensor that does not fit."""
        expected = {}
        for member, name, _ in self.scored_members:
            expected[f"member.{_member_key(name, member.axis)}"] = (member.layout[1],)
        for name, layer in self.element_layers:
            expected[f"element.{name}"] = (layer.out_features, layer.in_features)
            expected[f"feature.{name}"] = (layer.in_features,)
        tensors = {k: v for k, v in state.items() if k.startswith(("member.", "element.", "feature."))}
        for key, value in tensors.items():
            if key not in expected or tuple(value.shape) != expected[key]:
                raise ValueError(
                    f"Importance state '{key}' (shape {tuple(value.shape)}) does not fit this adapter "
                    f"(expected {expected.get(key, 'no such entry')}): the checkpoint belongs to another model, "
                    "another importance criterion or another version of peft_loraprune."
                )
        self.n_updates = int(state["n_updates"])
        self.n_skipped = int(state["n_skipped"])
        self.last_sparsity = float(state["last_sparsity"])
        self.pending_rewrite = bool(int(state["pending_rewrite"]))
        self.last_update_ok = bool(int(state["last_update_ok"]))
        devices = {name: layer.get_base_weight().device for name, layer in self.layers}
        self.member_averages.clear()
        self.element_averages.clear()
        self.feature_averages.clear()
        for key, value in tensors.items():
            kind, rest = key.split(".", 1)
            if kind == "member":
                self.member_averages[rest] = value.float().to(devices[rest.rsplit(".", 1)[0]])
            elif kind == "feature":
                self.feature_averages[rest] = value.float().to(devices[rest])
            else:
                self.element_averages[rest] = value.to(self._score_dtype).to(devices[rest])
