"""Which units the engine keeps, checked against units whose importance is known by construction.

Planted "dead" units contribute nothing to the model's output: an MLP channel whose gate/up rows and down column
are zero, a query head whose q rows and o columns are zero, single weights that are zero. Removing one changes the
loss by exactly zero (the brute-force reference), and every criterion scores it zero. Pruning exactly as many
units as were planted must then remove exactly the planted ones, for every criterion, granularity and budget: a
ranking that is inverted (pruning the best units) or distorted fails. A second reference is invariance: the global
budget normalises each layer's scores, so scaling one layer's weights must not move the mask.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig
from peft_loraprune.pruning.structure import find_structured_groups

HEAD_DIM = 8
DEAD_HEADS = (1, 2)  # one query head in each of the two KV groups (query_head grouping removes one per group)


def planted_model(granularity: str, seed: int = 0):
    """A tiny Llama with half its MLP channels and half its query heads dead, or (element granularities) half of
    the weights of every adapted layer zero, 2 in every 4 consecutive ones for N:M; returns the model and the dead
    sets (channels, heads or per-layer weight masks)."""
    model = make_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    dead = {}
    with torch.no_grad():
        for block in model.model.layers:
            if granularity == "structured":
                channels = torch.randperm(48, generator=g)[:24]
                block.mlp.gate_proj.weight[channels] = 0
                block.mlp.up_proj.weight[channels] = 0
                block.mlp.down_proj.weight[:, channels] = 0
                for h in DEAD_HEADS:
                    block.self_attn.q_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
                    block.self_attn.o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
                dead.setdefault("channels", []).append(set(channels.tolist()))
                dead.setdefault("heads", []).append(set(DEAD_HEADS))
            else:
                for module in (*block.self_attn.children(), *block.mlp.children()):
                    if not isinstance(module, torch.nn.Linear):
                        continue
                    w = module.weight
                    if granularity == "2:4":  # two zeros in every group of four, at random places
                        order = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=g).argsort(-1)
                        zero = (order < 2).reshape(w.shape)
                    else:
                        zero = torch.zeros(w.numel(), dtype=torch.bool)
                        zero[torch.randperm(w.numel(), generator=g)[: w.numel() // 2]] = True
                        zero = zero.reshape(w.shape)
                    w[zero] = 0
                    dead[id(module)] = zero
    return model, dead


def importance_steps(model, steps: int) -> None:
    """``steps`` backward passes of the tiny Llama on fixed batches, each folded into the importance."""
    model.train()
    for step in range(steps):
        inputs = make_inputs("llama", batch=4, seed=step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert model.base_model.update_importance()
        model.zero_grad()


def score_and_prune(model, steps: int = 2, b_scale: float = 0.01):
    """Importance from a few backward passes, then one rewrite to the target. ``b_scale``: the adapter's B is made
    random at this scale first, so the paper's estimator sees non-zero factors; 0 keeps B zero, so that the merged
    weight ``W0 + s·B·A`` stays exactly zero where ``W0`` is (the element tests' planted zeros)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    importance_steps(model, steps)
    engine = model.base_model.pruning_engine()
    engine.prune_to(model.base_model.peft_config["default"].target_sparsity)


@pytest.mark.parametrize("importance", [None, "lora", "magnitude", "wanda"])
@pytest.mark.parametrize("budget", ["local", "global"])
def test_structured_pruning_removes_exactly_the_dead_heads_and_channels(importance, budget):
    base, dead = planted_model("structured")
    head_grouping = "query_head" if budget == "local" else "kv_group"
    if budget == "global":  # per-KV-group pruning is refused with a global budget: kill whole channels only
        config = dict(prune_structures=["channels"])
    else:
        config = dict(prune_structures=["heads", "channels"])
    model = get_peft_model(
        base,
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            target_sparsity=0.5,
            importance=importance,
            budget=budget,
            head_grouping=head_grouping,
            lora_dropout=0.0,
            **config,
        ),
    )
    score_and_prune(model)
    groups = find_structured_groups(model.base_model, "default")
    seen = set()
    for block, g in enumerate(gr for gr in groups if gr.spec.structure == "channels"):
        pruned = set((~g.kept("default")).nonzero().flatten().tolist())
        assert pruned == dead["channels"][block], f"block {block} channels"
        seen.add("channels")
    for block, g in enumerate(gr for gr in groups if gr.spec.structure == "heads"):
        pruned = set((~g.kept("default")).nonzero().flatten().tolist())
        assert pruned == dead["heads"][block], f"block {block} heads"
        seen.add("heads")
    assert seen == set(config["prune_structures"])


@pytest.mark.parametrize("importance", [None, "lora", "magnitude"])
@pytest.mark.parametrize(
    "granularity,budget", [("unstructured", "local"), ("unstructured", "global"), ("2:4", "local")]
)
def test_element_pruning_removes_exactly_the_zero_weights(importance, granularity, budget):
    base, dead = planted_model(granularity)
    model = get_peft_model(
        base,
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            granularity=granularity,
            target_sparsity=0.5,
            importance=importance,
            budget=budget,
            lora_dropout=0.0,
        ),
    )
    score_and_prune(model, b_scale=0.0)
    checked = 0
    for _, layer in model.base_model.prune_layers():
        zero = dead[id(layer.get_base_layer())]
        assert torch.equal(~layer.element_mask("default"), zero)
        checked += 1
    assert checked == 14


@pytest.mark.parametrize("importance", ["magnitude", "wanda"])
def test_global_budget_is_invariant_to_one_layers_scale(importance):
    """Scores are normalised per layer before the global ranking: multiplying one layer's weights by 4 scales its
    scores by 4 and must leave every mask where it was (a power of two, so the normalised scores are bit-identical
    and no near-tie can flip by rounding)."""

    def masks(scale):
        base = make_model("llama", seed=3)
        with torch.no_grad():
            base.model.layers[1].mlp.down_proj.weight.mul_(scale)
        model = get_peft_model(
            base,
            LoRAPruneConfig(
                task_type="CAUSAL_LM",
                granularity="unstructured",
                budget="global",
                target_sparsity=0.5,
                importance=importance,
                lora_dropout=0.0,
            ),
        )
        score_and_prune(model, steps=1, b_scale=0.0)  # B zero: the merged weight is W0, scaled exactly
        return {name: layer.element_mask("default").clone() for name, layer in model.base_model.prune_layers()}

    reference, scaled = masks(1.0), masks(4.0)
    # the scaled layer is the last linear of the model: every layer's inputs, hence wanda's norms, are unchanged
    assert reference.keys() == scaled.keys()
    for name in reference:
        assert torch.equal(reference[name], scaled[name]), name
