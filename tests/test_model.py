"""The tuner: default targets, bad targets, unknown families, reports."""

import pytest
import torch
from conftest import TASK, make_model
from helpers import random_prune
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig


def test_default_targets_cover_every_module_of_a_group(family):
    model = get_peft_model(make_model(family), LoRAPruneConfig(task_type=TASK[family]))
    names = [n for n, _ in model.base_model.prune_layers()]
    per_block = {"llama": 7, "bert": 6, "vit": 6, "gpt2": 4}[family]
    assert len(names) == 2 * per_block
    assert not any("pooler" in n or "lm_head" in n or "classifier" in n for n in names)


def test_targets_matching_nothing_name_the_candidates():
    with pytest.raises(ValueError) as err:
        get_peft_model(make_model("llama"), LoRAPruneConfig(target_modules=["query", "value"]))
    assert "q_proj" in str(err.value) and "target_modules" in str(err.value)


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match="Linear"):
        get_peft_model(make_model("llama"), LoRAPruneConfig(target_modules=["embed_tokens"]))


def test_structured_needs_a_known_family_but_unstructured_works_anywhere():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    model = get_peft_model(Tiny(), LoRAPruneConfig(target_modules=["fc"], granularity="unstructured"))
    assert model.base_model.sparsity_report().weights_total == 64
    with pytest.raises(ValueError, match="supported model types are .*llama"):
        get_peft_model(Tiny(), LoRAPruneConfig(target_modules=["fc"]))  # fails at creation, not mid-training


def test_structured_pruning_needs_all_group_members():
    with pytest.raises(ValueError, match="not in target_modules"):
        get_peft_model(make_model("llama"), LoRAPruneConfig(target_modules=["q_proj", "v_proj"]))
    # restricting the pruned structures to what is adapted is allowed
    model = get_peft_model(
        make_model("llama"),
        LoRAPruneConfig(target_modules=["gate_proj", "up_proj", "down_proj"], prune_structures=["channels"]),
    )
    assert {r.unit for r in model.base_model.sparsity_report().layers} == {"channels"}


def test_sparsity_report_counts_masks(capsys):
    model = get_peft_model(make_model("bert"), LoRAPruneConfig(task_type="SEQ_CLS", dense_layers=[0]))
    random_prune(model, 0.5)
    report = model.base_model.sparsity_report()
    assert [r.block for r in report.layers] == [1, 1]  # block 0 kept dense
    heads, channels = report.layers
    assert (heads.total, heads.kept) == (4, 2) and (channels.total, channels.kept) == (48, 24)
    assert report.sparsity == pytest.approx(26 / 52)
    model.print_sparsity()
    assert "sparsity: 50.00%" in capsys.readouterr().out


def test_a_regex_default_from_peft_mapping_targets_modules_not_characters(monkeypatch):
    """PEFT's default-target mapping may hold a regex string (it ships one for gemma4); it must be used as a
    regex, not split into single characters."""
    import peft_loraprune.model as tuner_module

    monkeypatch.setattr(tuner_module, "get_architecture", lambda model_type: None)  # the PEFT mapping decides
    mapping = {**tuner_module.LoRAPruneModel.target_module_mapping, "gpt2": r".*\.h\.1\.attn\.c_attn"}
    monkeypatch.setattr(tuner_module.LoRAPruneModel, "target_module_mapping", mapping)
    peft_model = get_peft_model(make_model("gpt2"), LoRAPruneConfig(granularity="unstructured"))
    assert [n for n, _ in peft_model.base_model.prune_layers()] == ["transformer.h.1.attn.c_attn"]


def test_mixed_adapter_batches_are_refused_not_silently_ignored():
    from conftest import make_inputs

    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM"))
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**inputs, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, adapter_names=["default", "default"])
    model(**inputs)  # without the argument nothing changes
