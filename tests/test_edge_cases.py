"""Edge cases with defined behaviour: sparsity 0, sparsities that would empty a layer, head counts that do not
divide, half-precision bases, quantized bases."""

import pytest
import torch
import transformers
from conftest import make_inputs, make_model, model_output
from helpers import randomize_adapter, trainer_for, training_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig, export_pruned_model
from peft_loraprune.pruning.structure import find_structured_groups


def test_target_sparsity_zero_trains_and_exports_the_dense_model(tmp_path):
    model = training_model("llama", target_sparsity=0.0)
    dense_params = sum(p.numel() for p in make_model("llama").parameters())
    trainer_for(model, "llama", tmp_path, steps=10).train()
    assert model.base_model.sparsity_report().sparsity == 0.0
    assert all(v.all() for k, v in model.state_dict().items() if "lora_mask" in k)
    model.eval()
    inputs = make_inputs("llama")
    expected = model_output(model, inputs)
    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    assert sum(p.numel() for p in report.model.parameters()) == dense_params
    torch.testing.assert_close(model_output(report.model, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", ["local", "global"])
@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_a_sparsity_that_would_empty_a_layer_keeps_one_unit_per_layer(budget, granularity):
    model = training_model("llama", granularity=granularity, budget=budget, target_sparsity=0.99)
    randomize_adapter(model)
    engine = model.base_model.pruning_engine()
    engine.prune_to(0.99)
    if granularity == "structured":
        for g in find_structured_groups(model.base_model, "default"):
            assert int(g.kept("default").sum()) >= 1, g
    else:
        for _, layer in engine.element_layers:
            assert int(layer.element_mask("default").sum()) >= 1
    model.eval()
    out = model_output(model, make_inputs("llama"))
    assert torch.isfinite(out).all()
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    assert torch.isfinite(model_output(exported, make_inputs("llama"))).all()


def test_head_counts_that_do_not_divide_by_the_sparsity():
    """6 query heads in 2 KV groups (3 per group): 50% of 3 removes 1 per group (halves round down)."""
    config = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(
        base, LoRAPruneConfig(task_type="CAUSAL_LM", head_grouping="query_head", target_sparsity=0.5, lora_dropout=0.0)
    )
    randomize_adapter(model)
    model.base_model.pruning_engine().prune_to(0.5)
    model.eval()
    inputs = make_inputs("llama")
    expected = model_output(model, inputs)
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    assert exported.config.num_attention_heads == 4 and exported.config.num_key_value_heads == 2
    assert exported.config.intermediate_size == 20
    torch.testing.assert_close(model_output(exported, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_prunes_and_exports(dtype):
    torch.manual_seed(0)
    base = make_model("llama").to(dtype)
    model = get_peft_model(base, LoRAPruneConfig(task_type="CAUSAL_LM", pruning_interval=1, lora_dropout=0.0))
    model.train()
    engine = model.base_model.pruning_engine()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs("llama", batch=4)
    for step in range(1, 11):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert engine.update_importance(), f"non-finite importance at step {step}"
        optimizer.step()
        optimizer.zero_grad()
        engine.pruning_step(step, 10)
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" not in n)
    model.eval()
    expected = model_output(model, inputs).float()
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    assert next(exported.parameters()).dtype == dtype
    torch.testing.assert_close(model_output(exported, inputs).float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("package", ["hqq.core.quantize", "torchao.quantization", "bitsandbytes.nn.modules"])
def test_unsupported_quantized_layer_is_refused_naming_what_is_supported(package):
    """bitsandbytes' own 8-bit and 4-bit layers are supported (tests/test_quantized.py); a quantized layer of
    another kind, or a bitsandbytes layer whose weight is not one of its parameter classes, is refused."""

    class QuantLinear(torch.nn.Linear):  # stands in for a quantizer's Linear subclass with integer weights
        pass

    QuantLinear.__module__ = package
    model = make_model("llama")
    for layer in model.model.layers:
        old = layer.self_attn.q_proj
        new = QuantLinear(old.in_features, old.out_features, bias=False)
        new.weight = torch.nn.Parameter(torch.zeros_like(old.weight, dtype=torch.int8), requires_grad=False)
        layer.self_attn.q_proj = new
    with pytest.raises(
        TypeError, match="q_proj' is a quantized layer LoRAPrune does not support.*Supported: .*Linear4bit"
    ):
        get_peft_model(model, LoRAPruneConfig(task_type="CAUSAL_LM"))


def test_the_old_window_names_still_work_with_a_deprecation_warning_and_save_the_new_ones(tmp_path):
    """``warmup_ratio``/``cooldown_ratio`` (before 0.5.0; ``warmup_ratio`` clashed with TrainingArguments) map to
    ``pruning_start``/``pruning_end = 1 - cooldown_ratio``; an old adapter_config.json loads the same way."""
    import json

    import pytest

    from peft_loraprune import LoRAPruneConfig

    with pytest.warns(DeprecationWarning, match="pruning_start"):
        old = LoRAPruneConfig(task_type="CAUSAL_LM", warmup_ratio=0.2, cooldown_ratio=0.3)
    assert (old.pruning_start, old.pruning_end) == (0.2, pytest.approx(0.7))
    assert old.warmup_ratio is None and old.cooldown_ratio is None
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["pruning_start"] == 0.2 and saved["warmup_ratio"] is None
    saved.update(warmup_ratio=0.1, cooldown_ratio=0.6, pruning_start=0.1, pruning_end=0.4)  # a 0.4.0 file
    saved.pop("save_digest", None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(DeprecationWarning):
        loaded = LoRAPruneConfig.from_pretrained(str(tmp_path))
    assert (loaded.pruning_start, loaded.pruning_end) == (0.1, pytest.approx(0.4))
    with pytest.raises(ValueError, match="pruning_end=0.1 must be after pruning_start=0.2"):
        LoRAPruneConfig(task_type="CAUSAL_LM", pruning_start=0.2, pruning_end=0.1)
