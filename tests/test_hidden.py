"""The hidden size (``prune_structures=["hidden"]``): one mask on the residual stream, scored, exported exactly.

The reference for the masked model is computed with every mask open and forward hooks that multiply the input
embedding's output and every residual writer's output by the channel mask: what removing a channel of the stream
means, independent of the package's masks, hook and export.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from conftest import make_model, model_output
from helpers import randomize_adapter, trainer_for
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_depth import deep_config, deep_model, inputs_of

from peft_loraprune import LoRAPruneConfig, export_pruned_model, norm_module_names
from peft_loraprune.export.streaming import stream_export

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def hidden_model(family: str, tied: bool = False, seed: int = 0, structures=("hidden",), norms: bool = False, **cfg):
    config = deep_config(family)
    config.tie_word_embeddings = tied
    # a large epsilon, so that an export that does not rescale it is caught; Qwen3's query and key norms (over a
    # head, not the stream) read the same epsilon, and only a small one keeps them within rounding of the masked model
    config.rms_norm_eps = 1e-6 if family == "qwen3" else 0.25
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    if tied:
        base.tie_weights()
    peft_config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        prune_structures=list(structures),
        lora_dropout=0.0,
        modules_to_save=norm_module_names(base) if norms else None,
        **cfg,
    )
    model = get_peft_model(base, peft_config)
    randomize_adapter(model, seed=seed)
    if norms:  # trained norms that differ from the base's
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    return model.eval()


def remove_channels(model, channels: list[int]) -> torch.Tensor:
    stream = model.base_model.residual_stream()
    keep = torch.ones(stream.size, dtype=torch.bool)
    keep[channels] = False
    stream.apply("default", keep)
    return keep


def masking_by_hand(model, keep: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Logits with masks open and the stream's channels removed through hooks on the embedding and the writers."""
    stream = model.base_model.residual_stream()
    saved = [(layer, layer.lora_mask_rows["default"].clone()) for _, layer in stream.writers]
    for layer, _ in saved:
        layer.set_masks("default", rows=torch.ones_like(layer.lora_mask_rows["default"]))

    def scale(module, args, output):
        return output * keep.to(output.dtype)

    modules = [model.base_model.model.get_submodule(stream.embedding)] + [layer for _, layer in stream.writers]
    handles = [m.register_forward_hook(scale) for m in modules]
    try:
        assert bool(stream.kept("default").all())
        return model_output(model, inputs)
    finally:
        for h in handles:
            h.remove()
        for layer, rows in saved:
            layer.set_masks("default", rows=rows)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_narrower_stream_equals_the_masked_model(family, tied, tmp_path):
    model = hidden_model(family, tied=tied, structures=("heads", "channels", "hidden"), norms=True)
    inputs = inputs_of(family)
    keep = remove_channels(model, [0, 5, 17, 30])  # 28 kept: a multiple of the 4 heads (LlamaConfig needs it)
    reference = masking_by_hand(model, keep, inputs)
    masked = model_output(model, inputs)
    torch.testing.assert_close(masked, reference, rtol=0, atol=1e-5)
    with torch.no_grad():  # the stream is exactly zero at the removed channels, after every block
        states = model(**inputs, output_hidden_states=True).hidden_states
    assert all(bool((h[..., ~keep] == 0).all()) for h in states[:-1])

    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    exported = report.model
    assert exported.config.hidden_size == 28 and report.removed["hidden"] == 4
    torch.testing.assert_close(model_output(exported, inputs), reference, rtol=0, atol=1e-4)
    exported.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings == tied
    torch.testing.assert_close(model_output(reloaded, inputs), reference, rtol=0, atol=1e-4)
    assert report.params_after == sum(p.numel() for p in reloaded.parameters())
    if tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    cached = reloaded.generate(inputs["input_ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = reloaded.generate(
        inputs["input_ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_channel_scores_are_the_taylor_estimate_of_the_stream_mask():
    """A channel's step score is |d loss / d m_c| at m = 1, with m multiplying the embedding's output and every
    writer's output: checked against autograd on an explicit mask."""
    model = hidden_model("llama", importance_beta=0.0)
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    stream = model.base_model.residual_stream()
    m = torch.ones(stream.size, requires_grad=True)
    modules = [model.base_model.model.get_submodule(stream.embedding)] + [layer for _, layer in stream.writers]
    handles = [mod.register_forward_hook(lambda mod, a, out: out * m) for mod in modules]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for h in handles:
        h.remove()
    expected = m.grad.abs()
    torch.testing.assert_close(engine.step_stream_scores(), expected, rtol=1e-4, atol=1e-8)
    assert engine.update_importance()
    torch.testing.assert_close(engine.channel_scores(), expected / expected.norm(), rtol=1e-4, atol=1e-8)


def test_training_removes_exactly_the_target_and_reload_merge_and_disable_agree(tmp_path):
    model = get_peft_model(
        deep_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            prune_structures=["hidden", "layers"],
            target_sparsity=0.25,
            pruning_interval=2,
            lora_dropout=0.0,
        ),
    )
    trainer_for(model, "llama", tmp_path / "run", steps=12).train()
    stream = model.base_model.residual_stream()
    assert int((~stream.kept("default")).sum()) == 8  # 25% of 32
    assert model.base_model.sparsity_report().sparsity_by_unit() == {
        "hidden": pytest.approx(0.25),
        "layers": pytest.approx(0.2),  # 25% of 5 blocks, halves rounded down: 1
    }
    model.eval()
    inputs = inputs_of("llama")
    expected = model_output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(deep_model("llama"), tmp_path / "adapter").eval()
    assert torch.equal(model_output(reloaded, inputs), expected)
    with reloaded.disable_adapter():  # the embedding is not masked without the adapter
        torch.testing.assert_close(model_output(reloaded, inputs), model_output(deep_model("llama"), inputs))
    merged = reloaded.merge_and_unload()
    assert not merged.get_input_embeddings()._forward_hooks
    torch.testing.assert_close(model_output(merged, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("structures", [("heads", "channels", "hidden"), ("hidden", "layers", "heads", "channels")])
def test_joint_allocation_over_the_stream_removes_the_budget_exactly(structures):
    """One budget over the hidden size and the other axes: the weights that stay, counted as the export will
    (every block weight and the untied embedding and output keep H'/H), are within half an MLP channel per
    remaining block of what the target leaves, and the stream keeps a multiple of the heads."""
    model = hidden_model("llama", structures=structures, allocation="joint", seed=2)
    model.train()
    engine = model.base_model.pruning_engine()
    inputs = inputs_of("llama")
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert engine.update_importance()
        model.zero_grad()
    # channels of the stream made cheap, so that the split takes some (and the budget's arithmetic is tested with
    # H' < H); the first two blocks made free too
    engine.stream_averages["average"][:16] = 0.0
    if "layers" in structures:
        engine.depth_averages["average"][:2] = 0.0
    stream = model.base_model.residual_stream()
    block_weights = sum(layer.in_features * layer.out_features for _, layer in model.base_model.prune_layers()) // 5
    total = 5 * block_weights + stream.stream_only_weights
    for target in (0.3, 0.5, 0.7):
        engine.prune_to(target)
        hidden = int(stream.kept("default").sum())
        assert hidden % 4 == 0 and hidden < 32
        open_blocks = [b for b in range(5) if "layers" not in structures or bool(engine.blocks_kept()[b])]
        stay = stream.stream_only_weights
        for block in open_blocks:
            stay += block_weights - sum(
                (g.spec.n_groups - int(g.kept("default").sum())) * g.weights_per_group()
                for g in engine.groups
                if g.block == block
            )
        stay = stay * hidden / 32
        assert abs(stay - (1 - target) * total) <= 3 * 32 / 2 * len(open_blocks) * hidden / 32 + 1e-6
    report = export_pruned_model(model.eval(), measure_latency=False, progressbar=False)
    exported_weights = sum(p.numel() for n, p in report.model.named_parameters() if "norm" not in n)
    assert exported_weights == pytest.approx(stay, abs=1e-6)


@pytest.mark.parametrize("structures", [("layers",), ("hidden", "layers", "heads", "channels")])
def test_streaming_export_writes_exactly_the_in_memory_export_of_layers_and_hidden(structures, tmp_path):
    model = hidden_model("qwen2", structures=structures, norms=True)
    for gate in model.base_model.block_gates():
        if gate.block in (1, 2):
            gate.close("default")
    if "hidden" in structures:
        remove_channels(model, [3, 4, 20, 31])
    model.save_pretrained(tmp_path / "adapter")
    base = tmp_path / "base"
    deep_model("qwen2", seed=0).save_pretrained(base)  # the random base hidden_model built
    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    )
    export_pruned_model(reference, measure_latency=False, progressbar=False, save_directory=str(tmp_path / "memory"))
    stream_export(str(tmp_path / "adapter"), str(tmp_path / "stream"), str(base), progressbar=False)

    def tensors(folder):
        out = {}
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(folder, name)))
        return out

    expected, written = tensors(tmp_path / "memory"), tensors(tmp_path / "stream")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()
    assert a.config.num_hidden_layers == N_LEFT and a.config.layer_types == b.config.layer_types
    inputs = inputs_of("qwen2")
    assert torch.equal(model_output(a, inputs), model_output(b, inputs))


N_LEFT = 3  # blocks kept by the streaming test (5 - 2)


def test_families_and_settings_that_cannot_prune_the_hidden_size_are_refused():
    for family in ("bert", "gpt2", "vit"):
        task = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "vit": None}[family]
        with pytest.raises(ValueError, match="LayerNorm"):
            get_peft_model(make_model(family), LoRAPruneConfig(task_type=task, prune_structures=["hidden"]))
    with pytest.raises(ValueError, match="importance='activation'"):
        LoRAPruneConfig(task_type="CAUSAL_LM", prune_structures=["hidden"], importance="magnitude")
    with pytest.raises(ValueError, match="reads or writes the residual stream"):
        get_peft_model(
            deep_model("llama"),
            LoRAPruneConfig(
                task_type="CAUSAL_LM", prune_structures=["hidden"], target_modules=["o_proj", "down_proj"]
            ),
        )


def test_the_sparsity_report_counts_the_weights_the_export_removes():
    """Weights kept in the adapted modules, as the report counts them, equal the exported model's adapted weights."""
    model = hidden_model("llama", structures=("heads", "channels", "hidden", "layers"))
    engine = model.base_model.pruning_engine()
    for gate in model.base_model.block_gates()[:2]:
        gate.close("default")
    remove_channels(model, [1, 2, 3, 9])
    engine.remove_per_block({"channels": 12, "heads": 1})
    kept = model.base_model.sparsity_report().weights_kept
    exported = export_pruned_model(model, progressbar=False).model
    linear = sum(
        m.weight.numel()
        for n, m in exported.named_modules()
        if n.startswith("model.layers") and hasattr(m, "weight") and m.weight.dim() == 2
    )
    assert kept == linear
