"""Which structured criterion prunes best at LoRA's cost: the study behind the default ``importance``.

For each variant, a model is fine-tuned with LoRA and pruned (heads, as query heads inside KV groups where the
model has grouped-query attention, and MLP channels) with the same seed, data order, schedule and budget; the
masked model's quality decides: held-out perplexity for SmolLM2-135M on the Wikipedia leads that ship offline
(``--task smollm2``), test accuracy for MiniLM on Rotten Tomatoes (``--task minilm``; data and training as in
``peers.py``). Variants (``--variants``):

* ``lora``           the paper's estimator ``|W ⊙ G_hat|`` on every member (q/k/v/gate/up rows, o/down columns)
* ``lora@raw``       the same, averaging raw sums and normalising at pruning time (this package's rule up to 0.x)
* ``lora-rows``      the paper's estimator on producing rows only (q, gate, up)
* ``grad``           true gradient ``|W ⊙ G|`` on every member (memory-heavy baseline)
* ``activation``     first-order Taylor of removing the group, ``|Σ x·∂L/∂x|`` at the consumer's input
* ``lora+activation`` rows by the paper's estimator, consumer columns by the activation Taylor
* ``magnitude``      ``|W|``
* ``activation^2``   the activation term squared per step before averaging (Molchanov et al. 2019's rule)

A suffix ``~cdNN`` sets the cool-down (``pruning_end = 1 - NN / 100``: the fraction of steps trained after the
last mask rewrite), e.g. ``activation~cd40``; ``~global`` ranks units across blocks (``budget="global"``; not with
query heads inside KV groups).

    python benchmarks/criteria.py --variants lora,activation --sparsities 0.5 --steps 120
"""

from __future__ import annotations

import argparse
import gc
import time

import transformers
from common import previous_rows, summarise, table, write_result
from peers import TASKS
from peft import get_peft_model
from transformers import TrainingArguments

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig
from peft_loraprune.kernels.group_ops import sum_over_groups
from peft_loraprune.pruning.criteria import ActivationTaylor, Criterion, LoRAGradientEstimate, make_criterion

RESULT_NAMES = {"smollm2": "criteria_smollm2_wikipedia", "minilm": "criteria_minilm_rotten_tomatoes"}


class RowsOnly(LoRAGradientEstimate):
    """The paper's estimator, read on producing rows only."""

    name = "lora-rows"

    def scores_axis(self, axis):
        return axis == "rows"


class ActivationSquared(ActivationTaylor):
    """The activation Taylor term squared per step (a Fisher-like weighting of large steps)."""

    name = "activation^2"

    def member_scores(self, name, layer, axis, layout):
        if axis != "cols" or name not in self.touched:
            return None
        return sum_over_groups(self.sums[name], layout).pow(2)


class PerAxis(Criterion):
    """Producer rows scored by one criterion and consumer columns by another (``lora+activation``: a research variant, not a
    config value)."""

    def __init__(self, adapter: str, rows: Criterion, cols: Criterion) -> None:
        super().__init__(adapter)
        self.rows, self.cols = rows, cols
        self.name = f"{rows.name}+{cols.name}"
        self.elementwise = False
        self.reads_weights = rows.reads_weights or cols.reads_weights

    def attach(self, layers, consumers):
        consumer_names = {c.name for c in consumers}
        self.rows.attach([(n, l) for n, l in layers if n not in consumer_names], [])
        self.cols.attach([(c.name, c.layer) for c in consumers], consumers)

    def detach(self):
        self.rows.detach()
        self.cols.detach()

    def synchronize(self):
        self.rows.synchronize()
        self.cols.synchronize()

    def finite_inputs(self, name, layer):
        return self.rows.finite_inputs(name, layer) + self.cols.finite_inputs(name, layer)

    def member_scores(self, name, layer, axis, layout):
        return (self.rows if axis == "rows" else self.cols).member_scores(name, layer, axis, layout)

    def reset(self):
        self.rows.reset()
        self.cols.reset()


def build(variant: str, sparsity: float, args, task):
    """A LoRAPrune model of ``task`` whose engine scores with ``variant`` (see the module docstring)."""
    variant, _, schedule = variant.partition("~")
    criterion, _, order = variant.partition("@")
    config_criterion = {"lora-rows": "lora", "lora+activation": "lora", "activation^2": "activation"}.get(
        criterion, criterion
    )
    cooldown = int(schedule[2:]) / 100 if schedule.startswith("cd") else 0.1
    budget = "global" if schedule == "global" else "local"
    config = LoRAPruneConfig(
        task_type=task.task_type,
        r=args.r,
        lora_alpha=2 * args.r,
        target_sparsity=sparsity,
        importance=config_criterion,
        head_grouping=task.head_grouping,
        pruning_interval=args.pruning_interval,
        pruning_end=1 - cooldown,
        budget=budget,
    )
    model = get_peft_model(task.model(), config)
    engine = model.base_model.pruning_engine()
    if criterion == "lora-rows":
        engine.use_criterion(RowsOnly("default"))
    elif criterion == "lora+activation":
        engine.use_criterion(
            PerAxis("default", make_criterion("lora", "default"), make_criterion("activation", "default"))
        )
    elif criterion == "activation^2":
        engine.use_criterion(ActivationSquared("default"))
    engine.normalize_each_step = order != "raw"
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="smollm2")
    parser.add_argument("--variants", default="lora,lora@raw,lora-rows,grad,activation,lora+activation")
    parser.add_argument("--sparsities", default="0.5,0.2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=120, help="smollm2: optimizer steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--max_train_samples", type=int, default=4000, help="minilm: training sentences")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="minilm: test sentences (smoke runs)")
    parser.add_argument("--max_train_blocks", type=int, default=None, help="smollm2: training blocks (smoke runs)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-4 (smollm2), 1e-3 (minilm)")
    parser.add_argument("--pruning_interval", type=int, default=5)
    parser.add_argument("--max_eval_blocks", type=int, default=64)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="keep rows already in the result file")
    args = parser.parse_args()
    task = TASKS[args.task](args)
    name = RESULT_NAMES[args.task]
    metric = task.metric
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = previous_rows(name, args.out, []) if args.append else []
    for seed in seeds:
        if args.task == "smollm2" and not any(r["variant"] == "dense base" for r in rows):
            rows.append({"seed": seed, "variant": "dense base", **task.evaluate(task.model(), None)})
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for variant in args.variants.split(","):
                if any(r["seed"] == seed and r["variant"] == f"{sparsity:.0%} {variant}" for r in rows):
                    continue
                transformers.set_seed(seed)
                model = build(variant, sparsity, args, task)
                targs = TrainingArguments(
                    output_dir="/tmp/criteria_run",
                    report_to="none",
                    save_strategy="no",
                    use_cpu=True,
                    disable_tqdm=True,
                    logging_steps=25,
                    bf16=args.bf16,
                    **task.training_args(None, seed),
                )
                start = time.time()
                trainer = task.trainer(model, targs, [LoRAPruneCallback()])
                out = trainer.train()
                seconds = time.time() - start
                report = model.base_model.sparsity_report()
                rows.append(
                    {
                        "seed": seed,
                        "variant": f"{sparsity:.0%} {variant}",
                        **task.evaluate(model, trainer),
                        "train_loss": out.training_loss,
                        "train_seconds": seconds,
                        "sparsity_by_unit": report.sparsity_by_unit(),
                    }
                )
                print(rows[-1], flush=True)
                settings = {
                    **vars(args),
                    "train_tokens": task.train_tokens(),
                    "head_grouping": task.head_grouping,
                    "structures": "heads,channels",
                    "metric": metric,
                }
                write_result(
                    name,
                    {"settings": settings, "summary": summarise(rows, metric), "rows": rows},
                    args.out,
                    table=table(metric, "lower" if metric == "perplexity" else "higher", default_method="activation"),
                )
                del model, trainer
                gc.collect()
    for variant, s in summarise(rows, metric).items():
        print(f"{variant:28s} {s['mean']:9.4f} ± {s['std']:.4f} (n={s['n']})")


if __name__ == "__main__":
    main()
