"""The command line and lm-eval, offline: a tiny Llama with a word-level tokenizer, a local multiple-choice task."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_model
from helpers import random_prune, randomize_adapter
from huggingface_hub import ModelCard
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig
from peft_loraprune.cli import main

pytest.importorskip("lm_eval")

DOCS = [
    {"text": "a warm and funny film", "label": 1},
    {"text": "dull and far too long", "label": 0},
    {"text": "the best film of the year", "label": 1},
    {"text": "a tired and empty story", "label": 0},
    {"text": "funny warm and smart", "label": 1},
    {"text": "long dull empty", "label": 0},
]
TASK_YAML = """task: tiny_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in DOCS for w in d["text"].split()} | {"Review:", "Sentiment:", "negative", "positive"})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "[PAD]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model folder (with tokenizer), a 50%-pruned LoRAPrune adapter of it, and a local task."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    model = get_peft_model(base, LoRAPruneConfig(task_type="CAUSAL_LM", head_grouping="query_head"))
    randomize_adapter(model, seed=3)
    random_prune(model, 0.5, seed=1)
    model.eval()  # dropout off: outputs are deterministic
    model.save_pretrained(root / "adapter")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny.yaml").write_text(TASK_YAML.format(data=json.dumps(str(tasks / "tiny.jsonl"))))
    return {
        "root": root,
        "base": str(root / "base"),
        "adapter": str(root / "adapter"),
        "tasks": str(tasks),
        "model": model,
        "tokenizer": tokenizer,
    }


def hand_accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy by summing log-probabilities of each choice's tokens, computed here directly."""
    correct = 0
    for doc in DOCS:
        context = f"Review: {doc['text']}\nSentiment:"
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in ("negative", "positive"):
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        correct += int(max(range(2), key=lambda i: scores[i]) == doc["label"])
    return correct / len(DOCS)


def test_report_prints_the_sparsity_of_the_saved_masks(saved, capsys):
    assert main(["report", saved["adapter"]]) == 0
    out = capsys.readouterr().out
    expected = saved["model"].base_model.sparsity_report()
    assert expected.summary() in out
    assert expected.markdown_table() in out


def test_export_writes_a_smaller_model_in_the_dtype_asked_for(saved, capsys):
    full, half = saved["root"] / "exported", saved["root"] / "exported_bf16"
    assert main(["export", saved["adapter"], "--out", str(full)]) == 0
    assert main(["export", saved["adapter"], "--out", str(half), "--dtype", "bfloat16"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(full)
    assert exported.config.intermediate_size == 24  # half of the 48 channels removed
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in saved["model"].parameters())
    ids = torch.tensor([[3, 5, 7, 9, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, saved["model"](input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    halved = transformers.AutoModelForCausalLM.from_pretrained(half)
    assert halved.dtype == torch.bfloat16
    reference = exported.state_dict()
    for key, value in halved.state_dict().items():
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key  # the same weights, exact zeros kept
    card = ModelCard.load(full / "README.md")
    assert "Pruned with LoRAPrune" in card.text and card.data.base_model == saved["base"]
    assert transformers.AutoTokenizer.from_pretrained(full).get_vocab() == saved["tokenizer"].get_vocab()


def test_eval_of_an_adapter_matches_a_hand_computation_and_lands_on_the_card(saved, capsys, tmp_path):
    results_file = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            saved["adapter"],
            "--tasks",
            "tiny_sentiment",
            "--include_path",
            saved["tasks"],
            "--output",
            str(results_file),
            "--card",
        ]
    )
    assert rc == 0
    acc = json.loads(results_file.read_text())["tiny_sentiment"]["acc,none"]
    assert acc == pytest.approx(hand_accuracy(saved["model"], saved["tokenizer"]))
    card = ModelCard.load(Path(saved["adapter"]) / "README.md")
    entries = card.data.eval_results
    assert [(e.dataset_type, e.metric_type) for e in entries] == [("tiny_sentiment", "acc")]
    assert entries[0].metric_value == pytest.approx(acc)
    assert "## LoRAPrune" in card.text  # the adapter's own section is kept
    # the card's digest-protected neighbours still load
    assert main(["report", saved["adapter"], "--summary_only"]) == 0


def test_recorded_results_are_written_by_save_pretrained(saved, tmp_path):
    model = saved["model"]
    model.base_model.record_eval_results({"tiny_sentiment": {"acc,none": 0.5, "acc_stderr,none": 0.2}})
    model.save_pretrained(tmp_path / "with_results")
    entries = ModelCard.load(tmp_path / "with_results" / "README.md").data.eval_results
    assert [(e.dataset_type, e.metric_type, e.metric_value) for e in entries] == [("tiny_sentiment", "acc", 0.5)]


def test_lm_eval_command_line_loads_a_loraprune_adapter(saved, tmp_path):
    """``peft-loraprune lm-eval ... peft=ADAPTER`` is lm-eval's own CLI with the method registered."""
    out = tmp_path / "lm_eval_out"
    rc = main(
        [
            "lm-eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={saved['base']},peft={saved['adapter']}",
            "--tasks",
            "tiny_sentiment",
            "--include_path",
            saved["tasks"],
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ]
    )
    assert rc == 0
    written = list(out.rglob("results*.json"))
    assert written
    acc = json.loads(written[0].read_text())["results"]["tiny_sentiment"]["acc,none"]
    assert acc == pytest.approx(hand_accuracy(saved["model"], saved["tokenizer"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "/no/such/adapter"], "does not exist"),
        (["export", "/no/such/adapter", "--out", "/tmp/x"], "does not exist"),
        (["eval", "/no/such/model", "--tasks", "x"], "does not exist"),
    ],
)
def test_missing_paths_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0]


def test_a_base_that_does_not_fit_and_an_unknown_task_are_one_line_errors(saved, capsys, tmp_path):
    other = make_model("llama")
    other.config.hidden_size = 32
    wider = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(saved["tokenizer"]),
    )
    transformers.AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wider")
    capsys.readouterr()
    assert main(["report", saved["adapter"], "--base", str(tmp_path / "wider")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "does not fit the base model" in err[0]
    assert main(["eval", saved["adapter"], "--tasks", "no_such_task", "--include_path", saved["tasks"]]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "unknown lm-eval task" in err[0] and "no_such_task" in err[0]


def error_lines(stderr: str) -> list[str]:
    """What the CLI itself printed (transformers' loading progress bars aside); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("peft-loraprune")]


def test_console_script_is_installed():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "peft-loraprune"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "report" in out.stdout and "export" in out.stdout


def test_version_and_plain_text_help_with_every_option_explained(capsys):
    import argparse

    import peft_loraprune
    from peft_loraprune.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"peft-loraprune {peft_loraprune.__version__}"
    parser = build_parser()
    assert "``" not in parser.format_help()  # plain text, not reStructuredText
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subparsers.choices.items():
        if name == "lm-eval":  # lm-eval's own options, documented by lm-eval
            continue
        undocumented = [a.dest for a in sub._actions if not a.help and a.dest != "help"]
        assert not undocumented, f"{name}: options without help: {undocumented}"


def test_report_and_export_name_the_method_of_an_adapter_that_is_not_loraprune(saved, capsys, tmp_path):
    """A plain LoRA adapter has no masks: the commands say which method it is, not that it "does not fit the
    base" (what reading it as LoRAPrune ended in), and write nothing."""
    from peft import LoraConfig

    base = transformers.AutoModelForCausalLM.from_pretrained(saved["base"])
    lora = tmp_path / "lora"
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])).save_pretrained(lora)
    assert json.loads((lora / "adapter_config.json").read_text())["peft_type"] == "LORA"
    out = str(tmp_path / "out")
    capsys.readouterr()
    for argv in (
        ["report", str(lora)],
        ["export", str(lora), "--out", out],
        ["export", str(lora), "--out", out, "--in_memory"],
    ):
        assert main(argv) == 2, argv
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "is a LORA adapter" in err[0] and "not a LoRAPrune one" in err[0], err
        assert "does not fit" not in err[0]
    assert not (tmp_path / "out").exists()


def test_loading_without_the_method_registered_says_to_import_the_package(saved, capsys, monkeypatch):
    """PEFT's own error for a LoRAPrune adapter in a process that never imported peft_loraprune is a bare
    KeyError: 'LORAPRUNE'. Simulated here by taking the method out of PEFT's mappings: the package's loaders and
    every command that loads an adapter say what to do instead."""
    from peft import PeftModel, mapping
    from peft.utils.peft_types import PeftType

    from peft_loraprune.hub.evaluation import load_adapter_model
    from peft_loraprune.registration import MethodNotRegisteredError

    for table in (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING):
        monkeypatch.delitem(table, PeftType.LORAPRUNE)
    base = transformers.AutoModelForCausalLM.from_pretrained(saved["base"])
    with pytest.raises(KeyError, match="LORAPRUNE"):  # what PEFT says
        PeftModel.from_pretrained(base, saved["adapter"])
    with pytest.raises(MethodNotRegisteredError, match="`import peft_loraprune` registers it"):
        load_adapter_model(saved["adapter"])
    capsys.readouterr()
    for argv in (
        ["report", saved["adapter"]],
        ["export", saved["adapter"], "--out", "/nonexistent/never_written", "--in_memory"],
        ["eval", saved["adapter"], "--tasks", "tiny_sentiment", "--include_path", saved["tasks"]],
    ):
        assert main(argv) == 2, argv
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "import peft_loraprune" in err[0] and "KeyError: 'LORAPRUNE'" in err[0], err
