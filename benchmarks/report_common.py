"""What every part of the report shares: loading result files, the machine line, memory keys, ratio cells, and
replacing a generated block between two markers (a missing marker raises)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def load(pattern):
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))}


def machine(data) -> str:
    m = data["machine"]
    return (
        f"{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads)"
        f"{', ' + m['cuda'] if m.get('cuda') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, peft_loraprune {m.get('peft_loraprune')}; {m['date']}"
    )


def on_gpu(data) -> bool:
    return data["settings"].get("device", "cpu").startswith("cuda")


def memory_keys(data) -> tuple[str, str, str, str]:
    """(label, peak key, vs-LoRA key, vs-grad key): device memory on a GPU, resident memory on a CPU."""
    if on_gpu(data):
        return "peak GPU memory", "cuda_max_allocated_mib", "gpu_memory_vs_lora", "gpu_memory_vs_grad"
    return "peak RSS", "peak_rss_mib", "rss_vs_lora", "rss_vs_grad"


def ratio(row: dict, key: str) -> str:
    """A ratio cell: three decimals, "n/a" where the row has none (no baseline in its round)."""
    value = row.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def rewrites_removed_weights(row: dict) -> bool:
    """Whether a step-cost row's mask rewrites were timed removing weights (rows written before ``step_cost.py``
    recorded ``rewrite_sparsities`` timed rewrites to the sparsity already reached, which skip the selection)."""
    return bool(row.get("rewrite_sparsities"))


def with_rewrites_words(row: dict) -> str:
    amortised = row.get("amortised_time_vs_lora")
    if not rewrites_removed_weights(row) or amortised is None:
        return ""
    return f" ({amortised:.2f}x with mask rewrites)"


def replace_block(text: str, start: str, end: str, lines: list[str]) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers replaced by ``lines``."""
    missing = [marker for marker in (start, end) if marker not in text]
    if missing:
        raise ValueError(f"generated block markers missing from the document: {missing}")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return head + start + "\n" + "\n".join(lines) + "\n" + end + tail
