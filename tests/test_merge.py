"""Merging never fills pruned weights back in; unmerging restores the base; several adapters."""

import pytest
import torch
from conftest import make_inputs, make_model, model_output
from helpers import pruned_model, random_prune

from peft_loraprune import LoRAPruneConfig
from peft_loraprune.layer import LoRAPruneLayer


@pytest.mark.parametrize("granularity", ["structured", "unstructured", "2:4"])
@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_merge_and_unload_gives_plain_model_with_exact_zeros(family, granularity, adaptation):
    model = pruned_model(family, granularity, adaptation)
    inputs = make_inputs(family)
    expected = model_output(model, inputs)
    masks = {name: layer.full_mask("default").clone() for name, layer in model.base_model.prune_layers()}
    merged = model.merge_and_unload()
    assert type(merged) is type(make_model(family))
    assert not any(isinstance(m, LoRAPruneLayer) for m in merged.modules())
    modules = dict(merged.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight.t() if family == "gpt2" else modules[name].weight  # Conv1D is (in, out)
        assert torch.all(weight[~mask] == 0), name
        bias = modules[name].bias
        if bias is not None:
            dead_rows = ~mask.any(dim=1)
            assert torch.all(bias[dead_rows] == 0), name
    torch.testing.assert_close(model_output(merged, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_merge_unmerge_restores_base_and_disable_gives_dense_base(adaptation):
    family = "llama"
    model = pruned_model(family, "unstructured", adaptation)
    inputs = make_inputs(family)
    dense = model_output(make_model(family), inputs)
    expected = model_output(model, inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with model.disable_adapter():  # the pretrained weights are untouched by pruning: the dense base comes back
        torch.testing.assert_close(model_output(model, inputs), dense, rtol=0, atol=0)

    model.merge_adapter()
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model_output(model, inputs), expected, rtol=1e-5, atol=1e-6)

    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, inputs), dense, rtol=1e-5, atol=1e-6)


def test_several_adapters_add_set_delete():
    family = "bert"
    model = pruned_model(family, "structured", "parallel")
    inputs = make_inputs(family)
    first = model_output(model, inputs)
    model.add_adapter("second", LoRAPruneConfig(task_type="SEQ_CLS", granularity="unstructured", lora_dropout=0.0))
    model.set_adapter("second")
    random_prune(model, 0.3, adapter_name="second")
    second = model_output(model, inputs)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(model_output(model, inputs), first, rtol=0, atol=0)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert not any("second" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("second")


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_unmerge_restores_pruned_weights_bit_for_bit_and_kept_ones_within_rounding(adaptation):
    """As docs/concepts/masks.md says: merging stashes what the masked product overwrites and cannot be recomputed.
    Parallel adaptation: the pruned entries (stashed) come back bit for bit, the kept ones by subtracting s·B·A
    again, within float32 rounding (a bit-exact restore would stash every weight: a second copy of the model).
    Sequential adaptation stashes the whole weight: all of it comes back bit for bit; biases always do."""
    model = pruned_model("llama", "unstructured", adaptation)
    layers = dict(model.base_model.prune_layers())
    before = {n: (layer.base_weight_2d().clone(), layer.full_mask("default").clone()) for n, layer in layers.items()}
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.bias" in n}
    model.merge_adapter()
    assert all(not torch.equal(layer.base_weight_2d(), before[n][0]) for n, layer in layers.items())
    model.unmerge_adapter()
    for name, layer in layers.items():
        w0, kept = before[name]
        restored = layer.base_weight_2d()
        assert torch.equal(restored[~kept], w0[~kept]), name
        if adaptation == "sequential":
            assert torch.equal(restored, w0), name
        else:
            torch.testing.assert_close(restored, w0, rtol=0, atol=1e-6, msg=name)
    for name, bias in biases.items():
        assert torch.equal(dict(model.named_parameters())[name], bias), name
