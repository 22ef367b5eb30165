"""Which structured criterion prunes best at LoRA's cost: the study behind the default ``importance``.

For each variant, SmolLM2-135M is fine-tuned with LoRA and pruned (heads as query heads inside KV groups, MLP
channels) on the Wikipedia leads that ship offline, with the same seed, data order, schedule and budget; the
masked model's held-out perplexity decides. Variants (``--variants``):

* ``lora``           the paper's estimator ``|W ⊙ G_hat|`` on every member (q/k/v/gate/up rows, o/down columns)
* ``lora@raw``       the same, averaging raw sums and normalising at pruning time (this package's rule up to 0.x)
* ``lora-rows``      the paper's estimator on producing rows only (q, gate, up)
* ``grad``           true gradient ``|W ⊙ G|`` on every member (memory-heavy baseline)
* ``activation``     first-order Taylor of removing the group, ``|Σ x·∂L/∂x|`` at the consumer's input
* ``lora+activation`` rows by the paper's estimator, consumer columns by the activation Taylor
* ``magnitude``      ``|W|``
* ``activation^2``   the activation term squared per step before averaging (Molchanov et al. 2019's rule)

A suffix ``~cdNN`` sets the cool-down (``cooldown_ratio = NN / 100``: the fraction of steps trained after the
last mask rewrite), e.g. ``activation~cd40``.

    python benchmarks/criteria.py --variants lora,activation --sparsities 0.5 --steps 120
"""

from __future__ import annotations

import argparse
import gc
import time

import transformers
from common import previous_rows, summarise, write_result
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig
from peft_loraprune.criteria import ActivationTaylor, LoRAGradientEstimate
from peft_loraprune.group_ops import sum_over_groups

RESULT_NAME = "criteria_smollm2_wikipedia"


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
        return sum_over_groups(self.column_sums[name], layout).pow(2)


def build(variant: str, sparsity: float, args, model_path: str):
    variant, _, schedule = variant.partition("~")
    criterion, _, order = variant.partition("@")
    config_criterion = {"lora-rows": "lora", "lora+activation": "lora", "activation^2": "activation"}.get(
        criterion, criterion
    )
    cooldown = int(schedule[2:]) / 100 if schedule.startswith("cd") else 0.1
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        r=args.r,
        lora_alpha=2 * args.r,
        target_sparsity=sparsity,
        importance=config_criterion,
        head_grouping="query_head",
        pruning_interval=args.pruning_interval,
        cooldown_ratio=cooldown,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    engine = model.base_model.pruning_engine()
    if criterion == "lora-rows":
        engine.use_criterion(RowsOnly("default"))
    elif criterion == "lora+activation":
        engine.use_criterion("lora+activation")
    elif criterion == "activation^2":
        engine.use_criterion(ActivationSquared("default"))
    engine.normalize_each_step = order != "raw"
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="lora,lora@raw,lora-rows,grad,activation,lora+activation")
    parser.add_argument("--sparsities", default="0.5,0.2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pruning_interval", type=int, default=5)
    parser.add_argument("--max_eval_blocks", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="keep rows already in the result file")
    args = parser.parse_args()
    import local_assets
    from causal_lm import blocks_of, load_text, perplexity

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = previous_rows(RESULT_NAME, args.out, []) if args.append else []
    model_path = str(local_assets.smollm2_fp32_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for seed in seeds:
        text = load_text("wikipedia_leads", 0)  # fixed split; the seed varies initialisation and data order
        train = blocks_of(text["train"], tokenizer, args.block_size, None)
        test = blocks_of(text["test"], tokenizer, args.block_size, args.max_eval_blocks)
        if not any(r["variant"] == "dense base" for r in rows):
            base = AutoModelForCausalLM.from_pretrained(model_path)
            rows.append({"seed": seed, "variant": "dense base", "perplexity": perplexity(base, test)})
            del base
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for variant in args.variants.split(","):
                if any(r["seed"] == seed and r["variant"] == f"{sparsity:.0%} {variant}" for r in rows):
                    continue
                transformers.set_seed(seed)
                model = build(variant, sparsity, args, model_path)
                targs = TrainingArguments(
                    output_dir="/tmp/criteria_run",
                    max_steps=args.steps,
                    per_device_train_batch_size=args.batch,
                    learning_rate=args.lr,
                    seed=seed,
                    report_to="none",
                    save_strategy="no",
                    use_cpu=True,
                    disable_tqdm=True,
                    logging_steps=max(1, args.steps // 4),
                )
                start = time.time()
                out = Trainer(model=model, args=targs, train_dataset=train, callbacks=[LoRAPruneCallback()]).train()
                seconds = time.time() - start
                report = model.base_model.sparsity_report()
                rows.append(
                    {
                        "seed": seed,
                        "variant": f"{sparsity:.0%} {variant}",
                        "perplexity": perplexity(model, test),
                        "train_loss": out.training_loss,
                        "train_seconds": seconds,
                        "sparsity_by_unit": report.sparsity_by_unit(),
                    }
                )
                print(rows[-1], flush=True)
                settings = {
                    **vars(args),
                    "train_tokens": args.steps * args.batch * args.block_size,
                    "head_grouping": "query_head",
                    "structures": "heads,channels",
                }
                write_result(
                    RESULT_NAME,
                    {"settings": settings, "summary": summarise(rows, "perplexity"), "rows": rows},
                    args.out,
                )
                del model
                gc.collect()
    for variant, s in summarise(rows, "perplexity").items():
        print(f"{variant:28s} {s['mean']:9.2f} ± {s['std']:.2f} (n={s['n']})")


if __name__ == "__main__":
    main()
