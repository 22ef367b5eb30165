"""What LoRAPrune knows about model families, in one registry with one entry per family.

Structured pruning removes *groups*: an attention head (its rows in the query, key and value projections and its
columns in the output projection) or an MLP channel (its row in the first MLP linear(s) and its column in the
second). Which modules of a transformer block form a group, and how a group is laid out along their rows or
columns, depends on the family; nothing else in the package knows a module name.

A group axis of a module (rows = output features, columns = input features) of length ``L`` is viewed as
``(outer, n_groups, inner)``: group ``g`` covers every ``[o, g, i]``. Plain projections have ``outer = 1``;
GPT-2's fused ``c_attn`` is ``(3, n_heads, head_dim)`` (query, key and value stacked).

Whole blocks (``prune_structures=["layers"]``) are gated through their *residual writers*: the modules whose
outputs are added to the residual stream (a pre-norm block computes ``h + o_proj(...)`` and ``h + down_proj(...)``).
Masking every output row of those modules makes the block the identity, exactly as deleting it does; post-norm
blocks (BERT: ``LayerNorm(h + dense(...))``) have no such gate and cannot lose whole layers.

Adding a family is one ``register_architecture(ArchitectureSpec(...))`` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GroupMember:
    """One module's share of a group: which module (name relative to the block), which axis, what layout."""

    module: str
    axis: str  # "rows" | "cols"
    layout: tuple[int, int, int]  # (outer, n_groups, inner)


@dataclass(frozen=True)
class GroupSpec:
    """A kind of prunable unit in one block, e.g. its attention heads.

    ``partitions`` > 1 means the groups come in that many equal consecutive partitions that must each lose the
    same number of groups (query heads inside KV groups with grouped-query attention).

    ``input_factor``: a member whose output ``u`` enters the consumer's input ``x`` as an elementwise linear
    factor, ``x = a ⊙ u`` (the "up" projection of a gated MLP: ``down(act(gate(h)) ⊙ up(h))``). Then
    ``x_c·∂L/∂x_c = u_c·∂L/∂u_c`` token by token, so the activation Taylor score of a consumer column can be read
    at that member's output, which autograd keeps anyway for the product's backward, instead of holding the
    consumer's input until its backward (it is not otherwise kept when LoRA dropout is on).
    """

    structure: str  # "heads" | "channels"
    n_groups: int
    members: tuple[GroupMember, ...]
    partitions: int = 1
    input_factor: Optional[str] = None


@dataclass(frozen=True)
class ExportSpec:
    """How a family's config expresses pruned widths, for physical removal (``merge_and_prune``).

    ``removable``: the structures whose removal the config can express (every block must keep the same number).
    ``config_updates(config, kept, head_grouping)``: new config attributes, where ``kept`` maps a structure to the
    number of groups each block keeps (per partition for query-head grouping).
    ``refresh_block(block, config)``: optional; updates attributes a block derived from the config at
    construction (e.g. Llama attention's ``num_key_value_groups``) so the in-memory model matches a reload.
    ``layer_config_updates(config, kept_blocks)``: optional; the config attributes that describe a model keeping only
    the blocks ``kept_blocks`` (indices in order): ``num_hidden_layers`` and per-layer lists such as
    ``layer_types``. None: the config cannot express removed blocks.
    ``refresh_model(model)``: optional; updates attributes the model derived from the per-layer config at
    construction (e.g. Qwen2's ``has_sliding_layers``) after blocks were removed.
    """

    removable: tuple[str, ...]
    config_updates: Callable[[object, dict, str], dict]
    refresh_block: Optional[Callable[[object, object], None]] = None
    layer_config_updates: Optional[Callable[[object, list[int]], dict]] = None
    refresh_model: Optional[Callable[[object], None]] = None
    notes: str = ""


@dataclass(frozen=True)
class StreamSpec:
    """How a family's blocks read the residual stream, for pruning the hidden size (``prune_structures=["hidden"]``,
    see :mod:`~peft_loraprune.pruning.stream`). RMSNorm families only.

    ``readers``: block-relative names of the modules reading a norm's output (their input columns are stream
    channels); ``norms``: the block's RMSNorms over the stream; ``final_norm``: the norm after the last block,
    named relative to the module holding the block list; ``eps_attribute``: the config attribute of their epsilon.
    """

    readers: tuple[str, ...]
    norms: tuple[str, ...]
    final_norm: str
    eps_attribute: str = "rms_norm_eps"


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything LoRAPrune needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    block_pattern: str  # regex whose group 1 is the block index and group 2 the module name inside the block
    groups: Callable[[object, str], list[GroupSpec]]  # (model config, head_grouping) -> groups of one block
    prunable_modules: tuple[str, ...]  # default target modules (block-relative names)
    export: Optional[ExportSpec] = None
    #: block-relative names of the modules whose outputs are added to the residual stream (pre-norm blocks only;
    #: empty: whole blocks cannot be gated, see the module docstring)
    residual_writers: tuple[str, ...] = ()
    #: how blocks read the residual stream (RMSNorm families), for pruning the hidden size; None: not prunable
    stream: Optional[StreamSpec] = None
    notes: str = ""
    _compiled: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_compiled", re.compile(self.block_pattern))

    def locate(self, module_name: str) -> Optional[tuple[int, str]]:
        """``(block index, module name inside the block)`` for a full module name, or None."""
        m = self._compiled.search(module_name)
        if m is None:
            return None
        return int(m.group(1)), m.group(2)


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> None:
    """Add (or replace) a family; its ``model_types`` are the ``config.model_type`` values it serves."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def unregister_architecture(name: str) -> None:
    """Remove the family registered under ``name`` (all its model types); unknown names are an error."""
    types = [t for t, spec in _REGISTRY.items() if spec.name == name]
    if not types:
        raise ValueError(
            f"no registered family is named {name!r}; registered: {sorted({s.name for s in _REGISTRY.values()})}"
        )
    for t in types:
        del _REGISTRY[t]


def registered_specs() -> list[ArchitectureSpec]:
    """Every registered family once."""
    return list({id(spec): spec for spec in _REGISTRY.values()}.values())


def get_architecture(model_type: Optional[str]) -> Optional[ArchitectureSpec]:
    return _REGISTRY.get(model_type) if model_type else None


def block_of(model_type: Optional[str], module_name: str) -> Optional[int]:
    """Index of the transformer block holding ``module_name``: the family's own pattern when it is registered,
    else the last ``.<number>.`` in the name (how PEFT's ``layers_to_transform`` finds layers)."""
    spec = get_architecture(model_type)
    if spec is not None:
        located = spec.locate(module_name)
        if located is not None:
            return located[0]
    numbers = re.findall(r"\.(\d+)\.", f".{module_name}.")
    return int(numbers[-1]) if numbers else None


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def require_architecture(model_type: Optional[str]) -> ArchitectureSpec:
    """The spec of ``model_type``, or a ``ValueError`` naming the supported families."""
    spec = get_architecture(model_type)
    if spec is None:
        raise ValueError(
            f"Structured pruning does not know the model family {model_type!r}; supported model types are "
            f"{supported_model_types()}. Use granularity='unstructured' or an 'N:M' pattern (they work on any "
            "Linear or Conv1D), or add the family with peft_loraprune.register_architecture()."
        )
    return spec


def _head_dim(config) -> int:
    """An explicit ``head_dim`` from the config, else ``hidden_size / num_attention_heads``."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return head_dim
    _check_divisible("hidden_size / num_attention_heads", config.hidden_size, config.num_attention_heads)
    return config.hidden_size // config.num_attention_heads


def _check_divisible(what: str, total: int, parts: int) -> None:
    if parts <= 0 or total % parts:
        raise ValueError(f"{what}: {total} is not divisible by {parts}; the model config is inconsistent.")


def multi_head_groups(q: str, k: str, v: str, o: str, mlp_in: str, mlp_out: str):
    """The groups function of a block with plain multi-head attention (one key/value head per query head) and a
    two-linear MLP, given the block-relative module names (BERT, RoBERTa, ViT and the like)."""

    def groups(config, head_grouping: str) -> list[GroupSpec]:
        n_heads, hd, inter = config.num_attention_heads, _head_dim(config), config.intermediate_size
        heads = tuple(GroupMember(name, "rows", (1, n_heads, hd)) for name in (q, k, v))
        return [
            GroupSpec("heads", n_heads, heads + (GroupMember(o, "cols", (1, n_heads, hd)),)),
            GroupSpec(
                "channels",
                inter,
                (GroupMember(mlp_in, "rows", (1, inter, 1)), GroupMember(mlp_out, "cols", (1, inter, 1))),
            ),
        ]

    return groups


#: config attributes holding one entry per block, sliced when blocks are removed
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def kept_layers_config_updates(config, kept_blocks: list[int], count_attribute: str = "num_hidden_layers") -> dict:
    """``num_hidden_layers`` (or ``count_attribute``) and every per-layer list of the config
    (:data:`PER_LAYER_CONFIG_LISTS`, e.g. Qwen's ``layer_types`` of sliding and full attention) for a model that
    keeps only ``kept_blocks`` of its blocks."""
    updates = {count_attribute: len(kept_blocks)}
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if values is not None:
            updates[name] = [values[i] for i in kept_blocks]
    return updates


# ---------------------------------------------------------------------------------------------------- Llama family
def _llama_groups(config, head_grouping: str) -> list[GroupSpec]:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    _check_divisible("num_attention_heads / num_key_value_heads", n_heads, n_kv)
    hd = _head_dim(config)
    rep = n_heads // n_kv
    if head_grouping == "kv_group":
        heads = GroupSpec(
            "heads",
            n_kv,
            (
                GroupMember("self_attn.q_proj", "rows", (1, n_kv, rep * hd)),
                GroupMember("self_attn.k_proj", "rows", (1, n_kv, hd)),
                GroupMember("self_attn.v_proj", "rows", (1, n_kv, hd)),
                GroupMember("self_attn.o_proj", "cols", (1, n_kv, rep * hd)),
            ),
        )
    else:  # query heads inside their KV groups; key and value projections are untouched
        heads = GroupSpec(
            "heads",
            n_heads,
            (
                GroupMember("self_attn.q_proj", "rows", (1, n_heads, hd)),
                GroupMember("self_attn.o_proj", "cols", (1, n_heads, hd)),
            ),
            partitions=n_kv,
        )
    inter = config.intermediate_size
    channels = GroupSpec(
        "channels",
        inter,
        (
            GroupMember("mlp.gate_proj", "rows", (1, inter, 1)),
            GroupMember("mlp.up_proj", "rows", (1, inter, 1)),
            GroupMember("mlp.down_proj", "cols", (1, inter, 1)),
        ),
        input_factor="mlp.up_proj",  # down_proj(act(gate_proj(h)) * up_proj(h))
    )
    return [heads, channels]


def _llama_config_updates(config, kept: dict, head_grouping: str) -> dict:
    updates = {}
    if "heads" in kept:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        updates["head_dim"] = _head_dim(config)
        if head_grouping == "kv_group":
            updates["num_key_value_heads"] = kept["heads"]
            updates["num_attention_heads"] = kept["heads"] * (n_heads // n_kv)
        else:
            updates["num_attention_heads"] = kept["heads"] * n_kv
    if "channels" in kept:
        updates["intermediate_size"] = kept["channels"]
    if "hidden" in kept:  # RMSNorms over fewer channels: eps scaled with them (see stream.py); head_dim explicit
        updates["head_dim"] = _head_dim(config)
        updates["rms_norm_eps"] = config.rms_norm_eps * config.hidden_size / kept["hidden"]
        updates["hidden_size"] = kept["hidden"]
    return updates


def _llama_refresh_block(block, config) -> None:
    block.self_attn.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads


def _llama_refresh_model(model) -> None:
    """What modules read from the config at construction: Qwen2/3's ``has_sliding_layers`` (from ``layer_types``),
    and every RMSNorm's epsilon (``rms_norm_eps``, rescaled when the hidden size is pruned)."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "has_sliding_layers"):
        inner.has_sliding_layers = "sliding_attention" in (model.config.layer_types or [])
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = model.config.rms_norm_eps


register_architecture(
    ArchitectureSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        block_pattern=r"(?:^|\.)layers\.(\d+)\.(.+)$",
        groups=_llama_groups,
        prunable_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        export=ExportSpec(
            ("heads", "channels", "layers", "hidden"),
            _llama_config_updates,
            _llama_refresh_block,
            layer_config_updates=kept_layers_config_updates,
            refresh_model=_llama_refresh_model,
        ),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        stream=StreamSpec(
            readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
            norms=("input_layernorm", "post_attention_layernorm"),
            final_norm="norm",
        ),
        notes="grouped-query attention: whole KV groups ('kv_group') or query heads inside groups ('query_head')",
    )
)


# ---------------------------------------------------------------------------------------------------- BERT family
# query, key, value, attention output, MLP in, MLP out (block-relative names)
_BERT_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

register_architecture(
    ArchitectureSpec(
        name="bert",
        model_types=("bert", "roberta"),
        block_pattern=r"(?:^|\.)layer\.(\d+)\.(.+)$",
        groups=multi_head_groups(*_BERT_MODULES),
        prunable_modules=_BERT_MODULES,
        export=ExportSpec(
            ("channels",),
            lambda config, kept, grouping: {"intermediate_size": kept["channels"]} if "channels" in kept else {},
            notes="BERT derives the head size from hidden_size / num_attention_heads: pruned heads stay zeroed",
        ),
    )
)


# ---------------------------------------------------------------------------------------------------- ViT
def _vit_config_updates(config, kept: dict, head_grouping: str) -> dict:
    updates = {}
    if "heads" in kept:  # transformers 5 ViT reads an explicit head_dim from its config
        updates["head_dim"] = _head_dim(config)
        updates["num_attention_heads"] = kept["heads"]
    if "channels" in kept:
        updates["intermediate_size"] = kept["channels"]
    return updates


def _vit_refresh_block(block, config) -> None:
    block.attention.num_attention_heads = config.num_attention_heads


register_architecture(
    ArchitectureSpec(
        name="vit",
        model_types=("vit",),
        block_pattern=r"(?:^|\.)layers\.(\d+)\.(.+)$",
        groups=multi_head_groups(
            "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"
        ),
        prunable_modules=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        export=ExportSpec(
            ("heads", "channels", "layers"),
            _vit_config_updates,
            _vit_refresh_block,
            layer_config_updates=kept_layers_config_updates,
        ),
        residual_writers=("attention.o_proj", "mlp.fc2"),
        notes="module names of transformers 5.x",
    )
)


# ---------------------------------------------------------------------------------------------------- GPT-2
def _gpt2_groups(config, head_grouping: str) -> list[GroupSpec]:
    n_heads = config.n_head
    _check_divisible("n_embd / n_head", config.n_embd, n_heads)  # GPT-2 has no explicit head_dim
    hd = config.n_embd // n_heads
    inter = config.n_inner or 4 * config.n_embd
    return [
        GroupSpec(
            "heads",
            n_heads,
            (
                GroupMember("attn.c_attn", "rows", (3, n_heads, hd)),
                GroupMember("attn.c_proj", "cols", (1, n_heads, hd)),
            ),
        ),
        GroupSpec(
            "channels",
            inter,
            (GroupMember("mlp.c_fc", "rows", (1, inter, 1)), GroupMember("mlp.c_proj", "cols", (1, inter, 1))),
        ),
    ]


register_architecture(
    ArchitectureSpec(
        name="gpt2",
        model_types=("gpt2",),
        block_pattern=r"(?:^|\.)h\.(\d+)\.(.+)$",
        groups=_gpt2_groups,
        prunable_modules=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        export=ExportSpec(
            ("channels", "layers"),
            lambda config, kept, grouping: {"n_inner": kept["channels"]} if "channels" in kept else {},
            layer_config_updates=lambda config, kept_blocks: kept_layers_config_updates(
                config, kept_blocks, "n_layer"
            ),
            notes="GPT-2 derives the head size from n_embd / n_head: pruned heads stay zeroed",
        ),
        residual_writers=("attn.c_proj", "mlp.c_proj"),
        notes="fused query/key/value projection c_attn (Conv1D)",
    )
)
