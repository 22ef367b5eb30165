"""The LoRAPrune section of an adapter's model card (``README.md``), written next to the adapter files.

PEFT writes a generic card first (library, base model, PEFT version); this module adds tags and a section saying
what was pruned and how, so a user browsing the Hub sees the method, criterion, granularity, the sparsity reached
overall and per layer, and the library versions; evaluation results (lm-eval) go into the card's model-index
metadata, which the Hub shows as a results table. Uses ``huggingface_hub.ModelCard`` (the same class PEFT and
transformers use), so the YAML metadata stays valid.
"""

from __future__ import annotations

import os
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from .versions import library_versions

SECTION_START = "<!-- loraprune:start -->"
SECTION_END = "<!-- loraprune:end -->"


def render_section(config, report) -> str:
    """Markdown of the LoRAPrune section for ``config`` (a LoRAPruneConfig) and a ``SparsityReport``."""
    by_unit = ", ".join(f"{unit}: {s:.2%}" for unit, s in report.sparsity_by_unit().items()) or "n/a"
    lines = [
        SECTION_START,
        "## LoRAPrune",
        "",
        "This adapter was trained with [LoRAPrune](https://arxiv.org/abs/2305.18403) (`peft_loraprune`): LoRA "
        "fine-tuning that prunes the base model while it trains, guided by an importance criterion that needs no "
        "gradient of a pretrained weight (the one used is named below). The adapter stores the pruning masks; "
        "load it with `import peft_loraprune` and `PeftModel.from_pretrained`.",
        "",
        f"- Base model: `{config.base_model_name_or_path or 'unknown'}`",
        "- Method: LoRAPrune",
        f"- Importance criterion: `{config.importance}`",
        f"- Granularity: `{config.granularity}`"
        + (
            f" (pruned structures: {', '.join(config.prune_structures)})" if config.granularity == "structured" else ""
        ),
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
        *[f"- {name}: {v}" for name, v in library_versions().items()],
        SECTION_END,
    ]
    return "\n".join(lines)


def _load_card(path: str) -> ModelCard:
    return ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())


def _set_eval_results(card: ModelCard, entries, model_name: Optional[str]) -> None:
    """Merge ``EvalResult`` entries into the card's model-index (a newer value replaces the same task/metric)."""
    if not entries:
        return
    old = list(card.data.eval_results or [])
    keys = {(e.task_type, e.dataset_type, e.metric_type) for e in entries}
    card.data.eval_results = [e for e in old if (e.task_type, e.dataset_type, e.metric_type) not in keys] + list(
        entries
    )
    card.data.model_name = card.data.model_name or model_name or "model"


def write_eval_results(directory: str, entries, model_name: Optional[str] = None) -> str:
    """Add evaluation results (``huggingface_hub.EvalResult``) to ``directory/README.md`` as Hub model-index
    metadata, creating the card if there is none. Returns the card's path."""
    path = os.path.join(directory, "README.md")
    card = _load_card(path)
    _set_eval_results(card, entries, model_name or os.path.basename(os.path.abspath(directory)))
    card.save(path)
    return path


def write_model_card(directory: str, config, report, eval_results=None) -> str:
    """Create or update ``directory/README.md`` with the LoRAPrune section (replacing an older one), and the
    evaluation results recorded for the adapter, if any, as model-index metadata."""
    path = os.path.join(directory, "README.md")
    card = _load_card(path)
    _set_eval_results(card, eval_results, os.path.basename(os.path.abspath(directory)))
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


def write_export_card(
    directory: str, config, sparsity_report, export_report, source_adapter: Optional[str] = None, eval_results=None
) -> str:
    """The card of an exported (merged, physically pruned) model: what it was pruned from and by how much."""
    path = os.path.join(directory, "README.md")
    card = _load_card(path)
    card.data.tags = sorted(set(card.data.tags or []) | {"loraprune", "pruning", "pruned"})
    card.data.library_name = "transformers"
    if config.base_model_name_or_path:
        card.data["base_model"] = config.base_model_name_or_path
    _set_eval_results(card, eval_results, os.path.basename(os.path.abspath(directory)))
    lines = [
        SECTION_START,
        "## Pruned with LoRAPrune",
        "",
        f"A plain `transformers` model (load it with `from_pretrained`, no extra package): the LoRAPrune adapter "
        f"{'`' + source_adapter + '` ' if source_adapter else ''}merged into "
        f"`{config.base_model_name_or_path or 'its base model'}`, pruned units removed.",
        "",
        f"- Criterion: `{config.importance}`; granularity: `{config.granularity}`",
        f"- Sparsity: {sparsity_report.sparsity:.2%} of prunable units ("
        + (", ".join(f"{u}: {s:.2%}" for u, s in sparsity_report.sparsity_by_unit().items()) or "n/a")
        + ")",
        f"- Parameters: {export_report.params_before:,d} before, {export_report.params_after:,d} after",
        *[f"- Removed per block: {removed}" for removed in export_report.removed_per_block().values()],
        *[
            f"- Kept in place as zeros: {n} pruned {s} (the config cannot express removing them)"
            for s, n in export_report.kept_zeroed.items()
        ],
        "",
        "### Library versions",
        "",
        *[f"- {name}: {v}" for name, v in library_versions().items()],
        SECTION_END,
    ]
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        head, _, rest = text.partition(SECTION_START)
        text = head + "\n".join(lines) + rest.partition(SECTION_END)[2]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    card.text = text
    card.save(path)
    return path
