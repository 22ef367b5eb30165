"""Quantized (bitsandbytes) bases: LLM.int8 and 4-bit (NF4/FP4, double quantization) layers run on the CPU, so the
QLoRA path is tested here end to end against independent computations: dequantization by hand, the float layer
on the dequantized weight, reload in a fresh process, and export against the adapter's own outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

from peft_loraprune import LoRAPruneConfig, export_pruned_model  # noqa: E402
from peft_loraprune.kernels.quantized import dense_weight, rounded_as  # noqa: E402

# widths that are multiples of bitsandbytes' 4-bit block (64): its CPU kernels need them (see DESIGN.md, section 8)
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QUANT = {
    "int8": dict(load_in_8bit=True),
    "nf4-double-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved as safetensors: the original-precision checkpoint the quantized bases load from."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, head_dim=32, vocab_size=256, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def quantized_base(checkpoint, quant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=transformers.BitsAndBytesConfig(**QUANT[quant]), device_map="cpu"
        )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def train(model, steps=4, seed=0):
    """A manual loop (the callback's three calls): masks reach the target at the last step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_importance()
        opt.step()
        opt.zero_grad()
        model.base_model.pruning_step(step + 1, steps)
    return model.eval()


IDS = torch.arange(32).reshape(2, 16) * 7 % 256


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("quant", ["int8", "nf4-double-bf16"])
def test_dense_weight_is_the_hand_dequantized_weight(checkpoint, quant):
    model = quantized_base(checkpoint, quant)
    layer = model.model.layers[0].mlp.down_proj
    w = layer.weight
    if quant == "int8":  # LLM.int8: row-wise absmax, int8 · scale / 127
        expected = w.data.float() * w.SCB.float()[:, None] / 127
    else:  # NF4: 4-bit codes into the NF4 table, times each 64-block's absmax (double-quantized here)
        state = w.quant_state
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        packed = w.data.flatten()
        codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()
        expected = (state.code[codes].float().reshape(-1, 64) * absmax[:, None].float()).reshape(state.shape)
    torch.testing.assert_close(dense_weight(layer).float(), expected, rtol=0, atol=1e-6)
    original = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).model.layers[0].mlp.down_proj.weight
    assert (dense_weight(layer).float() - original).abs().max() < 0.02  # and it is the weight quantized


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("granularity", ["structured", "unstructured", "2:4"])
def test_trains_prunes_reloads_and_merges_on_a_quantized_base(checkpoint, quant, granularity, tmp_path):
    model = get_peft_model(
        quantized_base(checkpoint, quant),
        LoRAPruneConfig(task_type="CAUSAL_LM", granularity=granularity, target_sparsity=0.5, lora_dropout=0.0),
    )
    train(model)
    report = model.base_model.sparsity_report()
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    before = logits(model)
    assert torch.isfinite(before).all()

    # a fresh process loads the adapter on a freshly quantized base: identical outputs (once per format; in this
    # process for the element granularities, to keep the suite's time)
    model.save_pretrained(tmp_path / "adapter")
    if granularity != "structured":
        fresh = PeftModel.from_pretrained(quantized_base(checkpoint, quant), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(logits(fresh), before, rtol=0, atol=0)
    else:
        _reload_in_fresh_process(checkpoint, quant, tmp_path, before)
    # merge writes the masked merged weight in the layer's own format (pruned weights exactly zero); unmerge
    # restores the quantized original bit for bit
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    mask = layer.full_mask("default")
    model.base_model.merge_adapter()
    merged = dense_weight(layer.get_base_layer())
    assert (merged[~mask] == 0).all()
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def _reload_in_fresh_process(checkpoint, quant, tmp_path, expected):
    script = textwrap.dedent(f"""
        import json, torch, transformers, warnings, peft_loraprune
        from peft import PeftModel
        warnings.simplefilter("ignore")
        kw = json.loads({json.dumps(json.dumps({k: str(v) if isinstance(v, torch.dtype) else v for k, v in QUANT[quant].items()}))})
        kw = {{k: (getattr(torch, v.removeprefix("torch.")) if isinstance(v, str) and v.startswith("torch.") else v) for k, v in kw.items()}}
        base = transformers.AutoModelForCausalLM.from_pretrained(
            {checkpoint!r}, quantization_config=transformers.BitsAndBytesConfig(**kw), device_map="cpu")
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        ids = torch.arange(32).reshape(2, 16) * 7 % 256
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits.float(), {str(tmp_path / "reloaded.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=_offline_env())
    torch.testing.assert_close(torch.load(tmp_path / "reloaded.pt"), expected, rtol=0, atol=0)


def _offline_env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_element_masked_product_on_a_quantized_base_matches_the_float_layer_on_its_dequantized_weight(checkpoint):
    """The masked product dequantizes inside each pass: outputs and factor gradients equal plain autograd through
    ``((W_deq + s·B·A) ⊙ M)·x`` (an independent computation)."""
    model = get_peft_model(
        quantized_base(checkpoint, "int8"),
        LoRAPruneConfig(task_type="CAUSAL_LM", granularity="unstructured", lora_dropout=0.0, target_sparsity=0.5),
    )
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1)
    from peft_loraprune.kernels.mask_packing import pack_bits

    keep = torch.rand(layer.out_features, layer.in_features, generator=g) > 0.5
    layer.set_masks("default", elements_packed=pack_bits(keep))
    x = torch.randn(3, layer.in_features, generator=g)
    y = layer(x)
    y.square().sum().backward()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    w = dense_weight(layer.get_base_layer()).float()
    ref = x @ ((w + layer.scaling["default"] * b @ a) * keep).t()
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_grad_criterion_and_other_quantizers_are_refused_clearly(checkpoint):
    with pytest.raises(ValueError, match="importance='grad' is not supported on a quantized base"):
        get_peft_model(
            quantized_base(checkpoint, "nf4-double-bf16"), LoRAPruneConfig(task_type="CAUSAL_LM", importance="grad")
        )

    class Int8Weights(torch.nn.Module):  # what torchao / GPTQ-style layers look like to us: integer weights
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
            self.in_features = self.out_features = 8

    net = torch.nn.Sequential()
    net.add_module("proj", Int8Weights())
    with pytest.raises(
        TypeError, match="'proj' is a quantized layer LoRAPrune does not support.*bitsandbytes Linear8bitLt"
    ):
        get_peft_model(net, LoRAPruneConfig(target_modules=["proj"]))


@pytest.mark.parametrize("quant", ["int8", "nf4-double-bf16"])
def test_export_merges_into_dequantized_or_original_weights_and_reloads_with_plain_from_pretrained(
    checkpoint, quant, tmp_path
):
    def trained():
        torch.manual_seed(0)
        model = get_peft_model(
            quantized_base(checkpoint, quant),
            LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.5, lora_dropout=0.0),
        )
        return train(model)

    model = trained()
    adapter_logits = logits(model)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    expected_up = layer.masked_merged_weight("default")[layer.lora_mask_rows["default"]]
    report = export_pruned_model(model, measure_latency=False, save_directory=str(tmp_path / "deq"))
    assert report.merged_into.startswith("dequantized bitsandbytes")
    assert report.params_after < report.params_before
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq").eval()
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    assert type(reloaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(reloaded.model.layers[0].mlp.up_proj.weight.float(), expected_up, rtol=0, atol=1e-6)
    # the exported model computes what the adapter on its quantized base did (up to the compute dtype)
    torch.testing.assert_close(logits(reloaded), adapter_logits, rtol=0, atol=0.05)

    model = trained()  # the same run again: merged into the original-precision checkpoint instead
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    original = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).model.layers[0].mlp.up_proj.weight
    expected_up = layer.masked_merged_weight("default", original.detach())[layer.lora_mask_rows["default"]]
    report = export_pruned_model(
        model, measure_latency=False, base_weights=checkpoint, save_directory=str(tmp_path / "orig")
    )
    assert report.merged_into.startswith("the original-precision weights")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    torch.testing.assert_close(reloaded.model.layers[0].mlp.up_proj.weight.float(), expected_up, rtol=0, atol=0)


def test_trainer_with_callback_on_a_4bit_base_reaches_the_target_and_resumes(checkpoint, tmp_path):
    from datasets import Dataset

    from peft_loraprune import LoRAPruneCallback

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 16), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(
            quantized_base(checkpoint, "nf4-double-bf16"),
            LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.5, pruning_interval=2, lora_dropout=0.0),
        )
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="steps",
            save_steps=4,
            use_cpu=True,
            logging_strategy="no",
            seed=0,
            data_seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[LoRAPruneCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 8)
    assert full.base_model.sparsity_report().sparsity == pytest.approx(0.5, abs=0.01)
    resumed = run(tmp_path / "full", 8, resume=str(tmp_path / "full" / "checkpoint-4"))
    for (n, a), (_, b) in zip(full.named_buffers(), resumed.named_buffers()):
        if "lora_mask" in n:
            assert torch.equal(a, b), n


def _folder_tensors(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize(
    "quant, fmt, granularity, targets",
    [
        ("nf4-double-bf16", "nf4-dq", "structured", None),
        # element masks on two modules: the other Linear layers are quantized in training but not adapted
        ("int8", "int8", "unstructured", ["q_proj", "down_proj"]),
    ],
)
def test_streaming_export_quantized_as_writes_the_in_memory_export_of_the_quantized_model(
    checkpoint, quant, fmt, granularity, targets, tmp_path, capsys
):
    from peft_loraprune.cli import main

    torch.manual_seed(0)
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM", target_sparsity=0.5, lora_dropout=0.0, granularity=granularity, target_modules=targets
    )
    model = train(get_peft_model(quantized_base(checkpoint, quant), config))
    model.save_pretrained(tmp_path / "adapter")
    export_pruned_model(model, measure_latency=False, save_directory=str(tmp_path / "in_memory"))  # dequantized
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "rounded"), "--quantized_as", fmt]) == 0
    assert f"rounded as bitsandbytes {fmt} stores them (streaming export)" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "original")]) == 0
    expected, rounded = _folder_tensors(tmp_path / "in_memory"), _folder_tensors(tmp_path / "rounded")
    original = _folder_tensors(tmp_path / "original")
    assert rounded.keys() == expected.keys() == original.keys()
    for key in expected:
        torch.testing.assert_close(rounded[key], expected[key], rtol=0, atol=1e-6, msg=key)
    layer = "model.layers.0.self_attn.k_proj.weight"  # adapted (nf4) or not (int8): rounded either way
    assert not torch.allclose(rounded[layer], original[layer])
    assert torch.equal(rounded["lm_head.weight"], original["lm_head.weight"])  # the output layer stays as it was
    # refusals: the in-memory path does not round; an unknown format names the allowed ones
    argv = ["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "x"), "--quantized_as", fmt, "--in_memory"]
    assert main(argv) == 2
    assert "--quantized_as rounds the checkpoint's weights in the streaming export" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantized_as='nf5': allowed int8, nf4, nf4-dq, fp4, fp4-dq"):
        rounded_as(torch.zeros(64, 64), "nf5")
