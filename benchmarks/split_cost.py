"""What does each split of one weight budget between heads and channels cost, estimated and measured?

``allocation="joint"`` splits a budget of weights between attention heads and MLP channels by the summed
first-order estimates of the units removed (:meth:`GroupPruner.removal_costs`). On SmolLM2 it chose channels alone
at the default's 20% and 50% budgets; after training that won at 20% and lost at 50% (``peers_smollm2_distill.json``).
This script asks, before any training, whether a measured rate would choose differently: for every number of query
heads removed per KV group, the rest of the budget in channels, it records the estimate and the held-out loss of the
model with those units masked, and that loss again with each removed unit's mean input folded into its consumer as
a bias (FLAP's "bias compensation": ``W[:, removed] @ mean(x[removed])`` added to ``o_proj`` / ``down_proj``).

SmolLM2-135M (``peers.py``'s model and Wikipedia leads) with a fresh LoRAPrune adapter (B = 0, dropout 0), the
default criterion (``"activation"``) accumulated over ``--batches`` training batches through ``update_importance``;
the mean inputs come from the same batches. Units are chosen by the engine's own ranking
(:meth:`GroupPruner.remove_per_block`); the held-out loss is the mean token loss on ``--eval_blocks`` test blocks.

    python benchmarks/split_cost.py --bf16 --batches 32
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from common import table, write_result
from peers import SmolLM2Wikipedia
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig
from peft_loraprune.pruning.selection import prune_count

NAME = "split_cost_smollm2"


def default_budget(costs: dict, sparsity: float) -> tuple[dict, float]:
    """The per-structure default's counts at ``sparsity`` and the fraction of the block weights they remove."""
    counts = {kind: prune_count(len(c.curve), sparsity) for kind, c in costs.items()}
    removed = sum(counts[kind] * c.unit_weights for kind, c in costs.items())
    return counts, removed / sum(c.block_weights for c in costs.values())


class InputMeans:
    """The mean input of each consumer (``o_proj``, ``down_proj``) over the batches run while it is attached."""

    def __init__(self, consumers) -> None:
        self.sums, self.counts = {}, {}
        self.handles = [c.layer.register_forward_pre_hook(self._hook(c.name)) for c in consumers]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] = self.sums.get(name, 0) + x.sum(0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


class Compensation:
    """Adds ``W[:, removed] @ mean_input[removed]`` to each consumer's output while attached."""

    def __init__(self, consumers, means: dict, adapter: str) -> None:
        self.handles = []
        for c in consumers:
            removed = (~c.layer.lora_mask_cols[adapter]).float()
            bias = c.layer.get_base_weight().float() @ (means[c.name] * removed)
            self.handles.append(c.layer.register_forward_hook(lambda m, a, out, b=bias: out + b.to(out.dtype)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=32, help="training batches the criterion accumulates over")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_blocks", type=int, default=64, help="held-out blocks the loss is measured on")
    parser.add_argument("--sparsities", default="0.2,0.5", help="the default's sparsities whose budgets are split")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (as the training runs)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    args.max_eval_blocks, args.max_train_blocks = args.eval_blocks, args.batches * args.batch
    transformers.set_seed(0)
    transformers.utils.logging.disable_progress_bar()
    start = time.time()
    task = SmolLM2Wikipedia(args)
    collate = transformers.default_data_collator
    train = [collate([task.train[j] for j in range(i, i + args.batch)]) for i in range(0, len(task.train), args.batch)]
    test = [
        collate([task.test[j] for j in range(i, min(i + args.batch, len(task.test)))])
        for i in range(0, len(task.test), args.batch)
    ]
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_sparsity=0.5,
        allocation="joint",
        head_grouping=task.head_grouping,
    )
    model = get_peft_model(task.model(), config)
    engine = model.base_model.pruning_engine()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    means = InputMeans(engine.consumers())
    model.train()
    for batch in train:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if not engine.update_importance():
            raise SystemExit("a non-finite gradient while accumulating the importance")
        model.zero_grad(set_to_none=True)
    means = means.close()
    model.eval()
    layers = list(model.base_model.prune_layers())
    dense_masks = {
        name: (layer.lora_mask_rows[engine.adapter].clone(), layer.lora_mask_cols[engine.adapter].clone())
        for name, layer in layers
    }

    @torch.no_grad()
    def held_out_loss() -> float:
        with autocast:
            return sum(float(model(**b).loss) for b in test) / len(test)

    def masked(counts) -> None:
        for name, layer in layers:
            layer.set_masks(engine.adapter, rows=dense_masks[name][0], cols=dense_masks[name][1])
        engine.remove_per_block(counts)

    costs = engine.removal_costs()
    heads, channels = "heads", "channels"
    rows = [{"variant": "dense (no unit removed)", "held_out_loss": held_out_loss()}]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        default_counts, fraction = default_budget(costs, sparsity)
        budget = fraction * sum(c.block_weights for c in costs.values())
        joint = engine.joint_counts(fraction, costs)
        for n_heads in range(len(costs[heads].curve)):
            n_channels = round((budget - n_heads * costs[heads].unit_weights) / costs[channels].unit_weights)
            if not 0 <= n_channels < len(costs[channels].curve):
                continue
            counts = {heads: n_heads, channels: n_channels}
            masked(counts)
            loss = held_out_loss()
            compensation = Compensation(engine.consumers(), means, engine.adapter)
            compensated = held_out_loss()
            compensation.close()
            rows.append(
                {
                    "variant": f"{fraction:.2%} of the block weights: {n_heads} heads / KV group, {n_channels} channels",
                    "budget_fraction": fraction,
                    "default_sparsity": sparsity,
                    "heads_removed_per_kv_group": n_heads,
                    "channels_removed": n_channels,
                    "first_order_estimate": float(costs[heads].curve[n_heads] + costs[channels].curve[n_channels]),
                    "held_out_loss": loss,
                    "held_out_loss_compensated": compensated,
                    "is_default_split": counts == default_counts,
                    "is_joint_choice": counts == joint,
                }
            )
            print(rows[-1], flush=True)
    path = write_result(
        NAME,
        {
            "benchmark": "split_cost",
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "heads_per_kv_group": len(costs[heads].curve),
            "channels_per_block": len(costs[channels].curve),
            "seconds": time.time() - start,
            "definition": "first_order_estimate: summed comparable scores of the removed units (the joint "
            "allocation's cost); held_out_loss: mean token loss on the test blocks with those units masked, "
            "untrained adapter; _compensated: the same with mean-input biases at o_proj / down_proj",
            "rows": rows,
        },
        args.out,
        table=table("held_out_loss", "lower"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
