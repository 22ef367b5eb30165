"""Claim 4: speed and size of the exported models, dense vs 20% and 50% structured sparsity.

Speed depends on the exported shapes only, so the masks here come from one-shot magnitude pruning (no training):
a LoRAPrune adapter with ``importance="magnitude"`` is created, its importance is taken once, masks are set to the
sparsity, and ``export_pruned_model`` removes the pruned heads and channels. Each exported model is saved (file
size) and reloaded with plain ``from_pretrained``; CPU latency is the median of repeated forward passes
(no grad) at batch 1 and at a larger batch, throughput is tokens per second.

    python benchmarks/export_speed.py --model smollm2 --seq 128 --batches 1,8
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers
from common import load_model, write_result
from peft import get_peft_model

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneConfig, export_pruned_model
from peft_loraprune.latency import measure_latency_ms


def exported(model_name: str, sparsity: float, head_grouping: str, seed: int):
    model = load_model(model_name, seed)
    if sparsity == 0:
        return model
    peft_model = get_peft_model(
        model,
        LoRAPruneConfig(
            task_type="CAUSAL_LM", importance="magnitude", target_sparsity=sparsity, head_grouping=head_grouping
        ),
    )
    engine = peft_model.base_model.pruning_engine()
    engine.update_importance()
    engine.prune_to(sparsity)
    return export_pruned_model(peft_model, measure_latency=False, progressbar=False).model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", default="0,0.2,0.5")
    parser.add_argument("--head_grouping", default="query_head")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        model = exported(args.model, sparsity, args.head_grouping, args.seed)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            file_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        row = {
            "sparsity": sparsity,
            "params": sum(p.numel() for p in reloaded.parameters()),
            "file_bytes": file_bytes,
            "num_attention_heads": reloaded.config.num_attention_heads,
            "num_key_value_heads": reloaded.config.num_key_value_heads,
            "intermediate_size": reloaded.config.intermediate_size,
        }
        for batch in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator().manual_seed(args.seed)
            ids = torch.randint(0, reloaded.config.vocab_size, (batch, args.seq), generator=g)
            ms = measure_latency_ms(reloaded, {"input_ids": ids}, repeats=args.repeats)
            row[f"latency_ms_batch{batch}"] = ms
            row[f"tokens_per_s_batch{batch}"] = batch * args.seq / (ms / 1000)
        rows.append(row)
        print(row)
    dense = rows[0]
    for row in rows:
        for key in [k for k in row if k.startswith("latency_ms")]:
            row[key.replace("latency_ms", "latency_vs_dense")] = row[key] / dense[key]
        row["params_vs_dense"] = row["params"] / dense["params"]
    path = write_result(f"export_speed_{args.model}", {"settings": vars(args), "rows": rows}, args.out)
    print(f"written {path}")


if __name__ == "__main__":
    main()
