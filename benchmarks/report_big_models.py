"""The "big models" part of the report: quantized bases (``quantized_bases.py``) and the streaming export
(``streaming_export.py``), as RESULTS.md tables and README lines. Every number is read from the result files;
``report.py`` calls :func:`section` and :func:`readme_lines`."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASE_NAMES = {"bf16": "bf16 (float32 weights, bf16 autocast)", "int8": "LLM.int8", "nf4": "NF4, double quant"}

#: the issue's goals, shown beside the measurements (a miss is marked, not hidden)
PERPLEXITY_GOAL = 1.05  # a 4-bit base's structured export within 5% of the bf16 base's
STEP_GOAL = 1.15  # step time vs plain QLoRA on the same base
MEMORY_GOAL = 1.10  # peak memory vs plain QLoRA on the same base


def _load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cell(r: dict) -> str:
    gradient = r.get("element_mask_gradient") or "exact"
    return f"{r['granularity']} {r['sparsity']:.0%}" + ("" if gradient == "exact" else f" ({gradient} gradient)")


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _mark(value, goal) -> str:
    return "" if value is None or value <= goal else " (over the goal)"


def quantized_rows(data: dict) -> list[str]:
    """One line per LoRAPrune run: exported perplexity and its ratio to the bf16 base's, the mask overlap with the
    bf16 run, and step time and peak RSS against plain LoRA on the same base; then plain LoRA per base."""
    rows = data["rows"]
    lines = [
        "| cell | base | tokens | exported perplexity | vs bf16 base | on its quantized base | masks shared with bf16 | "
        "masks shared with seed 0 | step vs QLoRA | peak RSS vs QLoRA | step (s) | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    loraprune = [r for r in rows if r["method"] == "loraprune"]
    order = {"bf16": 0, "int8": 1, "nf4": 2}
    key = lambda r: (r["tokens"], _cell(r), r["seed"], order[r["base"]])  # noqa: E731
    for r in sorted(loraprune, key=key):
        ratio = r.get("perplexity_vs_bf16") if r["base"] != "bf16" else None
        lines.append(
            f"| {_cell(r)} (seed {r['seed']}) | {BASE_NAMES[r['base']]} | {r['tokens']:,d} | {r['perplexity']:.2f} | "
            f"{_fmt(ratio)}{_mark(ratio, PERPLEXITY_GOAL) if r['granularity'] == 'structured' else ''} | "
            f"{r['perplexity_adapter']:.2f} | {_fmt(r.get('mask_overlap_with_bf16'), '{:.1%}')} | "
            f"{_fmt(r.get('mask_overlap_with_seed0'), '{:.1%}')} | "
            f"{_fmt(r.get('step_time_vs_lora'))}{_mark(r.get('step_time_vs_lora'), STEP_GOAL)} | "
            f"{_fmt(r.get('peak_rss_vs_lora'))}{_mark(r.get('peak_rss_vs_lora'), MEMORY_GOAL)} | "
            f"{r['median_step_s']:.2f} | {r['peak_rss_mib']:,.0f} |"
        )
    lora = (r for r in rows if r["method"] == "lora")
    for r in sorted(lora, key=lambda r: (r["tokens"], r["seed"], order[r["base"]])):
        lines.append(
            f"| plain LoRA, no pruning (seed {r['seed']}) | {BASE_NAMES[r['base']]} | {r['tokens']:,d} | "
            f"{r['perplexity']:.2f} (adapter) | "
            f"{_fmt(r.get('perplexity_vs_bf16') if r['base'] != 'bf16' else None)} | | | | 1 | 1 | "
            f"{r['median_step_s']:.2f} | {r['peak_rss_mib']:,.0f} |"
        )
    return lines


def importance_rows(data: dict) -> list[str]:
    """The criterion before training on each base against the bf16 base's, beside the noise floors."""
    rows = data["rows"]
    levels = sorted(k[len("overlap_") :] for k in rows[1] if k.startswith("overlap_"))
    lines = [
        "| against the bf16 base's criterion | batches | rank correlation (Spearman) | "
        + " | ".join(f"pruned units shared at {level}" for level in levels)
        + " |",
        "|---|---:|---:|" + "---:|" * len(levels),
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['variant']} | {r['batches']} | {r['spearman']:.3f} | "
            + " | ".join(f"{r['overlap_' + level]:.1%}" for level in levels)
            + " |"
        )
    return lines


def streaming_lines(data: dict) -> list[str]:
    rows = {("memory" if r["in_memory"] else "stream"): r for r in data["rows"]}
    stream, memory = rows["stream"], rows["memory"]
    return [
        f"Command-line export of a {data['parameters'] / 1e9:.2f}B-parameter {data['model']} "
        f"({data['model_bf16_mib']:,.0f} MiB in bf16), {data['adapter']}; peak resident memory of the export "
        f"process: streaming {stream['peak_rss_mib']:,.0f} MiB ({stream['peak_rss_vs_bf16_model']:.2f}x the model) "
        f"in {stream['wall_s']:.0f} s, `--in_memory` {memory['peak_rss_mib']:,.0f} MiB "
        f"({memory['peak_rss_vs_bf16_model']:.2f}x) in {memory['wall_s']:.0f} s; tensors "
        + ("identical." if data["identical_tensors"] else "DIFFERENT (a bug).")
    ]


def _machine(data: dict) -> str:
    m = data["machine"]
    bnb = f", bitsandbytes {m['bitsandbytes']}" if m.get("bitsandbytes") else ""
    return f"{m['cpu_count']} CPUs, torch {m['torch']}, transformers {m['transformers']}{bnb}, {m['date'][:10]}"


def section(lines: list[str]) -> None:
    """RESULTS.md: the quantized-base table and the streaming-export line, where their files exist."""
    quantized, streaming = _load("quantized_bases_smollm2"), _load("streaming_export_llama-1b")
    if not (quantized or streaming):
        return
    lines += ["## Big models: quantized bases and the streaming export", ""]
    if quantized:
        s = quantized["settings"]
        tokens = sorted({r["tokens"] for r in quantized["rows"]})
        lines += [
            f"SmolLM2-135M on the Wikipedia leads, {', '.join(f'{t:,d}' for t in tokens)} training tokens per run "
            f"(batch {s['batch']} x {s['block_size']}; the same budget for every base), held-out perplexity of the "
            "export (a quantized base's adapter merged into the original float32 checkpoint, exported in bf16); "
            f"{_machine(quantized)}. Mask overlap: {quantized['mask_overlap_definition']}.",
            "",
            *quantized_rows(quantized),
            "",
        ]
    importance = _load("quantized_importance_smollm2")
    if importance:
        s = importance["settings"]
        lines += [
            "Why the masks differ (`benchmarks/quantized_importance.py`): the default criterion accumulated over the "
            f"same {s['batches']} training batches of {s['batch']} x {s['block_size']} tokens on each base, with a "
            "fresh adapter and no training step, so that only the base differs; the rows below the quantized bases "
            f"are the noise floors of the bf16 base itself (other batches; two halves). {importance['definition']}; "
            f"{_machine(importance)}.",
            "",
            *importance_rows(importance),
            "",
        ]
    if streaming:
        lines += [*streaming_lines(streaming), f"({_machine(streaming)})", ""]


def _on_its_base(r: dict) -> str:
    """`` (the adapter on its own <base> base: <ppl>, <ratio>x)``: the model as trained, before the export merges the
    adapter into the original-precision weights; the ratio is to the bf16 run's exported perplexity."""
    if r.get("perplexity_adapter") is None or not r.get("perplexity_vs_bf16"):
        return ""
    bf16 = r["perplexity"] / r["perplexity_vs_bf16"]
    as_trained = r.get("perplexity_export_as_trained")
    exported = f"; exported with `--quantized_as`: {as_trained:.2f}, {_fmt(as_trained / bf16)}x" if as_trained else ""
    return (
        f" (the adapter on its own {BASE_NAMES[r['base']]} base: {r['perplexity_adapter']:.2f}, "
        f"{_fmt(r['perplexity_adapter'] / bf16)}x{exported})"
    )


def readme_lines() -> list[str]:
    """README bullets for the "Big models" section."""
    out = []
    quantized = _load("quantized_bases_smollm2")
    if quantized:
        rows = [r for r in quantized["rows"] if r["method"] == "loraprune" and r["base"] != "bf16"]
        tokens = sorted({r["tokens"] for r in quantized["rows"]})
        for r in sorted(rows, key=lambda r: (r["base"], _cell(r), r["tokens"], r["seed"])):
            # each clause only where its reference run exists (a longer run may have no plain-QLoRA twin, and the
            # bf16 run's masks may not have been kept)
            clauses = [
                f"exported perplexity {r['perplexity']:.2f}, {_fmt(r.get('perplexity_vs_bf16'))}x the bf16 base's"
                + _on_its_base(r)
            ]
            if r.get("mask_overlap_with_bf16") is not None:
                clauses.append(f"{r['mask_overlap_with_bf16']:.0%} of the bf16 run's pruned units pruned too")
            if r.get("step_time_vs_lora") is not None:
                clauses.append(
                    f"step {r['step_time_vs_lora']:.3f}x and peak RSS {r['peak_rss_vs_lora']:.3f}x plain QLoRA on the "
                    "same base"
                )
            out.append(
                f"- {BASE_NAMES[r['base']]} base, {_cell(r)} (SmolLM2-135M, {r['tokens']:,d} tokens, seed {r['seed']}): "
                + "; ".join(clauses)
                + "."
            )
        lora = [r for r in quantized["rows"] if r["method"] == "lora" and r["base"] != "bf16"]
        if lora:
            out.append(
                "- Plain LoRA without pruning, for scale (what quantizing costs this 135M model by itself): "
                + "; ".join(
                    f"{BASE_NAMES[r['base']]} {_fmt(r.get('perplexity_vs_bf16'))}x the bf16 base's perplexity "
                    f"({r['tokens']:,d} tokens, seed {r['seed']})"
                    for r in sorted(lora, key=lambda r: (r["base"], r["tokens"], r["seed"]))
                )
                + "."
            )
        if out:
            out.insert(
                0,
                f"Measured (`benchmarks/quantized_bases.py`, {_machine(quantized)}, "
                f"{', '.join(f'{t:,d}' for t in tokens)} training tokens per run; table in RESULTS.md). Goals: "
                f"an export within {PERPLEXITY_GOAL - 1:.0%} of the bf16 base's perplexity, a step at most "
                f"{STEP_GOAL}x and peak memory at most {MEMORY_GOAL}x plain QLoRA's on the same base:",
            )
    importance = _load("quantized_importance_smollm2")
    if importance:
        by = {r["variant"]: r for r in importance["rows"]}
        low = min(k[len("overlap_") :] for k in importance["rows"][1] if k.startswith("overlap_"))

        def pair(r):
            return f"{r['spearman']:.2f} and {r['overlap_' + low]:.0%}"

        batches = importance["settings"]["batches"]
        out.append(
            "- Why the masks differ (`benchmarks/quantized_importance.py`: the criterion over the same "
            f"{batches} batches before any training step; rank correlation with the bf16 base's scores, and the "
            f"share of its pruned units also pruned, at {low}): "
            + "; ".join(f"{BASE_NAMES[b]}: {pair(by[b])}" for b in ("int8", "nf4") if b in by)
            + f"; {batches} other batches on the bf16 base itself: {pair(by['bf16, other batches'])}."
        )
    streaming = _load("streaming_export_llama-1b")
    if streaming:
        out += [f"- {streaming_lines(streaming)[0]}"]
    return out
