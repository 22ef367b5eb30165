"""Configuration of a LoRAPrune adapter.

`LoRAPruneConfig` keeps LoRA's fields where they mean the same thing (rank, alpha, dropout, target modules,
bias, fan-in/fan-out, layer selection) and adds the pruning fields of the method: how much to prune, at which
granularity, with which importance criterion, on which schedule.

Every field is checked when the config is built, so a typo fails at `LoRAPruneConfig(...)` and not hours into a
training run. The error always names the field and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .registration import LORAPRUNE_PEFT_TYPE
from .validation import check_choice, check_fraction, check_int

GRANULARITIES = ("unstructured", "structured", "N:M")
ADAPTATIONS = ("parallel", "sequential")
IMPORTANCE_CRITERIA = ("lora", "grad", "magnitude", "activation", "wanda")
GROUPWISE_CRITERIA = ("activation",)  # score whole heads and channels: structured granularity only
BUDGETS = ("local", "global")
SCHEDULES = ("cubic", "one_shot")
STRUCTURES = ("heads", "channels", "layers", "hidden")
HEAD_GROUPINGS = ("kv_group", "query_head")
ALLOCATIONS = ("per_structure", "joint")
LAYER_IMPORTANCES = ("taylor", "influence")
BIAS_OPTIONS = ("none", "all", "lora_only")
IMPORTANCE_DTYPES = ("bfloat16", "float16", "float32")
ELEMENT_MASK_GRADIENTS = ("exact", "straight_through")
# LoRA initialisations that are plain random/zero inits and keep the base model's outputs unchanged (or not,
# for False). Data-driven or SVD-based inits (PiSSA, OLoRA, LoftQ, EVA, CorDA, ...) rewrite the base weights
# or need a data pass: they are not supported.
SUPPORTED_INIT_LORA_WEIGHTS = (True, False, "gaussian")


def parse_n_m(granularity: str) -> tuple[int, int]:
    """Parse a semi-structured pattern such as ``"2:4"`` into ``(n_kept, m)``.

    ``"N:M"`` means: in every run of M consecutive weights along the input dimension, N are kept. Raises
    ``ValueError`` naming ``granularity`` for anything else (``0:4``, ``4:4``, ``2:x`` ...).
    """
    parts = granularity.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"granularity={granularity!r} is not a valid 'N:M' pattern; expected two positive integers such as '2:4'."
        )
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(
            f"granularity={granularity!r} is impossible: need 0 < N < M (N weights kept out of every M), e.g. '2:4'."
        )
    return n, m


@dataclass
class LoRAPruneConfig(PeftConfig):
    """Configuration of a LoRAPrune adapter: LoRA fine-tuning that prunes the model it adapts.

    The LoRA fields come first and mean what they mean in `peft.LoraConfig`; the pruning fields follow.

    Attributes:
        r: rank of the adapter factors (> 0).
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r`` (or ``/ sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: dropout on the adapter path's input.
        target_modules: module names or a regex to adapt. ``None`` picks, for a model family in the
            architecture registry, every attention and MLP linear (structured pruning needs all modules that
            lose a head or channel together), otherwise PEFT's LoRA default for the model type.
        exclude_modules: as in LoRA.
        layers_to_transform: as in LoRA.
        layers_pattern: as in LoRA.
        fan_in_fan_out: as in LoRA.
        bias: as in LoRA.
        modules_to_save: as in LoRA; ``norm_module_names(base)`` trains every normalisation layer.
        init_lora_weights: True, False or "gaussian", as in LoRA.
        use_rslora: as in LoRA.
        use_dora: accepted only as False (DoRA's magnitude vector would re-scale pruned rows).
        target_sparsity: fraction of prunable units removed by the end of training, in [0, 1). Units are
            weights ("unstructured", "N:M") or heads and channels ("structured").
        granularity: "unstructured", "structured" or an "N:M" pattern such as "2:4" (target_sparsity is then
            ignored: the pattern fixes it at 1 - N/M).
        adaptation: "parallel" (W = W0 + s·B·A, plain LoRA) or "sequential" (W = (I + s·B·A)·W0).
        importance: how heads, channels or weights are scored (see `peft_loraprune.pruning.criteria`):
            "activation" (structured only; the default there): the first-order Taylor estimate of removing a whole
            head or channel, from its consumer's input activation and that activation's gradient, which the
            backward pass computes anyway (no weight gradient, ``d_in`` floats of state per consumer module);
            "wanda" (the default for "unstructured" and "N:M"): ``|W_ij|`` of the merged weight times the norm of
            its input feature over the step's tokens, Wanda's rule, from the forward pass alone (``d_in`` floats of
            state per layer, the weight scored only when masks are rewritten); on SmolLM2 at 50% unstructured it
            gave lower held-out perplexity than the paper's estimator and than llm-compressor's one-shot Wanda and
            SparseGPT followed by the same LoRA (docs/benchmarks.md); "lora" (the paper's estimator from the adapter
            gradients, ``|W ⊙ G_hat|``, the default for those granularities before 0.4.0); "grad" (true gradient of
            the merged weight; memory-heavy baseline); "magnitude". ``None`` picks the default for the granularity.
        element_mask_gradient: "unstructured" and "N:M" only. "exact" (default): the adapter factors get the
            gradient of the masked update ``(B·A) ⊙ M``, which needs one weight-sized product ``grad_yᵀ·x`` per
            layer and backward pass. "straight_through" (opt-in approximation, as sparse-training methods use):
            the factors get the gradient of the unmasked update ``B·A``, computed at rank r with nothing
            weight-sized; outputs and input gradients stay exact, but pruned entries of ``B·A`` still steer the
            factors. Its time cost is in docs/concepts/cost.md.
        importance_beta: moving-average factor λ of the importance, in [0, 1).
        importance_dtype: storage dtype of per-weight scores ("lora", "grad" and "magnitude" at the unstructured and
            N:M granularities; "wanda", their default, keeps none: it averages one input norm per feature and scores
            the weight at rewrites).
        pruning_interval: optimizer steps between mask rewrites (>= 1).
        budget: "local" (same fraction in every pruned layer) or "global" (ranked across layers).
        initial_sparsity: the sparsity the schedule starts from (see ``schedule``).
        pruning_start: the fraction of the optimizer steps where pruning starts (see ``schedule``).
        pruning_end: the fraction of the optimizer steps where the target is reached (see ``schedule``).
        schedule: "cubic" or "one_shot". The cubic schedule goes from ``initial_sparsity``
            to ``target_sparsity`` between the fractions ``pruning_start`` and ``pruning_end`` of the optimizer
            steps (0.1 and 0.4: pruning from 10% to 40% of training, then 60% at the final structure);
            ``schedule="one_shot"`` prunes everything at ``pruning_start``. (Before 0.5.0 the window was
            ``warmup_ratio`` and ``cooldown_ratio = 1 - pruning_end``; those names still work, with a
            ``DeprecationWarning``: ``warmup_ratio`` was also ``TrainingArguments``' learning-rate warm-up.) The
            default window was measured against the reference code's (10% to 90%) and one-shot on SmolLM2 and MiniLM
            (``benchmarks/peers.py``; docs/benchmarks.md).
            Pruning late leaves the last units' removal little time to recover.
        prune_structures: for "structured": which units to prune: "heads", "channels" and/or "layers" (whole
            transformer blocks, gated through the modules that write into the residual stream; export deletes them
            and updates ``num_hidden_layers``; pre-norm families only, scored with ``importance="activation"``) and/or
            "hidden" (channels of the residual stream, one mask for every block; export slices the embedding, every
            projection, the norms and the output layer; RMSNorm families only, ``importance="activation"``).
        head_grouping: with grouped-query attention: "kv_group" removes a KV head with all its query heads;
            "query_head" removes query heads, the same number in every KV group.
        allocation: for "structured" with several ``prune_structures``: how the target is shared between them.
            "per_structure" (default): each kind loses ``target_sparsity`` of its units, rounded per block (with 3
            query heads per KV group, 20% removes 1 of 3). "joint": ``target_sparsity`` is the fraction of the
            pruned blocks' head and channel weights removed, and how many of each kind go is chosen at every
            rewrite by the importance, one split for the whole model so every block keeps the same widths (see
            `peft_loraprune.pruning.selection.split_weight_budget`). Needs ``budget="local"``.
        structure_sparsity: with ``allocation="per_structure"``, a fixed split: the fraction of each named kind's
            units removed by the end (``{"layers": 0.25, "hidden": 0.25}``); the schedule ramps every kind along with
            ``target_sparsity``; kinds not named lose ``target_sparsity``.
        layer_importance: with "layers" in ``prune_structures``, how whole blocks are scored. "influence":
            ShortGPT's Block Influence, ``1 - cos(h_in, h_out)`` averaged over the training tokens, measured on the
            adapted, masked model as it trains (no gradient); not comparable with the other kinds, so not with
            ``allocation="joint"`` (use ``structure_sparsity`` for a fixed split). "taylor": the Taylor estimate of
            closing the block's gate, ``|Σ y·∂L/∂y|`` over its residual writers' outputs, in the same units as heads
            and channels (``allocation="joint"`` compares them). None (default): "taylor" with
            ``allocation="joint"``, else "influence" (the better of the two on SmolLM2: docs/benchmarks.md, "front").
        dense_layers: transformer block indices never pruned (None: none), or "reference" for the reference
            code's choice (the first 10% of blocks and the last one).
        save_digest: written by ``save_pretrained`` (SHA-256 over the ``adapter_model.safetensors`` saved with
            this config and the config's other fields) and checked by ``from_pretrained``; not meant to be set by
            hand (see `peft_loraprune.hub.integrity`).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of the adapter factors (> 0)"})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator (update scaled by alpha / r); LoraConfig's default is 8"}
    )
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout probability on the adapter path's input, in [0, 1); LoraConfig's default is 0.0"},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt; None: every attention and MLP linear of a known family "
            "(PEFT's LoRA default otherwise)"
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never adapted"}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for GPT-2 style Conv1D weights"})
    bias: str = field(
        default="none", metadata={"help": "Which biases train, as in LoRA: 'none', 'all' or 'lora_only'"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "Not supported; must stay False"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved whole with the adapter (e.g. a classifier head)"}
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "Factor initialisation as in LoRA: True (B = 0), False (random, for tests) or 'gaussian'"},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices (as in LoRA)"}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the module list holding the blocks, for layers_to_transform (as in LoRA)"},
    )

    target_sparsity: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the prunable units (heads and channels, or weights) removed by the end of training, "
            "in [0, 1); ignored for N:M, whose pattern fixes it at 1 - N/M"
        },
    )
    granularity: str = field(
        default="structured",
        metadata={
            "help": "What is pruned: 'structured' (attention heads and MLP channels), 'unstructured' (single weights) "
            "or an 'N:M' pattern such as '2:4' (N weights kept in every M)"
        },
    )
    adaptation: str = field(
        default="parallel",
        metadata={
            "help": "'parallel': W0 + s·B·A (plain LoRA); 'sequential': (I + s·B·A)·W0, the adapter on the output"
        },
    )
    importance: Optional[str] = field(
        default=None,
        metadata={
            "help": "How units are scored: 'activation' (structured), 'wanda', 'lora' (the paper's estimator), 'grad' "
            "or 'magnitude'; None: 'activation' for structured, 'wanda' for unstructured and N:M"
        },
    )
    element_mask_gradient: str = field(
        default="exact",
        metadata={
            "help": "Unstructured and N:M: 'exact' gives the factors the gradient of the masked update (one "
            "weight-sized product per layer and step); 'straight_through' that of the unmasked update (cheaper, "
            "an approximation)"
        },
    )
    importance_beta: float = field(
        default=0.9,
        metadata={
            "help": "Weight of the past in the importance's moving average over steps, in [0, 1) (0: this step only)"
        },
    )
    importance_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Storage dtype of per-weight scores: 'bfloat16', 'float16' or 'float32' ('lora', 'grad', 'magnitude' per "
            "weight; 'wanda' keeps none)"
        },
    )
    pruning_interval: int = field(default=10, metadata={"help": "Optimizer steps between mask rewrites (>= 1)"})
    budget: str = field(
        default="local",
        metadata={"help": "'local': the same fraction pruned in every layer; 'global': units ranked across layers"},
    )
    initial_sparsity: float = field(
        default=0.0,
        metadata={
            "help": "Sparsity of the first rewrite, at pruning_start: a fraction in [0, 1), at most the target; "
            "ignored by the one_shot schedule"
        },
    )
    pruning_start: float = field(
        default=0.1, metadata={"help": "Fraction of the training steps at which pruning starts, in [0, 1)"}
    )
    pruning_end: float = field(
        default=0.4,
        metadata={
            "help": "Fraction of the training steps at which target_sparsity is reached, in (pruning_start, 1] (the "
            "reference code: 0.9)"
        },
    )
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "Deprecated (before 0.5.0): use pruning_start"}
    )
    cooldown_ratio: Optional[float] = field(
        default=None, metadata={"help": "Deprecated (before 0.5.0): use pruning_end = 1 - cooldown_ratio"}
    )
    schedule: str = field(
        default="cubic",
        metadata={
            "help": "'cubic': sparsity ramps from pruning_start to pruning_end; 'one_shot': everything at pruning_start"
        },
    )
    prune_structures: list[str] = field(
        default_factory=lambda: ["heads", "channels"],
        metadata={
            "help": "Structured only: which units are pruned: 'heads', 'channels', 'layers' (whole blocks; export "
            "deletes them) and/or 'hidden' (residual-stream channels; export slices the hidden size)"
        },
    )
    head_grouping: str = field(
        default="kv_group",
        metadata={
            "help": "With grouped-query attention: 'kv_group' removes a KV head with all its query heads; 'query_head' "
            "removes the same number of query heads in every KV group"
        },
    )
    allocation: str = field(
        default="per_structure",
        metadata={
            "help": "Structured, several prune_structures: 'per_structure' prunes target_sparsity of each kind's units; "
            "'joint' removes target_sparsity of the head and channel weights, split between the kinds by importance"
        },
    )
    structure_sparsity: Optional[dict[str, float]] = field(
        default=None,
        metadata={
            "help": "Structured, allocation='per_structure': a fixed split, the fraction of each named kind's units "
            "removed by the end (e.g. {'layers': 0.25, 'hidden': 0.25}); kinds not named lose target_sparsity"
        },
    )
    layer_importance: Optional[str] = field(
        default=None,
        metadata={
            "help": "With 'layers' in prune_structures, the block score: 'influence' (Block Influence 1 - cos(h_in, "
            "h_out) measured while training; not with allocation='joint') or 'taylor' (the gate's Taylor estimate, "
            "comparable with heads and channels); None: 'taylor' with allocation='joint', else 'influence'"
        },
    )
    dense_layers: Optional[Union[list[int], str]] = field(
        default=None,
        metadata={
            "help": "Transformer block indices never pruned, or 'reference' for the reference code's choice (the first "
            "10% of blocks and the last one); None: every block is pruned"
        },
    )
    save_digest: Optional[str] = field(
        default=None, metadata={"help": "SHA-256 of the weights file and this config (written on save)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LORAPRUNE_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.prune_structures, str):
            self.prune_structures = [self.prune_structures]
        if not isinstance(self.prune_structures, (list, tuple, set)):
            raise ValueError(f"prune_structures must be a list of {list(STRUCTURES)}, got {self.prune_structures!r}.")
        self.prune_structures = list(self.prune_structures)
        self._adopt_deprecated_window()
        if self.importance is None:
            # the defaults decided by benchmarks/criteria.py (structured) and benchmarks/peers.py --granularity
            # unstructured (per weight); see docs/benchmarks.md
            granularity = self.granularity if isinstance(self.granularity, str) else ""
            self.importance = "activation" if granularity == "structured" else "wanda"
        if self.layer_importance is None:  # the measured better score, where the allocation can use it
            self.layer_importance = "taylor" if self.allocation == "joint" else "influence"
        self.validate()

    def _adopt_deprecated_window(self) -> None:
        """``warmup_ratio`` / ``cooldown_ratio`` (before 0.5.0, also read from older saved adapters) become
        ``pruning_start`` / ``pruning_end`` with a ``DeprecationWarning``; the old fields are then cleared, so a
        save writes the new names only."""
        old = {"warmup_ratio": self.warmup_ratio, "cooldown_ratio": self.cooldown_ratio}
        if all(v is None for v in old.values()):
            return
        given = ", ".join(f"{k}={v!r}" for k, v in old.items() if v is not None)
        warnings.warn(
            f"{given}: LoRAPruneConfig's pruning window is now pruning_start (was warmup_ratio) and pruning_end "
            "(was 1 - cooldown_ratio), fractions of the training steps; the old names are removed in 0.6.0.",
            DeprecationWarning,
            stacklevel=4,
        )
        if self.warmup_ratio is not None:
            check_fraction("warmup_ratio", self.warmup_ratio)
            self.pruning_start = self.warmup_ratio
        if self.cooldown_ratio is not None:
            check_fraction("cooldown_ratio", self.cooldown_ratio)
            self.pruning_end = 1.0 - self.cooldown_ratio
        self.warmup_ratio = self.cooldown_ratio = None

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0)
        ):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        check_fraction("lora_dropout", self.lora_dropout)
        check_choice("bias", self.bias, BIAS_OPTIONS)
        if self.use_dora:
            raise ValueError(
                "use_dora=True is not supported by LoRAPrune: DoRA re-normalises each weight row with a trained "
                "magnitude, which would rescale pruned rows; use use_dora=False."
            )
        if not any(
            self.init_lora_weights is v or self.init_lora_weights == v for v in SUPPORTED_INIT_LORA_WEIGHTS
        ) or (isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool)):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by LoRAPrune; allowed values are "
                f"{list(SUPPORTED_INIT_LORA_WEIGHTS)} (PiSSA, OLoRA, LoftQ, EVA, CorDA and other LoRA variants that "
                "rewrite the base weights are not supported)."
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both or neither.")

        check_fraction("target_sparsity", self.target_sparsity)
        if not isinstance(self.granularity, str):
            raise ValueError(f"granularity must be a string, got {self.granularity!r}.")
        if ":" in self.granularity:
            parse_n_m(self.granularity)
        else:
            check_choice("granularity", self.granularity, GRANULARITIES[:2] + ("an 'N:M' pattern such as '2:4'",))
        check_choice("adaptation", self.adaptation, ADAPTATIONS)
        check_choice("importance", self.importance, IMPORTANCE_CRITERIA)
        if self.importance in GROUPWISE_CRITERIA and self.is_element_granularity:
            raise ValueError(
                f"importance={self.importance!r} scores whole heads and channels, so it needs "
                f"granularity='structured' (got {self.granularity!r}); for per-weight granularities use one of "
                f"{[c for c in IMPORTANCE_CRITERIA if c not in GROUPWISE_CRITERIA]}."
            )
        check_choice("element_mask_gradient", self.element_mask_gradient, ELEMENT_MASK_GRADIENTS)
        if self.element_mask_gradient != "exact" and not self.is_element_granularity:
            raise ValueError(
                f"element_mask_gradient={self.element_mask_gradient!r} changes the gradient of per-weight masks, "
                f"which granularity={self.granularity!r} does not have; use it with 'unstructured' or an 'N:M' "
                "pattern, or leave it at 'exact'."
            )
        check_fraction("importance_beta", self.importance_beta)
        check_choice("importance_dtype", self.importance_dtype, IMPORTANCE_DTYPES)
        check_int("pruning_interval", self.pruning_interval, 1)
        check_choice("budget", self.budget, BUDGETS)
        check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.effective_target_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity!r} exceeds the target sparsity "
                f"{self.effective_target_sparsity!r}; masks only ever lose entries."
            )
        check_fraction("pruning_start", self.pruning_start)
        check_fraction("pruning_end", self.pruning_end, upper_inclusive=True)
        if self.pruning_end <= self.pruning_start:
            raise ValueError(
                f"pruning_end={self.pruning_end!r} must be after pruning_start={self.pruning_start!r} (fractions of "
                "the training steps): no steps would be left for pruning."
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        if not self.prune_structures:
            raise ValueError(f"prune_structures must name at least one of {list(STRUCTURES)}, got [].")
        for s in self.prune_structures:
            check_choice("prune_structures", s, STRUCTURES)
        for axis in ("layers", "hidden"):
            if axis in self.prune_structures and self.granularity == "structured" and self.importance != "activation":
                raise ValueError(
                    f"prune_structures with {axis!r} scores its units by the Taylor estimate of their residual "
                    f"contributions, which importance='activation' computes; got importance={self.importance!r}."
                )
        check_choice("head_grouping", self.head_grouping, HEAD_GROUPINGS)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("layer_importance", self.layer_importance, LAYER_IMPORTANCES)
        if self.layer_importance == "influence" and self.allocation == "joint" and "layers" in self.prune_structures:
            raise ValueError(
                "layer_importance='influence' scores blocks by Block Influence, which is not in the loss units that "
                "allocation='joint' compares across heads, channels, layers and hidden channels; use "
                "layer_importance='taylor' with allocation='joint', or allocation='per_structure' (optionally with "
                "structure_sparsity) with 'influence'."
            )
        if self.allocation == "joint" and self.granularity != "structured":
            raise ValueError(
                f"allocation='joint' shares the target between heads and channels, which granularity="
                f"{self.granularity!r} does not prune; use it with granularity='structured' or leave it at "
                "'per_structure'."
            )
        if self.allocation == "joint" and self.budget != "local":
            raise ValueError(
                "allocation='joint' chooses one split of the weights between heads and channels for every block; "
                f"it needs budget='local', got budget={self.budget!r}."
            )
        self._validate_structure_sparsity()
        if self.dense_layers is not None and self.dense_layers != "reference":
            if isinstance(self.dense_layers, int) and not isinstance(self.dense_layers, bool):
                self.dense_layers = [self.dense_layers]
            if not isinstance(self.dense_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.dense_layers
            ):
                raise ValueError(
                    f"dense_layers must be None, 'reference' or a list of non-negative block indices, "
                    f"got {self.dense_layers!r}."
                )
            self.dense_layers = sorted(set(self.dense_layers))
        if self.save_digest is not None and (
            not isinstance(self.save_digest, str) or not re.fullmatch(r"[0-9a-f]{64}", self.save_digest)
        ):
            raise ValueError(
                f"save_digest must be None or a SHA-256 hex digest (64 lowercase hex digits), got "
                f"{self.save_digest!r}; it is written by save_pretrained, not set by hand."
            )

    def _validate_structure_sparsity(self) -> None:
        split = self.structure_sparsity
        if split is None:
            return
        if not isinstance(split, dict) or not split:
            raise ValueError(
                f"structure_sparsity must be a dict of kind -> fraction such as {{'layers': 0.25}}, got {split!r}."
            )
        for kind, fraction in split.items():
            if kind not in self.prune_structures:
                raise ValueError(
                    f"structure_sparsity names {kind!r}, which prune_structures={self.prune_structures} does not "
                    "prune; name only kinds listed there."
                )
            check_fraction(f"structure_sparsity[{kind!r}]", fraction)
        if self.allocation != "per_structure":
            raise ValueError(
                "structure_sparsity fixes each kind's share, allocation='joint' lets the importance choose it: use "
                "one or the other (allocation='per_structure' with structure_sparsity)."
            )
        if self.effective_target_sparsity <= 0:
            raise ValueError("structure_sparsity needs target_sparsity > 0: the schedule ramps every kind with it.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json`` atomically (a temporary file, then a rename), so a killed save never leaves
        half a config. The save digest and the model card are the saver's business (:mod:`~peft_loraprune.hub.saving`);
        a config saved on its own carries no digest."""
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".config-") as tmp:
            self.save_digest = None
            super().save_pretrained(tmp, **kwargs)
            os.replace(os.path.join(tmp, CONFIG_NAME), os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config; for a local folder, also check that it and the weights file next to it are the ones
        saved together (see :func:`peft_loraprune.hub.integrity.verify_saved_adapter`)."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(folder):
            from .hub.integrity import verify_saved_adapter  # the hub layer sits above the config

            verify_saved_adapter(folder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    # ------------------------------------------------------------------ derived values
    @property
    def is_element_granularity(self) -> bool:
        """True for granularities with one mask entry per weight ("unstructured" and "N:M")."""
        return self.granularity != "structured"

    @property
    def n_m(self) -> Optional[tuple[int, int]]:
        """``(N, M)`` for an "N:M" granularity, else None."""
        return parse_n_m(self.granularity) if ":" in self.granularity else None

    @property
    def effective_target_sparsity(self) -> float:
        """The sparsity the run ends at: ``1 - N/M`` for "N:M", else ``target_sparsity``."""
        nm = self.n_m
        return 1.0 - nm[0] / nm[1] if nm else float(self.target_sparsity)

    @property
    def scaling(self) -> float:
        """The adapter scale s: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
