import json

import pytest
from peft import PeftConfig

from peft_loraprune import LORAPRUNE_PEFT_TYPE, LoRAPruneConfig
from peft_loraprune.config import parse_n_m


def test_defaults_follow_the_reference_code():
    c = LoRAPruneConfig()
    assert c.peft_type == LORAPRUNE_PEFT_TYPE
    assert (c.r, c.lora_alpha, c.lora_dropout) == (8, 16, 0.05)
    assert (c.target_sparsity, c.pruning_interval, c.importance_beta) == (0.5, 10, 0.9)
    assert (c.pruning_start, c.pruning_end) == (0.1, 0.4)  # pruning from 10% to 40% of the steps
    assert c.granularity == "structured" and c.budget == "local"
    assert c.scaling == 2.0


def test_default_criterion_follows_the_granularity_and_is_saved_resolved(tmp_path):
    """The structured default is the activation Taylor criterion (benchmarks/criteria.py decided it); per-weight
    granularities default to Wanda's rule scored while fine-tuning (benchmarks/peers.py --granularity unstructured
    decided it). The saved config holds the resolved name."""
    assert LoRAPruneConfig().importance == "activation"
    assert LoRAPruneConfig(granularity="unstructured").importance == "wanda"
    assert LoRAPruneConfig(granularity="2:4").importance == "wanda"
    assert LoRAPruneConfig(importance="lora").importance == "lora"
    LoRAPruneConfig().save_pretrained(tmp_path)
    assert LoRAPruneConfig.from_pretrained(tmp_path).importance == "activation"
    assert LoRAPruneConfig(r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"target_sparsity": -0.1}, "target_sparsity"),
        ({"target_sparsity": float("nan")}, "target_sparsity"),
        ({"target_sparsity": "0.5"}, "target_sparsity"),
        ({"granularity": "2:2"}, "granularity"),
        ({"granularity": "0:4"}, "granularity"),
        ({"granularity": "5:4"}, "granularity"),
        ({"granularity": "2:x"}, "granularity"),
        ({"granularity": "2:4:8"}, "granularity"),
        ({"granularity": "rows"}, "granularity"),
        ({"importance": "taylor"}, "importance"),
        ({"adaptation": "serial"}, "adaptation"),
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"importance_beta": 1.0}, "importance_beta"),
        ({"importance_beta": -0.5}, "importance_beta"),
        ({"pruning_interval": 0}, "pruning_interval"),
        ({"pruning_interval": 1.5}, "pruning_interval"),
        ({"budget": "layerwise"}, "budget"),
        ({"bias": "some"}, "bias"),
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights"),
        ({"initial_sparsity": 0.6, "target_sparsity": 0.5}, "initial_sparsity"),
        ({"pruning_start": 0.6, "pruning_end": 0.6}, "pruning_end=0.6 must be after pruning_start=0.6"),
        ({"pruning_end": 1.5}, "pruning_end=1.5 is outside"),
        ({"schedule": "exponential"}, "schedule"),
        ({"prune_structures": ["neurons"]}, "prune_structures"),
        ({"prune_structures": []}, "prune_structures"),
        ({"head_grouping": "all"}, "head_grouping"),
        ({"dense_layers": [-1]}, "dense_layers"),
        ({"dense_layers": "first"}, "dense_layers"),
        ({"importance_dtype": "int8"}, "importance_dtype"),
        ({"element_mask_gradient": "ste", "granularity": "unstructured"}, "element_mask_gradient"),
        ({"element_mask_gradient": "straight_through"}, "element_mask_gradient"),  # structured: no element mask
    ],
)
def test_invalid_fields_are_rejected_by_name(kwargs, field):
    with pytest.raises(ValueError) as err:
        LoRAPruneConfig(**kwargs)
    assert field in str(err.value)


def test_unknown_lora_variant_fields_are_rejected():
    with pytest.raises(TypeError, match="layer_replication"):
        LoRAPruneConfig(layer_replication=[(0, 1)])


def test_n_m_parsing_and_effective_sparsity():
    assert parse_n_m("2:4") == (2, 4)
    c = LoRAPruneConfig(granularity="2:4", target_sparsity=0.1)
    assert c.is_element_granularity and c.n_m == (2, 4)
    assert c.effective_target_sparsity == 0.5
    assert LoRAPruneConfig(granularity="1:8").effective_target_sparsity == pytest.approx(0.875)


def test_config_json_round_trip(tmp_path):
    c = LoRAPruneConfig(
        target_modules=["q_proj", "v_proj"],
        granularity="unstructured",
        target_sparsity=0.3,
        importance="grad",
        element_mask_gradient="straight_through",
        adaptation="sequential",
        budget="global",
        dense_layers=[3, 0],
        prune_structures="heads",
    )
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORAPRUNE"
    for key in (
        "target_sparsity",
        "granularity",
        "adaptation",
        "importance",
        "importance_beta",
        "pruning_interval",
        "budget",
        "initial_sparsity",
        "pruning_start",
        "pruning_end",
        "schedule",
        "prune_structures",
        "head_grouping",
        "dense_layers",
        "importance_dtype",
        "element_mask_gradient",
    ):
        assert key in data, key
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoRAPruneConfig)
    assert loaded.granularity == "unstructured" and loaded.adaptation == "sequential"
    assert loaded.element_mask_gradient == "straight_through"
    assert loaded.dense_layers == [0, 3] and loaded.prune_structures == ["heads"]
    assert loaded.target_modules == {"q_proj", "v_proj"}
