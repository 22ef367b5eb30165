"""The distillation study (issue: recover the pruned model toward a dense teacher): RESULTS.md tables and README
lines, read from ``peers_<task>_distill.json`` beside the runs without distillation in the task's peers file (same
settings). Each row is compared with dense LoRA of the same file and seed budget: the perplexity ratio (SmolLM2)
or the accuracy difference in points (MiniLM), at equal training tokens and with the wall time of each run."""

from __future__ import annotations

from typing import Optional

import matplotlib.pyplot as plt
from report_common import HERE, load, machine
from stats import better, mean_of, paired_wins, summary

# task -> (the file with the runs without distillation, that file's dense LoRA and default method)
BASELINES = {
    "smollm2": "peers_smollm2",
    "smollm2_unstructured": "peers_smollm2_unstructured",
    "minilm": "peers_minilm_full_train",
}
#: where dense LoRA was run when the task's own files hold none (the same model, data and settings)
DENSE_FROM = {"smollm2_unstructured": ("peers_smollm2", "peers_smollm2_distill")}
TASK_WORDS = {
    "smollm2": "SmolLM2 / Wikipedia",
    "smollm2_unstructured": "SmolLM2 / Wikipedia",
    "minilm": "MiniLM / Rotten Tomatoes",
}
#: the issue's goals, shown beside the measurements (a miss is marked, not hidden)
#: (None: a cell of the study without a goal of its own)
GOALS = {
    ("smollm2", 0.2): ("ratio", 1.30),
    ("smollm2", 0.5): ("ratio", 2.0),
    ("smollm2_unstructured", 0.5): ("ratio", None),
    ("minilm", 0.5): ("points", -0.5),
}
#: the cost goals: step time against the default's, peak memory against plain LoRA's
COST_GOALS = {"time": 1.5, "memory": 1.15}
TEACHER_WORDS = {"unmasked": "the unmasked adapter", "teacher": "a second, dense adapter"}


def _rows_by_variant(rows, metric):
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["sparsity"]), []).append(r)
    return out


def _gap(task, value, dense) -> tuple[str, float]:
    """("1.75x", 1.75) for a perplexity, ("-1.20 pt", -1.2) for an accuracy."""
    if task.startswith("smollm2"):
        return f"{value / dense:.2f}x", value / dense
    points = 100 * (value - dense)
    return f"{points:+.2f} pt", points


def study(task: str):
    """(rows of both files, metric, dense LoRA mean, distill file data) or None when the study has no rows."""
    distill = load(f"peers_{task}_distill.json")
    base = load(f"{BASELINES[task]}.json")
    if not distill or not base:
        return None
    distill_data = next(iter(distill.values()))
    base_data = next(iter(base.values()))
    table = base_data["table"]
    default = table["default_method"]
    # marked, so that costs compare runs of the study's own code and environment (``_cost``)
    # and the peers given a recovery modifier in the study, as they were without it (where the study has no rerun)
    recovered_peers = {r["method"].partition("+")[0] for r in distill_data["rows"] if "+" in r["method"]}
    kept = {default, "dense-lora", *(recovered_peers & set(table.get("peers", ())))}
    rows = [{**r, "from_peers_file": True} for r in base_data["rows"] if r["method"] in kept]
    rows += distill_data["rows"]  # its dense LoRA too (the table leaves dense LoRA out; its conditions are listed)
    dense_rows = [r for r in base_data["rows"] + distill_data["rows"] if r["method"] == "dense-lora"]
    for name in DENSE_FROM.get(task, ()) if not dense_rows else ():
        dense_rows += [r for d in load(f"{name}.json").values() for r in d["rows"] if r["method"] == "dense-lora"]
    dense = summary(r[table["metric"]] for r in dense_rows)
    return rows, table, dense, distill_data


def section(lines):
    for task in BASELINES:
        found = study(task)
        if found is None:
            continue
        rows, table, dense, data = found
        metric = table["metric"]
        lines += [
            f"### Distillation study: {task}",
            "",
            f"Machine: {machine(data)}. Rows without distillation are the task's peers file (same settings); dense "
            f"LoRA {metric} {dense.mean:.4g} (n={dense.n}). `vs dense` is the {'perplexity ratio' if task.startswith('smollm2') else 'accuracy difference in points'} "
            "to dense LoRA; total tokens include a dense teacher's own training. Wall time is each run's process "
            "on a shared 2-core machine (load average in the row where recorded).",
            "",
            f"| method | sparsity | heads / channels removed | {metric} (mean ± std, n) | vs dense | total train tokens | "
            "wall time (s) | load | peak RSS MiB | teacher MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        conditions = [
            f"dense LoRA seed {r['seed']} ({r['seconds']:.0f} s): {r['conditions']}"
            for r in rows
            if r["method"] == "dense-lora" and r.get("conditions")
        ]
        for (method, sparsity), group in sorted(
            _rows_by_variant(rows, metric).items(), key=lambda kv: (-kv[0][1], kv[0][0])
        ):
            if method == "dense-lora":
                continue
            stat = summary(r[metric] for r in group)
            gap, _ = _gap(task, stat.mean, dense.mean)
            fmt = "{:.2f}" if table["direction"] == "lower" else "{:.4f}"
            cell = fmt.format(stat.mean) + (f" ± {fmt.format(stat.std)}" if stat.n > 1 else "") + f" ({stat.n})"
            tokens = _total_tokens(group)
            seconds = summary(r["seconds"] for r in group).mean
            load_avg = summary(r.get("load_average_1min") for r in group)
            teacher = summary(r.get("teacher_memory_mib") for r in group)
            rss = summary(r.get("peak_rss_mib") for r in group)
            shared = [r["conditions"] for r in group if r.get("conditions")]
            conditions += [
                f"{method} {sparsity:.0%} seed {r['seed']}: {r['conditions']}" for r in group if r.get("conditions")
            ]
            lines.append(
                f"| {method} | {sparsity:.0%} | {_units_removed(group)} | {cell} | {gap} | {tokens:,.0f} | {seconds:.0f}{' *' if shared else ''} | "
                f"{'-' if load_avg is None else f'{load_avg.mean:.1f}'} | {'-' if rss is None else f'{rss.mean:,.0f}'} | "
                f"{'-' if teacher is None else f'{teacher.mean:.0f}'} |"
            )
        if conditions:
            lines += [
                "",
                "\\* Wall time not that of the current code alone on the machine: " + "; ".join(conditions) + ".",
            ]
        cost = cost_line() if task == "smollm2" else None
        lines += [
            "",
            *[f"- {v}" for v in verdicts(task, rows, table, dense.mean)],
            *[f"- {v}" for v in peer_recovery_lines(task, rows, table, dense.mean)],
            *([f"- {cost}"] if cost else []),
            "",
        ]
        tokens_plot(task, rows, table, dense.mean, lines)


def tokens_plot(task, rows, table, dense, lines):
    """The study's gap to dense LoRA against total training tokens (a dense teacher's included), one panel per
    sparsity: a variant is only better than training longer when it lies below the default's line."""
    groups = _rows_by_variant(rows, table["metric"])
    sparsities = sorted({s for _, s in groups if s > 0}, reverse=True)
    default = table["default_method"]
    peers = table.get("peers", ())  # their rows without recovery, read from the peers file: not the study's points
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 3.4), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        line = sorted(
            (_total_tokens(g), _gap(task, summary(r[table["metric"]] for r in g).mean, dense)[1])
            for (m, s), g in groups.items()
            if s == sparsity and (m == default or m.startswith(f"{default}+steps="))
        )
        if line:
            ax.plot(*zip(*line), "k--", marker="o", lw=0.8, label="default (longer: +steps)")
        for (m, s), g in sorted(groups.items()):
            if s != sparsity or m == default or m.startswith(f"{default}+steps=") or m in ("dense-lora", *peers):
                continue
            gap = _gap(task, summary(r[table["metric"]] for r in g).mean, dense)[1]
            ax.scatter([_total_tokens(g)], [gap], label=m.replace(f"{default}+", "+"), s=22)
        goal = GOALS.get((task, sparsity))
        if goal and goal[1] is not None:
            ax.axhline(goal[1], color="red", lw=0.8, ls=":", label="goal")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:,.0f}k")
        ax.set_title(f"{sparsity:.0%} {_granularity(task)}", fontsize=9)
        ax.set_xlabel("total training tokens")
        ax.set_ylabel(
            "perplexity / dense LoRA's" if task.startswith("smollm2") else "accuracy - dense LoRA's (points)"
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    name = f"distillation_{task}"
    fig.savefig(HERE / f"{name}.png", dpi=110)
    plt.close(fig)
    lines += [f"![{name}]({name}.png)", ""]


def verdicts(task, rows, table, dense) -> list[str]:
    """Per goal cell: today's default and the best recovery variant (any modifier: distillation, rank, norms,
    learning rate) against the goal."""
    out = []
    metric = table["metric"]
    groups = _rows_by_variant(rows, metric)
    for (goal_task, sparsity), (kind, goal) in GOALS.items():
        if goal_task != task:
            continue
        default = groups.get((table["default_method"], sparsity))
        # any recovery modifier, on the default or on one of its schedules (``-cd10+...``); ``+steps=`` rows are the
        # default trained longer: the equal-token baselines
        variants = {
            m: g
            for (m, s), g in groups.items()
            if s == sparsity and _is_variant(m, table["default_method"]) and "+steps=" not in m
        }
        if not default or not variants:
            continue
        default_gap = _gap(task, summary(r[metric] for r in default).mean, dense)
        best = _best_variant(variants, metric, table["direction"])
        best_gap = _gap(task, summary(r[metric] for r in variants[best]).mean, dense)
        if goal is None:
            goal_clause = "no goal set for this cell."
        else:
            met = best_gap[1] <= goal if kind == "ratio" else best_gap[1] >= goal
            goal_words = f"at most {goal:.2f}x" if kind == "ratio" else f"within {-goal:.1f} points"
            goal_clause = f"goal {goal_words}: " + ("met." if met else "not met.")
        tokens = _total_tokens(variants[best])
        reruns = _longer(groups, table, sparsity, _total_tokens(default))  # the default again, with today's code
        rerun = (
            f" (rerun with the study's code: {_gap(task, summary(r[metric] for r in reruns).mean, dense)[0]}, "
            f"n={len(reruns)})"
            if reruns
            else ""
        )
        # the variant against the default run with the same code and environment when there is such a rerun
        same_env = _gap(task, summary(r[metric] for r in reruns).mean, dense) if reruns else default_gap
        line = (
            f"{TASK_WORDS[task]}, {sparsity:.0%} {_granularity(task)}: default {default_gap[0]} dense LoRA{rerun}; best "
            f"recovery variant `{best}` {best_gap[0]} "
            f"(n={len(variants[best])}, {tokens:,.0f} training tokens in all"
            + ("" if _better(best_gap[1], same_env[1], kind) else ", not better than the default")
            + f"); {goal_clause}"
        )
        longer = _longer(groups, table, sparsity, tokens)
        if tokens != _total_tokens(default) and longer:
            same = _gap(task, summary(r[metric] for r in longer).mean, dense)
            line += f" At equal tokens ({tokens:,.0f}) the default trained longer is {same[0]} (n={len(longer)})."
        line += _equal_wall_time(task, groups, table, sparsity, variants[best], dense)
        line += _cost(groups, variants[best], reruns or default)
        line += _against_dense_with_the_same_change(task, groups, table, best, variants[best])
        out.append(line)
    return out


def _best_variant(variants: dict, metric: str, direction: str) -> str:
    """The best variant, chosen pair by pair on the seeds both ran: a variant replaces the best so far when its mean
    over the seeds they share is better (over all their seeds when they share none). So a variant run on one seed
    does not win over one run on two only because the other's second seed was harder. Ties keep the first found."""

    def ahead(a, b) -> bool:
        seeds = {r["seed"] for r in variants[a]} & {r["seed"] for r in variants[b]}
        mean_a, mean_b = (
            summary(r[metric] for r in variants[m] if not seeds or r["seed"] in seeds).mean for m in (a, b)
        )
        return better(mean_a, mean_b, direction)

    best = None
    for name in variants:
        if best is None or ahead(name, best):
            best = name
    return best


def peer_recovery_lines(task, rows, table, dense) -> list[str]:
    """The peers given the same recovery as LoRAPrune: per peer modifier row (``wanda-sp+kd=...``), the peer
    without it (its ``+steps=`` rerun with the study's code when there is one) beside LoRAPrune's default with and
    without the same modifier, and which of the two ends ahead."""
    out = []
    metric = table["metric"]
    groups = _rows_by_variant(rows, metric)
    default = table["default_method"]

    def mean_gap(group):
        return _gap(task, summary(r[metric] for r in group).mean, dense)

    def without(method, sparsity, tokens):
        reruns = [r for (m, s), g in groups.items() if s == sparsity and m.startswith(f"{method}+steps=") for r in g]
        reruns = [r for r in reruns if _total_tokens([r]) == tokens]
        return reruns or groups.get((method, sparsity))

    for (method, sparsity), group in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        peer, _, modifier = method.partition("+")
        if peer not in table["peers"] or not modifier or modifier.startswith("steps="):
            continue
        base_tokens = summary(r["train_tokens"] for r in group).mean
        plain = without(peer, sparsity, base_tokens)
        ours, ours_plain = groups.get((f"{default}+{modifier}", sparsity)), without(default, sparsity, base_tokens)
        if not plain or not ours or not ours_plain:
            continue
        peer_gap, our_gap = mean_gap(group), mean_gap(ours)
        ahead = _better(our_gap[1], peer_gap[1], "ratio" if table["direction"] == "lower" else "points")
        verdict = "LoRAPrune still ahead" if ahead else f"{peer} ahead"
        # a lead smaller than the seed-to-seed spread of either side (where it was measured) is not one
        mine, theirs = summary(r[metric] for r in ours), summary(r[metric] for r in group)
        spread = max(x.std for x in (mine, theirs) if x.n > 1) if max(mine.n, theirs.n) > 1 else None
        if spread is not None and abs(mine.mean - theirs.mean) <= spread:
            verdict = (
                f"a tie: {abs(mine.mean - theirs.mean):.3g} {metric} apart, within the seed-to-seed spread "
                f"({spread:.3g})"
            )
        wins, both = paired_wins(ours + group, metric, table["direction"], sparsity, ours[0]["method"], method)
        seeds = f"; paired by seed, LoRAPrune ahead on {wins} of {both}" if both else ""
        out.append(
            f"{TASK_WORDS[task]}, {sparsity:.0%} {_granularity(task)}, the same recovery for a peer (`+{modifier}`): "
            f"{peer} {mean_gap(plain)[0]} without it, {peer_gap[0]} with it (n={len(group)}); LoRAPrune "
            f"{mean_gap(ours_plain)[0]} without it, {our_gap[0]} with it (n={len(ours)}): {verdict}{seeds}."
        )
    return out


#: modifiers that change how any LoRA trains, pruned or not: the ones dense LoRA can be given too
LORA_MODIFIERS = ("lr", "r", "norms")


def _against_dense_with_the_same_change(task, groups, table, variant, variant_rows) -> str:
    """`` Against dense LoRA with the same +lr=...``: when dense LoRA was also run with the variant's LoRA
    modifiers (a learning rate, a rank, trainable norms: changes that may help any LoRA, not the pruned model only;
    what only pruning has, such as ``+channels=`` or a teacher, is left out), the gap to that run."""
    lora = [m for m in variant.split("+")[1:] if m.partition("=")[0] in LORA_MODIFIERS]
    modifiers = "+".join(lora)
    if not modifiers:
        return ""
    same = groups.get((f"dense-lora+{modifiers}", 0.0))
    if not same:
        return ""
    metric = table["metric"]
    dense = summary(r[metric] for r in same).mean
    gap = _gap(task, summary(r[metric] for r in variant_rows).mean, dense)[0]
    return f" Against dense LoRA with the same `+{modifiers}` ({dense:.4g}, n={len(same)}): {gap}."


#: modifiers of probes: measured in the study's table, never a "best recovery variant" (nothing a user can ship:
#: ``+bias`` lives in benchmark hooks that export drops)
PROBES = ("bias",)


def _is_variant(method: str, default: str) -> bool:
    """``default+<modifiers>`` or ``default-<schedule>+<modifiers>``: the default given a recovery change (not a
    probe)."""
    name, plus, modifiers = method.partition("+")
    if any(m.partition("=")[0] in PROBES for m in modifiers.split("+")):
        return False
    return bool(plus) and (name == default or name.startswith(f"{default}-"))


def _granularity(task: str) -> str:
    return "unstructured" if task.endswith("_unstructured") else "structured"


def _longer(groups, table, sparsity, tokens) -> list:
    """Rows of the default run with ``+steps=`` to ``tokens`` training tokens (all such groups together)."""
    prefix = f"{table['default_method']}+steps="
    return [
        r
        for (m, s), g in groups.items()
        if s == sparsity and m.startswith(prefix) and _total_tokens(g) == tokens
        for r in g
    ]


def _total_seconds(rows) -> float:
    """Mean wall time of the rows, a dense teacher's own training included."""
    return summary(r["seconds"] + r.get("teacher_train_seconds", 0.0) for r in rows).mean


def _equal_wall_time(task, groups, table, sparsity, variant_rows, dense) -> str:
    """`` At equal wall time ...``: the default (trained to any ``+steps=``) with the most tokens whose wall time
    does not exceed the variant's own plus its teacher's; empty for a variant without a teacher (its wall time is
    its tokens' on the same code, and single runs on a shared machine vary more than the step cost does)."""
    if not all("seconds" in r for r in variant_rows) or not any("teacher_train_seconds" in r for r in variant_rows):
        return ""  # only a teacher's training makes a variant cost more time than its tokens say
    wall = _total_seconds(variant_rows)
    default = table["default_method"]
    fitting = [
        g
        for (m, s), g in groups.items()
        if s == sparsity
        and (m == default or m.startswith(f"{default}+steps="))
        and all("seconds" in r for r in g)
        and _total_seconds(g) <= wall
    ]
    if not fitting:
        return ""
    longest = max(fitting, key=_total_tokens)
    gap = _gap(task, summary(r[table["metric"]] for r in longest).mean, dense)[0]
    return (
        f" At equal wall time ({wall:,.0f} s with any teacher's training), the default trained to "
        f"{_total_tokens(longest):,.0f} tokens ({_total_seconds(longest):,.0f} s, n={len(longest)}) is {gap}."
    )


def _cost(groups, variant_rows, default_rows) -> str:
    """`` Its cost: ...``: the variant's fastest run (with any teacher's training) against the default's fastest
    (the least disturbed of each on a shared machine) and its mean peak RSS against dense LoRA's run with the study's
    code (the peers file's, measured with older code, only when the study has none), with the issue's cost goals
    (:data:`COST_GOALS`); empty where a side has no wall time or memory recorded."""

    def fastest(rows):
        timed = [r["seconds"] + r.get("teacher_train_seconds", 0.0) for r in rows if "seconds" in r]
        return min(timed) if timed else None

    ours, theirs = fastest(variant_rows), fastest(default_rows)
    dense_rows = groups.get(("dense-lora", 0.0)) or []
    memory = mean_of(variant_rows, "peak_rss_mib")
    own = [r for r in dense_rows if not r.get("from_peers_file")]
    dense_memory = mean_of(own, "peak_rss_mib") or mean_of(dense_rows, "peak_rss_mib")
    if ours is None or theirs is None or memory is None or dense_memory is None:
        return ""

    def verdict(ratio, goal):
        return "met" if ratio <= goal else "not met"

    time_ratio, memory_ratio = ours / theirs, memory / dense_memory
    return (
        f" Its cost: fastest run {ours:,.0f} s against the default's {theirs:,.0f} s ({time_ratio:.2f}x; goal at most "
        f"{COST_GOALS['time']}x: {verdict(time_ratio, COST_GOALS['time'])}), peak RSS {memory:,.0f} MiB against "
        f"dense LoRA's {dense_memory:,.0f} ({memory_ratio:.2f}x; goal at most {COST_GOALS['memory']}x: "
        f"{verdict(memory_ratio, COST_GOALS['memory'])})."
    )


def _better(gap: float, other: float, kind: str) -> bool:
    """A smaller perplexity ratio, or a larger accuracy difference."""
    return gap < other if kind == "ratio" else gap > other


def _units_removed(rows) -> str:
    """``"33% / 20%"``: the fraction of heads and of channels removed (mean over the rows), ``-`` where unknown."""
    if not any({"heads", "channels"} & set(r.get("sparsity_by_unit") or {}) for r in rows):
        return "-"  # unstructured: no whole unit removed
    parts = []
    for unit in ("heads", "channels"):
        found = summary((r.get("sparsity_by_unit") or {}).get(unit, 0.0) for r in rows if r.get("sparsity_by_unit"))
        parts.append("-" if found is None else f"{found.mean:.0%}")
    return " / ".join(parts)


def _total_tokens(rows) -> float:
    """Mean training tokens of the rows, a dense teacher's own training included."""
    return summary(r.get("total_train_tokens", r["train_tokens"]) for r in rows).mean


def cost_line() -> Optional[str]:
    """What a distillation step costs, from the step-cost run under the Trainer's bf16 autocast (the study's
    setting), against the issue's goals; None when that run is missing."""
    runs = [d for d in load("step_cost_*_distill.json").values() if d["settings"].get("autocast")]
    if not runs:
        return None
    data = runs[-1]
    s = data["settings"]
    distilled = [r for r in data["rows"] if r.get("time_vs_default") is not None and r.get("teacher")]
    if not distilled:
        return None
    parts = "; ".join(
        f"toward {TEACHER_WORDS.get(r['teacher'], r['teacher'])} {r['time_vs_default']:.2f}x the default's step "
        f"and {r['rss_vs_lora']:.2f}x plain LoRA's peak memory"
        for r in distilled
    )
    slowest = max(r["time_vs_default"] for r in distilled)
    heaviest = max(r["rss_vs_lora"] for r in distilled)
    return (
        f"Cost of a distillation step ({s['model']}, batch {s['batch']} x {s['seq']} tokens, {s['autocast']} "
        f"autocast, {s.get('rounds', 1)} rounds): {parts}. Goals at most {COST_GOALS['time']}x the default's time: "
        f"{'met' if slowest <= COST_GOALS['time'] else 'not met'}; at most {COST_GOALS['memory']}x LoRA's memory: "
        f"{'met' if heaviest <= COST_GOALS['memory'] else 'not met'}."
    )


def split_cost_section(lines) -> None:
    """``split_cost_smollm2.json``: for each split of the default's weight budget between heads and channels, the
    joint allocation's first-order estimate beside the held-out loss measured with those units masked (untrained
    adapter), with and without mean-input compensation; the split the estimate picks and the default's marked."""
    found = load("split_cost_smollm2.json")
    if not found:
        return
    data = next(iter(found.values()))
    rows = data["rows"]
    dense = next(r for r in rows if "budget_fraction" not in r)
    s = data["settings"]
    lines += [
        "### Splitting one weight budget between heads and channels, before training",
        "",
        f"Machine: {machine(data)}. SmolLM2-135M, fresh adapter, `activation` importance over {s['batches']} "
        f"training batches of {s['batch']} x {s['block_size']} tokens{', bf16 autocast' if s['bf16'] else ''}; "
        f"held-out loss on {s['eval_blocks']} test blocks (dense: {dense['held_out_loss']:.3f}); "
        f'{data["seconds"]:.0f} s{" (" + data["conditions"] + ")" if data.get("conditions") else ""}. The estimate is what `allocation="joint"` minimises; the compensated loss folds '
        "each removed unit's mean input into its consumer as a bias (FLAP's bias compensation).",
        "",
        "| weights removed | heads removed / KV group | channels removed | first-order estimate | held-out loss | "
        "with compensation | |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "budget_fraction" not in r:
            continue
        marks = ", ".join(
            word
            for flag, word in ((r["is_default_split"], "the default"), (r["is_joint_choice"], "estimate's choice"))
            if flag
        )
        lines.append(
            f"| {r['budget_fraction']:.2%} | {r['heads_removed_per_kv_group']} of {data['heads_per_kv_group']} | "
            f"{r['channels_removed']} of {data['channels_per_block']} | {r['first_order_estimate']:.2f} | "
            f"{r['held_out_loss']:.3f} | {r['held_out_loss_compensated']:.3f} | {marks} |"
        )
    lines.append("")


def readme_lines() -> list[str]:
    out = []
    for task in BASELINES:
        found = study(task)
        if found is not None:
            rows, table, dense, _ = found
            out += [f"- {v}" for v in verdicts(task, rows, table, dense.mean)]
            out += [f"- {v}" for v in peer_recovery_lines(task, rows, table, dense.mean)]
    cost = cost_line()
    return out + ([f"- {cost}"] if cost else [])


#: the README quickstart's recovery settings (learning rate 1e-3, rank 32 with lora_alpha 64, trained norms) as a
#: modifier of the study's method names: the README table's ``+ recipe`` rows (tests/test_docs.py checks that the
#: quickstart says the same)
RECIPE = "lr=0.001+r=32+norms"

#: what each modifier of a study run changes: the legend under docs/benchmarks.md's recovery tables
MODIFIER_WORDS = {
    "lr": "the learning rate",
    "r": "the LoRA rank (`lora_alpha` twice the rank)",
    "norms": "the normalisation layers train too (`modules_to_save=norm_module_names(base)`)",
    "kd": "distillation (teacher/weight/temperature) toward `dense` (a dense LoRA adapter trained first: its tokens "
    "count), `unmasked` (the adapter, masks off) or `base` (the pretrained model)",
    "steps": "trained for that many steps; at the default's own count, the default rerun with the study's code, "
    "which the column *vs the default* compares with where there is one",
    "channels": "the default's weight budget spent on MLP channels alone (that fraction of them; no head removed)",
    "joint": '`allocation="joint"` at the default\'s weight budget: the importance splits it between heads and '
    "channels",
    "init": "the pruned adapter starts from the dense LoRA adapter's weights (its tokens count)",
    "recovery_lr": "the learning rate times that factor once the masks are final",
    "bias": "a probe, not in the package: FLAP's bias compensation for the removed inputs, plus a trained bias",
    "budget": "`budget` (global: units ranked across blocks)",
}
#: schedules of the default, written ``<default>-<schedule>``
SCHEDULE_WORDS = {"cd10": "pruning from 10% to 90% of the steps (the reference code's window)"}


def _changes(method: str, default: str) -> tuple[str, frozenset]:
    """(family, changes): ``loraprune-activation-cd10+r=32+norms`` -> (the default, {"-cd10", "r=32", "norms"})."""
    name, _, modifiers = method.partition("+")
    changes = {m for m in modifiers.split("+") if m}
    if name.startswith(f"{default}-"):
        changes.add(name[len(default) :])
        name = default
    return name, frozenset(changes)


def _extends(method: str, methods, default: str) -> Optional[str]:
    """The run of the same family whose changes are the most of ``method``'s (a proper subset): what ``method``
    adds its last change to; None when there is none, or when it is the default itself (a column of its own)."""
    family, changes = _changes(method, default)
    best = None
    for other in sorted(methods):
        f, c = _changes(other, default)
        if f == family and c < changes and (best is None or len(c) > len(_changes(best, default)[1])):
            best = other
    return None if best == default else best


def _relative(task: str, rows, reference, metric: str) -> str:
    """``rows`` against ``reference`` on the seeds both ran: a perplexity ratio or an accuracy difference in points,
    with the number of shared seeds; ``-`` when they share none."""
    seeds = {r["seed"] for r in rows} & {r["seed"] for r in reference or ()}
    if not seeds:
        return "-"
    ours, theirs = (summary(r[metric] for r in group if r["seed"] in seeds).mean for group in (rows, reference))
    relative = f"{ours / theirs:.3f}x" if task.startswith("smollm2") else f"{100 * (ours - theirs):+.2f} pt"
    return f"{relative} ({len(seeds)})"


def _short(method: str, default: str) -> str:
    """``+lr=0.001`` for the default given a modifier (``loraprune-activation+lr=0.001``), else the name."""
    return method[len(default) :] if method.startswith(default) and method != default else method


def recovery_lines() -> list[str]:
    """docs/benchmarks.md's recovery tables: per task and sparsity, every run of the study against dense LoRA, the
    default (rerun with the study's code where there is such a rerun) on the seeds both ran, and the run it adds its
    last change to; then the legend of the modifiers that appear."""
    out, seen = [], set()
    for task in BASELINES:
        found = study(task)
        if found is None:
            continue
        rows, table, dense, data = found
        metric, default = table["metric"], table["default_method"]
        groups = _rows_by_variant(rows, metric)
        fmt = "{:.2f}" if table["direction"] == "lower" else "{:.4f}"
        plain_runs = [r for r in rows if not _changes(r["method"], default)[1] and r.get("learning_rate")]
        rate = summary(r["learning_rate"] for r in plain_runs)
        rank = summary(r.get("r") for r in plain_runs)
        settings = ", ".join(
            words
            for value, words in ((rank, "rank {:g}"), (rate, "learning rate {:g}"))
            if value is not None
            for words in [words.format(value.mean)]
        )
        for sparsity in sorted({s for _, s in groups}, reverse=True):
            at = {m: g for (m, s), g in groups.items() if s == sparsity and m != "dense-lora"}
            if not at:
                continue
            plain = groups.get((default, sparsity))
            reference = (_longer(groups, table, sparsity, _total_tokens(plain)) if plain else None) or plain
            cell = f"{sparsity:.0%} {_granularity(task)}" if sparsity else "no pruning"
            out += [
                f"**{TASK_WORDS[task]}, {cell}** (dense LoRA {metric} {dense.mean:.4g}, n={dense.n}"
                + (f"; without a modifier: {settings}" if settings else "")
                + f"; peft_loraprune {data['machine'].get('peft_loraprune')}, {data['machine']['date'][:10]}):",
                "",
                f"| run | seeds | {metric} | vs dense LoRA | vs the default, same seeds | vs the run it extends, "
                "same seeds | tokens in all |",
                "|---|---:|---:|---:|---:|---|---:|",
            ]
            order = sorted(at, key=lambda m: (m != default, _changes(m, default)[0] != default, m))
            for method in order:
                group = at[method]
                stat = summary(r[metric] for r in group)
                family, changes = _changes(method, default)
                seen |= {c.partition("=")[0] for c in changes}
                extends = _extends(method, at, default)
                versus_default = (
                    _relative(task, group, reference, metric)
                    if sparsity
                    and method != default
                    and family == default
                    and method not in {r["method"] for r in reference or ()}
                    else "-"
                )
                versus_extended = (
                    f"{_relative(task, group, at[extends], metric)} against `{_short(extends, default)}`"
                    if extends
                    else "-"
                )
                name = f"`{_short(method, default)}`" + (" (peers file)" if group[0].get("from_peers_file") else "")
                out.append(
                    f"| {name} | {len(group)} | {fmt.format(stat.mean)} | {_gap(task, stat.mean, dense.mean)[0]} | "
                    f"{versus_default} | {versus_extended} | {_total_tokens(group):,.0f} |"
                )
            out.append("")
    legend = [f"`+{k}`: {MODIFIER_WORDS.get(k, 'see benchmarks/peers.py')}" for k in MODIFIER_WORDS if k in seen]
    legend += [f"`{k}`: {SCHEDULE_WORDS[k[1:]]}" for k in sorted(seen) if k[1:] in SCHEDULE_WORDS]
    legend += [
        f"`+{k}`: see `benchmarks/peers.py`"
        for k in sorted(seen)
        if k not in MODIFIER_WORDS and k[1:] not in SCHEDULE_WORDS
    ]
    legend.insert(0, "a name starting with `+` or `-`: the default (the first row) with that change")
    return out + ["Names: " + "; ".join(legend) + "."] if out else out
