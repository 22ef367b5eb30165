"""The README's generated blocks: the benchmark bullets, the demos' output, the cost and big-models blocks. Each
block sits between two markers; a marker missing from the README raises (README_BLOCKS lists them)."""

from __future__ import annotations

import re

import report_big_models
from report_common import HERE, load, memory_keys, on_gpu, replace_block, with_rewrites_words
from report_cost import element_breakdown_rows, masked_blocks_rows, memory_profile_rows
from report_peers import granularity_of, peers_verdicts, table_of, tag_words
from stats import mean_of


def readme_summary() -> list[str]:
    """Bullets for README's Benchmarks section, computed from the result files like RESULTS.md."""
    out = []
    for file_name, data in load("peers_*.json").items():
        rows = data["rows"]
        task = data["settings"]["task"]
        granularity = granularity_of(data)
        table = table_of(data, file_name)
        if not table["current"]:
            continue  # the README speaks of the current defaults; RESULTS.md keeps the rest
        metric = table["metric"]
        sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}, reverse=True)
        seeds = sorted({r["seed"] for r in rows})
        name = (
            (
                "SmolLM2-135M, held-out perplexity"
                if task == "smollm2"
                else f"MiniLM on Rotten Tomatoes, {data['settings']['max_train_samples']:,d} training sentences, accuracy"
            )
            + ("" if granularity == "structured" else f", {granularity}")
            + tag_words(file_name, data)
        )
        dense = mean_of([r for r in rows if r["method"] == "dense-lora"], metric)
        out.append(
            f"- **Against other pruners** ({name}, seeds {seeds}, {rows[0]['train_tokens']:,d} training tokens"
            + (f"; dense LoRA {dense:.4g}" if dense is not None else "")
            + "):"
        )
        out += [f"  - {v}" for v in peers_verdicts(rows, table, sparsities)]
    for data in load("criteria_*.json").values():
        summary = data["summary"]
        cells = []
        for p in sorted({v.split("%")[0] for v in summary if "%" in v}, key=float, reverse=True):
            at = {v.split(" ", 1)[1]: e["mean"] for v, e in summary.items() if v.startswith(f"{p}% ")}
            cells.append(f"{p}%: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(at.items(), key=lambda kv: kv[1])))
        out.append(
            f"- **Criterion study** (SmolLM2-135M, {data['settings']['train_tokens']:,d} training tokens, seeds "
            f"{data['settings']['seeds']}; held-out perplexity, lower is better): " + "; ".join(cells) + "."
        )
    for data in load("step_cost_*.json").values():
        s = data["settings"]
        rows = {r["config"]: r for r in data["rows"]}
        label, _, vs_lora, _ = memory_keys(data)

        parts = [
            f"{c} {r['time_vs_lora']:.2f}x time{with_rewrites_words(r)} / {r[vs_lora]:.2f}x {label}"
            for c, r in rows.items()
            if c != "lora" and "time_vs_lora" in r
        ]
        where = f", {data['machine']['cuda']}, {s.get('dtype')}" if on_gpu(data) else ""
        where += f", {s['note']}" if s.get("note") else ""
        if parts:
            out.append(
                f"- **Step cost vs plain LoRA** ({s['model']}, {s['batch']} x {s['seq']} tokens{where}, "
                f"{data['machine']['date'][:10]}, peft_loraprune {data['machine'].get('peft_loraprune')}): "
                + "; ".join(parts)
                + "."
            )
    return out


def demo_text_classification(data) -> list[str]:
    """README block of ``make demo`` from ``demo_text_classification.json``."""
    r = data["result"]
    e = r["export"]
    m = data["machine"]
    mib = 2**20
    return [
        f"What it printed here ({m['cpu_count']} CPU cores, {r['wall_seconds'] / 60:.0f} min for the whole `make demo`, "
        f"peak RSS {r['peak_rss_mib_children'] / 1024:.1f} GB; peft_loraprune {m.get('peft_loraprune')}, criterion "
        f"`{r['settings']['importance'] or 'default'}`, {m['date'][:10]}):",
        "",
        f"| | test accuracy ({r['sizes']['test']:,d} sentences) |",
        "|---|---:|",
        f"| dense LoRA (r={r['settings']['lora_r']}, same steps) | {r['dense_lora']['test_accuracy']:.4f} |",
        f"| LoRAPrune, {r['loraprune']['sparsity']:.0%} of heads and channels pruned (masked) | "
        f"{r['loraprune']['test_accuracy']:.4f} |",
        f"| exported (channels removed, heads zeroed) and reloaded | {e['test_accuracy_after_reload']:.4f} |",
        "",
        "| exported model | before | after |",
        "|---|---:|---:|",
        f"| parameters | {e['params_before']:,d} | {e['params_after']:,d} |",
        f"| weights in the adapted encoder linears | {r['loraprune']['weights_in_adapted_modules']:,d} | "
        f"{r['loraprune']['weights_kept_in_adapted_modules']:,d} kept |",
        f"| size (fp32) | {e['bytes_before'] / mib:.1f} MiB | {e['bytes_after'] / mib:.1f} MiB |",
        f"| CPU latency, batch {e['latency_batch'][0]} x {e['latency_batch'][1]} tokens | "
        f"{e['latency_before_ms']:.1f} ms | {e['latency_after_ms']:.1f} ms (x{e['speedup']:.2f}) |",
    ] + (["", data["conditions"]] if data.get("conditions") else [])


def demo_causal_lm(data) -> list[str]:
    """README block of ``make demo-lm`` from ``demo_causal_lm.json``."""
    r = data["result"]
    m = data["machine"]
    runs = r["runs"]
    s = r["settings"]
    first = runs[0]["export"]
    lines = [
        f"What it printed here ({m['cpu_count']} CPU cores, {r['wall_seconds'] / 60:.0f} min for the whole `make "
        f"demo-lm`; peft_loraprune {m.get('peft_loraprune')}, criterion `{s['importance'] or 'default'}`, "
        f"{m['date'][:10]}): {s['max_steps']} steps of {s['batch_size']} x {r['block_size']} tokens on "
        f"{r['train_blocks']:,d} Wikipedia blocks, perplexity on {r['test_blocks']} held-out blocks.",
        "",
        "| target | pruned (channels / heads) | perplexity masked | exported + reloaded | parameters | CPU latency |",
        "|---|---|---:|---:|---:|---:|",
        f"| dense base | 0 / 0 | {r['dense_perplexity']:.2f} | | {first['params_before'] / 1e6:.1f}M | "
        f"{first['latency_before_ms']:.1f} ms |",
    ]
    for run in runs:
        e = run["export"]
        units = run["sparsity_by_unit"]
        lines.append(
            f"| {run['target_sparsity']:.0%} | {units.get('channels', 0):.1%} / {units.get('heads', 0):.1%} | "
            f"{run['perplexity_masked']:.2f} | {run['perplexity_exported_reloaded']:.2f} | "
            f"{e['params_after'] / 1e6:.1f}M | {e['latency_after_ms']:.1f} ms (x{e['speedup']:.2f}) |"
        )
    return lines


def demo_command_line(data) -> list[str]:
    """README block of the Evaluate section: the commands run on ``make demo-lm``'s 50% adapter and their output."""
    steps = data["result"].get("command_line")
    if not steps:
        return []
    m = data["machine"]
    lines = [
        f"What they printed here on `make demo-lm`'s 50% adapter (peft_loraprune {m.get('peft_loraprune')}, "
        f"{m['date'][:10]}; paths shortened, evaluation limited to the first documents of each local task):",
        "",
        "```",
    ]
    for step in steps[1:]:  # the first one only writes the local tasks
        command = step["command"].replace(str(HERE.parent) + "/", "")
        lines.append("$ " + " ".join(part.rsplit("/", 3)[-1] if "/" in part else part for part in command.split()))
        output = re.sub(r"/tmp/\w+/cli/", "", step["stdout"])  # the walkthrough's temporary folder
        lines += [line for line in output.strip().splitlines() if line.strip()][-12:]
    return [*lines, "```"]


def _demo(name: str):
    found = load(f"demo_{name}.json")
    return next(iter(found.values())) if found else None


def cost_lines() -> list[str]:
    cost = []
    for data in load("memory_profile_*.json").values():
        s = data["settings"]
        cost += [
            f"Measured with `benchmarks/memory_profile.py` ({s['model']}, batch {s['batch']} x {s['seq']} tokens, "
            f"{data['machine']['date'][:10]}, peft_loraprune {data['machine'].get('peft_loraprune')}"
            + (f"; {data['label']}" if data.get("label") else "")
            + "):",
            "",
            *memory_profile_rows(data),
            "",
        ]
    for data in load("masked_blocks_*.json").values():
        cost += [*masked_blocks_rows(data), ""]
    for data in load("element_step_breakdown_*.json").values():
        cost += [*element_breakdown_rows(data), ""]
    return cost


# every generated block of the README: (marker name, what renders it); both markers must be present
README_BLOCKS = (
    ("benchmarks", readme_summary),
    ("demo:text_classification", lambda: demo_text_classification(_demo("text_classification"))),
    ("demo:causal_lm", lambda: demo_causal_lm(_demo("causal_lm"))),
    ("demo:command_line", lambda: demo_command_line(_demo("causal_lm"))),
    ("cost", cost_lines),
    ("big-models", report_big_models.readme_lines),
)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start (generated by benchmarks/report.py) -->", f"<!-- {name}:end -->"


def update_readme(readme=HERE.parent / "README.md") -> None:
    """Regenerate every block of README_BLOCKS in place; a missing marker raises before anything is written."""
    text = readme.read_text()
    for name, render in README_BLOCKS:
        text = replace_block(text, *markers(name), render())
    readme.write_text(text)
