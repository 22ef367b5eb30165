"""Does a quantized base change what LoRAPrune's structured criterion ranks, before training changes anything else?

``quantized_bases.py`` finds the masks of an NF4-base run overlapping the bf16 run's by about 60% at 20% structured.
That number mixes two causes: the criterion reading a perturbed model, and two trainings drifting apart once their
masks differ (different units pruned, different adapters learned). This script isolates the first.

SmolLM2-135M (``peers.py``'s model and Wikipedia leads) with a fresh LoRAPrune adapter (B = 0, so the adapter adds
nothing yet; dropout 0; no optimizer step) on each base of ``quantized_bases.py`` (float32 weights under bf16
autocast, LLM.int8, NF4 with double quantization and bf16 compute). The default structured criterion
(``"activation"``: Σ x·∂L/∂x at each consumer's input, per head and channel) is accumulated over the same ``--batches``
training batches on every base, through the package's own ``update_importance``; then ``prune_to`` selects each
``--sparsities`` level (nested, as the schedule selects them) and the masks are compared with the bf16 base's by
``quantized_bases.mask_overlap`` (the same definition as there). Two noise floors, same base, same code:

* ``bf16, other batches``: the bf16 base on the next ``--batches`` batches of the training data: how much the
  ranking depends on which data it saw (a training run sees 250 to 1000 batches, with a moving average).
* ``bf16, other half``: agreement of the two halves of the reference batches with each other.

Per row: the overlap with the bf16 reference at each sparsity, the rank correlation (Spearman) of every head's and
channel's score with the reference's, and the seconds.

    python benchmarks/quantized_importance.py --bf16 --batches 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers
from common import table, write_result
from peers import SmolLM2Wikipedia
from peft import get_peft_model
from quantized_bases import BASES, LIBRARIES, load_base, mask_overlap, save_masks

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneConfig

NAME = "quantized_importance_smollm2"


def ranks(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype)
    return out


def spearman(a: dict, b: dict) -> float:
    """Rank correlation of the group scores, each member's vector ranked on its own, then pooled."""
    ra = torch.cat([ranks(a[k].double()) / max(a[k].numel() - 1, 1) for k in sorted(a)])
    rb = torch.cat([ranks(b[k].double()) / max(b[k].numel() - 1, 1) for k in sorted(a)])
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def accumulate(task, base: str, batches: list[dict], args, work: Path, label: str) -> dict:
    """The criterion's averages after ``batches`` on ``base``, and the masks each sparsity selects from them."""
    start = time.time()
    model = load_base(task, base)
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_sparsity=max(args.sparsity_levels),
        importance=None,
        head_grouping=task.head_grouping,
    )
    model = get_peft_model(model, config)
    model.train()
    engine = model.base_model.pruning_engine()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        if not engine.update_importance():
            raise SystemExit(f"{label}: a non-finite gradient on {base}")
        model.zero_grad(set_to_none=True)
    scores = {k: v.clone() for k, v in engine.member_averages.items()}
    masks = {}
    for sparsity in args.sparsity_levels:
        engine.prune_to(sparsity)
        masks[sparsity] = work / f"{label}_{sparsity}.pt"
        save_masks(model, "structured", masks[sparsity])
    engine.close()
    return {"scores": scores, "masks": masks, "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--batches", type=int, default=32, help="training batches the criterion accumulates over")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (as the quantized_bases runs)")
    parser.add_argument("--work_dir", default="/tmp/quantized_importance")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    args.sparsity_levels = sorted(float(s) for s in args.sparsities.split(","))
    if args.batches < 2:
        raise SystemExit("--batches must be at least 2 (the halves are compared)")
    args.max_eval_blocks, args.max_train_blocks = 1, 2 * args.batches * args.batch
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(0)
    transformers.utils.logging.disable_progress_bar()
    task = SmolLM2Wikipedia(args)
    collate = transformers.default_data_collator
    blocks = [task.train[i] for i in range(len(task.train))]
    batches = [collate(blocks[i : i + args.batch]) for i in range(0, len(blocks), args.batch)]
    first, other = batches[: args.batches], batches[args.batches : 2 * args.batches]
    half = args.batches // 2

    reference = accumulate(task, "bf16", first, args, work, "bf16")
    runs = {
        "bf16, other batches": accumulate(task, "bf16", other, args, work, "bf16_other"),
        "bf16, first half": accumulate(task, "bf16", first[:half], args, work, "bf16_first_half"),
        "bf16, second half": accumulate(task, "bf16", first[half:], args, work, "bf16_second_half"),
    }
    for base in [b for b in args.bases.split(",") if b != "bf16"]:
        runs[base] = accumulate(task, base, first, args, work, base)

    def compare(a: dict, b: dict) -> dict:
        return {
            "spearman": spearman(a["scores"], b["scores"]),
            **{
                f"overlap_{s:.0%}": mask_overlap(a["masks"][s], b["masks"][s])["mask_overlap_with_bf16"]
                for s in args.sparsity_levels
            },
        }

    rows = [{"variant": "bf16 (reference)", "batches": args.batches, "seconds": reference["seconds"]}]
    for label, run in runs.items():
        if label.startswith("bf16, ") and "half" in label:
            continue
        rows.append({"variant": label, "batches": args.batches, **compare(reference, run), "seconds": run["seconds"]})
    rows.append(
        {
            "variant": "bf16, first half vs second half",
            "batches": half,
            **compare(runs["bf16, first half"], runs["bf16, second half"]),
        }
    )
    for row in rows:
        print(row)
    path = write_result(
        NAME,
        {
            "benchmark": "quantized_importance",
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "sparsity_levels")},
            "definition": "overlap: |P_a ∩ P_ref| / |P_ref|, P the pruned row and column mask entries "
            "(quantized_bases.mask_overlap); spearman: rank correlation of the per-member head and channel "
            "scores, each member ranked on its own, pooled",
            "rows": rows,
        },
        args.out,
        libraries=LIBRARIES,
        table=table("spearman", "higher"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
