"""Export: physically smaller models that plain from_pretrained reloads with the same outputs."""

import logging

import pytest
import torch
import transformers
from conftest import AUTO, make_inputs, make_model, model_output
from helpers import pruned_model, randomize_adapter
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig, export_pruned_model


def param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("budget", ["local", "global"])
def test_export_reloads_with_plain_from_pretrained(family, budget, tmp_path):
    model = pruned_model(family, budget=budget)
    if budget == "global":  # make the blocks uneven, as a global budget does
        from peft_loraprune.pruning.structure import find_structured_groups

        for g in find_structured_groups(model.base_model, "default"):
            if g.block == 1 and g.spec.structure == "channels":
                keep = g.kept("default").clone()
                keep[keep.nonzero().flatten()[:5]] = False
                g.apply("default", keep)
    inputs = make_inputs(family)
    expected = model_output(model, inputs)
    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    exported = report.model
    assert type(exported) is type(make_model(family))  # a plain transformers model of the base class
    torch.testing.assert_close(model_output(exported, inputs), expected, rtol=0, atol=1e-4)
    exported.save_pretrained(tmp_path)
    reloaded = AUTO[family].from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, inputs), expected, rtol=0, atol=1e-4)
    # the parameter count is what the updated config predicts, and smaller than the dense model
    assert param_count(reloaded) == param_count(AUTO[family].from_config(reloaded.config)) == report.params_after
    assert report.params_after < report.params_before == param_count(make_model(family))
    if budget == "global":
        assert report.params_per_layer_widths < report.params_after and report.notes


def test_llama_parameter_count_by_hand():
    model = pruned_model("llama")  # 2 blocks; hidden 32, 4 heads of 8 in 2 KV groups, 48 channels; half of each pruned
    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    hidden, hd, rep = 32, 8, 2
    per_kv_group = hidden * rep * hd * 2 + hidden * hd * 2  # q rows + o cols + k rows + v rows
    per_channel = 3 * hidden  # gate row, up row, down column
    removed = 2 * (1 * per_kv_group + 24 * per_channel)
    assert report.params_before - report.params_after == removed
    cfg = report.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 8, 24)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_with_cache_on_exported_causal_lm(family, tmp_path):
    model = pruned_model(family)
    ids = make_inputs(family)["input_ids"][:1]
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    exported.save_pretrained(tmp_path)
    reloaded = AUTO[family].from_pretrained(tmp_path).eval()
    for cache in (True, False):
        out = reloaded.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=cache)
        assert torch.equal(out, expected)
    static = reloaded.generate(input_ids=ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, expected)


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_element_export_keeps_exact_zeros_and_pattern(granularity):
    model = pruned_model("llama", granularity=granularity)
    masks = {n: l.full_mask("default").clone() for n, l in model.base_model.prune_layers()}
    inputs = make_inputs("llama")
    expected = model_output(model, inputs)
    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    modules = dict(report.model.named_modules())
    for name, mask in masks.items():
        assert torch.all(modules[name].weight[~mask] == 0)
    assert report.params_after == report.params_before and report.notes
    torch.testing.assert_close(model_output(report.model, inputs), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_element_export_reloads_with_plain_from_pretrained_in_the_dtype_asked_for(granularity, dtype, tmp_path):
    model = pruned_model("llama", granularity=granularity)
    masks = {n: l.full_mask("default").clone() for n, l in model.base_model.prune_layers()}
    exported = export_pruned_model(model, measure_latency=False, progressbar=False, dtype=dtype).model
    exported.save_pretrained(tmp_path)
    reloaded = AUTO["llama"].from_pretrained(tmp_path).eval()
    assert reloaded.dtype == dtype
    modules = dict(reloaded.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert weight.dtype == dtype and torch.all(weight[~mask] == 0), name  # exact zeros survive save and load
        assert (weight[mask] != 0).float().mean() > 0.99, name  # and the kept weights are the exported ones
    inputs = make_inputs("llama")
    torch.testing.assert_close(model_output(reloaded, inputs), model_output(exported, inputs), rtol=0, atol=0)


def test_export_report_measures_latency_when_asked_and_is_logged_not_printed(capsys, caplog):
    model = pruned_model("llama")
    with caplog.at_level(logging.INFO, logger="peft_loraprune"):
        exported = model.merge_and_prune(progressbar=False, measure_latency=True)
    assert capsys.readouterr().out == ""  # library code does not print
    assert "parameters:" in caplog.text and "CPU latency" in caplog.text and "removed per block" in caplog.text
    assert isinstance(exported, transformers.LlamaForCausalLM)
    with pytest.raises(TypeError, match="LoRAPrune"):
        export_pruned_model(make_model("llama"))


def test_query_head_export_keeps_kv_heads(tmp_path):
    model = get_peft_model(
        make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", head_grouping="query_head", lora_dropout=0.0)
    )
    randomize_adapter(model)
    from peft_loraprune.pruning.structure import find_structured_groups

    for g in find_structured_groups(model.base_model, "default"):
        if g.spec.structure == "heads":  # one query head of the two in each KV group, as the selection does
            g.apply(
                "default",
                torch.tensor([True, False, False, True]) if g.block else torch.tensor([False, True, True, False]),
            )
    model.eval()
    inputs = make_inputs("llama")
    expected = model_output(model, inputs)
    exported = export_pruned_model(model, measure_latency=False, progressbar=False).model
    cfg = exported.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    exported.save_pretrained(tmp_path)
    reloaded = AUTO["llama"].from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, inputs), expected, rtol=0, atol=1e-4)


def test_default_latency_inputs_follow_the_models_device_and_dtype():
    """Example inputs for the export report's latency are made on the model's device, pixels in its dtype (a
    bfloat16 ViT gets bfloat16 pixels; float32 pixels would fail its first convolution)."""
    from peft_loraprune.export.latency import default_example_inputs, measure_latency_ms

    vit = make_model("vit").to(torch.bfloat16)
    inputs = default_example_inputs(vit, batch_size=2)
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["pixel_values"].shape == (2, 1, 8, 8)
    assert measure_latency_ms(vit, inputs, repeats=2, warmup=1) > 0
    llama = make_model("llama")
    ids = default_example_inputs(llama, seq_len=1000)["input_ids"]
    assert ids.dtype == torch.long and ids.shape == (1, 64)  # capped at max_position_embeddings
    assert ids.device == next(llama.parameters()).device


def test_an_exported_peft_model_refuses_to_save_report_or_export_again(tmp_path):
    """The export merges the adapter away (as merge_and_unload does): a save afterwards used to write an adapter
    with no tensors, silently, that failed to reload. Now every use that needs the adapter says what happened and
    what to do, and writes nothing; the adapter saved before the export reloads."""
    from peft import PeftModel

    model = pruned_model("llama")
    expected = model_output(model, make_inputs("llama"))
    model.save_pretrained(tmp_path / "before")  # the documented order
    export_pruned_model(model, progressbar=False)
    attempts = {
        "save_pretrained": lambda: model.save_pretrained(tmp_path / "after"),
        "a sparsity report": model.sparsity_report,
        "print_sparsity": model.print_sparsity,
        "another export": lambda: export_pruned_model(model, progressbar=False),
        "merge_and_prune": lambda: model.merge_and_prune(progressbar=False),
    }
    for attempt in attempts.values():
        with pytest.raises(RuntimeError, match=r"consumed by export_pruned_model.*Save the adapter before exporting"):
            attempt()
    assert not (tmp_path / "after").exists()  # refused before anything was written
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "before").eval()
    torch.testing.assert_close(model_output(reloaded, make_inputs("llama")), expected, rtol=1e-5, atol=1e-6)


def test_latency_is_measured_only_when_asked(monkeypatch):
    """Timing forward passes took longer than the export itself on SmolLM2: off by default, in the function and
    in merge_and_prune; example_inputs without measure_latency=True would be ignored, so they are refused."""
    import peft_loraprune.export.merge as merge

    timed = []
    monkeypatch.setattr(merge, "measure_latency_ms", lambda model, inputs: timed.append(inputs) or 1.0)
    report = export_pruned_model(pruned_model("llama"), progressbar=False)
    assert timed == [] and report.latency_before_ms is None and report.speedup is None
    assert "latency" not in str(report)
    pruned_model("llama").merge_and_prune(progressbar=False)
    assert timed == []
    inputs = make_inputs("llama")
    model = pruned_model("llama")
    with pytest.raises(ValueError, match="measure_latency=True"):
        export_pruned_model(model, example_inputs=inputs, progressbar=False)
    report = export_pruned_model(model, example_inputs=inputs, measure_latency=True, progressbar=False)
    assert len(timed) == 2 and all(t is inputs for t in timed) and report.speedup == 1.0


def _word_tokenizer(n_words: int = 62):
    """A word-level tokenizer of the tiny Llama's vocabulary (64 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *(f"w{i}" for i in range(n_words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def test_export_saves_the_tokenizer_so_the_folder_is_complete(tmp_path):
    """With tokenizer=, save_directory holds what pipeline(model=folder) needs: the model and its tokenizer, both
    loaded with the Auto classes; the pipeline's greedy continuation is the exported model's own."""
    tokenizer = _word_tokenizer()
    with pytest.raises(ValueError, match="pass save_directory"):
        export_pruned_model(pruned_model("llama"), tokenizer=tokenizer, progressbar=False)
    model = pruned_model("llama")
    folder = tmp_path / "pruned"
    report = export_pruned_model(model, save_directory=str(folder), tokenizer=tokenizer, progressbar=False)
    assert transformers.AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.intermediate_size == report.model.config.intermediate_size < 48
    generate = transformers.pipeline("text-generation", model=str(folder))
    prompt = "w1 w2 w3"
    text = generate(prompt, max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = report.model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :]
    assert text.split() == tokenizer.decode(expected, skip_special_tokens=True).split()


@pytest.mark.parametrize(
    "kv_heads, grouping, keep, queries_removed, kv_removed, words",
    [
        (2, "kv_group", [True, False], 3, 1, "1 KV group (3 query heads)"),
        (2, "query_head", [True, False, True, True, True, False], 2, 0, "2 query heads (1 in each of the 2 KV groups"),
        (6, "kv_group", [True, False, True, True, False, True], 2, 2, "2 attention heads"),
    ],
    ids=["kv_groups", "query_heads", "multi_head"],
)
def test_export_report_words_removed_heads_as_the_config_counts_them(
    kv_heads, grouping, keep, queries_removed, kv_removed, words, tmp_path
):
    """6 query heads sharing 2 KV heads (or 6 of each): removing one KV group removes 3 query heads, which the
    report, the streaming export's report and the exported model's card say (not "1 heads"), in agreement with
    the exported config."""
    from peft_loraprune.export.streaming import stream_export
    from peft_loraprune.hub.model_card import write_export_card
    from peft_loraprune.pruning.structure import find_structured_groups

    config = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoRAPruneConfig(task_type="CAUSAL_LM", head_grouping=grouping))
    for g in find_structured_groups(model.base_model, "default"):
        if g.spec.structure == "heads":
            g.apply("default", torch.tensor(keep))
    model.save_pretrained(tmp_path / "adapter")
    sparsity = model.sparsity_report()
    streamed = stream_export(str(tmp_path / "adapter"), str(tmp_path / "stream"), progressbar=False)
    report = export_pruned_model(model, progressbar=False)
    after = report.model.config
    assert (6 - after.num_attention_heads, kv_heads - after.num_key_value_heads) == (queries_removed, kv_removed)
    for r in (report, streamed):
        assert r.removed_per_block()["heads"].startswith(words)
        assert f"removed per block: {words}" in str(r)
    card = write_export_card(str(tmp_path / "stream"), model.peft_config["default"], sparsity, streamed)
    assert f"Removed per block: {words}" in open(card).read()
