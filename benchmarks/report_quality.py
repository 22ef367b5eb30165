"""Quality tables and plots other than the peers': the criterion study, score fidelity, the accuracy study."""

from __future__ import annotations

import matplotlib.pyplot as plt
from report_common import HERE, load, machine


def criteria_section(lines):
    """The study that decided the default criterion (benchmarks/criteria.py)."""
    for _name, data in load("criteria_*.json").items():
        s = data["settings"]
        summary = data["summary"]
        sparsities = sorted({v.split("%")[0] for v in summary if "%" in v}, key=float, reverse=True)
        variants = list(dict.fromkeys(v.split(" ", 1)[1] for v in summary if "%" in v))
        dense = summary.get("dense base", {}).get("mean")
        accuracy = s.get("metric") == "accuracy"
        better = max if accuracy else min
        if accuracy:
            title = "MiniLM on Rotten Tomatoes, test accuracy"
            what = (
                f"{s['max_train_samples']:,d} training sentences, one epoch ({s['train_tokens']:,d} tokens); test "
                "accuracy, higher is better"
            )
        else:
            title = "SmolLM2-135M, held-out perplexity"
            what = (
                f"{s['steps']} optimizer steps of {s['batch']} x {s['block_size']} tokens ({s['train_tokens']:,d} "
                f"training tokens); held-out perplexity on {s['max_eval_blocks']} blocks, lower is better"
                + (f" (dense base {dense:.2f})" if dense else "")
            )
        lines += [
            f"### Which structured criterion: {title}, seeds {s['seeds']}",
            "",
            f"Machine: {machine(data)}. {what}; rank {s['r']}, masks rewritten every {s['pruning_interval']} steps "
            f"(cubic schedule), {s['head_grouping']} heads.",
            "",
            "| criterion | " + " | ".join(f"{p}% sparsity" for p in sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        for v in variants:
            cells = []
            for p in sparsities:
                entry = summary.get(f"{p}% {v}")
                if entry is None:
                    cells.append("-")
                    continue
                best = better(summary[f"{p}% {w}"]["mean"] for w in variants if f"{p}% {w}" in summary)
                fmt = "{:.4f}" if accuracy else "{:.1f}"
                text = fmt.format(entry["mean"]) + (" ± " + fmt.format(entry["std"]) if entry["n"] > 1 else "")
                cells.append(f"**{text}**" if entry["mean"] == best else text)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Variants: `lora` the paper's estimator on every member (q/k/v/gate/up rows, o/down columns), "
            "normalised per step as the reference code does; `lora@raw` the same averaged raw and normalised when "
            "ranking (the rule of peft_loraprune 0.1); `lora-rows` the paper's estimator on producing rows only; "
            "`grad` the true gradient; `activation` the first-order Taylor term of removing each group at its "
            "consumer's input; `lora+activation` rows by the estimator, consumer columns by the activation term.",
            "",
        ]


def fidelity_section(lines):
    for name, data in load("fidelity_*.json").items():
        steps = data["steps"]
        keys = [k for k in steps[0] if "rho" in k and not k.endswith("_min")]
        lines += [
            f"### Importance fidelity: `{data['settings']['model']}` ({len(steps)} steps)",
            "",
            f'Machine: {machine(data)}. Spearman rank correlation with the true-gradient ("grad") scores of the '
            'paper\'s estimator ("lora"; rows without a criterion name) and of "activation" (rows naming it), mean '
            "over the second half of the run; `_averaged`: of the moving averages that pruning ranks:",
            "",
            "| measure | rho |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {data['summary_second_half'][k]:.3f} |" for k in keys]
        lines += ["", f"![fidelity]({name}.png)", ""]
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for k in keys:
            ax.plot([s["step"] for s in steps], [s[k] for s in steps], label=k)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("Spearman rho vs grad")
        ax.set_ylim(-0.1, 1.0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(HERE / f"{name}.png", dpi=110)
        plt.close(fig)


def quality_section(lines):
    for data in load("quality_minilm_*.json").values():
        s = data["settings"]
        lines += [
            f"### Accuracy: MiniLM on Rotten Tomatoes, {s['sparsity']:.0%} sparsity, seeds {s['seeds']}",
            "",
            f"Machine: {machine(data)}. {s['max_train_samples']} training sentences, {s['epochs']} epoch(s).",
            "",
            "| variant | test accuracy (mean ± std, n) |",
            "|---|---:|",
        ]
        for variant, v in data["summary"].items():
            lines.append(f"| {variant} | {v['mean']:.4f} ± {v['std']:.4f} ({v['n']}) |")
        lines.append("")


def quality_plot(lines):
    """Claim 2 at a glance: accuracy per variant, mean and spread over seeds."""
    for name, data in load("quality_minilm_*.json").items():
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
        ax.set_xticks(
            range(len(names)),
            [v.replace(" cubic", "").replace("structured", "str.") for v in names],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylim(min(means) - 0.05, max(means) + 0.03)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"MiniLM, Rotten Tomatoes, 50% sparsity, seeds {data['settings']['seeds']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(HERE / f"{name}.png", dpi=110)
        plt.close(fig)
        lines += [f"![accuracy]({name}.png)", ""]
