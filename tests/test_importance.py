"""Each criterion against an independent computation, the moving average, and non-finite steps."""

import warnings

import pytest
import torch
from conftest import make_inputs, make_model
from helpers import randomize_adapter
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig


def one_layer_setup(adaptation, importance, granularity, family="llama"):
    config = LoRAPruneConfig(task_type="CAUSAL_LM", adaptation=adaptation, importance=importance,
                             granularity=granularity, lora_dropout=0.0, importance_beta=0.75,
                             importance_dtype="float32")
    model = get_peft_model(make_model(family), config)
    randomize_adapter(model, seed=4)
    model.train()
    engine = model.base_model.pruning_engine()
    return model, engine


def backward(model, seed=1):
    inputs = make_inputs("llama", seed=seed)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()


def expected_element_scores(layer, criterion, true_grad=None):
    """|W ⊙ G| from raw tensors: hand formula for "lora", autograd's G for "grad", |W| for "magnitude"."""
    w0 = layer.base_weight_2d().detach().float()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    sequential = layer.adaptation["default"] == "sequential"
    w = (torch.eye(w0.shape[0]) + s * b @ a) @ w0 if sequential else w0 + s * b @ a
    if criterion == "magnitude":
        return w.abs()
    if criterion == "grad":
        return (w * true_grad).abs()
    da = layer.lora_A["default"].weight.grad
    db = layer.lora_B["default"].weight.grad
    g_hat = db @ a + b @ da - db @ da
    if sequential:
        g_hat = g_hat @ w0
    return (w * g_hat).abs()


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
@pytest.mark.parametrize("importance", ["lora", "magnitude"])
@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_first_update_matches_hand_formula(adaptation, importance, granularity):
    model, engine = one_layer_setup(adaptation, importance, granularity)
    backward(model)
    expected = {n: expected_element_scores(l, importance) for n, l in engine.layers}
    assert engine.update_importance()
    beta = 0.75
    for name, layer in engine.layers:
        e = expected[name] * (1 - beta)
        if granularity == "structured":
            torch.testing.assert_close(layer.lora_importance_rows["default"], e.sum(1), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(layer.lora_importance_cols["default"], e.sum(0), rtol=1e-4, atol=1e-9)
            assert "default" not in layer.lora_importance_elements  # no weight-sized state for structured
        else:
            torch.testing.assert_close(layer.lora_importance_elements["default"], e, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_grad_criterion_uses_the_true_gradient_of_the_merged_weight(adaptation):
    model, engine = one_layer_setup(adaptation, "grad", "unstructured")
    # independent: make every base weight a leaf of an explicit merged weight and let autograd differentiate
    inputs = make_inputs("llama", seed=1)
    layers = dict(engine.layers)
    merged_leaves = {}
    originals = {}
    for name, layer in layers.items():
        with torch.no_grad():
            w = layer.merged_weight_rows("default").clone()
        merged_leaves[name] = w.requires_grad_(True)
        originals[name] = layer.forward

        def forward(x, *args, _w=w, _layer=layer, **kwargs):
            bias = _layer.merged_bias("default")
            return torch.nn.functional.linear(x, _w, bias)

        layer.forward = forward
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    true_grads = {n: w.grad.clone() for n, w in merged_leaves.items()}
    for name, layer in layers.items():
        layer.forward = originals[name]
    model.zero_grad()

    backward(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_weight_grad["default"], true_grads[name], rtol=1e-4, atol=1e-7)
    expected = {n: expected_element_scores(l, "grad", true_grads[n]) for n, l in layers.items()}
    engine.update_importance()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_importance_elements["default"], 0.25 * expected[name],
                                   rtol=1e-4, atol=1e-9)
        assert not layer.lora_weight_grad["default"].any()  # reset for the next step


def test_lora_criterion_never_gives_pretrained_weights_a_gradient():
    model, engine = one_layer_setup("parallel", "lora", "structured")
    backward(model)
    engine.update_importance()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None and not p.requires_grad, name


def test_moving_average_over_two_steps():
    model, engine = one_layer_setup("parallel", "lora", "unstructured")
    backward(model, seed=1)
    first = {n: expected_element_scores(l, "lora") for n, l in engine.layers}
    engine.update_importance()
    model.zero_grad()
    backward(model, seed=2)
    second = {n: expected_element_scores(l, "lora") for n, l in engine.layers}
    engine.update_importance()
    for name, layer in engine.layers:
        expected = 0.75 * 0.25 * first[name] + 0.25 * second[name]
        torch.testing.assert_close(layer.lora_importance_elements["default"], expected, rtol=1e-4, atol=1e-9)


def test_non_finite_gradient_skips_update_once_warned_and_leaves_masks():
    model, engine = one_layer_setup("parallel", "lora", "structured")
    backward(model)
    engine.update_importance()
    before = {n: l.lora_importance_rows["default"].clone() for n, l in engine.layers}
    masks = {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}
    model.zero_grad()
    backward(model, seed=3)
    first_layer = engine.layers[0][1]
    first_layer.lora_B["default"].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or infinite"):
        assert engine.update_importance() is False
    for name, layer in engine.layers:
        assert torch.equal(layer.lora_importance_rows["default"], before[name])
    # a rewrite due now waits for a finite step
    total = 10  # the schedule's last rewrite is at step 9 = round(0.9 * 10)
    assert engine.pruning_step(9, total) is None and engine.pending_rewrite
    assert all(torch.equal(v, masks[k]) for k, v in model.state_dict().items() if "mask" in k)
    first_layer.lora_B["default"].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert engine.update_importance() is False
    model.zero_grad()
    backward(model, seed=4)
    assert engine.update_importance()
    assert engine.pruning_step(10, total) == 0.5
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5)
