"""Claim 3: how well the LoRA-estimated importance ranks like the true-gradient importance, over training steps.

At every optimizer step of a LoRA fine-tuning run (no pruning, so both criteria see the same weights), this
computes for every adapted layer the element scores ``|W ⊙ G_hat|`` ("lora": from the adapter gradients) and
``|W ⊙ G|`` ("grad": the true gradient of the merged weight, captured during backward), and reports Spearman's
rank correlation

* at element level: per layer on a fixed random sample of weights, averaged over layers;
* at group level: the structured group scores (heads, channels) of both criteria across all blocks, for the
  instantaneous scores and for their moving averages (λ = 0.9), which are what pruning ranks; the same for the
  "activation" criterion (first-order Taylor of removing a group, at its consumer's input) against "grad".

    python benchmarks/fidelity.py --steps 60            # MiniLM on Rotten Tomatoes (offline)
    python benchmarks/fidelity.py --model smollm2 --batch 4 --steps 60   # SmolLM2-135M on Wikipedia leads
"""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers
from common import table, write_result
from peft import get_peft_model

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneConfig
from peft_loraprune.kernels.importance import moving_average_
from peft_loraprune.pruning.criteria import make_criterion


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho (ranks by sort order; ties are rare for continuous scores)."""
    ra = torch.empty_like(a, dtype=torch.float64)
    rb = torch.empty_like(b, dtype=torch.float64)
    ra[a.argsort()] = torch.arange(a.numel(), dtype=torch.float64)
    rb[b.argsort()] = torch.arange(b.numel(), dtype=torch.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def layer_scores(criterion, name, layer):
    """Element scores of one layer for an element-wise criterion object, from the package's own code."""
    full = torch.empty(layer.out_features, layer.in_features)
    for rows, block in criterion.element_chunks(name, layer):
        full[rows] = block
    return full


def minilm_rotten_tomatoes(args):
    """MiniLM (BERT) classifying Rotten Tomatoes sentences, heads grouped as in ``peers.py``."""
    import local_assets

    path = local_assets.resolve_model("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    data = local_assets.rotten_tomatoes(args.seed)["train"].shuffle(seed=args.seed)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def batches(step):
        batch = data[step * args.batch : (step + 1) * args.batch]
        enc = tokenizer(batch["text"], truncation=True, max_length=64, padding=True, return_tensors="pt")
        return {**enc, "labels": torch.tensor(batch["label"])}

    return base, LoRAPruneConfig(task_type="SEQ_CLS", importance="grad", lora_dropout=0.0), batches


def smollm2_wikipedia(args):
    """SmolLM2-135M on the Wikipedia leads, blocks of 64 tokens, heads as query heads inside KV groups (the
    setting of ``peers.py --task smollm2``)."""
    import local_assets
    from causal_lm import blocks_of, load_text

    path = local_assets.smollm2_fp32_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train = blocks_of(load_text("wikipedia_leads", 0)["train"], tokenizer, 64, None).shuffle(seed=args.seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    config = LoRAPruneConfig(task_type="CAUSAL_LM", importance="grad", lora_dropout=0.0, head_grouping="query_head")

    def batches(step):
        ids = torch.tensor(train[step * args.batch : (step + 1) * args.batch]["input_ids"])
        return {"input_ids": ids, "labels": ids}

    return base, config, batches


#: ``--model``: the pretrained model, its LoRAPrune configuration ("grad" captures the true gradient) and a
#: function from step to training batch
TASKS = {"minilm": minilm_rotten_tomatoes, "smollm2": smollm2_wikipedia}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample", type=int, default=20000, help="weights sampled per layer for element rho")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    transformers.set_seed(args.seed)
    base, config, batches = TASKS[args.model](args)
    model = get_peft_model(base, config)
    tuner = model.base_model
    engine = tuner.pruning_engine()  # importance="grad": captures the true gradient during backward
    criteria = {
        "grad": engine.criterion,
        "lora": make_criterion("lora", "default"),
        "activation": make_criterion("activation", "default"),
    }
    criteria["activation"].attach(engine.scored_layers, engine.consumers())
    layers = dict(engine.scored_layers)  # the layers "grad" captures (unused members, such as k/v under
    # query-head grouping, are not scored)
    groups = engine.groups
    kinds = sorted({g.spec.structure for g in groups})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    samples = {
        n: torch.randperm(l.out_features * l.in_features, generator=g)[: args.sample] for n, l in layers.items()
    }
    averages = {}
    rows = []
    model.train()
    for step in range(args.steps):
        loss = model(**batches(step)).loss
        loss.backward()
        with torch.no_grad():
            element_rho = []
            for name, layer in layers.items():
                idx = samples[name]
                lora_full = layer_scores(criteria["lora"], name, layer).flatten()[idx]
                grad_full = layer_scores(criteria["grad"], name, layer).flatten()[idx]
                element_rho.append(spearman(lora_full, grad_full))
            member_scores = {c: engine.step_member_scores(criteria[c]) for c in criteria}
            row = {
                "step": step + 1,
                "loss": loss.item(),
                "element_rho_mean": statistics.mean(element_rho),
                "element_rho_min": min(element_rho),
            }
            for kind in kinds:
                of_kind = [x for x in groups if x.spec.structure == kind]
                now = {c: torch.cat([engine.group_scores(x, member_scores[c]) for x in of_kind]) for c in criteria}
                for c in criteria:
                    key = (c, kind)
                    if averages.get(key) is None:
                        averages[key] = torch.zeros_like(now[c])
                    moving_average_(averages[key], now[c], 0.9)
                for c in ("lora", "activation"):
                    prefix = kind if c == "lora" else f"{kind}_{c}"
                    row[f"{prefix}_rho"] = spearman(now[c], now["grad"])
                    row[f"{prefix}_rho_averaged"] = spearman(averages[(c, kind)], averages[("grad", kind)])
            for c in criteria.values():
                c.reset()
        optimizer.step()
        optimizer.zero_grad()
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    summary = {
        k: statistics.mean(r[k] for r in rows[len(rows) // 2 :])
        for k in rows[0]
        if k.endswith(("rho", "rho_mean", "rho_averaged"))
    }
    result = write_result(
        f"fidelity_{args.model}",
        {"settings": vars(args), "summary_second_half": summary, "steps": rows},
        args.out,
        table=table("rho", "higher", default_method="activation"),
    )
    print("mean over the second half of the run:", {k: round(v, 3) for k, v in summary.items()})
    print(f"written {result}")


if __name__ == "__main__":
    main()
