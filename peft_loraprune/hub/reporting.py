"""Sparsity reports: how much of an adapted model is pruned, overall and per layer.

Counts are read from the masks, in the granularity's units: heads and channels for structured adapters, weights
for unstructured and N:M ones. Every report also counts the weights of the adapted modules, which is what a
user's memory and disk follow. ``peft_model.print_sparsity()`` prints the one-line summary; the model card
and the Trainer logs use :meth:`SparsityReport.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class LayerSparsity:
    """One row of the report: a module (element granularity) or one kind of group in one block (structured)."""

    name: str
    unit: str
    total: int
    kept: int
    block: Optional[int] = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    adapter_name: str
    granularity: str
    target_sparsity: float
    layers: list[LayerSparsity] = field(default_factory=list)
    weights_total: int = 0
    weights_kept: int = 0

    @property
    def units_total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def units_kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of prunable units removed (layers kept dense are not counted)."""
        return 1.0 - self.units_kept / self.units_total if self.units_total else 0.0

    def sparsity_by_unit(self) -> dict[str, float]:
        out = {}
        for unit in sorted({layer.unit for layer in self.layers}):
            rows = [layer for layer in self.layers if layer.unit == unit]
            total = sum(r.total for r in rows)
            out[unit] = 1.0 - sum(r.kept for r in rows) / total if total else 0.0
        return out

    @property
    def weight_sparsity(self) -> float:
        return 1.0 - self.weights_kept / self.weights_total if self.weights_total else 0.0

    def summary(self) -> str:
        by_unit = ", ".join(f"{unit} {s:.2%}" for unit, s in self.sparsity_by_unit().items()) or "nothing prunable"
        return (
            f"sparsity: {self.sparsity:.2%} ({by_unit}; target {self.target_sparsity:.2%}) || "
            f"weights kept in adapted modules: {self.weights_kept:,d} / {self.weights_total:,d} "
            f"({1 - self.weight_sparsity:.2%})"
        )

    def to_dict(self) -> dict:
        return {
            "adapter_name": self.adapter_name,
            "granularity": self.granularity,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "sparsity_by_unit": self.sparsity_by_unit(),
            "weights_total": self.weights_total,
            "weights_kept": self.weights_kept,
            "weight_sparsity": self.weight_sparsity,
            "layers": [asdict(layer) | {"sparsity": layer.sparsity} for layer in self.layers],
        }

    def markdown_table(self) -> str:
        lines = ["| layer | unit | kept | total | sparsity |", "|---|---|---:|---:|---:|"]
        for layer in self.layers:
            lines.append(f"| {layer.name} | {layer.unit} | {layer.kept} | {layer.total} | {layer.sparsity:.2%} |")
        return "\n".join(lines)


def build_sparsity_report(tuner, adapter_name: str) -> SparsityReport:
    """Read every mask of ``adapter_name`` and count what is kept."""
    config = tuner.peft_config[adapter_name]
    report = SparsityReport(adapter_name, config.granularity, config.effective_target_sparsity)
    layers = list(tuner.prune_layers(adapter_name))
    structured = not config.is_element_granularity and bool(layers)
    # what export removes besides the masks' own rows and columns: closed blocks whole, and removed stream
    # channels from the columns of every module reading the stream
    closed_blocks: set = set()
    stream_kept, readers = None, set()
    if structured and "layers" in config.prune_structures:
        gates = tuner.block_gates(adapter_name)
        closed_blocks = {gate.block for gate in gates if not gate.kept(adapter_name)}
        report.layers.append(LayerSparsity("layers", "layers", len(gates), len(gates) - len(closed_blocks)))
    if structured and "hidden" in config.prune_structures:
        stream = tuner.residual_stream(adapter_name)
        stream_kept = stream.kept(adapter_name)
        readers = {name for name, _ in stream.readers}
        report.layers.append(LayerSparsity("hidden", "hidden", stream_kept.numel(), int(stream_kept.sum())))
    for name, layer in layers:
        rows = layer.lora_mask_rows[adapter_name]
        cols = layer.lora_mask_cols[adapter_name]
        if name in readers:
            cols = cols & stream_kept.to(cols.device)
        total = layer.out_features * layer.in_features
        elements = layer.element_mask(adapter_name)
        if closed_blocks and tuner.block_index(name) in closed_blocks:
            kept = 0
        elif elements is None:
            kept = int(rows.sum()) * int(cols.sum())
        else:
            kept = int((elements & rows[:, None] & cols[None, :]).sum())
        report.weights_total += total
        report.weights_kept += kept
        if config.is_element_granularity:
            report.layers.append(LayerSparsity(name, "weights", total, kept, tuner.block_index(name)))
    if not config.is_element_granularity and layers:
        for groups in tuner.structured_groups(adapter_name):
            kept = int(groups.kept(adapter_name).sum())
            report.layers.append(
                LayerSparsity(
                    f"block {groups.block} {groups.spec.structure}",
                    groups.spec.structure,
                    groups.spec.n_groups,
                    kept,
                    groups.block,
                )
            )
    return report
