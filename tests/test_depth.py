"""Whole blocks (``prune_structures=["layers"]``): gates through the residual writers, scores, exact counts, export.

The reference for "the model without blocks S" is computed independently of the masks and of export: the same
adapter with every mask open, run with a forward hook that makes each block of S return its input unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import make_config, make_inputs, model_output
from helpers import randomize_adapter, trainer_for
from peft import PeftModel, get_peft_model

from peft_loraprune import LoRAPruneConfig, export_pruned_model

N_LAYERS = 5
LLAMA_LIKE = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}


def deep_config(family: str):
    """A tiny config of ``family`` with :data:`N_LAYERS` blocks (Qwen2/3 with sliding and full attention layers)."""
    shape = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=64,
    )
    if family in LLAMA_LIKE:
        return LLAMA_LIKE[family](**shape)
    if family in ("qwen2", "qwen3"):
        cls = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
        return cls(**shape, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    config = make_config(family)
    if family == "gpt2":
        config.n_layer = N_LAYERS
    else:
        config.num_hidden_layers = N_LAYERS
    return config


AUTO = {"vit": transformers.AutoModelForImageClassification, "bert": transformers.AutoModelForSequenceClassification}
TASK = {"vit": None, "bert": "SEQ_CLS"}


def deep_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AUTO.get(family, transformers.AutoModelForCausalLM).from_config(deep_config(family)).eval()


def inputs_of(family: str) -> dict:
    if family == "vit":
        return make_inputs("vit")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 7), generator=g)  # longer than Qwen's sliding window
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def layered(family: str, seed: int = 0, **cfg):
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("prune_structures", ["layers"])
    config = LoRAPruneConfig(task_type=TASK.get(family, "CAUSAL_LM"), **cfg)
    model = get_peft_model(deep_model(family, seed), config)
    randomize_adapter(model, seed=seed)
    return model.eval()


def block_list(model):
    """The module list of the blocks, found from the first block's module name."""
    prefix = model.base_model.block_gates()[0].prefix
    return model.base_model.model.get_submodule(prefix.rpartition(".")[0])


def skipping_blocks(model, closed: set[int], inputs: dict) -> torch.Tensor:
    """Logits of ``model`` (masks open) with the blocks ``closed`` replaced by the identity through forward hooks."""

    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [
        b.register_forward_hook(identity, with_kwargs=True) for i, b in enumerate(block_list(model)) if i in closed
    ]
    try:
        return model_output(model, inputs)
    finally:
        for h in handles:
            h.remove()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "vit", "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_blocks_equal_deleted_blocks_in_the_masked_model_the_export_and_its_reload(family, tmp_path):
    model = layered(family, prune_structures=["heads", "channels", "layers"])
    inputs = inputs_of(family)
    closed = {1, 3}
    reference = skipping_blocks(model, closed, inputs)  # masks all open here
    for gate in model.base_model.block_gates():
        if gate.block in closed:
            gate.close("default")
    masked = model_output(model, inputs)
    torch.testing.assert_close(masked, reference, rtol=0, atol=1e-5)
    assert (masked - model_output(model, inputs) == 0).all()

    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    exported = report.model
    torch.testing.assert_close(model_output(exported, inputs), reference, rtol=0, atol=1e-4)
    assert report.removed["layers"] == 2
    exported.save_pretrained(tmp_path)
    reloaded = type(exported).from_pretrained(tmp_path).eval()
    n_layers = reloaded.config.n_layer if family == "gpt2" else reloaded.config.num_hidden_layers
    assert n_layers == N_LAYERS - 2
    if family in ("qwen2", "qwen3"):  # the per-layer attention kinds follow their blocks
        full = deep_config(family).layer_types
        assert reloaded.config.layer_types == [t for i, t in enumerate(full) if i not in closed]
    torch.testing.assert_close(model_output(reloaded, inputs), reference, rtol=0, atol=1e-4)
    assert report.params_after == sum(p.numel() for p in reloaded.parameters())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generation_with_cache_after_deleting_blocks(family, tmp_path):
    """Key-value cache slots follow the renumbered blocks: cached greedy decoding equals uncached decoding."""
    model = layered(family)
    for gate in model.base_model.block_gates():
        if gate.block in (0, 2):
            gate.close("default")
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    exported.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = inputs_of(family)["input_ids"][:1]
    for m in (exported, reloaded):
        cached = m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)


def test_block_scores_are_the_taylor_estimate_of_closing_each_gate():
    """A block's step score is |d loss / d gate| at gate = 1, with the gate scaling both residual contributions:
    checked against autograd on explicit gates (hooks multiplying the writers' outputs by a leaf tensor)."""
    model = layered("llama", layer_importance="taylor", importance_beta=0.0)
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    gates = torch.ones(N_LAYERS, requires_grad=True)
    handles = []
    for i, gate in enumerate(model.base_model.block_gates()):
        for _, layer in gate.writers:
            handles.append(layer.register_forward_hook(lambda m, a, out, _i=i: out * gates[_i]))
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for h in handles:
        h.remove()
    expected = gates.grad.abs()
    got = engine.step_block_scores()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert engine.update_importance()
    torch.testing.assert_close(engine.block_scores(), expected / expected.norm(), rtol=1e-4, atol=1e-7)


def test_training_closes_exactly_the_target_number_of_blocks_and_reloads(tmp_path):
    model = get_peft_model(
        deep_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            prune_structures=["layers"],
            target_sparsity=0.4,
            pruning_interval=2,
            lora_dropout=0.0,
        ),
    )
    trainer_for(model, "llama", tmp_path / "run", steps=12).train()
    engine = model.base_model.pruning_engine()
    assert int((~engine.blocks_kept()).sum()) == 2  # 40% of 5 blocks
    report = model.base_model.sparsity_report()
    assert report.sparsity_by_unit() == {"layers": pytest.approx(0.4)}
    model.eval()
    inputs = inputs_of("llama")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(deep_model("llama"), tmp_path / "adapter").eval()
    assert torch.equal(model_output(reloaded, inputs), expected)
    assert torch.equal(reloaded.base_model.pruning_engine().blocks_kept(), engine.blocks_kept())


def test_joint_allocation_over_blocks_heads_and_channels_removes_the_budget_exactly():
    """One weight budget shared by blocks, heads and channels: the weights removed are within half an MLP channel
    of the budget (the finest unit takes the rounding), and every remaining block keeps the same widths."""
    model = layered("llama", prune_structures=["heads", "channels", "layers"], allocation="joint", seed=1)
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert engine.update_importance()
        model.zero_grad()
    block_weights = engine.gates[0].block_weights
    channel_weights = 3 * 32  # a channel's row in gate and up, its column in down
    for target in (0.2, 0.5, 0.7):
        engine.prune_to(target)
        kept = engine.blocks_kept()
        removed_blocks = int((~kept).sum())
        widths = set()
        removed = removed_blocks * block_weights
        for g in engine.groups:
            if kept[g.block]:
                n_removed = g.spec.n_groups - int(g.kept("default").sum())
                widths.add((g.spec.structure, n_removed))
                removed += n_removed * g.weights_per_group()
        assert len(widths) <= 2  # one width per kind over the blocks that stay
        assert abs(removed - target * N_LAYERS * block_weights) <= channel_weights / 2 * (N_LAYERS - removed_blocks)


def test_split_with_blocks_picks_the_cheapest_mix_by_hand():
    from peft_loraprune.pruning.selection import split_with_blocks

    # 3 blocks of 10 weights, one kind of unit of 1 weight (curve per block: n removals cost n*1.0, up to 9)
    per_block = [[torch.arange(10, dtype=torch.float32)] for _ in range(3)]
    mins = [[0] for _ in range(3)]
    cheap_block = torch.tensor([0.0, 0.5, 100.0])  # the first block costs 0.5 in all, the second much more
    # 10 weights: one whole block (cost 0.5) beats 3-4 units in every block (cost 10)
    assert split_with_blocks(cheap_block, 10, 0, per_block, [1], mins, 10.0) == (1, [0])
    dear_block = torch.tensor([0.0, 50.0, 100.0])
    # now units everywhere are cheaper: 10 weights over 3 blocks, nearest count per block 3 (9 weights)
    assert split_with_blocks(dear_block, 10, 0, per_block, [1], mins, 10.0) == (0, [3])
    # blocks alone: the nearest count, halves rounded down; never all of them
    assert split_with_blocks(dear_block, 10, 0, [[] for _ in range(3)], [], [[] for _ in range(3)], 15.0) == (1, [])
    assert split_with_blocks(dear_block, 10, 0, [[] for _ in range(3)], [], [[] for _ in range(3)], 30.0)[0] == 2
    # a block already closed stays closed
    assert split_with_blocks(dear_block, 10, 1, per_block, [1], mins, 10.0)[0] >= 1


def test_block_splitter_costs_the_blocks_that_remain():
    """Closing the first block in order leaves the others' units to pay for the rest: the cost is the closed block's
    plus the remaining blocks' own curves (not the closed one's)."""
    from peft_loraprune.pruning.selection import BlockSplitter

    unit_cost = [0.1, 10.0, 10.0]  # block 0's units are cheap, the others' dear
    per_block = [[torch.arange(10, dtype=torch.float32) * c] for c in unit_cost]
    splitter = BlockSplitter(torch.tensor([0.0, 0.5, 100.0]), 10, 0, per_block, [1], [[0]] * 3)
    # 16 weights: k=0 needs 5 units per block (cost 5 * 20.1 = 100.5); k=1 closes block 0 (0.5) and takes 3 units
    # from each of blocks 1 and 2 (3 * 20): 60.5
    assert splitter.best(16.0) == (0.0, pytest.approx(60.5), 1, [3])
    blocks_fixed = BlockSplitter(torch.zeros(3), 10, 0, per_block, [1], [[0]] * 3, max_blocks=0)
    assert blocks_fixed.best(15.0) == (0.0, pytest.approx(5 * 20.1), 0, [5])


def test_depth_state_round_trips_through_a_checkpoint_and_refuses_another_shape():
    model = layered("llama")
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert engine.update_importance()
    state = engine.state_dict()
    assert state["depth.average"].shape == (N_LAYERS,)
    fresh = layered("llama").base_model.pruning_engine()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.block_scores(), engine.block_scores())
    fewer = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(
            copy.copy(deep_config("llama")).__class__(**{**deep_config("llama").to_dict(), "num_hidden_layers": 3})
        ),
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"]),
    )
    with pytest.raises(ValueError, match="depth.average.*does not fit"):
        fewer.base_model.pruning_engine().load_state_dict(state)


@pytest.mark.parametrize("allocation", ["per_structure", "joint"])
def test_resume_with_layers_equals_uninterrupted_run(allocation, tmp_path):
    from test_training import StopAt, final_state

    structures = ["layers"] if allocation == "per_structure" else ["heads", "channels", "layers"]

    def fresh():
        return get_peft_model(
            deep_model("llama"),
            LoRAPruneConfig(
                task_type="CAUSAL_LM",
                prune_structures=structures,
                allocation=allocation,
                target_sparsity=0.5,
                pruning_interval=2,
                lora_dropout=0.0,
            ),
        )

    straight = fresh()
    trainer_for(straight, "llama", tmp_path / "a", steps=12, save_strategy="steps", save_steps=6).train()
    first = fresh()
    trainer_for(
        first, "llama", tmp_path / "b", steps=12, save_strategy="steps", save_steps=6, callbacks=[StopAt(6)]
    ).train()
    resumed = fresh()
    trainer_for(resumed, "llama", tmp_path / "b", steps=12, save_strategy="steps", save_steps=6).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6")
    )
    a, b = final_state(straight), final_state(resumed)
    assert "importance.depth.average" in a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    if allocation == "per_structure":
        assert int((~straight.base_model.pruning_engine().blocks_kept()).sum()) == 2  # 50% of 5, halves down


def test_bad_input_is_refused_with_one_clear_error():
    bert = AUTO["bert"].from_config(deep_config("bert"))
    with pytest.raises(ValueError, match="post-norm"):
        get_peft_model(bert, LoRAPruneConfig(task_type="SEQ_CLS", prune_structures=["layers"]))
    with pytest.raises(ValueError, match="importance='activation'"):
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], importance="lora")
    with pytest.raises(ValueError, match="would remove all 5"):
        get_peft_model(
            deep_model("llama"),
            LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], target_sparsity=0.95),
        )
    with pytest.raises(ValueError, match="residual writers.*not in target_modules"):
        get_peft_model(
            deep_model("llama"),
            LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], target_modules=["q_proj", "o_proj"]),
        )


def test_a_fixed_split_gives_each_kind_its_own_target(tmp_path):
    """``structure_sparsity``: each named kind ends at its own fraction, the others at target_sparsity."""
    model = get_peft_model(
        deep_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            prune_structures=["channels", "layers"],
            target_sparsity=0.25,
            structure_sparsity={"layers": 0.4},
            pruning_interval=2,
            lora_dropout=0.0,
        ),
    )
    trainer_for(model, "llama", tmp_path / "run", steps=12).train()
    assert model.base_model.sparsity_report().sparsity_by_unit() == {
        "channels": pytest.approx(0.25),
        "layers": pytest.approx(0.4),
    }
    with pytest.raises(ValueError, match="structure_sparsity names 'hidden'"):
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], structure_sparsity={"hidden": 0.5})
    with pytest.raises(ValueError, match="allocation='joint'"):
        LoRAPruneConfig(
            task_type="CAUSAL_LM", prune_structures=["layers"], structure_sparsity={"layers": 0.5}, allocation="joint"
        )
    with pytest.raises(ValueError, match=r"structure_sparsity\['layers'\]"):
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], structure_sparsity={"layers": 1.5})


def test_a_family_whose_config_cannot_express_removed_blocks_is_refused():
    """A registered family with residual writers but no way to write fewer blocks into its config."""
    import dataclasses

    from peft_loraprune.pruning.architectures import get_architecture, register_architecture

    llama = get_architecture("llama")
    no_layers = dataclasses.replace(llama, export=dataclasses.replace(llama.export, layer_config_updates=None))
    no_hidden = dataclasses.replace(llama, export=dataclasses.replace(llama.export, removable=("heads", "channels")))
    try:
        register_architecture(no_layers)
        with pytest.raises(ValueError, match="cannot express removed blocks"):
            get_peft_model(deep_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"]))
        register_architecture(no_hidden)
        with pytest.raises(ValueError, match="cannot express a narrower stream"):
            get_peft_model(deep_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["hidden"]))
    finally:
        register_architecture(llama)


def test_block_influence_is_one_minus_the_mean_cosine_between_block_input_and_output():
    """``layer_importance="influence"``: a block's step score is ShortGPT's Block Influence of the adapted, masked
    model, checked against the hidden states transformers returns (``output_hidden_states``: block i reads entry i
    and writes entry i + 1; the last entry is after the final norm, so the last block is checked by a closed gate).
    Passes without a backward are not counted; micro-batches average over all their tokens."""
    model = layered("llama", layer_importance="influence", importance_beta=0.0)
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    with torch.no_grad():
        model(**inputs)  # evaluation-like pass: not counted
    assert engine.step_block_scores() is None

    def influence_by_hand(batch):
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        cos = [torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1) for i in range(N_LAYERS - 1)]
        return torch.stack([c.sum() for c in cos]), cos[0].numel()

    halves = [{k: v[:1] for k, v in inputs.items()}, {k: v[1:, :4] for k, v in inputs.items()}]
    sums, tokens = torch.zeros(N_LAYERS - 1), 0
    for batch in halves:  # two micro-batches of different lengths: one mean over all their tokens
        s, n = influence_by_hand(batch)
        sums, tokens = sums + s, tokens + n
        model(**batch, labels=batch["input_ids"]).loss.backward()
    got = engine.step_block_scores()
    torch.testing.assert_close(got[:-1], 1 - sums / tokens, rtol=1e-5, atol=1e-6)
    assert engine.update_importance()
    torch.testing.assert_close(engine.block_scores(), got / got.norm())
    assert engine.step_block_scores() is None  # the update started the next step

    model.base_model.block_gates()[-1].close("default")  # a closed block adds nothing: cos = 1, influence 0
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert float(engine.step_block_scores()[-1]) == pytest.approx(0.0, abs=1e-6)


def test_influence_training_closes_the_least_influential_blocks_and_leaves_no_hook(tmp_path):
    model = get_peft_model(
        deep_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            prune_structures=["layers"],
            layer_importance="influence",
            target_sparsity=0.4,
            schedule="one_shot",
            pruning_start=0.5,
            pruning_end=0.9,
            pruning_interval=1,
            lora_dropout=0.0,
        ),
    )
    engine = model.base_model.pruning_engine()
    seen = []
    fold = engine._fold

    def recording_fold(beta):  # the averages the one-shot rewrite ranks by
        fold(beta)
        seen.append(engine.block_scores().clone())

    engine._fold = recording_fold
    trainer_for(model, "llama", tmp_path / "run", steps=6).train()
    kept = engine.blocks_kept()
    assert int((~kept).sum()) == 2
    at_rewrite = seen[2]  # 3 updates folded before the rewrite at step 3 of 6
    assert set(torch.argsort(at_rewrite)[:2].tolist()) == set((~kept).nonzero().flatten().tolist())
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(deep_model("llama"), tmp_path / "adapter")
    assert reloaded.peft_config["default"].layer_importance == "influence"
    assert torch.equal(reloaded.base_model.pruning_engine().blocks_kept(), kept)
    merged = model.merge_and_unload()
    assert all(not b._forward_hooks for b in merged.model.layers)


def test_influence_refuses_the_joint_allocation_and_unknown_values():
    per_structure = LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"])
    joint = LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["heads", "layers"], allocation="joint")
    assert (per_structure.layer_importance, joint.layer_importance) == ("influence", "taylor")  # the defaults
    with pytest.raises(ValueError, match="layer_importance='influence'.*allocation='joint'"):
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            prune_structures=["heads", "layers"],
            allocation="joint",
            layer_importance="influence",
        )
    with pytest.raises(ValueError, match="layer_importance"):
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["layers"], layer_importance="bi")
