"""Element pruning: single weights, unstructured (a local or global budget) or N:M.

State, per element-pruned layer: one moving-average score per weight, in ``importance_dtype``, averaged raw; or,
for a separable criterion (score ``|W_ij|·v_j``, e.g. ``"wanda"``), the moving average of ``v`` (``d_in`` floats,
float32), multiplied by the merged weight only when masks are rewritten, one layer at a time. Layers that
``dense_layers`` keeps dense are neither scored nor pruned.

Selection is one rule per element granularity (:func:`selection_rule`): it gets every pruned layer's scores and
kept mask and returns the new masks. Adding an element granularity means adding its rule there and its name in
:data:`peft_loraprune.config.GRANULARITIES`; masks, the masked product, merge and export already handle any element
mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.importance import moving_average_, normalized
from ..kernels.mask_packing import pack_bits
from ..kernels.workspace import WORKSPACE
from ..layer import LoRAPruneLayer
from .engine import PruningEngine
from .selection import keep_top, keep_top_global, n_m_mask, prune_count
from .structure import resolve_dense_layers

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# (scores of each layer, kept mask of each layer, sparsity) -> new mask of each layer; scores are float32
SelectionRule = Callable[[list, list, float], list]


def _local(scores, kept, sparsity):
    out = []
    for s, k in zip(scores, kept):
        n = k.numel()
        out.append(keep_top(s.flatten(), k.flatten(), n - prune_count(n, sparsity)).reshape(k.shape))
    return out


def _global(scores, kept, sparsity):
    flat_kept = [k.flatten() for k in kept]
    total = sum(k.numel() for k in flat_kept)
    new = keep_top_global([normalized(s.flatten()) for s in scores], flat_kept, total - prune_count(total, sparsity))
    return [m.reshape(k.shape) for m, k in zip(new, kept)]


def _n_m(n: int, m: int) -> SelectionRule:
    def rule(scores, kept, sparsity):
        # target_sparsity is N:M's own (1 - n/m) at the end; in between the schedule ramps the pruned count per M
        n_keep = m - prune_count(m, sparsity, keep_at_least_one=False)
        return [n_m_mask(s, k, n_keep, m) for s, k in zip(scores, kept)]

    return rule


def selection_rule(config) -> SelectionRule:
    """The element selection rule of ``config``'s granularity and budget (chosen once per engine)."""
    if config.n_m is not None:
        return _n_m(*config.n_m)
    return _local if config.budget == "local" else _global


class ElementPruner(PruningEngine):
    """Importance averaging and mask rewriting for single weights (unstructured and N:M)."""

    def __init__(self, tuner, adapter_name: str) -> None:
        super().__init__(tuner, adapter_name)
        blocks = [b for b in (tuner.block_index(n) for n, _ in self.layers) if b is not None]
        dense = resolve_dense_layers(self.config, blocks)
        self.element_layers = [(n, l) for n, l in self.layers if tuner.block_index(n) not in dense]
        self.element_averages: dict[str, torch.Tensor] = {}  # importance_dtype, one per weight
        self.feature_averages: dict[str, torch.Tensor] = {}  # separable criteria: float32, d_in per layer
        self._score_dtype = _DTYPES[self.config.importance_dtype]
        self._rule = selection_rule(self.config)

    @property
    def stores(self):
        return {"element": self.element_averages, "feature": self.feature_averages}

    def _check_criterion(self, criterion) -> None:
        if not criterion.elementwise:
            raise ValueError(
                f"importance={criterion.name!r} scores whole heads and channels; granularity="
                f"{self.config.granularity!r} needs a per-weight criterion: 'wanda', 'lora', 'grad' or 'magnitude'."
            )

    def _scored_layers(self, criterion):
        return list(self.element_layers)

    # ------------------------------------------------------------------ importance
    def _fold(self, beta: float) -> None:
        if self.criterion.separable:
            for name, _ in self.element_layers:
                step = self.criterion.step_features(name)
                if step is not None:  # None: module not used in this step's graph
                    moving_average_(self._average(self.feature_averages, name, step.shape, step.device), step, beta)
            return
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

    # ------------------------------------------------------------------ masks
    def _select(self, sparsity: float) -> None:
        if self._rule is _global:  # one ranking across layers: every layer's scores at once
            scores = [self._element_scores(n, layer) for n, layer in self.element_layers]
            kept = [layer.element_mask(self.adapter) for _, layer in self.element_layers]
            new = self._rule(scores, kept, sparsity)
        else:  # per-layer rules: one layer's scores alive at a time
            new = [
                self._rule([self._element_scores(n, layer)], [layer.element_mask(self.adapter)], sparsity)[0]
                for n, layer in self.element_layers
            ]
        for (_, layer), mask in zip(self.element_layers, new):
            layer.set_masks(self.adapter, elements_packed=pack_bits(mask))

    # ------------------------------------------------------------------ checkpointing
    def _state_shapes(self):
        shapes = {}
        for name, layer in self.element_layers:
            shapes[f"element.{name}"] = (layer.out_features, layer.in_features)
            shapes[f"feature.{name}"] = (layer.in_features,)
        return shapes

    def _device_of(self, kind, key):
        return dict(self.layers)[key].get_base_weight().device

    def _restored(self, kind, key, value, device):
        return value.to(self._score_dtype).to(device) if kind == "element" else value.float().to(device)
