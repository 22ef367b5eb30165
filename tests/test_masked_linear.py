"""The element-masked product against plain autograd through an explicitly built masked weight."""

import pytest
import torch

from peft_loraprune.kernels.mask_packing import pack_bits
from peft_loraprune.kernels.masked_linear import element_masked_linear


def _inputs(seed=0, d_out=10, d_in=13, r=3):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    keep = torch.rand(d_out, d_in, generator=g) > 0.4
    return dict(
        x=make(2, 5, d_in),
        x_lora=make(2, 5, d_in),
        weight=make(d_out, d_in),
        bias=make(d_out),
        lora_B=make(d_out, r),
        lora_R=make(r, d_in),
        keep=keep,
    )


def _reference(t, scaling, shared):
    x_lora = t["x"] if shared else t["x_lora"]
    keep = t["keep"].float()
    delta = scaling * t["lora_B"] @ t["lora_R"]
    return t["x"] @ (t["weight"] * keep).t() + x_lora @ (delta * keep).t() + t["bias"]


@pytest.mark.parametrize("block", [None, 24], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("shared", [True, False], ids=["no-dropout", "own-adapter-input"])
def test_outputs_and_every_gradient_match_autograd(shared, block, monkeypatch):
    """Also with blocks of 24 weights: one row per block forward, and column blocks of 8 and 5 backward (the last
    one ending inside a packed byte)."""
    if block is not None:
        monkeypatch.setattr("peft_loraprune.kernels.masked_linear.ELEMENTS_PER_TOKEN", 1)
        monkeypatch.setattr("peft_loraprune.kernels.masked_linear.MIN_BLOCK_ELEMENTS", block)
    scaling = 1.7
    ours = {k: v.clone().requires_grad_(k != "keep") for k, v in _inputs().items()}
    ref = {k: v.clone().requires_grad_(k != "keep") for k, v in _inputs().items()}
    x_lora = ours["x"] if shared else ours["x_lora"]
    y = element_masked_linear(
        ours["x"], x_lora, ours["weight"], ours["bias"], ours["lora_B"], ours["lora_R"], scaling,
        pack_bits(ours["keep"]), ours["keep"].shape[1],
    )  # fmt: skip
    y_ref = _reference(ref, scaling, shared)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    names = ["x", "weight", "bias", "lora_B", "lora_R"] + ([] if shared else ["x_lora"])
    for name in names:
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # pruned weights get no gradient: the pretrained weight's gradient is masked too
    assert torch.all(ours["weight"].grad[~ours["keep"]] == 0)


@pytest.mark.parametrize("shared", [True, False], ids=["no-dropout", "own-adapter-input"])
def test_input_gradients_reach_the_layer_below_contiguous(shared):
    """The input gradients are built transposed; handed on as strided views they made the elementwise backward
    of the layer below (activation, gating product) several times slower, so they leave contiguous."""
    t = {k: v.clone() for k, v in _inputs(seed=1).items()}
    x = t["x"].requires_grad_() * 1.0  # a non-leaf: its hook sees the gradient exactly as produced
    x_lora = x if shared else t["x_lora"].requires_grad_() * 1.0
    seen = []
    for tensor in {id(x): x, id(x_lora): x_lora}.values():
        tensor.register_hook(lambda g: seen.append(g.is_contiguous()))
    y = element_masked_linear(
        x, x_lora, t["weight"], None, t["lora_B"], t["lora_R"], 1.0, pack_bits(t["keep"]), t["keep"].shape[1]
    )
    y.sum().backward()
    assert seen == [True] * (1 if shared else 2)


def _straight_through_reference(t, scaling, shared):
    """The masked layer's value, with the update's gradient passed through the mask unchanged: ``delta ⊙ M`` in
    value, ``delta`` in gradient (the classic detach trick, independent of the code under test)."""
    x_lora = t["x"] if shared else t["x_lora"]
    keep = t["keep"].float()
    delta = scaling * t["lora_B"] @ t["lora_R"]
    passed = delta * keep + (delta - delta.detach()) * (1 - keep)
    return t["x"] @ (t["weight"] * keep).t() + x_lora @ passed.t() + t["bias"]


@pytest.mark.parametrize("shared", [True, False], ids=["no-dropout", "own-adapter-input"])
def test_straight_through_gives_the_factors_the_unmasked_gradient_and_keeps_the_rest_exact(shared):
    scaling = 0.9
    ours = {k: v.clone().requires_grad_(k != "keep") for k, v in _inputs(seed=3).items()}
    ref = {k: v.clone().requires_grad_(k != "keep") for k, v in _inputs(seed=3).items()}
    exact = {k: v.clone().requires_grad_(k != "keep") for k, v in _inputs(seed=3).items()}
    x_lora = ours["x"] if shared else ours["x_lora"]
    args = (ours["lora_B"], ours["lora_R"], scaling, pack_bits(ours["keep"]), ours["keep"].shape[1])
    y = element_masked_linear(ours["x"], x_lora, ours["weight"], ours["bias"], *args, straight_through=True)
    y_ref = _straight_through_reference(ref, scaling, shared)
    y_exact = _reference(exact, scaling, shared)
    torch.testing.assert_close(y, y_exact, rtol=1e-5, atol=1e-5)  # the output is the masked layer's
    grad_out = torch.randn_like(y)
    for out in (y, y_ref, y_exact):
        (out * grad_out).sum().backward()
    for name in ["x", "weight", "bias", "lora_B", "lora_R"] + ([] if shared else ["x_lora"]):
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    for name in ["x", "weight", "bias"] + ([] if shared else ["x_lora"]):  # input gradients stay exact
        torch.testing.assert_close(ours[name].grad, exact[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # ...and the factors' do differ from the exact ones (the approximation is real, not a no-op)
    assert not torch.allclose(ours["lora_B"].grad, exact["lora_B"].grad, rtol=1e-3, atol=1e-4)


def test_straight_through_forms_nothing_weight_sized_in_backward():
    """Its point is cost: the factor gradients come from rank-r products, so the backward pass asks the workspace
    for no ``gradient`` buffer (the exact path's ``grad_yᵀ·x_lora``)."""
    from peft_loraprune.kernels.workspace import WORKSPACE

    d_out, d_in = 96, 80
    t = _inputs(seed=5, d_out=d_out, d_in=d_in)
    for straight_through, expected in ((True, False), (False, True)):
        WORKSPACE.clear()
        lora_B = t["lora_B"].clone().requires_grad_(True)
        lora_R = t["lora_R"].clone().requires_grad_(True)
        y = element_masked_linear(
            t["x"], t["x_lora"], t["weight"], None, lora_B, lora_R, 1.0, pack_bits(t["keep"]), d_in,
            straight_through=straight_through,
        )  # fmt: skip
        y.sum().backward()
        assert ("gradient" in WORKSPACE.slots()) is expected


def test_nothing_weight_sized_is_saved_for_backward_but_the_weight():
    d_out, d_in = 64, 48
    t = _inputs(d_out=d_out, d_in=d_in)
    lora_B = t["lora_B"].requires_grad_(True)
    lora_R = t["lora_R"].requires_grad_(True)
    packed = pack_bits(t["keep"])
    y = element_masked_linear(t["x"], t["x"], t["weight"], None, lora_B, lora_R, 2.0, packed, d_in)
    saved = [s for s in y.grad_fn.saved_tensors if s is not None]
    big = [s for s in saved if s.numel() >= d_out * d_in and s.data_ptr() != t["weight"].data_ptr()]
    assert big == [], [(tuple(s.shape), s.dtype) for s in big]
    # the mask stays bit-packed: an eighth of a byte per weight
    assert any(s is packed for s in saved)


@pytest.mark.parametrize("block", [None, 200], ids=["one-block", "many-blocks"])
def test_bfloat16_autocast_runs_the_product_in_bfloat16_and_stays_close(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr("peft_loraprune.kernels.masked_linear.ELEMENTS_PER_TOKEN", 1)
        monkeypatch.setattr("peft_loraprune.kernels.masked_linear.MIN_BLOCK_ELEMENTS", block)
    t = _inputs(d_out=32, d_in=40)
    for v in t.values():
        if v.is_floating_point():
            v.requires_grad_(True)
    packed = pack_bits(t["keep"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = element_masked_linear(
            t["x"], t["x_lora"], t["weight"], t["bias"], t["lora_B"], t["lora_R"], 0.5, packed, 40
        )
    assert y.dtype == torch.bfloat16
    y_ref = _reference({k: v.detach() for k, v in t.items()}, 0.5, shared=False)
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=5e-2)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * grad_out).sum().backward()
    # gradients come back in each input's own dtype
    assert t["lora_B"].grad.dtype == torch.float32 and t["x"].grad.dtype == torch.float32
    assert torch.all(t["weight"].grad[~t["keep"]] == 0)
    # ...and agree with float32 autograd to bfloat16's precision (blocks summed in float32, not in bfloat16)
    ref = {k: v.detach().clone().requires_grad_(k != "keep") for k, v in t.items()}
    (_reference(ref, 0.5, shared=False) * grad_out).sum().backward()
    for name in ["x", "x_lora", "weight", "bias", "lora_B", "lora_R"]:
        error = (t[name].grad - ref[name].grad).norm() / ref[name].grad.norm()
        assert error < 2e-2, (name, float(error))


def test_layers_of_different_sizes_share_scratch_buffers_without_corrupting_each_other():
    """The weight-sized temporaries live in one reused workspace: whatever a pass returns must be its own."""
    scaling = 0.7
    small, large = _inputs(seed=1, d_out=6, d_in=9), _inputs(seed=2, d_out=20, d_in=17)
    results = []
    for t in (small, large, small):
        t = {k: v.clone().requires_grad_(k != "keep") for k, v in t.items()}
        y = element_masked_linear(
            t["x"], t["x_lora"], t["weight"], t["bias"], t["lora_B"], t["lora_R"], scaling,
            pack_bits(t["keep"]), t["keep"].shape[1],
        )  # fmt: skip
        y.sum().backward()
        results.append((y.detach(), t["lora_B"].grad, t["x"].grad))
    snapshot = [tuple(r.clone() for r in res) for res in results]
    # a further pass of the large layer (it reuses and overwrites every buffer) leaves earlier results alone
    t = {k: v.clone().requires_grad_(k != "keep") for k, v in large.items()}
    element_masked_linear(
        t["x"], t["x_lora"], t["weight"], t["bias"], t["lora_B"], t["lora_R"], scaling, pack_bits(t["keep"]), 17
    ).sum().backward()
    for before, after in zip(snapshot, results):
        for a, b in zip(before, after):
            assert torch.equal(a, b)
    # and the small layer's results are the same after the large one grew the buffers
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)
    reference = {k: v.clone().requires_grad_(k != "keep") for k, v in small.items()}
    y_ref = _reference(reference, scaling, shared=False)
    y_ref.sum().backward()
    torch.testing.assert_close(results[2][0], y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[2][1], reference["lora_B"].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cols", [1, 8, 13, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_values_unpack_to_the_same_mask(cols, dtype):
    from peft_loraprune.kernels.mask_packing import unpack_bits, unpack_values_into

    keep = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bits(keep)
    out = torch.full((5, packed.shape[1] * 8), 7.0, dtype=dtype)
    values = unpack_values_into(packed, cols, out, torch.empty(packed.numel(), dtype=torch.int64))
    assert values.dtype == dtype and torch.equal(values, keep.to(dtype))
    assert torch.equal(unpack_bits(packed, cols), keep)
    with pytest.raises(ValueError, match="out must be a floating tensor of shape"):
        unpack_values_into(packed, cols, torch.empty(5, 3), torch.empty(packed.numel(), dtype=torch.int64))
