"""``allocation="joint"``: one weight budget shared by heads and channels, split by importance.

Three references, none of them the code under test: units planted dead (their removal changes nothing, so the
cheapest split of an exact budget removes exactly them, whatever their mix of heads and channels); the first-order
estimates recomputed with autograd (the cross-kind exchange rate must be the criterion's raw units, not the
per-member normalised vectors); and the weight count of the tiny Llama worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from peft import get_peft_model
from test_ranking import importance_steps

from peft_loraprune import LoRAPruneConfig
from peft_loraprune.pruning.structure import find_structured_groups

# the tiny Llama of conftest: hidden 32, 4 query heads of 8 in 2 KV groups, 48 MLP channels
HEAD_WEIGHTS = 8 * 32 + 32 * 8  # q_proj rows + o_proj columns of one query head (K and V stay)
CHANNEL_WEIGHTS = 3 * 32  # gate and up rows, down column
BLOCK_WEIGHTS = 4 * HEAD_WEIGHTS + 48 * CHANNEL_WEIGHTS
DEAD_HEADS = (1, 2)  # one query head in each KV group


def planted(n_dead_heads_per_group: int, n_dead_channels: int, seed: int = 0):
    """The tiny Llama with dead query heads (q rows and o columns zero) and dead channels (gate/up rows and down
    column zero) in both blocks; returns the model and the dead sets."""
    model = make_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    heads = set(DEAD_HEADS[: 2 * n_dead_heads_per_group]) if n_dead_heads_per_group else set()
    dead = {"heads": [], "channels": []}
    with torch.no_grad():
        for block in model.model.layers:
            channels = torch.randperm(48, generator=g)[:n_dead_channels]
            block.mlp.gate_proj.weight[channels] = 0
            block.mlp.up_proj.weight[channels] = 0
            block.mlp.down_proj.weight[:, channels] = 0
            for h in heads:
                block.self_attn.q_proj.weight[h * 8 : (h + 1) * 8] = 0
                block.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
            dead["channels"].append(set(channels.tolist()))
            dead["heads"].append(heads)
    return model, dead


def joint_model(base, sparsity: float, importance=None, **extra):
    return get_peft_model(
        base,
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            granularity="structured",
            target_sparsity=sparsity,
            importance=importance,
            head_grouping="query_head",
            allocation="joint",
            lora_dropout=0.0,
            **extra,
        ),
    )


def score(model, steps: int = 2) -> None:
    """Importance from a few backward passes with B = 0 (the merged weight is W0: dead units score exactly 0)."""
    importance_steps(model, steps)


def pruned_sets(model) -> dict[str, list[set]]:
    out = {"heads": [], "channels": []}
    for g in find_structured_groups(model.base_model, "default"):
        out[g.spec.structure].append(set((~g.kept("default")).nonzero().flatten().tolist()))
    return out


@pytest.mark.parametrize("importance", [None, "magnitude", "wanda"])
@pytest.mark.parametrize("dead_heads,dead_channels", [(1, 24), (1, 12), (0, 24)])
def test_joint_allocation_removes_exactly_the_dead_units_whatever_their_mix(importance, dead_heads, dead_channels):
    """The budget is exactly the dead units' weights. (1, 12) and (0, 24) are mixes the per-structure allocation
    cannot reach at any one sparsity (it would take 1 of 2 heads per group with 27%, or none with 12%)."""
    base, dead = planted(dead_heads, dead_channels)
    budget = 2 * dead_heads * HEAD_WEIGHTS + dead_channels * CHANNEL_WEIGHTS
    model = joint_model(base, budget / BLOCK_WEIGHTS, importance)
    score(model)
    model.base_model.pruning_engine().prune_to(budget / BLOCK_WEIGHTS)
    assert pruned_sets(model) == dead


def test_joint_scores_are_the_first_order_estimates_in_loss_units():
    """After one step, each group's comparable score is ``|Σ_tokens Σ_{c ∈ group} x_c·∂L/∂x_c|`` at its consumer
    (o_proj for a head, down_proj for a channel), recomputed here with autograd, times one constant for both kinds:
    ``(1 − β)²`` (the average of the normalised vector and the average of its norm, both from zero)."""
    model = joint_model(make_model("llama", seed=1), 0.3)
    captured = {}

    def keep_input(name):
        def hook(module, args):
            x = args[0]
            x.retain_grad()
            captured[name] = x

        return hook

    handles = []
    for i, block in enumerate(model.base_model.model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(keep_input(("heads", i))))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(keep_input(("channels", i))))
    model.train()
    inputs = make_inputs("llama", batch=4, seed=0)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for h in handles:
        h.remove()
    engine = model.base_model.pruning_engine()
    assert engine.update_importance()
    beta = model.peft_config["default"].importance_beta
    checked = 0
    for g in engine.groups:
        x = captured[(g.spec.structure, g.block)]
        per_column = (x * x.grad).reshape(-1, x.shape[-1]).sum(dim=0)
        width = 8 if g.spec.structure == "heads" else 1
        expected = per_column.reshape(-1, width).sum(dim=1).abs() * (1 - beta) ** 2
        torch.testing.assert_close(engine.comparable_scores(g), expected, rtol=1e-4, atol=1e-12)
        checked += 1
    assert checked == 4


def test_joint_checkpoint_restores_the_scales_and_other_families_do_not_fit():
    base, _ = planted(1, 12)
    model = joint_model(base, 0.3)
    score(model)
    state = model.base_model.pruning_engine().state_dict()
    scales = sorted(k for k in state if k.startswith("scale."))
    assert len(scales) == 4  # o_proj and down_proj columns of both blocks
    fresh = joint_model(planted(1, 12)[0], 0.3)
    engine = fresh.base_model.pruning_engine()
    engine.load_state_dict(state)
    for key in scales:
        assert torch.equal(engine.member_scales[key.split(".", 1)[1]], state[key])
    model.base_model.pruning_engine().prune_to(0.3)
    engine.prune_to(0.3)
    assert pruned_sets(fresh) == pruned_sets(model)
    per_structure = get_peft_model(
        planted(1, 12)[0],
        LoRAPruneConfig(
            task_type="CAUSAL_LM", granularity="structured", head_grouping="query_head", target_sparsity=0.3
        ),
    )
    with pytest.raises(ValueError, match="scale.*does not fit"):
        per_structure.base_model.pruning_engine().load_state_dict(state)


def test_joint_allocation_keeps_one_width_per_kind_and_only_removes_along_the_schedule():
    """Every block keeps the same number of heads and channels (export needs one width per kind), masks only
    lose units as the sparsity rises, and the weights removed stay within half a channel of the budget."""
    model = joint_model(make_model("llama", seed=2), 0.5)
    score(model, steps=3)
    engine = model.base_model.pruning_engine()
    previous = None
    for sparsity in (0.1, 0.25, 0.4, 0.5):
        engine.prune_to(sparsity)
        sets = pruned_sets(model)
        for kind in sets:
            assert len({len(s) for s in sets[kind]}) == 1, f"{kind} differ between blocks at {sparsity}"
        removed = len(sets["heads"][0]) * HEAD_WEIGHTS + len(sets["channels"][0]) * CHANNEL_WEIGHTS
        assert abs(removed - sparsity * BLOCK_WEIGHTS) <= CHANNEL_WEIGHTS / 2
        if previous is not None:
            for kind in sets:
                assert all(p <= s for p, s in zip(previous[kind], sets[kind]))
        previous = sets


@pytest.mark.parametrize(
    "extra,message",
    [
        (dict(granularity="unstructured"), "allocation='joint'.*granularity='unstructured'"),
        (dict(granularity="structured", budget="global"), "allocation='joint'.*budget='local'"),
        (dict(granularity="structured", allocation="both"), "allocation"),
    ],
)
def test_joint_allocation_config_errors_name_the_argument(extra, message):
    kwargs = {"task_type": "CAUSAL_LM", "allocation": "joint", **extra}
    with pytest.raises(ValueError, match=message):
        LoRAPruneConfig(**kwargs)


def test_removal_costs_need_the_joint_allocation_and_remove_per_block_ranks_by_the_engines_scores():
    """Without ``allocation="joint"`` the cross-kind costs have no scales: a clear error, not zeros; removing a
    given count per block keeps the best-scored units of every block (hand-planted scores)."""
    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.5))
    engine = model.base_model.pruning_engine()
    with pytest.raises(ValueError, match="allocation='joint'"):
        engine.removal_costs()
    channels = [g for g in engine.groups if g.spec.structure == "channels"]
    for g in channels:  # channel j of every block scores j: the 12 lowest are 0..11
        for member, name, _ in g.members:
            key = f"{name}.{member.axis}"
            if key in engine.member_averages or member.axis == "cols":
                engine.member_averages[key] = torch.arange(g.spec.n_groups, dtype=torch.float32)
    engine.remove_per_block({"channels": 12})
    for g in channels:
        assert g.kept(engine.adapter).tolist() == [False] * 12 + [True] * (g.spec.n_groups - 12)
