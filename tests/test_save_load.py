"""Save, reload (in a fresh process too), AutoPeftModel, transformers' load_adapter, bad files, the Hub."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import AUTO, make_inputs, make_model, model_output
from helpers import pruned_model
from peft import PeftModel
from safetensors.torch import load_file, save_file

import peft_loraprune


@pytest.mark.parametrize("granularity", ["structured", "unstructured", "2:4"])
def test_save_and_reload_gives_identical_outputs(family, granularity, tmp_path):
    model = pruned_model(family, granularity)
    inputs = make_inputs(family)
    expected = model_output(model, inputs)
    assert not torch.allclose(expected, model_output(make_model(family), inputs)), "adapter must change outputs"
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAPRUNE" and config["granularity"] == granularity
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    mask_keys = [k for k in tensors if "mask" in k]
    assert mask_keys and all(k.startswith("base_model.model.") for k in mask_keys)
    if granularity == "structured":
        assert not any("lora_mask_elements" in k for k in mask_keys)
    else:
        packed = [tensors[k] for k in mask_keys if "lora_mask_elements" in k]
        assert packed and all(t.dtype == torch.uint8 for t in packed)

    reloaded = PeftModel.from_pretrained(make_model(family), tmp_path)
    torch.testing.assert_close(model_output(reloaded, inputs), expected, rtol=0, atol=0)
    assert_same_adapter_state(model, reloaded)


def assert_same_adapter_state(a, b):
    sa = {k: v for k, v in a.state_dict().items() if "lora_" in k}
    sb = {k: v for k, v in b.state_dict().items() if "lora_" in k}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # something was pruned, so the comparison covered real masks: rows for structured adapters, packed element
    # bytes below 0xFF (at least one weight of eight pruned) for unstructured and N:M ones
    if a.peft_config["default"].is_element_granularity:
        assert any((v < 255).any() for k, v in sa.items() if "lora_mask_elements" in k)
    else:
        assert any(not v.all() for k, v in sa.items() if "lora_mask_rows" in k)


def test_fresh_process_reload(tmp_path):
    family = "llama"
    model = pruned_model(family, "unstructured", "sequential")
    inputs = make_inputs(family)
    make_model(family).save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"inputs": inputs, "expected": model_output(model, inputs)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, transformers, peft_loraprune
        from peft import PeftModel, AutoPeftModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        m = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            assert torch.equal(m(**io["inputs"]).logits, io["expected"]), "PeftModel.from_pretrained"
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_auto_peft_model_and_transformers_load_adapter(tmp_path):
    from peft import AutoPeftModelForCausalLM

    family = "llama"
    model = pruned_model(family)
    inputs = make_inputs(family)
    expected = model_output(model, inputs)
    make_model(family).save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(model_output(auto, inputs), expected, rtol=0, atol=0)

    base = AUTO[family].from_pretrained(tmp_path / "base").eval()
    base.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(model_output(base, inputs), expected, rtol=0, atol=0)


def test_wrong_base_shape_fails_clearly(tmp_path):
    import transformers

    model = pruned_model("llama")
    model.save_pretrained(tmp_path)
    wider = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="has shape .* but this model expects"):
        PeftModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("corruption", ["dtype", "shape"])
def test_bad_mask_in_file_fails_clearly(tmp_path, corruption):
    """A file written by another tool (no LoRAPrune digests) with a mask of the wrong kind."""
    model = pruned_model("llama", "unstructured")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_mask_rows" in k)
    tensors[key] = tensors[key].float() if corruption == "dtype" else tensors[key][:-1]
    save_file(tensors, path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["save_digest"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=("dtype" if corruption == "dtype" else "shape")):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_element_masks_keep_the_adapter_small(tmp_path):
    model = pruned_model("llama", "unstructured")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    packed = sum(t.numel() for k, t in tensors.items() if "lora_mask_elements" in k)
    weights = sum(layer.out_features * layer.in_features for _, layer in model.base_model.prune_layers())
    assert packed * 8 == pytest.approx(weights, rel=0.05)  # one bit per weight


def test_model_card_and_push_to_hub_capture(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    class Repo:
        repo_id = "me/pruned"

    def fake_create_repo(self, repo_id, **kwargs):
        return Repo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        import shutil

        shutil.copytree(folder_path, tmp_path / "hub")
        uploaded["repo_id"] = repo_id
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)

    family = "gpt2"
    model = pruned_model(family)
    inputs = make_inputs(family)
    expected = model_output(model, inputs)
    assert peft_loraprune.push_to_hub(model, "me/pruned") == "commit"
    hub = tmp_path / "hub"
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (hub / "README.md").read_text()
    report = model.base_model.sparsity_report()
    for text in (
        "LoRAPrune",
        "Importance criterion: `activation`",
        "Granularity: `structured`",
        f"Sparsity reached: {report.sparsity:.2%}",
        "block 1 heads",
        "transformers:",
        "torch:",
    ):
        assert text in card, text
    assert "loraprune" in card.split("---")[1]  # tag in the YAML header
    reloaded = PeftModel.from_pretrained(make_model(family), hub)
    torch.testing.assert_close(model_output(reloaded, inputs), expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="repo_id"):
        peft_loraprune.push_to_hub(model, "")
