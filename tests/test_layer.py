"""The layer's forward pass against independent computations of ((W0 + s·B·A) ⊙ M)·x."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from peft_loraprune import (
    ArchitectureSpec,
    GroupMember,
    GroupSpec,
    LoRAPruneConfig,
    register_architecture,
    supported_model_types,
    unregister_architecture,
)
from peft_loraprune.kernels.mask_packing import _pack_bits_tensor, _unpack_bits_tensor, pack_bits, unpack_bits

TOY = ArchitectureSpec(
    name="toy",
    model_types=("toy_proj",),
    block_pattern=r"(?:^|\.)blocks\.(\d+)\.(.+)$",
    groups=lambda config, grouping: [GroupSpec("channels", 10, (GroupMember("proj", "rows", (1, 10, 1)),))],
    prunable_modules=("proj",),
)


@pytest.fixture(autouse=True, scope="module")
def toy_family():
    """A one-module "family" so that structured adapters can be built on the toy network below (structured pruning
    refuses models whose family it does not know); registered for this module's tests only."""
    register_architecture(TOY)
    yield
    unregister_architecture("toy")
    assert "toy_proj" not in supported_model_types()


class Net(torch.nn.Module):
    def __init__(self, kind: str, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.config = type(
            "Config", (), {"model_type": "toy_proj", "to_dict": lambda self: {"model_type": "toy_proj"}}
        )()
        block = torch.nn.Module()
        block.proj = torch.nn.Linear(12, 10, bias=bias) if kind == "linear" else Conv1D(10, 12)
        self.blocks = torch.nn.ModuleList([block])

    def forward(self, x):
        return self.blocks[0].proj(x)


def wrap(kind, **kw):
    cfg = LoRAPruneConfig(target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False, **kw)
    return get_peft_model(Net(kind), cfg)


def canonical_weight(layer):
    w = layer.get_base_layer().weight.detach()
    return w.t() if layer.fan_in_fan_out else w


def reference_output(layer, x, mask, adaptation):
    """((W0 + s·B·A) ⊙ M)x + b ⊙ rows, or the sequential form, from the raw tensors."""
    w0 = canonical_weight(layer)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    s = layer.scaling["default"]
    bias = layer.get_base_layer().bias
    rows = layer.lora_mask_rows["default"].float()
    if adaptation == "parallel":
        w = w0 + s * b @ a
        bb = bias
    else:
        t = torch.eye(w0.shape[0]) + s * b @ a
        w = t @ w0
        bb = None if bias is None else t @ bias
    out = x @ (w * mask).t()
    if bb is not None:
        out = out + bb * rows
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_all_kept_parallel_equals_peft_lora(kind):
    torch.manual_seed(3)
    ours = wrap(kind)
    theirs = get_peft_model(
        Net(kind),
        LoraConfig(target_modules=["proj"], init_lora_weights=False, lora_alpha=16, fan_in_fan_out=kind == "conv1d"),
    )
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(
            sorted((n, p) for n, p in ours.named_parameters() if "lora_" in n),
            sorted((n, p) for n, p in theirs.named_parameters() if "lora_" in n),
        ):
            assert n1 == n2
            p2.copy_(p1)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_structured_masks_match_reference(kind, adaptation):
    model = wrap(kind, adaptation=adaptation)
    layer = model.base_model.model.blocks[0].proj
    rows = torch.ones(10, dtype=torch.bool)
    rows[[1, 4, 5]] = False
    cols = torch.ones(12, dtype=torch.bool)
    cols[[0, 7]] = False
    layer.set_masks("default", rows=rows, cols=cols)
    x = torch.randn(4, 12)
    mask = (rows[:, None] & cols[None, :]).float()
    torch.testing.assert_close(model(x), reference_output(layer, x, mask, adaptation), rtol=1e-5, atol=1e-5)
    assert torch.all(model(x)[:, ~rows] == 0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_element_masks_forward_and_gradients_match_autograd(kind, adaptation):
    model = wrap(kind, adaptation=adaptation, granularity="unstructured")
    model.train()
    layer = model.base_model.model.blocks[0].proj
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(10, 12, generator=g) > 0.4
    layer.set_masks("default", elements_packed=pack_bits(keep))
    x = torch.randn(2, 3, 12, requires_grad=True)
    y = model(x)
    ref = reference_output(layer, x, keep.float(), adaptation)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    # gradients w.r.t. A, B and x against plain autograd through the explicit merged weight
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w0 = canonical_weight(layer)
    s = layer.scaling["default"]
    bias = layer.get_base_layer().bias.detach()
    if adaptation == "parallel":
        w, bb = w0 + s * b @ a, bias
    else:
        t = torch.eye(10) + s * b @ a
        w, bb = t @ w0, t @ bias
    ((x2 @ (w * keep).t() + bb) * grad_out).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_element_mask_with_dropout_keeps_pruned_weights_out():
    cfg = LoRAPruneConfig(
        target_modules=["proj"], lora_dropout=0.5, init_lora_weights=False, granularity="unstructured"
    )
    model = get_peft_model(Net("linear"), cfg)
    model.train()
    layer = model.base_model.model.blocks[0].proj
    keep = torch.zeros(10, 12, dtype=torch.bool)
    keep[:, :3] = True
    layer.set_masks("default", elements_packed=pack_bits(keep))
    x = torch.randn(4, 12)
    x[:, :3] = 0  # only pruned columns carry signal: output must be the bias alone
    torch.testing.assert_close(model(x), layer.get_base_layer().bias.expand(4, 10).detach())


def test_pretrained_weights_never_require_grad():
    model = wrap("linear", granularity="2:4")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.blocks.0.proj.lora_A.default.weight",
        "base_model.model.blocks.0.proj.lora_B.default.weight",
    }


def test_masks_exist_from_creation_all_kept():
    model = wrap("linear", granularity="unstructured")
    keys = [k for k in model.state_dict() if "mask" in k]
    assert sorted(k.split(".")[-2] for k in keys) == ["lora_mask_cols", "lora_mask_elements", "lora_mask_rows"]
    layer = model.base_model.model.blocks[0].proj
    assert layer.full_mask("default").all()


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_bit_packing_round_trip(cols):
    m = torch.rand(5, cols) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_bits(packed, cols), m)
    # the CPU path (NumPy) and the tensor path used on other devices agree bit for bit
    assert torch.equal(_pack_bits_tensor(m), packed)
    assert torch.equal(_unpack_bits_tensor(packed, cols), m)
    # most significant bit first: a single kept first entry is 0b10000000
    first = torch.zeros(1, 8, dtype=torch.bool)
    first[0, 0] = True
    assert pack_bits(first).item() == 128
    with pytest.raises(ValueError, match="cols="):
        unpack_bits(packed, cols + 8)


def test_two_active_adapters_are_refused():
    model = wrap("linear")
    model.add_adapter("other", LoRAPruneConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "other"])
