"""Render benchmarks/RESULTS.md (tables) and plots from the JSON files in benchmarks/results/.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load(pattern):
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))}


def _machine(data) -> str:
    m = data["machine"]
    return (f"{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads)"
            f"{', ' + m['cuda'] if m.get('cuda') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
            f"peft {m['peft']}; {m['date']}")


def step_cost_section(lines):
    for name, data in _load("step_cost_*.json").items():
        s = data["settings"]
        lines += [f"### Step time and memory: `{s['model']}`, batch {s['batch']} x {s['seq']} tokens", "",
                  f"Machine: {_machine(data)}. Median of {s['steps']} steps after {s['warmup']} warm-up steps; "
                  "each configuration in its own process.", "",
                  "| configuration | step (ms) | of which importance (ms) | time vs LoRA | peak RSS (MiB) | RSS vs LoRA | RSS vs grad |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in data["rows"]:
            lines.append(
                f"| {r['config']} | {r['median_step_s'] * 1000:.1f} | {r['median_importance_s'] * 1000:.1f} | "
                f"{r.get('time_vs_lora', float('nan')):.3f} | {r['peak_rss_mib']:.0f} | {r.get('rss_vs_lora', float('nan')):.3f} | "
                f"{r.get('rss_vs_grad', float('nan')):.3f} |"
            )
        lines.append("")


def step_cost_plot(lines):
    """Claim 1 at a glance: time and peak memory of every configuration relative to plain LoRA, per setting."""
    results = _load("step_cost_*.json")
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, data) in zip(axes[0], results.items()):
        rows = [r for r in data["rows"] if r["config"] != "lora"]
        labels = [r["config"].replace("loraprune_", "").replace("_structured", "") for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["time_vs_lora"] for r in rows], width=0.4, label="step time")
        ax.bar([i + 0.2 for i in x], [r["rss_vs_lora"] for r in rows], width=0.4, label="peak RSS")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.1, color="red", lw=0.8, ls="--", label="1.10x target")
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        s = data["settings"]
        ax.set_title(f"{s['model']}, {s['batch']}x{s['seq']} tokens", fontsize=9)
        ax.set_ylabel("vs plain LoRA")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "step_cost.png", dpi=110)
    plt.close(fig)
    lines += ["![step cost](step_cost.png)", ""]


def export_plot(lines):
    """Claim 4 at a glance: latency of the exported models relative to dense, per batch size."""
    for name, data in _load("export_speed_*.json").items():
        batches = data["settings"]["batches"].split(",")
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        rows = data["rows"]
        x = range(len(rows))
        width = 0.8 / (len(batches) + 1)
        for j, b in enumerate(batches):
            ax.bar([i + j * width for i in x], [r[f"latency_vs_dense_batch{b}"] for r in rows], width=width,
                   label=f"latency, batch {b}")
        ax.bar([i + len(batches) * width for i in x], [r["params_vs_dense"] for r in rows], width=width,
               label="parameters", color="gray")
        ax.axhline(0.6, color="red", lw=0.8, ls="--", label="0.6x target at 50%")
        ax.set_xticks([i + width for i in x], [f"{r['sparsity']:.0%}" for r in rows])
        ax.set_xlabel("structured sparsity")
        ax.set_ylabel("vs dense")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(HERE / f"{name}.png", dpi=110)
        plt.close(fig)
        lines += [f"![export speed]({name}.png)", ""]


def quality_plot(lines):
    """Claim 2 at a glance: accuracy per variant, mean and spread over seeds."""
    for name, data in _load("quality_minilm_*.json").items():
        summary = data["summary"]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        names = list(summary)
        means = [summary[v]["mean"] for v in names]
        stds = [summary[v]["std"] for v in names]
        colors = ["gray" if v == "dense LoRA" else ("C0" if v.startswith("structured") else "C1") for v in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
        for i, v in enumerate(names):
            seeds = [r["test_accuracy"] for r in data["rows"] if r["variant"] == v]
            ax.plot([i] * len(seeds), seeds, "k.", ms=3)
        ax.set_xticks(range(len(names)), [v.replace(" cubic", "").replace("structured", "str.") for v in names],
                      rotation=30, ha="right", fontsize=7)
        ax.set_ylim(min(means) - 0.05, max(means) + 0.03)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"MiniLM, Rotten Tomatoes, 50% sparsity, seeds {data['settings']['seeds']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(HERE / f"{name}.png", dpi=110)
        plt.close(fig)
        lines += [f"![accuracy]({name}.png)", ""]


def export_section(lines):
    for name, data in _load("export_speed_*.json").items():
        s = data["settings"]
        batches = s["batches"].split(",")
        lines += [f"### Exported model speed: `{s['model']}`, {s['seq']} tokens", "", f"Machine: {_machine(data)}.", "",
                  "| sparsity | params | file (MiB) | heads / KV heads / channels | "
                  + " | ".join(f"latency b{b} (ms) | vs dense" for b in batches) + " |",
                  "|---:|---:|---:|---|" + "---:|---:|" * len(batches)]
        for r in data["rows"]:
            cells = " | ".join(f"{r[f'latency_ms_batch{b}']:.1f} | {r[f'latency_vs_dense_batch{b}']:.2f}" for b in batches)
            lines.append(f"| {r['sparsity']:.0%} | {r['params']:,d} | {r['file_bytes'] / 2**20:.1f} | "
                         f"{r['num_attention_heads']} / {r['num_key_value_heads']} / {r['intermediate_size']} | {cells} |")
        lines.append("")


def fidelity_section(lines):
    for name, data in _load("fidelity_*.json").items():
        steps = data["steps"]
        keys = [k for k in steps[0] if "rho" in k and not k.endswith("_min")]
        lines += [f"### Importance fidelity: `{data['settings']['model']}` ({len(steps)} steps)", "",
                  f"Machine: {_machine(data)}. Spearman rank correlation between \"lora\" and \"grad\" scores, mean "
                  "over the second half of the run:", "", "| measure | rho |", "|---|---:|"]
        lines += [f"| {k} | {data['summary_second_half'][k]:.3f} |" for k in keys]
        lines += ["", f"![fidelity]({name}.png)", ""]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for k in keys:
            ax.plot([s["step"] for s in steps], [s[k] for s in steps], label=k)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("Spearman rho (lora vs grad)")
        ax.set_ylim(-0.1, 1.0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(HERE / f"{name}.png", dpi=110)
        plt.close(fig)


def perplexity_section(lines):
    for data in _load("quality_smollm2_*.json").values():
        s = data["settings"]
        lines += [f"### Perplexity: SmolLM2-135M on Wikipedia leads, structured pruning, seeds {s['seeds']}", "",
                  f"Machine: {_machine(data)}. {s['max_steps']} optimizer steps of {s['batch']} x {s['block_size']} "
                  f"tokens ({s['train_tokens']:,d} training tokens), held-out perplexity on {s['max_eval_blocks']} "
                  "blocks; heads and MLP channels pruned together (query heads inside KV groups).", "",
                  "| variant | perplexity (mean ± std, n) | exported + reloaded |", "|---|---:|---:|"]
        for variant, v in data["summary"].items():
            exported = [r.get("perplexity_exported") for r in data["rows"] if r["variant"] == variant]
            cell = f"{exported[0]:.2f}" if exported and exported[0] is not None else "-"
            lines.append(f"| {variant} | {v['mean']:.2f} ± {v['std']:.2f} ({v['n']}) | {cell} |")
        lines.append("")


def quality_section(lines):
    for data in _load("quality_minilm_*.json").values():
        s = data["settings"]
        lines += [f"### Accuracy: MiniLM on Rotten Tomatoes, {s['sparsity']:.0%} sparsity, seeds {s['seeds']}", "",
                  f"Machine: {_machine(data)}. {s['max_train_samples']} training sentences, {s['epochs']} epoch(s).",
                  "", "| variant | test accuracy (mean ± std, n) |", "|---|---:|"]
        for variant, v in data["summary"].items():
            lines.append(f"| {variant} | {v['mean']:.4f} ± {v['std']:.4f} ({v['n']}) |")
        lines.append("")


def main():
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`.", "",
             "Targets of the benchmarks issue and where they stand (2-core CPU machine, no GPU lent):", "",
             "- structured step time within 1.10x of plain LoRA: met at 512 tokens per step (SmolLM2 1.00x, random 0.5B",
             "  Llama 1.03x); missed at 128 tokens per step on the 0.5B Llama (1.28x): the importance update is a fixed",
             "  cost per step (about 0.4 s there, a few memory passes over the 0.36B adapted weights), so its share",
             "  shrinks as tokens per step grow;",
             "- structured peak memory within 1.10x of plain LoRA: met (1.00x-1.06x);",
             "- at most 0.6x the memory of the true-gradient baseline: met for the memory training adds on top of the",
             "  loaded 0.5B Llama at 128 tokens (0.39x), not at 512 tokens (0.63x) nor in total peak RSS (0.65x-0.84x),",
             "  where activations (and SmolLM2's 49k-vocabulary logits) dominate;",
             "- exported latency at 50% at most 0.6x dense: not met on SmolLM2 (0.70x at batch 1, 0.67x at batch 8): with 3",
             "  query heads per KV group 50% removes one head in three, and the tied embedding/LM head is not pruned.",
             "",
             "Unstructured and 2:4 steps cost 1.7x-3x plain LoRA: exact gradients through an element mask need one full-size product per layer.",
             "",
             "Quality (claim 2), MiniLM on Rotten Tomatoes, 3 seeds: structured 50%, \"lora\" 0.770 ± 0.008 is within one",
             "standard deviation of the true gradient (0.775 ± 0.012) and ahead of \"magnitude\" (0.753); iterative beats one-shot",
             "(0.760) on the mean, in 2 of 3 seeds. Unstructured 50%: the true gradient leads (0.794 vs 0.783 for \"lora\"),",
             "magnitude 0.771, one-shot 0.776. Dense LoRA 0.798. SmolLM2 (one seed, 31k training tokens, dense base 31.3):",
             "\"lora\" is far ahead of \"magnitude\" but behind the true gradient (ppl 92 vs 70 at 20%, 202 vs 116 at 50%); at",
             "this tiny budget the adapter has learned little, so the claim that LoRA-guided importance matches the true",
             "gradient is not reproduced on the language model.",
             ""]
    for section in (step_cost_section, step_cost_plot, quality_section, quality_plot, perplexity_section,
                    fidelity_section, export_section, export_plot):
        section(lines)
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
