"""Structured pruning: whole heads, channels and blocks, scored and removed as groups.

A group (a head, a KV group, an MLP channel) spans several modules of a block: rows of its producers, columns of
its consumer (:mod:`~peft_loraprune.pruning.structure`). The state is, per scored group member (one module's rows
or columns), the moving average of its per-group scores (``n_groups`` floats, float32). By default each step's
member vector is divided by its L2 norm before it is averaged, as the reference code does, so that a step's
overall gradient scale (gradient clipping, loss scaling, the spike after a mask rewrite) does not decide how much
it counts; a group's score is the sum over its members. Selection keeps the best groups per block (``budget=
"local"``, per KV group with ``head_grouping="query_head"``) or across the model (``"global"``).

Normalised vectors rank the groups of one member, not heads against channels. ``allocation="joint"`` compares
them, so it also keeps, per member, the moving average of each step's L2 norm (one float, ``scale.<member>``):
``average × scale`` is the group's estimate back in the criterion's units (for ``"activation"``, the first-order
loss change of removing it), and one split of the weight budget between the kinds is chosen for the whole model
(:func:`~peft_loraprune.pruning.selection.split_weight_budget`).

Whole blocks (``"layers"`` in ``prune_structures``) are gated through their residual writers
(:mod:`~peft_loraprune.pruning.depth`). Their state is one vector over the gated blocks (``depth.average``): each
step, a block scores its Block Influence (``layer_importance="influence"``, :class:`~peft_loraprune.pruning.depth.BlockInfluence`) or
``|Σ_writers Σ_rows Σ_tokens y·∂L/∂y|`` (``"taylor"``, the Taylor estimate of closing its gate), the vector
is normalised like a member's and averaged; ``depth.scale`` keeps its raw norm for the joint allocation.

Channels of the residual stream (``"hidden"``, :mod:`~peft_loraprune.pruning.stream`) are scored the same way: the
mask of channel ``c`` multiplies the embedding's output and every writer's output row ``c``, so its Taylor estimate
is ``|Σ_tokens (e_c·∂L/∂e_c + Σ_writers y_c·∂L/∂y_c)|``; its state is ``stream.average`` (and ``stream.scale``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..kernels.importance import moving_average_, normalized
from .criteria import Consumer
from .depth import BlockGate, BlockInfluence
from .engine import PruningEngine
from .selection import (
    BlockSplitter,
    keep_top,
    keep_top_global,
    keep_top_per_row,
    prune_count,
    removal_loss_curve,
    split_weight_budget,
    split_with_stream,
)
from .stream import round_to_multiple, width_multiple
from .structure import BlockGroups


class RemovalCost(NamedTuple):
    """One kind of unit under ``allocation="joint"`` (see :meth:`GroupPruner.removal_costs`)."""

    curve: torch.Tensor  #: entry n: summed estimated cost of removing n units per partition from every block
    unit_weights: int  #: weights of one block that one removal per partition takes
    min_count: int  #: units per partition already removed in some block (they stay removed)
    block_weights: int  #: this kind's weights in one block


def _member_key(name: str, axis: str) -> str:
    return f"{name}.{axis}"


class GroupPruner(PruningEngine):
    """Importance averaging and mask rewriting for heads and channels."""

    #: divide each step's per-member group scores by their L2 norm before averaging (the reference code's
    #: order); False averages raw sums and normalises when ranking
    normalize_each_step: bool = True

    def __init__(self, tuner, adapter_name: str) -> None:
        super().__init__(tuner, adapter_name)
        self.groups = tuner.structured_groups(adapter_name)
        if self.config.budget == "global" and any(g.spec.partitions > 1 for g in self.groups):
            raise ValueError(
                "budget='global' with head_grouping='query_head' is not supported (each KV group must lose the "
                "same number of query heads in every layer); use budget='local' or head_grouping='kv_group'."
            )
        self.member_averages: dict[str, torch.Tensor] = {}  # float32, n_groups per scored member
        #: allocation="joint" only: per scored member, the moving average of each step's raw L2 norm (1 float)
        self.member_scales: dict[str, torch.Tensor] = {}
        self.joint = self.config.allocation == "joint"
        self.gates: list[BlockGate] = (
            tuner.block_gates(adapter_name) if "layers" in self.config.prune_structures else []
        )
        #: "average": the moving average of the blocks' per-step scores; "scale" (joint only): of their raw norm
        self.depth_averages: dict[str, torch.Tensor] = {}
        #: layer_importance="influence": the Block Influence hooks on the gated blocks (else None)
        self.influence: Optional[BlockInfluence] = None
        if self.gates and self.config.layer_importance == "influence":
            self.influence = BlockInfluence(tuner.model, self.gates)
        if self.gates:
            self._check_depth_target()
        self.stream = tuner.residual_stream(adapter_name) if "hidden" in self.config.prune_structures else None
        #: every count of kept stream channels is a multiple of this (the heads kept at the end; see stream.py)
        self.hidden_multiple = width_multiple(tuner, adapter_name) if self.stream is not None else 1
        self.stream_averages: dict[str, torch.Tensor] = {}  # the same for the stream's channels

    def _check_depth_target(self) -> None:
        n = len(self.gates)
        target = self.config.effective_target_sparsity
        blocks_alone = not self.joint or not self.groups
        target = (self.config.structure_sparsity or {}).get("layers", target)
        if blocks_alone and prune_count(n, target, keep_at_least_one=False) >= n:
            raise ValueError(
                f"target_sparsity={target!r} with prune_structures containing 'layers' would remove all {n} pruned "
                f"blocks; the largest target that keeps one is below {(n - 0.5) / n:.4f}."
            )

    @property
    def stores(self):
        stores = {"member": self.member_averages, **({"scale": self.member_scales} if self.joint else {})}
        if self.gates:
            stores["depth"] = self.depth_averages
        if self.stream is not None:
            stores["stream"] = self.stream_averages
        return stores

    def _check_criterion(self, criterion) -> None:
        if (self.gates or self.stream is not None) and not criterion.scores_writers:
            raise ValueError(
                f"prune_structures with 'layers' or 'hidden' needs a criterion that scores residual contributions; "
                f"{criterion.name!r} does not (use importance='activation')."
            )

    def _writers(self) -> list[tuple[str, object]]:
        """Every module whose residual contribution is scored: the gated blocks' writers, the stream's writers and
        the input embedding's mask hook (each once)."""
        writers = {}
        if self.influence is None:  # the Taylor estimate of the blocks' gates reads their writers
            writers.update((name, layer) for gate in self.gates for name, layer in gate.writers)
        if self.stream is not None:
            writers.update(self.stream.writers)
            writers[self.stream.embedding] = self.tuner.stream_mask(self.adapter)
        return list(writers.items())

    def use_criterion(self, criterion) -> None:
        super().use_criterion(criterion)
        writers = self._writers()
        if writers:
            self.criterion.attach_writers(writers)

    def _reset_step(self) -> None:
        super()._reset_step()
        if self.influence is not None:
            self.influence.reset()

    def close(self) -> None:
        super().close()
        if self.influence is not None:
            self.influence.remove()

    def _scored_layers(self, criterion):
        self.scored_members = [
            (member, name, layer)
            for g in self.groups
            for member, name, layer in g.members
            if criterion.scores_axis(member.axis)
        ]
        scored = {name: layer for _, name, layer in self.scored_members}
        scored.update((name, layer) for gate in self.gates for name, layer in gate.writers)
        if self.stream is not None:
            scored.update(self.stream.writers)
        return list(scored.items())

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

    # ------------------------------------------------------------------ importance
    def _raw_step_scores(self, criterion) -> dict[str, torch.Tensor]:
        """This step's raw per-member group scores, keyed like :attr:`member_averages`; members whose layer got
        no gradient this step are absent."""
        out = {}
        for member, name, layer in self.scored_members:
            if criterion.scores_axis(member.axis):
                raw = criterion.member_scores(name, layer, member.axis, member.layout)
                if raw is not None:
                    out[_member_key(name, member.axis)] = raw
        return out

    def step_member_scores(self, criterion=None) -> dict[str, torch.Tensor]:
        """This step's per-member group scores (normalised when :attr:`normalize_each_step`), keyed like
        :attr:`member_averages`; members whose layer got no gradient this step are absent. ``criterion``: another
        criterion object to read instead of the engine's (the fidelity benchmark compares two)."""
        raw = self._raw_step_scores(criterion or self.criterion)
        return {key: normalized(v) if self.normalize_each_step else v for key, v in raw.items()}

    def step_block_scores(self, criterion=None) -> Optional[torch.Tensor]:
        """This step's raw score of every gated block, or None when the blocks were not used this step: the Taylor
        estimate ``|Σ_writers Σ_rows Σ_tokens y·∂L/∂y|``, or with ``layer_importance="influence"`` the Block
        Influence measured since the last update."""
        if self.influence is not None:
            return self.influence.step_scores()
        criterion = criterion or self.criterion
        scores = []
        for gate in self.gates:
            sums = [criterion.writer_sums(name) for name, _ in gate.writers]
            if any(s is None for s in sums):
                return None
            scores.append(sum(s.sum() for s in sums).abs().reshape(1))
        return torch.cat(scores).float() if scores else None

    def step_stream_scores(self, criterion=None) -> Optional[torch.Tensor]:
        """This step's raw score of every channel of the residual stream (``|Σ_tokens (e_c·∂L/∂e_c + Σ_writers
        y_c·∂L/∂y_c)|``), or None when the stream's writers were not used this step."""
        criterion = criterion or self.criterion
        total = criterion.writer_sums(self.stream.embedding)
        if total is None:
            return None
        total = total.clone()
        for name, _ in self.stream.writers:
            sums = criterion.writer_sums(name)
            if sums is None:
                return None
            total += sums.to(total.device)
        return total.abs()

    def _fold(self, beta: float) -> None:
        keep_scales = self.joint and self.normalize_each_step
        for key, raw in self._raw_step_scores(self.criterion).items():
            step = normalized(raw) if self.normalize_each_step else raw
            moving_average_(self._average(self.member_averages, key, step.shape, step.device), step, beta)
            if keep_scales:
                norm = raw.float().norm().reshape(1)
                moving_average_(self._average(self.member_scales, key, (1,), norm.device), norm, beta)
        if self.gates:
            self._fold_vector(self.depth_averages, self.step_block_scores(), beta, keep_scales)
        if self.stream is not None:
            self._fold_vector(self.stream_averages, self.step_stream_scores(), beta, keep_scales)

    def _fold_vector(self, store: dict, raw: Optional[torch.Tensor], beta: float, keep_scale: bool) -> None:
        """One step's scores of a whole-model vector (blocks, stream channels) into ``store["average"]``, normalised
        like a member's, and its raw norm into ``store["scale"]`` when kept; nothing when the step has none."""
        if raw is None:
            return
        step = normalized(raw) if self.normalize_each_step else raw
        moving_average_(self._average(store, "average", step.shape, step.device), step, beta)
        if keep_scale:
            norm = raw.norm().reshape(1)
            moving_average_(self._average(store, "scale", (1,), norm.device), norm, beta)

    def _averaged(self, store: dict, size: int, comparable: bool) -> torch.Tensor:
        """``store``'s averaged scores (zeros before the first update); ``comparable``: in the criterion's units,
        times the averaged raw norm (as :meth:`comparable_scores` does for groups)."""
        average = store.get("average")
        scores = torch.zeros(size) if average is None else average.float()
        if comparable and self.normalize_each_step:
            scale = store.get("scale")
            scores = scores * (float(scale) if scale is not None else 0.0)
        return scores

    def blocks_kept(self) -> torch.Tensor:
        """Per gated block: True while it is kept."""
        return torch.tensor([gate.kept(self.adapter) for gate in self.gates], dtype=torch.bool)

    def block_scores(self, comparable: bool = False) -> torch.Tensor:
        """The averaged score of every gated block, on the CPU (see :meth:`_averaged`)."""
        return self._averaged(self.depth_averages, len(self.gates), comparable).cpu()

    def close_blocks(self, keep: torch.Tensor) -> None:
        """Close the gate of every block whose entry of ``keep`` is False (closed blocks stay closed)."""
        for gate, k in zip(self.gates, keep.tolist()):
            if not k and gate.kept(self.adapter):
                gate.close(self.adapter)

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

    def comparable_scores(self, groups: BlockGroups) -> torch.Tensor:
        """Score of every group in the criterion's own units, comparable across kinds and blocks: each member's
        average times its :attr:`member_scales` (the raw averages as they are when steps are not normalised)."""
        total = torch.zeros(groups.spec.n_groups, device=groups.members[0][2].get_base_weight().device)
        for member, name, _ in groups.members:
            key = _member_key(name, member.axis)
            vector = self.member_averages.get(key)
            if vector is None:
                continue
            vector = vector.float().to(total.device)
            if self.normalize_each_step:
                scale = self.member_scales.get(key)
                vector = vector * (scale.float().to(total.device) if scale is not None else 0.0)
            total += vector
        return total

    def _select(self, sparsity: float) -> None:
        if self.joint:
            self._select_joint(sparsity)
            return
        if self.gates:
            n = len(self.gates)
            n_keep = n - prune_count(n, self.kind_sparsity("layers", sparsity))
            self.close_blocks(keep_top(self.block_scores(), self.blocks_kept(), n_keep))
        if self.stream is not None:
            size = self.stream.size
            kept = self.stream.kept(self.adapter)
            n_keep = size - prune_count(size, self.kind_sparsity("hidden", sparsity))
            n_keep = round_to_multiple(n_keep, self.hidden_multiple)
            self.stream.apply(self.adapter, keep_top(self.channel_scores().to(kept.device), kept, n_keep))
        overall = sparsity
        for structure in sorted({g.spec.structure for g in self.groups}):
            sparsity = self.kind_sparsity(structure, overall)
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

    def channel_scores(self, comparable: bool = False) -> torch.Tensor:
        """The averaged score of every channel of the residual stream (see :meth:`_averaged`)."""
        return self._averaged(self.stream_averages, self.stream.size, comparable)

    def kind_sparsity(self, kind: str, sparsity: float) -> float:
        """The fraction of ``kind``'s units removed when the schedule is at ``sparsity``: ``sparsity`` itself, or
        with ``structure_sparsity`` naming the kind, its own target scaled along the same schedule."""
        own = (self.config.structure_sparsity or {}).get(kind)
        target = self.config.effective_target_sparsity
        if own is None:
            return sparsity
        return own * sparsity / target if target > 0 else 0.0

    def _select_joint(self, sparsity: float) -> None:
        """``allocation="joint"``: remove ``sparsity`` of every pruned block's head and channel weights, the same
        number of each kind in every block, split between the kinds where the summed estimates cost least; with
        ``"layers"`` or ``"hidden"``, whole blocks and stream channels join the split (:meth:`joint_split`)."""
        if not self.gates and self.stream is None:
            self.remove_per_block(self.joint_counts(sparsity))
            return
        closed, counts, hidden_kept = self.joint_split(sparsity)
        if self.gates:
            keep = torch.ones(len(self.gates), dtype=torch.bool)
            keep[closed] = False
            self.close_blocks(keep)
        if hidden_kept is not None:
            kept = self.stream.kept(self.adapter)
            self.stream.apply(
                self.adapter, keep_top(self.channel_scores(comparable=True).to(kept.device), kept, hidden_kept)
            )
        self.remove_per_block(counts)

    def joint_split(self, fraction: float) -> tuple[list[int], dict[str, int], Optional[int]]:
        """Under ``allocation="joint"`` with ``"layers"`` and/or ``"hidden"``: which gated blocks close (positions in
        :attr:`gates`), how many units of each other kind every remaining block loses, and how many channels of
        the residual stream stay (None without ``"hidden"``), so that ``fraction`` of the weights the listed axes
        can remove go where the estimates in the criterion's units cost least
        (:class:`~peft_loraprune.pruning.selection.BlockSplitter`,
        :func:`~peft_loraprune.pruning.selection.split_with_stream`). Those weights are the pruned blocks' adapted
        weights, plus the embedding's (and an untied output layer's) with ``"hidden"``."""
        kinds = sorted({g.spec.structure for g in self.groups})
        by_block = {(g.block, g.spec.structure): g for g in self.groups}
        if self.gates:
            kept = self.blocks_kept()
            scores = self.block_scores(comparable=True)
            order = torch.where(kept, scores, torch.full_like(scores, -1.0)).argsort(stable=True).tolist()
            block_curve = torch.cat([scores.new_zeros(1), scores[order].masked_fill(~kept[order], 0.0).cumsum(0)[:-1]])
            blocks = [self.gates[position].block for position in order]
            block_weights, min_blocks, max_blocks = self.gates[0].block_weights, int((~kept).sum()), None
        else:  # blocks are not pruned: the splitter only shares the budget between the other kinds
            blocks = sorted({g.block for g in self.groups})
            order, block_curve = list(range(len(blocks))), torch.zeros(len(blocks))
            first = [by_block[(blocks[0], kind)] for kind in kinds]
            block_weights, min_blocks, max_blocks = sum(g.spec.n_groups * g.weights_per_group() for g in first), 0, 0
        unit_weights = []
        for kind in kinds:
            g = by_block[(blocks[0], kind)]
            unit_weights.append(g.spec.partitions * g.weights_per_group())
        per_block_curves, per_block_mins = [], []
        for block in blocks:
            curves, mins = [], []
            for kind in kinds:
                g = by_block[(block, kind)]
                parts = g.spec.partitions
                k = g.kept(self.adapter).cpu()
                curves.append(removal_loss_curve(self.comparable_scores(g).cpu(), k, parts))
                mins.append(g.spec.n_groups // parts - int(k.reshape(parts, -1).sum(dim=1).min()))
            per_block_curves.append(curves)
            per_block_mins.append(mins)
        splitter = BlockSplitter(
            block_curve, block_weights, min_blocks, per_block_curves, unit_weights, per_block_mins, max_blocks
        )
        if self.stream is None:
            _, _, n_closed, counts = splitter.best(fraction * block_weights * len(blocks))
            return order[:n_closed], dict(zip(kinds, counts)), None
        size, step = self.stream.size, self.hidden_multiple
        kept_now = self.stream.kept(self.adapter).cpu()
        curve = removal_loss_curve(self.channel_scores(comparable=True).cpu(), kept_now)
        options = list(range(step, int(kept_now.sum()) + 1, step))
        hidden_kept, n_closed, counts = split_with_stream(
            curve, options, size, self.stream.stream_only_weights, splitter, fraction
        )
        return order[:n_closed], dict(zip(kinds, counts)), hidden_kept

    def joint_counts(self, fraction: float, costs: Optional[dict[str, RemovalCost]] = None) -> dict[str, int]:
        """How many units of each kind every block loses so that ``fraction`` of its head and channel weights go,
        split where the estimates (:meth:`removal_costs`, or ``costs`` when given) cost least
        (:func:`~peft_loraprune.pruning.selection.split_weight_budget`)."""
        costs = self.removal_costs() if costs is None else costs
        block_weights = sum(c.block_weights for c in costs.values())
        counts = split_weight_budget(
            [c.curve for c in costs.values()],
            [c.unit_weights for c in costs.values()],
            [c.min_count for c in costs.values()],
            fraction * block_weights,
        )
        return dict(zip(costs, counts))

    def removal_costs(self) -> dict[str, RemovalCost]:
        """Per kind of unit (``"heads"``, ``"channels"``), what removing ``n`` of them from every block (per
        partition) costs by the estimates in the criterion's units (:meth:`comparable_scores`), the weights one such
        removal takes from a block, and how many are already removed. Needs ``allocation="joint"`` (the per-member
        scales that put heads and channels in one unit are kept only then)."""
        if not self.joint:
            raise ValueError(
                "removal_costs compares heads with channels and needs the per-member scales that only "
                "allocation='joint' keeps; got allocation=" + repr(self.config.allocation)
            )
        out = {}
        for structure in sorted({g.spec.structure for g in self.groups}):
            groups = [g for g in self.groups if g.spec.structure == structure]
            parts = groups[0].spec.partitions
            per = groups[0].spec.n_groups // parts
            kept = [g.kept(self.adapter) for g in groups]
            scores = [self.comparable_scores(g) for g in groups]
            out[structure] = RemovalCost(
                curve=sum(removal_loss_curve(s.cpu(), k.cpu(), parts) for s, k in zip(scores, kept)),
                unit_weights=parts * groups[0].weights_per_group(),
                min_count=max(per - int(k.reshape(parts, per).sum(dim=1).min()) for k in kept),
                block_weights=groups[0].spec.n_groups * groups[0].weights_per_group(),
            )
        return out

    def remove_per_block(self, counts: dict[str, int]) -> None:
        """Remove ``counts[kind]`` units of each kind from every block (per KV group for query heads), the ones
        rated cheapest (:meth:`comparable_scores` under ``allocation="joint"``, else :meth:`group_scores`); units
        already removed count and stay removed."""
        score = self.comparable_scores if self.joint else self.group_scores
        for structure, n_remove in counts.items():
            for g in (g for g in self.groups if g.spec.structure == structure):
                parts = g.spec.partitions
                per = g.spec.n_groups // parts
                scores, kept = score(g), g.kept(self.adapter)
                if parts > 1:
                    new = keep_top_per_row(
                        scores.reshape(parts, per), kept.reshape(parts, per), per - n_remove
                    ).flatten()
                else:
                    new = keep_top(scores, kept, per - n_remove)
                g.apply(self.adapter, new)

    # ------------------------------------------------------------------ checkpointing
    def _state_shapes(self):
        shapes = {f"member.{_member_key(name, m.axis)}": (m.layout[1],) for m, name, _ in self.scored_members}
        if self.joint:
            shapes.update({f"scale.{_member_key(name, m.axis)}": (1,) for m, name, _ in self.scored_members})
        if self.gates:
            shapes["depth.average"] = (len(self.gates),)
            if self.joint:
                shapes["depth.scale"] = (1,)
        if self.stream is not None:
            shapes["stream.average"] = (self.stream.size,)
            if self.joint:
                shapes["stream.scale"] = (1,)
        return shapes

    def _device_of(self, kind, key):
        if kind == "depth":
            return self.gates[0].writers[0][1].get_base_weight().device
        if kind == "stream":
            return self.stream.writers[0][1].get_base_weight().device
        return dict(self.layers)[key.rsplit(".", 1)[0]].get_base_weight().device
