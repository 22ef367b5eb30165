"""Plots for the examples (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_sparsity_per_layer(report, path: str, title: str = "") -> str:
    """Bar chart of the sparsity of every block (one bar per unit: heads, channels or weights)."""
    units = sorted({layer.unit for layer in report.layers})
    blocks = sorted({layer.block for layer in report.layers if layer.block is not None})
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(blocks) * len(units) + 2), 3.6))
    width = 0.8 / max(1, len(units))
    for i, unit in enumerate(units):
        values = []
        for block in blocks:
            rows = [r for r in report.layers if r.unit == unit and r.block == block]
            total = sum(r.total for r in rows)
            values.append(100 * (1 - sum(r.kept for r in rows) / total) if total else 0.0)
        ax.bar([b + (i - (len(units) - 1) / 2) * width for b in blocks], values, width, label=unit)
    ax.axhline(100 * report.target_sparsity, color="black", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("pruned (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(blocks)
    ax.set_title(title or f"sparsity per layer ({report.granularity})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
