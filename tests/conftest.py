"""Tiny models built from configs (random weights, no download) for every family the tests cover."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers

import peft_loraprune  # noqa: F401  (registers the method)

FAMILIES = ("llama", "bert", "vit", "gpt2")


def make_config(family: str):
    if family == "llama":  # grouped-query attention: 4 query heads in 2 KV groups, explicit head_dim
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            max_position_embeddings=64,
        )
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
    if family == "vit":
        return transformers.ViTConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=8,
            patch_size=4,
            num_channels=1,
            num_labels=3,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(family)


TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "vit": None}
AUTO = {
    "llama": transformers.AutoModelForCausalLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "bert": transformers.AutoModelForSequenceClassification,
    "vit": transformers.AutoModelForImageClassification,
}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AUTO[family].from_config(make_config(family))
    model.eval()
    return model


def make_inputs(family: str, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}
    ids = torch.randint(1, 64, (batch, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="session", autouse=True)
def shared_asset_cache(tmp_path_factory):
    """One cache of converted offline assets (SmolLM2's float32 checkpoint) for the whole session, fresh per
    session: the conversion from GGUF runs once, not in every example and benchmark smoke test."""
    if "LORAPRUNE_CACHE" not in os.environ:
        os.environ["LORAPRUNE_CACHE"] = str(tmp_path_factory.mktemp("asset_cache"))
    yield os.environ["LORAPRUNE_CACHE"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def pytest_sessionstart(session):
    """The versions under test, first thing in the output even with -q (the version matrix runs the suite on
    several)."""
    from importlib.metadata import version

    names = ("torch", "peft", "transformers", "accelerate", "safetensors")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("peft_loraprune under " + ", ".join(f"{n} {version(n)}" for n in names))
