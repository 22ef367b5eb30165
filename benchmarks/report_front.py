"""The quality/speed front (``benchmarks/front.py``): held-out perplexity against the exported model's CPU latency.

Renders, from ``results/front_smollm2.json``: the table (one line per method and fraction, seeds averaged), the
verdict lines against the issue's goals (the best perplexity at 0.55x the dense decode latency or less against
2.5x dense LoRA's; whether every peer point is beaten on both axes by some LoRAPrune point), and the plot
``docs/images/front_smollm2.png`` (perplexity against decode and prefill latency, every point labelled).
"""

from __future__ import annotations

import json
import math
import statistics

import matplotlib.pyplot as plt
import matplotlib.ticker
from report_common import HERE, load, machine

#: the goal of the front's issue: at this decode latency (vs dense) or less ...
LATENCY_GOAL = 0.55
#: ... held-out perplexity at most this many times dense LoRA's
PERPLEXITY_GOAL = 2.5
PLOT = HERE.parent / "docs" / "images" / "front_smollm2.png"

_NAMES = {
    "loraprune-activation": "LoRAPrune",
    "dense-lora": "dense LoRA",
    "shortgpt": "ShortGPT",
    "minitron": "Minitron",
    "wanda-sp": "Wanda-sp",
    "llm-pruner": "LLM-Pruner",
}


def _modifiers(method: str) -> tuple[str, dict]:
    name, *mods = method.split("+")
    return name, dict(m.partition("=")[::2] for m in mods)


def label(row: dict) -> str:
    """A reader's name for a row: method, the units it prunes, the fraction; in brackets how the split was chosen,
    how blocks were scored and when pruning ended where those differ from the plain run."""
    name, mods = _modifiers(row["method"])
    notes = []
    if "joint" in mods:
        notes.append("joint")
    if name.startswith("loraprune-activation-cd"):  # the cubic window ending earlier: more steps to recover
        ending = 100 - int(name.rpartition("cd")[2])
        name = "loraprune-activation"
    else:
        ending = None
    out = _NAMES.get(name, name)
    if name == "dense-lora":
        return out
    axes = mods.get("axes")
    if axes is None:
        axes = "channels" if "channels" in mods else ("layers" if name == "shortgpt" else "heads/channels")
    if "split" in mods:  # a fixed fraction per kind; kinds not named lose the row's sparsity
        split = dict(part.split(":") for part in mods["split"].split("/"))
        out += " " + " + ".join(f"{a} {float(split.get(a, row['sparsity'])):.0%}" for a in axes.split("/"))
    else:
        out += f" {axes.replace('/', '+')} {row['sparsity']:.0%}"
    if name.startswith("loraprune") and "layers" in axes.split("/") and "joint" not in mods:
        # how blocks were scored (rows without the field predate Block Influence: the Taylor gate)
        notes.append(row.get("layer_importance", mods.get("blocks", "taylor")))
    if ending is not None:
        notes.append(f"pruned by {ending}% of the steps")
    return out + (f" ({', '.join(notes)})" if notes else "")


def is_loraprune(row: dict) -> bool:
    return row["method"].startswith("loraprune")


def points() -> tuple[dict | None, list[dict]]:
    """``(data, points)``: one point per method and fraction with its mean perplexity over seeds and the latency
    ratios (rows without latency are left out)."""
    data = load("front_smollm2.json").get("front_smollm2")
    if data is None:
        return None, []
    groups: dict = {}
    for row in data["rows"]:
        groups.setdefault((row["method"], row["sparsity"]), []).append(row)
    # rows whose exports have the same shapes run the same kernels: one latency for them all (the median of their
    # timings), so that timing noise between identical models (about 5% here) cannot decide a comparison
    by_shape: dict = {}
    for row in data["rows"]:
        config = row.get("export", {}).get("config")
        if config is not None and row.get("decode_latency_vs_dense") is not None:
            by_shape.setdefault(json.dumps(config, sort_keys=True), []).append(row)
    shared = {}
    for rows in by_shape.values():
        decode = statistics.median(r["decode_latency_vs_dense"] for r in rows)
        prefill = statistics.median(r["prefill_latency_vs_dense"] for r in rows)
        for r in rows:
            shared[id(r)] = (decode, prefill, len(rows))
    out = []
    for rows in groups.values():
        timed = [r for r in rows if r.get("decode_latency_vs_dense") is not None]
        if not timed:
            continue
        first = timed[0]
        out.append(
            {
                "label": label(first),
                "loraprune": is_loraprune(first),
                "dense": first["method"].startswith("dense"),
                "perplexity": statistics.mean(r["perplexity"] for r in rows),
                "seeds": sorted(r["seed"] for r in rows),
                "decode": shared.get(id(first), (first["decode_latency_vs_dense"],))[0],
                "prefill": shared.get(id(first), (None, first["prefill_latency_vs_dense"]))[1],
                "params_removed": first.get("export", {}).get("params_fraction_removed"),
                "seconds": max(r["seconds"] for r in rows),
                "copied": any("copied_from" in r for r in rows),
                "timed_on": first["latency"]["timed_on"],
            }
        )
    return data, sorted(out, key=lambda p: p["decode"], reverse=True)


def _dense_perplexity(pts) -> float | None:
    dense = [p["perplexity"] for p in pts if p["dense"]]
    return dense[0] if dense else None


def table_lines() -> list[str]:
    """The front as a table, slowest first."""
    data, pts = points()
    if not pts:
        return ["No timed rows yet: run `benchmarks/front.py latency` after the training rows."]
    dense = _dense_perplexity(pts)
    lines = [
        "| model | held-out perplexity | vs dense LoRA | decode latency | prefill latency | parameters removed | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pts:
        vs = f"{p['perplexity'] / dense:.2f}x" if dense else "-"
        removed = "-" if p["params_removed"] is None else f"{p['params_removed']:.0%}"
        star = " *" if p["timed_on"] in ("shape twin", "recorded config") else ""
        lines.append(
            f"| {p['label']} | {p['perplexity']:.2f} | {vs} | {p['decode']:.2f}x{star} | {p['prefill']:.2f}x{star} | "
            f"{removed} | {len(p['seeds'])} |"
        )
    s = data["settings"]
    lat = data.get("latency_settings", {})
    tokens = s["steps"] * s["batch"] * s["block_size"]
    lines += [
        "",
        f"SmolLM2-135M on Wikipedia leads, {tokens:,d} training tokens per run, LoRA rank 32 with trained norms at "
        f"learning rate 1e-3, bfloat16 autocast; latency of the exported float32 model against the dense one, "
        f"batch 1, {lat.get('new_tokens', 128)} decoded tokens with the cache and a {lat.get('prefill', 512)}-token "
        f"prefill, {lat.get('threads', 2)} threads, median of {lat.get('rounds', 3)} interleaved rounds. "
        "(*) timed on random weights of the exported shapes (the export folder was not kept). Rows with the same exported shapes share "
        "one latency, the median of their timings. Machine: " + machine(data) + ".",
    ]
    return lines


def dominates(a: dict, b: dict) -> bool:
    """``a`` is both faster (decode) and better (perplexity) than ``b``, or equal on one and better on the other."""
    return (
        a["decode"] <= b["decode"]
        and a["perplexity"] <= b["perplexity"]
        and (a["decode"] < b["decode"] or a["perplexity"] < b["perplexity"])
    )


def verdict_lines() -> list[str]:
    """The goals, checked on the points."""
    _, pts = points()
    dense = _dense_perplexity(pts)
    if not pts or dense is None:
        return ["The front has no timed dense row yet."]
    lines = []
    fast = [p for p in pts if p["loraprune"] and p["decode"] <= LATENCY_GOAL]
    if fast:
        best = min(fast, key=lambda p: p["perplexity"])
        met = "met" if best["perplexity"] <= PERPLEXITY_GOAL * dense else "not met"
        lines.append(
            f"- At {LATENCY_GOAL}x the dense decode latency or less, the best LoRAPrune point is {best['label']}: "
            f"{best['perplexity'] / dense:.2f}x dense LoRA's perplexity at {best['decode']:.2f}x latency "
            f"(goal at most {PERPLEXITY_GOAL}x: {met})."
        )
    else:
        lines.append(f"- No LoRAPrune point decodes at {LATENCY_GOAL}x the dense latency or less yet (goal not met).")
    ours = [p for p in pts if p["loraprune"]]
    for peer in (p for p in pts if not p["loraprune"] and not p["dense"]):
        winners = [p for p in ours if dominates(p, peer)]
        if winners:
            best = min(winners, key=lambda p: p["perplexity"])
            lines.append(
                f"- {peer['label']} ({peer['perplexity']:.2f} at {peer['decode']:.2f}x): as fast or slower, and worse, than "
                f"{best['label']} ({best['perplexity']:.2f} at {best['decode']:.2f}x)."
            )
        else:
            lines.append(
                f"- {peer['label']} ({peer['perplexity']:.2f} at {peer['decode']:.2f}x): no LoRAPrune point is both "
                "faster and better (LoRAPrune loses here)."
            )
    return lines


def _clusters(pts: list[dict], key: str) -> list[list[dict]]:
    """The points grouped where their markers overlap: latency within 0.015 and perplexity within 3%."""
    clusters: list[list[dict]] = []
    for p in sorted(pts, key=lambda p: (p[key], p["perplexity"])):
        for cluster in clusters:
            q = cluster[0]
            if abs(q[key] - p[key]) <= 0.015 and abs(math.log(q["perplexity"] / p["perplexity"])) <= 0.03:
                cluster.append(p)
                break
        else:
            clusters.append([p])
    return clusters


def _annotate(ax, fig, clusters: list[list[dict]], key: str, size: float = 6.5) -> None:
    """One stacked label per cluster, right of its point (left of the dense star), moved down where it would
    overlap a label placed before it, with a thin line back to its point when moved."""
    to_points = 72 / fig.dpi  # display pixels -> typographic points
    placed: list[tuple[float, float, float, float]] = []  # x0, x1, top, bottom in points
    anchors = [(ax.transData.transform((c[0][key], c[0]["perplexity"])) * to_points, c) for c in clusters]
    for (x, y), cluster in sorted(anchors, key=lambda a: -a[0][1]):
        lines = [p["label"] for p in cluster]
        right = not any(p["dense"] for p in cluster)
        width = max(len(line) for line in lines) * size * 0.5
        height = len(lines) * size * 1.25
        x0, x1 = (x + 5, x + 5 + width) if right else (x - 5 - width, x - 5)
        top = y + height / 2
        for px0, px1, ptop, pbottom in sorted(placed, key=lambda b: -b[3]):
            if px0 < x1 and x0 < px1 and pbottom < top and top - height < ptop:
                top = pbottom - 1  # below the label it would cover
        placed.append((x0, x1, top, top - height))
        dy = top - height / 2 - y
        ax.annotate(
            "\n".join(lines),
            (cluster[0][key], cluster[0]["perplexity"]),
            fontsize=size,
            xytext=(5 if right else -5, dy),
            textcoords="offset points",
            ha="left" if right else "right",
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if abs(dy) > size else None,
        )


def plot() -> None:
    """Perplexity against decode and prefill latency (both vs dense), every point labelled."""
    _, pts = points()
    if not pts:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, title in zip(axes, ("decode", "prefill"), ("batch-1 decoding, 128 tokens", "512-token prefill")):
        for p in pts:
            color = "black" if p["dense"] else ("tab:blue" if p["loraprune"] else "tab:orange")
            marker = "*" if p["dense"] else ("o" if p["loraprune"] else "s")
            ax.scatter(p[key], p["perplexity"], color=color, marker=marker, s=60 if p["dense"] else 30, zorder=3)
        ax.set_yscale("log")
        ax.set_xlim(min(p[key] for p in pts) - 0.03, 1.2)  # room for the labels right of the points
        ax.axvline(LATENCY_GOAL, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"latency vs the dense model ({title}, CPU)")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (lower is better)")
    axes[0].scatter([], [], color="tab:blue", marker="o", label="LoRAPrune")
    axes[0].scatter([], [], color="tab:orange", marker="s", label="peers, same LoRA recovery")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M: quality against speed of the exported models", fontsize=9)
    fig.tight_layout()
    for ax, key in zip(axes, ("decode", "prefill")):  # once the layout fixed where the points are drawn
        ax.get_ylim()  # settles the autoscaled limits the transform reads
        _annotate(ax, fig, _clusters(pts, key), key)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def page_lines(image: str = "../images/front_smollm2.png") -> list[str]:
    """The generated block of docs/how-to/speed.md (and docs/benchmarks.md with ``image`` relative to it): the
    plot, the table and the verdicts."""
    plot()
    picture = [f"![quality against speed]({image})", ""] if PLOT.exists() else []
    return [*picture, *table_lines(), "", *verdict_lines()]


def readme_lines() -> list[str]:
    """The README's picture of the front (nothing until the plot exists)."""
    plot()
    if not PLOT.exists():
        return []
    return ["![quality against speed](docs/images/front_smollm2.png)", "", *verdict_lines()[:1]]


def benchmark_lines() -> list[str]:
    return page_lines("images/front_smollm2.png")


def section(lines: list[str]) -> None:
    """RESULTS.md's section (the plot is written beside the docs)."""
    plot()
    lines += ["## Quality against speed (SmolLM2-135M, CPU)", "", *table_lines(), "", *verdict_lines(), ""]
    if PLOT.exists():
        lines += ["![front](../docs/images/front_smollm2.png)", ""]
