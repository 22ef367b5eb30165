"""norm_module_names: the modules_to_save entries that make every normalisation layer train, and only those."""

from __future__ import annotations

import pytest
import torch
from conftest import TASK, make_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig, norm_module_names


@pytest.mark.parametrize(
    "family,expected",
    [
        ("llama", ["input_layernorm", "norm", "post_attention_layernorm"]),
        ("bert", ["LayerNorm"]),
        ("gpt2", ["ln_1", "ln_2", "ln_f"]),
    ],
)
def test_every_norm_trains_and_nothing_else_is_saved_whole(family, expected):
    base = make_model(family)
    norms = [m for m in base.modules() if type(m).__name__.endswith("Norm")]
    assert norm_module_names(base) == expected
    model = get_peft_model(base, LoRAPruneConfig(task_type=TASK[family], modules_to_save=norm_module_names(base)))
    wrapped = [m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    head = 1 if TASK[family] == "SEQ_CLS" else 0  # PEFT saves a classification head whole too
    assert len(wrapped) == len(norms) + head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    saved = [n for n in trainable if ".modules_to_save." in n]
    assert len(saved) == len(trainable) and len(saved) == sum(len(list(m.parameters())) for m in norms) + 2 * head


def test_norm_module_names_needs_the_model():
    with pytest.raises(TypeError, match="needs the base model"):
        norm_module_names({"model": torch.nn.LayerNorm(4)})
