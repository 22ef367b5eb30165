"""The streaming export writes exactly the tensors of the in-memory export, without loading the base model, and
the safetensors writer behind it produces files that safetensors and from_pretrained read."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import make_model
from helpers import pruned_model
from peft import PeftModel
from safetensors.torch import load_file

from peft_loraprune import export_pruned_model
from peft_loraprune.cli import main
from peft_loraprune.export.checkpoint_io import CheckpointReader, StreamingShardWriter, parse_size, planned
from peft_loraprune.export.streaming import replacement_mismatch, stream_export
from peft_loraprune.hub.skeleton import load_adapter_skeleton


def _tensors(folder) -> dict:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.fixture
def base_folder(tmp_path):
    def save(family):
        path = tmp_path / f"base_{family}"
        make_model(family).save_pretrained(path)
        return str(path)

    return save


@pytest.mark.parametrize(
    "family,granularity,cfg",
    [
        ("llama", "structured", {}),
        ("llama", "structured", {"budget": "global"}),
        ("llama", "unstructured", {}),
        ("llama", "2:4", {}),
        ("llama", "structured", {"adaptation": "sequential"}),
        ("gpt2", "structured", {}),  # Conv1D: weights stored (in, out)
    ],
)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streaming_export_writes_exactly_the_in_memory_export(base_folder, tmp_path, family, granularity, cfg, dtype):
    base = base_folder(family)
    model = pruned_model(family, granularity, **cfg)
    model.save_pretrained(tmp_path / "adapter")

    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    )
    export_pruned_model(reference, measure_latency=False, save_directory=str(tmp_path / "memory"), dtype=dtype)
    report = stream_export(
        str(tmp_path / "adapter"),
        str(tmp_path / "stream"),
        base,
        dtype=dtype,
        max_shard_size=20_000,
        progressbar=False,
    )
    expected, written = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert len([f for f in os.listdir(tmp_path / "stream") if f.endswith(".safetensors")]) > 1  # sharded
    assert report.params_after == sum(t.numel() for t in written.values())

    # a plain from_pretrained reloads it, and it computes what the adapter did
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        tol = 0 if dtype is None else 0.05
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), adapter_logits, rtol=0, atol=tol + 1e-5)


def test_cli_export_streams_by_default_and_loads_in_memory_when_asked(base_folder, tmp_path, capsys):
    base = base_folder("llama")
    pruned_model("llama").save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--base", base, "--out", str(tmp_path / "s")]) == 0
    assert "streaming export" in capsys.readouterr().out
    assert (
        main(["export", str(tmp_path / "adapter"), "--base", base, "--out", str(tmp_path / "m"), "--in_memory"]) == 0
    )
    assert "streaming export" not in capsys.readouterr().out
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert sorted(s) == sorted(m) and all(torch.equal(s[k], m[k]) for k in s)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["intermediate_size"] < make_model("llama").config.intermediate_size
    assert (tmp_path / "s" / "README.md").is_file()
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "x"), "--max_shard_size", "lots"]) == 2
    assert "max_shard_size" in capsys.readouterr().err


def test_writer_checks_order_dtype_and_size_and_leaves_no_partial_shard(tmp_path):
    plan = [planned("a", torch.float32, (4, 3)), planned("b", torch.bfloat16, (5,))]
    writer = StreamingShardWriter(str(tmp_path), plan, max_shard_bytes=1 << 20)
    with pytest.raises(ValueError, match="expected the data of 'a' next"):
        writer.write("b", torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="planned torch.float32"):
        writer.write("a", torch.zeros(4, 3, dtype=torch.float64))
    a = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    writer.write("a", a[:1])
    writer.write("a", a[1:])  # in pieces along the first dimension
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer.abort()
    assert os.listdir(tmp_path) == []  # nothing half-written left behind
    writer = StreamingShardWriter(str(tmp_path), plan, max_shard_bytes=1 << 20)
    b = torch.linspace(0, 1, 5).to(torch.bfloat16)
    writer.write("a", a)
    writer.write("b", b)
    assert writer.close() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123


def test_report_reads_masks_and_config_only(base_folder, tmp_path, capsys):
    """`peft-loraprune report` never loads the base weights: it works with the weights file gone."""
    base = base_folder("llama")
    model = pruned_model("llama")
    model.save_pretrained(tmp_path / "adapter")
    os.remove(os.path.join(base, "model.safetensors"))
    assert main(["report", str(tmp_path / "adapter"), "--base", base, "--summary_only"]) == 0
    assert capsys.readouterr().out.strip() == model.base_model.sparsity_report().summary()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streaming_export_writes_the_trained_copies_of_whole_saved_modules(
    base_folder, tmp_path, capsys, dtype, monkeypatch
):
    """Trained norms (``modules_to_save``) replace the base's in the streamed export, as in the in-memory one; the
    command line builds the adapter's weightless skeleton once for its check, the export and the card."""
    base = base_folder("llama")
    model = pruned_model("llama", modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g))  # trained: no longer the base's values
    model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    )
    export_pruned_model(reference, measure_latency=False, save_directory=str(tmp_path / "memory"), dtype=dtype)
    import peft_loraprune.cli as cli
    import peft_loraprune.export.streaming as streaming

    builds = []

    def counted(*args, **kwargs):
        builds.append(args)
        return load_adapter_skeleton(*args, **kwargs)

    monkeypatch.setattr(cli, "load_adapter_skeleton", counted)
    monkeypatch.setattr(streaming, "load_adapter_skeleton", counted)
    argv = ["export", str(tmp_path / "adapter"), "--base", base, "--out", str(tmp_path / "stream")]
    assert main(argv + (["--dtype", "bfloat16"] if dtype else [])) == 0
    assert "streaming export" in capsys.readouterr().out
    assert len(builds) == 1
    expected, written = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    trained = model.base_model.model.model.norm.modules_to_save["default"].weight
    base_norm = load_file(os.path.join(base, "model.safetensors"))["model.norm.weight"]
    assert torch.equal(written["model.norm.weight"], trained.to(written["model.norm.weight"].dtype))
    assert not torch.equal(written["model.norm.weight"].float(), base_norm.float())
    # the report reads the adapter without the base weights
    assert main(["report", str(tmp_path / "adapter"), "--base", base, "--summary_only"]) == 0


def test_saved_modules_that_do_not_replace_a_checkpoint_tensor_one_for_one_are_named(base_folder):
    reader = CheckpointReader(base_folder("llama"))
    assert replacement_mismatch({"model.norm.weight": torch.ones(32)}, reader) is None
    assert "'score.weight', which the base checkpoint does not hold" in replacement_mismatch(
        {"score.weight": torch.ones(2, 32)}, reader
    )
    assert "with shape (16,), the base checkpoint holds (32,)" in replacement_mismatch(
        {"model.norm.weight": torch.ones(16)}, reader
    )
