"""The tables against other pruners (``peers_*.json``), their verdicts and plots.

What a table compares comes from its result file's ``table`` block (``common.table``): the metric and its
direction, the package's default method and the peers, and whether the file measures the current defaults. A
peers file without that block is an error, not a guess.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from report_common import HERE, load, machine
from stats import better, mean_of, paired_wins, summary


def table_of(data, name: str = "this result file") -> dict:
    """The file's ``table`` block; a ``KeyError`` naming the file when it has none (nothing is guessed)."""
    if "table" not in data:
        raise KeyError(f"{name} has no 'table' block (metric, direction, default method, peers): see common.table")
    return data["table"]


def ordered(methods, table: dict) -> list[str]:
    """Table order: dense LoRA, the default method, its variants (schedules, modifiers), other LoRAPrune
    criteria, the peers in the file's order, then anything else by name."""
    default, peers = table["default_method"], table["peers"]

    def key(m):
        if m == "dense-lora":
            return (0, m)
        if m == default:
            return (1, m)
        if default and m.startswith((default + "-", default + "+")):
            return (2, m)
        if m.startswith("loraprune-"):
            return (3, m)
        if m.split("+")[0] in peers:
            return (4, peers.index(m.split("+")[0]), m)
        return (5, m)

    return sorted(methods, key=key)


def tag_words(name: str, data) -> str:
    """What tells a result file's table from another of the same task and granularity, in words: the
    ``peers.py --tag`` suffix of its file name (``peers_smollm2_long`` -> "long run, 4,000 steps")."""
    s, granularity = data["settings"], granularity_of(data)
    base = f"peers_{s['task']}" + ("" if granularity == "structured" else f"_{granularity}")
    tag = name[len(base) + 1 :] if name.startswith(base + "_") else ""
    if not tag:
        return ""
    steps = f", {s['steps']:,d} steps" if s.get("task") == "smollm2" else ""
    return f" ({tag.replace('_', ' ')} run{steps})"


def granularity_of(data) -> str:
    return data["settings"].get("granularity", "structured")


def peers_section(lines):
    """Side by side with the pruners people use (benchmarks/peers.py)."""
    for name, data in load("peers_*.json").items():
        if name.endswith("_distill"):
            continue  # the recovery study's runs: their own table, at each row's total tokens (report_distill)
        s = data["settings"]
        rows = data["rows"]
        task = s["task"]
        granularity = granularity_of(data)
        table = table_of(data, name)
        metric, direction = table["metric"], table["direction"]
        extra = [k for k in ("rt_sentiment_acc", "wiki_continuation_acc_norm") if any(k in r for r in rows)]
        methods = ordered({r["method"] for r in rows}, table)
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
            + tag_words(name, data)
            + (
                "" if table["current"] else " (earlier defaults: the package's default method is not among these rows)"
            ),
            "",
            f"Machine: {machine(data)}. Seeds {sorted({r['seed'] for r in rows})}; {tokens:,d} training tokens "
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
            means = {m: mean_of(v, metric) for m, v in at.items()}
            best = next(iter(means.values()))
            for value in means.values():
                best = value if better(value, best, direction) else best
            for m, v in at.items():
                stat = summary(r[metric] for r in v)
                fmt = "{:.2f}" if direction == "lower" else "{:.4f}"
                cell = fmt.format(stat.mean) + (" ± " + fmt.format(stat.std) if stat.n > 1 else "") + f" ({stat.n})"
                if sparsity > 0 and stat.mean == best:
                    cell = f"**{cell}**"
                ex = "".join(f"{mean_of(v, k):.4f} | " if mean_of(v, k) is not None else "- | " for k in extra)
                marked = any(r.get("conditions") for r in v)
                lines.append(
                    f"| {m} | {sparsity:.0%} | {cell} | {ex}{mean_of(v, 'seconds'):.0f}{' *' if marked else ''} | "
                    f"{mean_of(v, 'peak_rss_mib'):.0f} |"
                )
        lines.append("")
        for r in rows:
            if r.get("conditions"):
                lines += [f"\\* {r['method']} {r['sparsity']:.0%} seed {r['seed']}: {r['conditions']}.", ""]
        verdicts = peers_verdicts(rows, table, sparsities)
        if verdicts:
            lines += ["Read from the rows above:", "", *[f"- {v}" for v in verdicts], ""]
        peers_plot(name, rows, table, methods, sparsities, lines, granularity)


def peers_verdicts(rows, table: dict, sparsities):
    """Sentences computed from the results: where the default wins or loses, and the paper's estimator vs grad."""
    out = []
    metric, direction = table["metric"], table["direction"]
    default_method, peer_methods = table["default_method"], table["peers"]
    criterion = default_method.split("-", 1)[1]
    for sparsity in sparsities:
        means = {
            m: mean_of([r for r in rows if r["method"] == m and r["sparsity"] == sparsity], metric)
            for m in ordered({r["method"] for r in rows}, table)
        }
        means = {m: v for m, v in means.items() if v is not None}
        default = means.get(default_method)
        peers = {m: v for m, v in means.items() if m in peer_methods}
        if default is not None and peers:
            beaten = [m for m, v in peers.items() if better(v, default, direction)]
            out.append(
                f"{sparsity:.0%}: the default (`{criterion}`) {metric} {default:.4g}; "
                + ("ahead of every peer (" if not beaten else f"behind {', '.join(beaten)} (")
                + ", ".join(f"{m} {v:.4g}" for m, v in peers.items())
                + ")"
                + _margin_caveat(rows, table, sparsity, default_method, default, peers)
                + "."
            )
        variants = (
            sorted(m for m in means if m.startswith((default_method + "-", default_method + "+"))) if peers else []
        )
        for variant in variants:
            value = means[variant]
            ahead = all(better(value, v, direction) for v in peers.values())
            at = [r for r in rows if r["method"] == variant and r["sparsity"] == sparsity]
            n = len(at)
            out.append(
                f"{sparsity:.0%}: the same criterion with {variant_words(at)} "
                f"(`{variant}`, {n} seed{'s' if n > 1 else ''}): {metric} {value:.4g}, "
                + ("ahead of every peer" if ahead else "not ahead of every peer")
                + (
                    f" and of the default schedule ({default:.4g})."
                    if default is not None and better(value, default, direction)
                    else (f"; the default schedule: {default:.4g}." if default is not None else ".")
                )
            )
        for suffix in ("", "-cd10"):  # the two criteria compared on the same schedule
            lora, grad = means.get(f"loraprune-lora{suffix}"), means.get(f"loraprune-grad{suffix}")
            if lora is not None and grad is not None:
                out.append(
                    f"{sparsity:.0%}: {metric} of the paper's estimator (`lora{suffix}`) {lora:.4g}, of the true "
                    f"gradient (`grad{suffix}`) {grad:.4g}: ratio {lora / grad:.3f}."
                )
    return out


def variant_words(rows) -> str:
    """What a variant of the default changes, in words, read from its rows: the schedule each row records
    (``row["schedule"]``), the distillation, rank, learning rate, trainable norms and budget of ``+`` modifiers."""
    row = rows[0]
    words = []
    schedule = row.get("schedule") or {}
    if schedule.get("schedule") == "one_shot":
        start = schedule.get("pruning_start", schedule.get("warmup_ratio", 0))  # the names before 0.5.0 in old rows
        words.append(f"a one-shot schedule (everything pruned at {start:.0%} of the steps)")
    elif schedule:
        start = schedule.get("pruning_start", schedule.get("warmup_ratio", 0))
        end = schedule.get("pruning_end", 1 - schedule.get("cooldown_ratio", 0))
        words.append(
            f"a {schedule.get('schedule', 'cubic')} schedule pruning from {start:.0%} to {end:.0%} of the steps"
        )
    if row.get("distillation"):
        d = row["distillation"]
        words.append(
            f"distillation toward the {d['teacher']} teacher (weight {d['weight']:g}, temperature {d['temperature']:g})"
        )
    if "+r=" in row["method"]:
        words.append(f"rank {row['r']}")
    if "+lr=" in row["method"]:
        words.append(f"learning rate {row['learning_rate']:g}")
    if row.get("trainable_norms"):
        words.append(f"trainable {', '.join(row['trainable_norms'])}")
    if row.get("recovery_lr"):
        words.append(f"the learning rate x{row['recovery_lr']['factor']:g} once the masks are final")
    if row.get("init_from"):
        words.append("the pruned adapter starting from the dense LoRA adapter")
    if "+steps=" in row["method"]:
        words.append(f"{row['train_tokens']:,} training tokens ({row['optimizer_steps']} steps)")
    if row.get("budget") == "global":
        words.append("each kind of unit ranked across blocks (a global budget)")
    if row.get("prune_structures") == ["channels"]:
        words.append(
            f"MLP channels only ({row['sparsity_by_unit']['channels']:.1%} of them, heads kept; "
            f"{row['weights_kept_in_adapted_modules']:,} weights kept)"
        )
    return ", ".join(words) or "another setting"


def _margin_caveat(rows, table, sparsity, method, default, peers) -> str:
    """How far the nearest peer is, against the default's (``method``) own seed-to-seed spread (a margin inside it
    is not a ranking yet)."""
    stat = summary(r[table["metric"]] for r in rows if r["method"] == method and r["sparsity"] == sparsity)
    if stat.n < 2:
        return " (one seed: the margins are not tested against seed noise)"
    nearest = min(peers, key=lambda m: abs(peers[m] - default))
    margin = abs(peers[nearest] - default)
    wins, common = paired_wins(rows, table["metric"], table["direction"], sparsity, method, nearest)
    seeds = f"; better than {nearest} on {wins} of {common} paired seeds" if common else ""
    if margin < stat.std:
        return f" (the nearest margin, {margin:.3g}, is within the default's seed-to-seed spread, std {stat.std:.3g}{seeds})"
    return f" (nearest margin {margin:.3g}, default's seed-to-seed std {stat.std:.3g}{seeds})"


def peers_plot(name, rows, table, methods, sparsities, lines, granularity="structured"):
    metric = table["metric"]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, sp in enumerate(sparsities):
            v = mean_of([r for r in rows if r["method"] == m and r["sparsity"] == sp], metric)
            if v is not None:
                xs.append(i + j * width)
                ys.append(v)
        ax.bar(xs, ys, width=width, label=m)
    dense = mean_of([r for r in rows if r["method"] == "dense-lora"], metric)
    if dense is not None:
        ax.axhline(dense, color="black", lw=0.8, ls="--", label="dense LoRA")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sparsities))], [f"{s:.0%}" for s in sparsities])
    ax.set_xlabel(f"{granularity} sparsity")
    ax.set_ylabel(metric)
    if table["direction"] == "lower":
        ax.set_yscale("log")
    else:
        low = min(r[metric] for r in rows)
        ax.set_ylim(max(0.0, low - 0.05), 1.0 if dense is None else max(dense, max(r[metric] for r in rows)) + 0.02)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=110)
    plt.close(fig)
    lines += [f"![{name}]({name}.png)", ""]
