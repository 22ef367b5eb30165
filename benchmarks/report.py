"""Render benchmarks/RESULTS.md (tables) and plots from the JSON files in benchmarks/results/.

python benchmarks/report.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import report_big_models  # noqa: E402


def _load(pattern):
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))}


def _machine(data) -> str:
    m = data["machine"]
    return (
        f"{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads)"
        f"{', ' + m['cuda'] if m.get('cuda') else ''}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, peft_loraprune {m.get('peft_loraprune')}; {m['date']}"
    )


def _on_gpu(data) -> bool:
    return data["settings"].get("device", "cpu").startswith("cuda")


def _memory_keys(data) -> tuple[str, str, str, str]:
    """(label, peak key, vs-LoRA key, vs-grad key): device memory on a GPU, resident memory on a CPU."""
    if _on_gpu(data):
        return "peak GPU memory", "cuda_max_allocated_mib", "gpu_memory_vs_lora", "gpu_memory_vs_grad"
    return "peak RSS", "peak_rss_mib", "rss_vs_lora", "rss_vs_grad"


def _ratio(row: dict, key: str) -> str:
    """A ratio cell: three decimals, "n/a" where the row has none (no baseline in its round)."""
    value = row.get(key)
    return "n/a" if value is None else f"{value:.3f}"


def _rewrites_removed_weights(row: dict) -> bool:
    """Whether a step-cost row's mask rewrites were timed removing weights (rows written before ``step_cost.py``
    recorded ``rewrite_sparsities`` timed rewrites to the sparsity already reached, which skip the selection)."""
    return bool(row.get("rewrite_sparsities"))


def _with_rewrites_words(row: dict) -> str:
    amortised = row.get("amortised_time_vs_lora")
    if not _rewrites_removed_weights(row) or amortised is None:
        return ""
    return f" ({amortised:.2f}x with mask rewrites)"


def step_cost_section(lines):
    for _name, data in _load("step_cost_*.json").items():
        s = data["settings"]
        label, peak, vs_lora, vs_grad = _memory_keys(data)
        where = ""
        if _on_gpu(data):
            where = (
                f", on the GPU ({s.get('dtype', 'float32')} pretrained weights, float32 adapters; memory is PyTorch's "
                "peak allocated device memory; at this size the GPU waits on Python and kernel launches, so step "
                "times vary by up to 30% from step to step and time ratios are rough)"
            )
        note = f" ({s['note']})" if s.get("note") else ""
        lines += [
            f"### Step time and memory: `{s['model']}`, batch {s['batch']} x {s['seq']} tokens{where}{note}",
            "",
            f"Machine: {_machine(data)}. Median of {s['steps']} steps after {s['warmup']} warm-up steps; "
            "each configuration in its own process"
            + (
                f"; {s['rounds']} interleaved rounds, ratios taken within a round, medians over rounds."
                if s.get("rounds", 1) > 1
                else " (one round)."
                if _on_gpu(data)
                else " (one round: ratios move by up to about 15% between runs on this machine)."
            ),
            "",
            f"| configuration | step (ms) | of which importance (ms) | time vs LoRA | mask rewrite (ms) | "
            f"with rewrites, vs LoRA | {label} (MiB) | vs LoRA | vs grad |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        stale = False
        for r in data["rows"]:
            rewrite = f"{r.get('median_mask_rewrite_s', 0.0) * 1000:.0f}"
            if r.get("pruning_interval") and not _rewrites_removed_weights(r):
                rewrite, stale = rewrite + " *", True
            lines.append(
                f"| {r['config']} | {r['median_step_s'] * 1000:.1f} | {r['median_importance_s'] * 1000:.1f} | "
                f"{_ratio(r, 'time_vs_lora')} | {rewrite} | {_ratio(r, 'amortised_time_vs_lora')} | {r[peak]:.0f} | "
                f"{_ratio(r, vs_lora)} | {_ratio(r, vs_grad)} |"
            )
        lines.append("")
        lines.append(
            '"with rewrites": the step plus one mask rewrite spread over the pruning interval '
            "(every 10 steps by default)."
            + (
                " (*) timed as a rewrite to the sparsity already reached, which skips the selection: an unstructured "
                "rewrite there was under-reported by about 5x (`step_cost.py` now times rewrites that remove 2% more)."
                if stale
                else ""
            )
        )
        lines.append("")


def masked_blocks_rows(data) -> list[str]:
    """Lines of one ``masked_blocks_*.json``: a layer's forward + backward with blocked passes vs one block."""
    s = data["settings"]
    blocks = [k for k in data["rows"][0]["time_vs_one_block"] if k not in ("one block", "block_elements")]
    out = [
        f"Element-masked forward + backward of the {s['shapes']} layer shapes (`benchmarks/masked_blocks.py`, "
        f"{_machine(data)}; median of {s['repeats']} interleaved repetitions), time against one block per weight "
        "in the same repetitions (below 1 is faster):",
        "",
        "| tokens | adapter dropout | factor gradient | one block (ms) | "
        + " | ".join(blocks)
        + " | block_elements (weights) |",
        "|---:|---|---|---:|" + "---:|" * (len(blocks) + 1),
    ]
    for r in data["rows"]:
        ratios = r["time_vs_one_block"]
        out.append(
            f"| {r['tokens']} | {'yes' if r['adapter_dropout'] else 'no'} | "
            f"{'straight-through' if r['straight_through'] else 'exact'} | {r['median_ms']['one block']:.1f} | "
            + " | ".join(f"{ratios[b]:.2f}" for b in blocks)
            + f" | {ratios['block_elements']:.2f} ({r['block_elements']:,d}) |"
        )
    return out


def masked_blocks_section(lines):
    for data in _load("masked_blocks_*.json").values():
        lines += ["### Blocked passes of the element-masked product", "", *masked_blocks_rows(data), ""]


def element_breakdown_rows(data) -> list[str]:
    """Lines of one ``element_step_breakdown_*.json``: an element-masked layer step against LoRA's, the weight-sized
    kernels it runs and the floors those kernels imply."""
    s = data["settings"]
    kernels = list(data["rows"][0]["kernel_ms"])
    out = [
        f"Where an element-masked layer step goes: the {s['shapes']} layer shapes summed "
        f"(`benchmarks/element_step_breakdown.py`, {_machine(data)}; median of {s['repeats']} interleaved "
        "repetitions). Forward + backward against plain LoRA's in the same repetitions; each weight-sized kernel "
        "timed alone on the whole weights (ms); *products floor*: LoRA plus the weight-sized products the variant "
        "adds; *eager floor*: those plus its elementwise passes (unpack, rebuild, mask multiplies, thin products, "
        "each at its count) run as separate unblocked kernels, which the blocked passes beat by keeping blocks in "
        "cache:",
        "",
        "| tokens | adapter dropout | LoRA (ms) | factor gradient | masked (ms) | vs LoRA | products floor | "
        "eager floor | unblocked elementwise / masked | " + " | ".join(kernels) + " |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(kernels),
    ]
    for r in data["rows"]:
        for variant, v in r["variants"].items():
            out.append(
                f"| {r['tokens']} | {'yes' if r['adapter_dropout'] else 'no'} | {r['lora_ms']:.1f} | "
                f"{variant.replace('_', '-')} | {v['measured_ms']:.1f} | {v['vs_lora']:.2f} | "
                f"{v['products_floor_vs_lora']:.2f} | {v['eager_floor_vs_lora']:.2f} | "
                f"{v['elementwise_share_of_step']:.2f} | "
                + " | ".join(f"{r['kernel_ms'][k]:.1f}" for k in kernels)
                + " |"
            )
    return out


def element_breakdown_section(lines):
    for data in _load("element_step_breakdown_*.json").values():
        lines += ["### Where the element-masked step goes", "", *element_breakdown_rows(data), ""]


def memory_profile_rows(data) -> list[str]:
    """Table rows of one ``memory_profile_*.json``: state between steps and peak live heap per phase."""
    phases = ["forward", "backward", "importance update", "optimizer step", "mask rewrite"]
    out = [
        "| configuration | live between steps (MiB) | pruning state vs LoRA (MiB) | bytes per adapted weight | "
        + " | ".join(f"{p} peak (+MiB)" for p in phases)
        + " | peak RSS (MiB) | resident but not live at peak (MiB) |",
        "|---|" + "---:|" * (5 + len(phases)),
    ]
    for r in data["rows"]:
        per = r.get("state_bytes_per_adapted_parameter")
        cells = [
            r["config"],
            f"{r['live_between_steps_mib']:.0f}",
            f"{r.get('state_mib_vs_lora', float('nan')):.0f}",
            f"{per:.2f}" if per is not None else "",
        ]
        cells += [
            f"{r['phases'][p]['peak_live_above_step_start_mib']:.0f}" if p in r["phases"] else "" for p in phases
        ]
        peak_rss = max(p["peak_rss_mib"] for p in r["phases"].values())
        peak_live = r["live_between_steps_mib"] + max(
            p["peak_live_above_step_start_mib"] for p in r["phases"].values()
        )
        cells += [f"{peak_rss:.0f}", f"{peak_rss - peak_live:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def memory_profile_section(lines):
    for _name, data in _load("memory_profile_*.json").items():
        s = data["settings"]
        lines += [
            f"### Where the memory goes: `{s['model']}`, batch {s['batch']} x {s['seq']} tokens"
            + (f", {data['label']}" if data.get("label") else ""),
            "",
            f"Machine: {_machine(data)}. One profiled step after {s['warmup']} warm-up steps with masks at 50%; "
            "live heap sampled every millisecond (glibc `mallinfo2`), peaks above the live heap at the step's "
            "start; pruning state = live heap after the step minus plain LoRA's.",
            "",
            *memory_profile_rows(data),
            "",
        ]


def step_cost_plot(lines):
    """Claim 1 at a glance: time and peak memory of every configuration relative to plain LoRA, per setting."""
    results = _load("step_cost_*.json")
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (_name, data) in zip(axes[0], results.items()):
        rows = [r for r in data["rows"] if r["config"] != "lora"]
        labels = [r["config"].replace("loraprune_", "").replace("_structured", "") for r in rows]
        label, _, vs_lora, _ = _memory_keys(data)
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["time_vs_lora"] for r in rows], width=0.4, label="step time")
        ax.bar([i + 0.2 for i in x], [r[vs_lora] for r in rows], width=0.4, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.1, color="red", lw=0.8, ls="--", label="1.10x target")
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        s = data["settings"]
        where = f", {data['machine']['cuda']}" if _on_gpu(data) else ", CPU"
        ax.set_title(f"{s['model']}, {s['batch']}x{s['seq']} tokens{where}", fontsize=8)
        ax.set_ylabel("vs plain LoRA")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "step_cost.png", dpi=110)
    plt.close(fig)
    lines += ["![step cost](step_cost.png)", ""]


def _export_label(r) -> str:
    """A row of an export-speed file: "50%" (structured, removed), "2:4" (dense with its zeros) or "2:4 sparse
    (cuSPARSELt)" (converted to PyTorch's semi-structured tensors; ``True`` in files written before the backend
    was recorded: PyTorch's default choice)."""
    if isinstance(r["sparsity"], str):
        backend = r.get("semi_structured")
        if not backend:
            return f"{r['sparsity']} (dense zeros)"
        names = {True: "PyTorch default", "cutlass": "CUTLASS", "cusparselt": "cuSPARSELt"}
        return f"{r['sparsity']} sparse ({names.get(backend, backend)})"
    return f"{r['sparsity']:.0%}"


def export_plot(lines):
    """Claim 4 at a glance: latency of the exported models relative to dense, per batch size."""
    for name, data in _load("export_speed_*.json").items():
        batches = data["settings"]["batches"].split(",")
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        rows = data["rows"]
        x = range(len(rows))
        width = 0.8 / (len(batches) + 1)
        for j, b in enumerate(batches):
            ax.bar(
                [i + j * width for i in x],
                [r[f"latency_vs_dense_batch{b}"] for r in rows],
                width=width,
                label=f"latency, batch {b}",
            )
        ax.bar(
            [i + len(batches) * width for i in x],
            [r["params_vs_dense"] for r in rows],
            width=width,
            label="parameters",
            color="gray",
        )
        ax.axhline(0.6, color="red", lw=0.8, ls="--", label="0.6x target at 50%")
        ax.set_xticks([i + width for i in x], [_export_label(r) for r in rows], fontsize=7)
        ax.set_xlabel("sparsity (structured, removed) or pattern")
        if data["machine"].get("cuda"):
            ax.set_title(f"{data['settings']['model']} on {data['machine']['cuda']}", fontsize=8)
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


def export_section(lines):
    for _name, data in _load("export_speed_*.json").items():
        s = data["settings"]
        batches = s["batches"].split(",")
        lines += [
            f"### Exported model speed: `{s['model']}`, {s['seq']} tokens"
            + (f", {s.get('dtype')} on the GPU" if s.get("device", "cpu").startswith("cuda") else ""),
            "",
            f"Machine: {_machine(data)}."
            + (
                f" Median of {s['repeats']} forward passes, each waited for (`torch.cuda.synchronize`)."
                if s.get("device", "cpu").startswith("cuda")
                else ""
            ),
            "",
            "| sparsity | params | file (MiB) | heads / KV heads / channels | "
            + " | ".join(f"latency b{b} (ms) | vs dense" for b in batches)
            + " |",
            "|---:|---:|---:|---|" + "---:|---:|" * len(batches),
        ]
        for r in data["rows"]:
            cells = " | ".join(
                f"{r[f'latency_ms_batch{b}']:.1f} | {r[f'latency_vs_dense_batch{b}']:.2f}" for b in batches
            )
            lines.append(
                f"| {_export_label(r)} | {r['params']:,d} | {r['file_bytes'] / 2**20:.1f} | "
                f"{r['num_attention_heads']} / {r['num_key_value_heads']} / {r['intermediate_size']} | {cells} |"
            )
        lines.append("")


def fidelity_section(lines):
    for name, data in _load("fidelity_*.json").items():
        steps = data["steps"]
        keys = [k for k in steps[0] if "rho" in k and not k.endswith("_min")]
        lines += [
            f"### Importance fidelity: `{data['settings']['model']}` ({len(steps)} steps)",
            "",
            f'Machine: {_machine(data)}. Spearman rank correlation with the true-gradient ("grad") scores of the '
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
    for data in _load("quality_minilm_*.json").values():
        s = data["settings"]
        lines += [
            f"### Accuracy: MiniLM on Rotten Tomatoes, {s['sparsity']:.0%} sparsity, seeds {s['seeds']}",
            "",
            f"Machine: {_machine(data)}. {s['max_train_samples']} training sentences, {s['epochs']} epoch(s).",
            "",
            "| variant | test accuracy (mean ± std, n) |",
            "|---|---:|",
        ]
        for variant, v in data["summary"].items():
            lines.append(f"| {variant} | {v['mean']:.4f} ± {v['std']:.4f} ({v['n']}) |")
        lines.append("")


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def criteria_section(lines):
    """The study that decided the default criterion (benchmarks/criteria.py)."""
    for _name, data in _load("criteria_*.json").items():
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
            f"Machine: {_machine(data)}. {what}; rank {s['r']}, masks rewritten every {s['pruning_interval']} steps "
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


PEER_ORDER = (
    "dense-lora",
    "loraprune-activation",
    "loraprune-activation-cd10",
    "loraprune-activation-oneshot",
    "loraprune-wanda",
    "loraprune-lora",
    "loraprune-grad",
    "loraprune-lora-cd10",
    "loraprune-grad-cd10",
    "loraprune-magnitude",
    "llm-pruner",
    "wanda-sp",
    "sparsegpt",
    "wanda",
)

# Per granularity: the package's default method, and the peers it is measured against (benchmarks/peers.py)
ROLES = {
    "structured": ("loraprune-activation", ("llm-pruner", "wanda-sp")),
    "unstructured": ("loraprune-wanda", ("sparsegpt", "wanda")),  # "lora" until 0.4.0
}


def _ordered(methods) -> list[str]:
    """Methods in table order (PEER_ORDER, then any other by name), so every regeneration reads the same."""
    return sorted(methods, key=lambda m: (PEER_ORDER.index(m) if m in PEER_ORDER else len(PEER_ORDER), m))


def _tag_words(name: str, data) -> str:
    """What tells a result file's table from another of the same task and granularity, in words: the
    ``peers.py --tag`` suffix of its file name (``peers_smollm2_long`` -> "long run, 4,000 steps")."""
    s, granularity = data["settings"], _granularity(data)
    base = f"peers_{s['task']}" + ("" if granularity == "structured" else f"_{granularity}")
    tag = name[len(base) + 1 :] if name.startswith(base + "_") else ""
    if not tag:
        return ""
    steps = f", {s['steps']:,d} steps" if s.get("task") == "smollm2" else ""
    return f" ({tag.replace('_', ' ')} run{steps})"


def _granularity(data) -> str:
    return data["settings"].get("granularity", "structured")


def peers_section(lines):
    """Side by side with the pruners people use (benchmarks/peers.py)."""
    for name, data in _load("peers_*.json").items():
        s = data["settings"]
        rows = data["rows"]
        task = s["task"]
        granularity = _granularity(data)
        metric = "perplexity" if task == "smollm2" else "accuracy"
        better = min if metric == "perplexity" else max
        extra = [k for k in ("rt_sentiment_acc", "wiki_continuation_acc_norm") if any(k in r for r in rows)]
        methods = _ordered({r["method"] for r in rows})
        sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}, reverse=True)
        tokens = rows[0]["train_tokens"]
        title = (
            "SmolLM2-135M on Wikipedia leads, held-out perplexity"
            if task == "smollm2"
            else f"MiniLM (BERT) on Rotten Tomatoes ({s['max_train_samples']:,d} training sentences), test accuracy"
        )
        if granularity == "structured":
            units = (
                "Every method removes the same units in every block (heads, as query heads inside KV groups where "
                "the model has grouped-query attention, and MLP channels). "
            )
        else:
            units = (
                f"Every method zeroes the same fraction of the weights of every Linear in the blocks ({granularity}, "
                "per layer); SparseGPT and Wanda are llm-compressor's own `SparseGPTModifier` and "
                "`WandaPruningModifier` (one-shot on the pretrained model, in an environment of their own: "
                f"llm-compressor {data['machine'].get('llmcompressor', '(see the result file)')}, transformers "
                f"{data['machine'].get('transformers')}), then LoRA recovery with their zeros fixed. "
            )
        lines += [
            f"### Against other pruners: {title}"
            + ("" if granularity == "structured" else f" ({granularity})")
            + _tag_words(name, data),
            "",
            f"Machine: {_machine(data)}. Seeds {sorted({r['seed'] for r in rows})}; {tokens:,d} training tokens "
            f"for every method (LoRA rank {s['r']}{', bfloat16 autocast' if s.get('bf16') else ''}); peers "
            f"also read {s['calibration_batches']} calibration batches "
            f"({max(r['calibration_tokens'] for r in rows):,d} tokens) of the training data before pruning. "
            + units
            + "Wall time covers calibration and training, on a "
            "shared 2-core machine where other jobs sometimes ran alongside (the controlled cost measure is the step-"
            "cost benchmark); peak RSS is each run's own process. LoRAPrune's schedule is in the method's name: "
            "none, the package's default (cubic, pruning from 10% to 40% of the steps); `-cd10`, the reference "
            "code's window (pruning until 90%, the default before 0.3.0; those rows ran under the bare name then and "
            "are relabelled); `-oneshot`, everything pruned at 10%. Every row records its schedule.",
            "",
        ]
        header = (
            f"| method | sparsity | {metric} (mean ± std, n) | "
            + "".join(f"{k} | " for k in extra)
            + "wall time (s) | peak RSS (MiB) |"
        )
        lines += [header, "|---|---:|---:|" + "---:|" * len(extra) + "---:|---:|"]
        for sparsity in [0.0] + sparsities:
            at = {m: [r for r in rows if r["method"] == m and r["sparsity"] == sparsity] for m in methods}
            at = {m: v for m, v in at.items() if v}
            if not at:
                continue
            best = better(_mean(v, metric) for v in at.values())
            for m, v in at.items():
                values = [r[metric] for r in v]
                mean = _mean(v, metric)
                std = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
                fmt = "{:.2f}" if metric == "perplexity" else "{:.4f}"
                cell = fmt.format(mean) + (" ± " + fmt.format(std) if len(values) > 1 else "") + f" ({len(values)})"
                if sparsity > 0 and mean == best:
                    cell = f"**{cell}**"
                ex = "".join(f"{_mean(v, k):.4f} | " if _mean(v, k) is not None else "- | " for k in extra)
                marked = any(r.get("conditions") for r in v)
                lines.append(
                    f"| {m} | {sparsity:.0%} | {cell} | {ex}{_mean(v, 'seconds'):.0f}{' *' if marked else ''} | "
                    f"{_mean(v, 'peak_rss_mib'):.0f} |"
                )
        lines.append("")
        for r in rows:
            if r.get("conditions"):
                lines += [f"\\* {r['method']} {r['sparsity']:.0%} seed {r['seed']}: {r['conditions']}.", ""]
        verdicts = peers_verdicts(rows, metric, sparsities, granularity)
        if verdicts:
            lines += ["Read from the rows above:", "", *[f"- {v}" for v in verdicts], ""]
        peers_plot(name, rows, metric, methods, sparsities, lines, granularity)


def peers_verdicts(rows, metric, sparsities, granularity="structured"):
    """Sentences computed from the results: where the default wins or loses, and the paper's estimator vs grad."""
    out = []
    lower = metric == "perplexity"
    default_method, peer_methods = ROLES[granularity]
    criterion = default_method.split("-", 1)[1]
    for sparsity in sparsities:
        means = {
            m: _mean([r for r in rows if r["method"] == m and r["sparsity"] == sparsity], metric)
            for m in _ordered({r["method"] for r in rows})
        }
        means = {m: v for m, v in means.items() if v is not None}
        default = means.get(default_method)
        peers = {m: v for m, v in means.items() if m in peer_methods}
        if default is not None and peers:
            beaten = [m for m, v in peers.items() if (v < default if lower else v > default)]
            out.append(
                f"{sparsity:.0%}: the default (`{criterion}`) {metric} {default:.4g}; "
                + ("ahead of every peer (" if not beaten else f"behind {', '.join(beaten)} (")
                + ", ".join(f"{m} {v:.4g}" for m, v in peers.items())
                + ")"
                + _margin_caveat(rows, metric, sparsity, default_method, default, peers)
                + "."
            )
        variants = sorted(m for m in means if m.startswith(default_method + "-")) if peers else []
        for variant in variants:
            value = means[variant]
            ahead = all((value < v) if lower else (value > v) for v in peers.values())
            n = len([r for r in rows if r["method"] == variant and r["sparsity"] == sparsity])
            out.append(
                f"{sparsity:.0%}: the same criterion on {_schedule_words(variant)} "
                f"(`{variant}`, {n} seed{'s' if n > 1 else ''}): {metric} {value:.4g}, "
                + ("ahead of every peer" if ahead else "not ahead of every peer")
                + (
                    f" and of the default schedule ({default:.4g})."
                    if default is not None and ((value < default) if lower else (value > default))
                    else (f"; the default schedule: {default:.4g}." if default is not None else ".")
                )
            )
        for suffix in ("", "-cd10"):  # the two criteria compared on the same schedule
            lora, grad = means.get(f"loraprune-lora{suffix}"), means.get(f"loraprune-grad{suffix}")
            if lora is not None and grad is not None:
                out.append(
                    f"{sparsity:.0%}: the paper's estimator (`lora{suffix}`) / true gradient (`grad{suffix}`) "
                    f"{metric}: {lora / grad:.3f}."
                )
    return out


def _schedule_words(method: str) -> str:
    """What a ``loraprune-<criterion>-<schedule>`` suffix means (benchmarks/peers.py ``loraprune_method``)."""
    suffix = method.rsplit("-", 1)[-1]
    if suffix == "oneshot":
        return "a one-shot schedule (everything pruned at the end of the warm-up)"
    if suffix == "cd10":
        return "the reference code's cubic window (pruning until 90% of the steps, the default before 0.3.0)"
    if suffix.startswith("cd"):
        end = 1 - int(suffix[2:]) / 100
        return f"a cubic window ending at {end:.0%} of the steps"
    return f"schedule {suffix}"


def _margin_caveat(rows, metric, sparsity, method, default, peers) -> str:
    """How far the nearest peer is, against the default's (``method``) own seed-to-seed spread (a margin inside it
    is not a ranking yet)."""
    values = [r[metric] for r in rows if r["method"] == method and r["sparsity"] == sparsity]
    if len(values) < 2:
        return " (one seed: the margins are not tested against seed noise)"
    mean = sum(values) / len(values)
    std = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5
    nearest = min(peers, key=lambda m: abs(peers[m] - default))
    margin = abs(peers[nearest] - default)
    seeds = _paired_seeds(rows, metric, sparsity, method, nearest)
    if margin < std:
        return (
            f" (the nearest margin, {margin:.3g}, is within the default's seed-to-seed spread, std {std:.3g}{seeds})"
        )
    return f" (nearest margin {margin:.3g}, default's seed-to-seed std {std:.3g}{seeds})"


def _paired_seeds(rows, metric, sparsity, method, peer) -> str:
    """On how many of the seeds both ran ``method`` is better than ``peer``: the ranking seed by seed."""
    lower = metric == "perplexity"
    by_seed = {
        m: {r["seed"]: r[metric] for r in rows if r["method"] == m and r["sparsity"] == sparsity}
        for m in (method, peer)
    }
    common = sorted(set(by_seed[method]) & set(by_seed[peer]))
    if not common:
        return ""
    wins = [
        s
        for s in common
        if (by_seed[method][s] < by_seed[peer][s]) == lower and by_seed[method][s] != by_seed[peer][s]
    ]
    return f"; better than {peer} on {len(wins)} of {len(common)} paired seeds"


def peers_plot(name, rows, metric, methods, sparsities, lines, granularity="structured"):
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, sp in enumerate(sparsities):
            v = _mean([r for r in rows if r["method"] == m and r["sparsity"] == sp], metric)
            if v is not None:
                xs.append(i + j * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=m)
    dense = _mean([r for r in rows if r["method"] == "dense-lora"], metric)
    if dense is not None:
        ax.axhline(dense, color="black", lw=0.8, ls="--", label="dense LoRA")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sparsities))], [f"{s:.0%}" for s in sparsities])
    ax.set_xlabel(f"{granularity} sparsity")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    else:
        low = min(r[metric] for r in rows)
        ax.set_ylim(max(0.0, low - 0.05), 1.0 if dense is None else max(dense, max(r[metric] for r in rows)) + 0.02)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=110)
    plt.close(fig)
    lines += [f"![{name}]({name}.png)", ""]


README_START = "<!-- benchmarks:start (generated by benchmarks/report.py) -->"
README_END = "<!-- benchmarks:end -->"


def readme_summary() -> list[str]:
    """Bullets for README's Benchmarks section, computed from the result files like RESULTS.md."""
    out = []
    for file_name, data in _load("peers_*.json").items():
        rows = data["rows"]
        task = data["settings"]["task"]
        granularity = _granularity(data)
        metric = "perplexity" if task == "smollm2" else "accuracy"
        sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}, reverse=True)
        seeds = sorted({r["seed"] for r in rows})
        name = (
            (
                "SmolLM2-135M, held-out perplexity"
                if task == "smollm2"
                else f"MiniLM on Rotten Tomatoes, {data['settings']['max_train_samples']:,d} training sentences, accuracy"
            )
            + ("" if granularity == "structured" else f", {granularity}")
            + _tag_words(file_name, data)
        )
        dense = _mean([r for r in rows if r["method"] == "dense-lora"], metric)
        out.append(
            f"- **Against other pruners** ({name}, seeds {seeds}, {rows[0]['train_tokens']:,d} training tokens"
            + (f"; dense LoRA {dense:.4g}" if dense is not None else "")
            + "):"
        )
        out += [f"  - {v}" for v in peers_verdicts(rows, metric, sparsities, granularity)]
    for data in _load("criteria_*.json").values():
        summary = data["summary"]
        cells = []
        for p in sorted({v.split("%")[0] for v in summary if "%" in v}, key=float, reverse=True):
            at = {v.split(" ", 1)[1]: e["mean"] for v, e in summary.items() if v.startswith(f"{p}% ")}
            cells.append(f"{p}%: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(at.items(), key=lambda kv: kv[1])))
        out.append(
            f"- **Criterion study** (SmolLM2-135M, {data['settings']['train_tokens']:,d} training tokens, seeds "
            f"{data['settings']['seeds']}; held-out perplexity, lower is better): " + "; ".join(cells) + "."
        )
    for data in _load("step_cost_*.json").values():
        s = data["settings"]
        rows = {r["config"]: r for r in data["rows"]}
        label, _, vs_lora, _ = _memory_keys(data)

        parts = [
            f"{c} {r['time_vs_lora']:.2f}x time{_with_rewrites_words(r)} / {r[vs_lora]:.2f}x {label}"
            for c, r in rows.items()
            if c != "lora" and "time_vs_lora" in r
        ]
        where = f", {data['machine']['cuda']}, {s.get('dtype')}" if _on_gpu(data) else ""
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


def _replace_block(text: str, start: str, end: str, lines: list[str]) -> str:
    if start not in text or end not in text:
        return text
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return head + start + "\n" + "\n".join(lines) + "\n" + end + tail


def update_readme() -> None:
    readme = HERE.parent / "README.md"
    text = _replace_block(readme.read_text(), README_START, README_END, readme_summary())
    for name, render in (("text_classification", demo_text_classification), ("causal_lm", demo_causal_lm)):
        found = _load(f"demo_{name}.json")
        if found:
            data = next(iter(found.values()))
            text = _replace_block(
                text,
                f"<!-- demo:{name}:start (generated by benchmarks/report.py) -->",
                f"<!-- demo:{name}:end -->",
                render(data),
            )
            if name == "causal_lm":
                text = _replace_block(
                    text,
                    "<!-- demo:command_line:start (generated by benchmarks/report.py) -->",
                    "<!-- demo:command_line:end -->",
                    demo_command_line(data),
                )
    cost = []
    for data in _load("memory_profile_*.json").values():
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
    for data in _load("masked_blocks_*.json").values():
        cost += [*masked_blocks_rows(data), ""]
    for data in _load("element_step_breakdown_*.json").values():
        cost += [*element_breakdown_rows(data), ""]
    text = _replace_block(text, "<!-- cost:start (generated by benchmarks/report.py) -->", "<!-- cost:end -->", cost)
    text = _replace_block(
        text,
        "<!-- big-models:start (generated by benchmarks/report.py) -->",
        "<!-- big-models:end -->",
        report_big_models.readme_lines(),
    )
    readme.write_text(text)


def main():
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; every number below is read "
        "from those files (machine, versions and settings with each table). Sections appear in the order "
        "quality against peers, the criterion study, cost, fidelity, export speed, and results of earlier "
        "versions where they have not been re-measured.",
        "",
    ]
    for section in (
        peers_section,
        criteria_section,
        step_cost_section,
        step_cost_plot,
        memory_profile_section,
        masked_blocks_section,
        element_breakdown_section,
        fidelity_section,
        export_section,
        export_plot,
        quality_section,
        quality_plot,
        report_big_models.section,
    ):
        section(lines)
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    update_readme()
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
