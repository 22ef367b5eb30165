"""Claim 4: speed and size of the exported models, dense vs 20% and 50% structured sparsity.

Speed depends on the exported shapes only, so the masks here come from one-shot magnitude pruning (no training):
a LoRAPrune adapter with ``importance="magnitude"`` is created, its importance is taken once, masks are set to the
sparsity, and ``export_pruned_model`` removes the pruned heads and channels. Each exported model is saved (file
size) and reloaded with plain ``from_pretrained``; CPU latency is the median of repeated forward passes
(no grad) at batch 1 and at a larger batch, throughput is tokens per second.

    python benchmarks/export_speed.py --model smollm2 --seq 128 --batches 1,8
    python benchmarks/export_speed.py --model llama-0.5b --sparsities 0,0.5,2:4 --device cuda --dtype float16

A ``2:4`` entry exports an N:M adapter (two of every four weights kept, by magnitude). On a GPU that has 2:4 sparse
kernels (Ampere or newer, float16/bfloat16) its Linear weights are then turned into PyTorch's semi-structured sparse
tensors (``peft_loraprune.kernels.semi_structured.to_semi_structured``) with each of PyTorch's two backends (CUTLASS,
cuSPARSELt), one row each beside the dense export with its zeros (``semi_structured``: the backend, or None);
elsewhere only the dense export is timed. On a GPU, latency waits for the device's kernels.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers
from common import load_model, table, write_result
from peft import get_peft_model

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneConfig, export_pruned_model
from peft_loraprune.export.latency import measure_latency_ms
from peft_loraprune.kernels.semi_structured import check_semi_structured_support, to_semi_structured

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exported(model_name: str, entry: str, head_grouping: str, seed: int):
    """The exported model of one ``--sparsities`` entry: a fraction of heads and channels, or an N:M pattern."""
    model = load_model(model_name, seed)
    if entry in ("0", "0.0"):
        return model
    if ":" in entry:
        options = dict(granularity=entry, target_sparsity=0.5)  # the pattern fixes the sparsity
        sparsity = 0.5
    else:
        sparsity = float(entry)
        options = dict(granularity="structured", target_sparsity=sparsity, head_grouping=head_grouping)
    peft_model = get_peft_model(model, LoRAPruneConfig(task_type="CAUSAL_LM", importance="magnitude", **options))
    engine = peft_model.base_model.pruning_engine()
    engine.update_importance()
    engine.prune_to(sparsity)
    return export_pruned_model(peft_model, measure_latency=False, progressbar=False).model


def variants(entry: str, device: torch.device, dtype: torch.dtype) -> list:
    """How an entry's export is timed: as saved (None), and for 2:4, with each of PyTorch's sparse backends where
    its kernels run here."""
    timed = [None]
    if ":" not in entry:
        return timed
    for backend in ("cutlass", "cusparselt"):
        try:
            check_semi_structured_support(device, dtype, backend)
        except RuntimeError as refusal:
            print(f"{entry}: not timed with {backend}: {refusal}")
        else:
            timed.append(backend)
    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", default="0,0.2,0.5")
    parser.add_argument("--head_grouping", default="query_head")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the reloaded model runs in")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for entry in args.sparsities.split(","):
        model = exported(args.model, entry, args.head_grouping, args.seed)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            file_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
            for backend in variants(entry, device, dtype):
                reloaded = transformers.AutoModelForCausalLM.from_pretrained(d).to(device=device, dtype=dtype).eval()
                params = sum(p.numel() for p in reloaded.parameters())
                if backend is not None:
                    to_semi_structured(reloaded, backend=backend)
                row = {
                    "sparsity": entry if ":" in entry else float(entry),
                    "semi_structured": backend,
                    "params": params,
                    "file_bytes": file_bytes,
                    "num_attention_heads": reloaded.config.num_attention_heads,
                    "num_key_value_heads": reloaded.config.num_key_value_heads,
                    "intermediate_size": reloaded.config.intermediate_size,
                }
                for batch in [int(b) for b in args.batches.split(",")]:
                    g = torch.Generator().manual_seed(args.seed)
                    ids = torch.randint(0, reloaded.config.vocab_size, (batch, args.seq), generator=g).to(device)
                    ms = measure_latency_ms(reloaded, {"input_ids": ids}, repeats=args.repeats)
                    row[f"latency_ms_batch{batch}"] = ms
                    row[f"tokens_per_s_batch{batch}"] = batch * args.seq / (ms / 1000)
                rows.append(row)
                print(row)
                del reloaded
    dense = rows[0]
    for row in rows:
        for key in [k for k in row if k.startswith("latency_ms")]:
            row[key.replace("latency_ms", "latency_vs_dense")] = row[key] / dense[key]
        row["params_vs_dense"] = row["params"] / dense["params"]
    suffix = "" if args.device == "cpu" and args.dtype == "float32" else f"_{device.type}_{args.dtype}"
    path = write_result(
        f"export_speed_{args.model}{suffix}",
        {"settings": vars(args), "rows": rows},
        args.out,
        table=table("speedup", "higher"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
