"""Cost tables and plots: step time and memory against plain LoRA, the element-masked blocks, the memory profile,
export speed."""

from __future__ import annotations

import matplotlib.pyplot as plt
from report_common import (
    HERE,
    load,
    machine,
    memory_keys,
    on_gpu,
    ratio,
    rewrites_removed_weights,
)

#: step_cost.py's distillation teachers, in words
TEACHERS = {"unmasked": "the adapter with its masks off", "teacher": "a second, dense adapter"}


def step_cost_section(lines):
    for _name, data in load("step_cost_*.json").items():
        s = data["settings"]
        label, peak, vs_lora, vs_grad = memory_keys(data)
        where = ""
        if on_gpu(data):
            where = (
                f", on the GPU ({s.get('dtype', 'float32')} pretrained weights, float32 adapters; memory is PyTorch's "
                "peak allocated device memory; at this size the GPU waits on Python and kernel launches, so step "
                "times vary by up to 30% from step to step and time ratios are rough)"
            )
        if s.get("autocast"):  # what Trainer(bf16=True) runs: float32 weights, matmuls under autocast
            where += f", {s['dtype']} weights under {s['autocast']} autocast (as `Trainer(bf16=True)` runs)"
        if s.get("quantization", "none") != "none":  # bitsandbytes base: plain LoRA is QLoRA
            where += f", {s['quantization']} base (bitsandbytes; LoRA is QLoRA on the same base)"
        note = f" ({s['note']})" if s.get("note") else ""
        lines += [
            f"### Step time and memory: `{s['model']}`, batch {s['batch']} x {s['seq']} tokens{where}{note}",
            "",
            f"Machine: {machine(data)}. Median of {s['steps']} steps after {s['warmup']} warm-up steps; "
            "each configuration in its own process"
            + (
                f"; {s['rounds']} interleaved rounds, ratios taken within a round, medians over rounds."
                if s.get("rounds", 1) > 1
                else " (one round)."
                if on_gpu(data)
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
            if r.get("pruning_interval") and not rewrites_removed_weights(r):
                rewrite, stale = rewrite + " *", True
            lines.append(
                f"| {r['config']} | {r['median_step_s'] * 1000:.1f} | {r['median_importance_s'] * 1000:.1f} | "
                f"{ratio(r, 'time_vs_lora')} | {rewrite} | {ratio(r, 'amortised_time_vs_lora')} | {r[peak]:.0f} | "
                f"{ratio(r, vs_lora)} | {ratio(r, vs_grad)} |"
            )
        distilled = [r for r in data["rows"] if r.get("time_vs_default") is not None and r.get("teacher")]
        recipe = [r for r in data["rows"] if r.get("time_vs_default") is not None and r.get("recipe_of")]
        by_config = {r["config"]: r for r in data["rows"]}
        if recipe:
            lines += [
                "",
                "The recovery recipe (rank 32, alpha 64, the normalisation layers trained), against the same "
                "configuration at rank 8 of the same round: "
                + "; ".join(
                    f"`{r['config']}` {r['time_vs_default']:.2f}x `{r['recipe_of']}`'s step time"
                    + _per_round(r, by_config.get(r["recipe_of"]))
                    + f" and {r['rss_vs_default']:.2f}x its peak memory"
                    for r in recipe
                )
                + ".",
            ]
        if distilled:
            lines += [
                "",
                "Distillation (weight 0.5, temperature 2) added to the default, against `loraprune_structured` of the "
                "same round: "
                + "; ".join(
                    f"`{r['config']}` (teacher: {TEACHERS.get(r['teacher'], r['teacher'])}) "
                    f"{r['time_vs_default']:.2f}x its step time and "
                    f"{r['rss_vs_default']:.2f}x its peak memory, teacher outputs {r['teacher_memory_mib']:.1f} MiB"
                    for r in distilled
                )
                + ".",
            ]
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


def _per_round(row: dict, other) -> str:
    """`` (per round: 1.18x, 0.84x)``: the step-time ratio of ``row`` to ``other`` in each interleaved round, so a
    reader sees how far the median of two rounds can be trusted; empty for a single round."""
    if not other or len(row.get("rounds") or ()) < 2 or len(other.get("rounds") or ()) != len(row["rounds"]):
        return ""
    ratios = [a["median_step_s"] / b["median_step_s"] for a, b in zip(row["rounds"], other["rounds"])]
    return " (per round: " + ", ".join(f"{x:.2f}x" for x in ratios) + ")"


def masked_blocks_rows(data) -> list[str]:
    """Lines of one ``masked_blocks_*.json``: a layer's forward + backward with blocked passes vs one block."""
    s = data["settings"]
    blocks = [k for k in data["rows"][0]["time_vs_one_block"] if k not in ("one block", "block_elements")]
    out = [
        f"Element-masked forward + backward of the {s['shapes']} layer shapes (`benchmarks/masked_blocks.py`, "
        f"{machine(data)}; median of {s['repeats']} interleaved repetitions), time against one block per weight "
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
    for data in load("masked_blocks_*.json").values():
        lines += ["### Blocked passes of the element-masked product", "", *masked_blocks_rows(data), ""]


def element_breakdown_rows(data) -> list[str]:
    """Lines of one ``element_step_breakdown_*.json``: an element-masked layer step against LoRA's, the weight-sized
    kernels it runs and the floors those kernels imply."""
    s = data["settings"]
    kernels = list(data["rows"][0]["kernel_ms"])
    out = [
        f"Where an element-masked layer step goes: the {s['shapes']} layer shapes summed "
        f"(`benchmarks/element_step_breakdown.py`, {machine(data)}; median of {s['repeats']} interleaved "
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
    for data in load("element_step_breakdown_*.json").values():
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
    for _name, data in load("memory_profile_*.json").items():
        s = data["settings"]
        lines += [
            f"### Where the memory goes: `{s['model']}`, batch {s['batch']} x {s['seq']} tokens"
            + (f", {data['label']}" if data.get("label") else ""),
            "",
            f"Machine: {machine(data)}. One profiled step after {s['warmup']} warm-up steps with masks at 50%; "
            "live heap sampled every millisecond (glibc `mallinfo2`), peaks above the live heap at the step's "
            "start; pruning state = live heap after the step minus plain LoRA's.",
            "",
            *memory_profile_rows(data),
            "",
        ]


def step_cost_plot(lines):
    """Claim 1 at a glance: time and peak memory of every configuration relative to plain LoRA, per setting."""
    results = load("step_cost_*.json")
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (_name, data) in zip(axes[0], results.items()):
        rows = [r for r in data["rows"] if r["config"] != "lora"]
        labels = [r["config"].replace("loraprune_", "").replace("_structured", "") for r in rows]
        label, _, vs_lora, _ = memory_keys(data)
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["time_vs_lora"] for r in rows], width=0.4, label="step time")
        ax.bar([i + 0.2 for i in x], [r[vs_lora] for r in rows], width=0.4, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.1, color="red", lw=0.8, ls="--", label="1.10x target")
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        s = data["settings"]
        where = f", {data['machine']['cuda']}" if on_gpu(data) else ", CPU"
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
    for name, data in load("export_speed_*.json").items():
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


def export_section(lines):
    for _name, data in load("export_speed_*.json").items():
        s = data["settings"]
        batches = s["batches"].split(",")
        lines += [
            f"### Exported model speed: `{s['model']}`, {s['seq']} tokens"
            + (f", {s.get('dtype')} on the GPU" if s.get("device", "cpu").startswith("cuda") else ""),
            "",
            f"Machine: {machine(data)}."
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
