"""The LoRAPrune section of an adapter's model card (``README.md``), written next to the adapter files.

PEFT writes a generic card first (library, base model, PEFT version); this module adds tags and a section saying
what was pruned and how, so a user browsing the Hub sees the method, criterion, granularity, the sparsity reached
overall and per layer, and the library versions. Uses ``huggingface_hub.ModelCard`` (the same class PEFT and
transformers use), so the YAML metadata stays valid.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCard, ModelCardData

SECTION_START = "<!-- loraprune:start -->"
SECTION_END = "<!-- loraprune:end -->"
_LIBRARIES = ("peft_loraprune", "peft", "transformers", "torch", "accelerate")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def render_section(config, report) -> str:
    """Markdown of the LoRAPrune section for ``config`` (a LoRAPruneConfig) and a ``SparsityReport``."""
    by_unit = ", ".join(f"{unit}: {s:.2%}" for unit, s in report.sparsity_by_unit().items()) or "n/a"
    lines = [
        SECTION_START,
        "## LoRAPrune",
        "",
        "This adapter was trained with [LoRAPrune](https://arxiv.org/abs/2305.18403) (`peft_loraprune`): LoRA "
        "fine-tuning that prunes the base model, guided by importance estimated from the adapter's weights and "
        "gradients. The adapter stores the pruning masks; load it with `import peft_loraprune` and "
        "`PeftModel.from_pretrained`.",
        "",
        f"- Base model: `{config.base_model_name_or_path or 'unknown'}`",
        "- Method: LoRAPrune",
        f"- Importance criterion: `{config.importance}`",
        f"- Granularity: `{config.granularity}`"
        + (f" (pruned structures: {', '.join(config.prune_structures)})" if config.granularity == "structured" else ""),
        f"- Adaptation: `{config.adaptation}`; rank {config.r}, alpha {config.lora_alpha}",
        f"- Budget: `{config.budget}`; schedule: `{config.schedule}`, pruning every {config.pruning_interval} steps",
        f"- Target sparsity: {report.target_sparsity:.2%}",
        f"- Sparsity reached: {report.sparsity:.2%} ({by_unit})",
        f"- Weights kept in adapted modules: {report.weights_kept:,d} of {report.weights_total:,d} "
        f"({1 - report.weight_sparsity:.2%})",
        "",
        "### Sparsity per layer",
        "",
        report.markdown_table(),
        "",
        "### Library versions",
        "",
        *[f"- {name}: {_version(name)}" for name in _LIBRARIES],
        SECTION_END,
    ]
    return "\n".join(lines)


def write_model_card(directory: str, config, report) -> str:
    """Create or update ``directory/README.md`` with the LoRAPrune section (replacing an older one)."""
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    tags = set(card.data.tags or [])
    tags.update({"peft", "loraprune", "pruning", "lora"})
    card.data.tags = sorted(tags)
    if config.base_model_name_or_path and not card.data.get("base_model"):
        card.data["base_model"] = config.base_model_name_or_path
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        head, _, rest = text.partition(SECTION_START)
        _, _, tail = rest.partition(SECTION_END)
        text = head + render_section(config, report) + tail
    else:
        text = text.rstrip() + "\n\n" + render_section(config, report) + "\n"
    card.text = text
    card.save(path)
    return path
