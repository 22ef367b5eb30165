"""Claim 2, language modelling: held-out perplexity of SmolLM2-135M pruned to 20% and 50% structured sparsity
with the "lora", "grad" and "magnitude" criteria, beside the dense base and a dense LoRA fine-tune of the same
budget (``--dense_lora``: ``target_sparsity=0``, the same run with masks that never change).

Runs ``examples/causal_lm.py`` once per criterion and seed (each in its own process; it trains one model per
sparsity) on the Wikipedia lead sections that ship offline, and writes ``quality_smollm2_wikipedia.json``
after every run.

    python benchmarks/quality_lm.py --seeds 0 --max_steps 300 --block_size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, previous_rows, summarise, write_result

RESULT_NAME = "quality_smollm2_wikipedia"
CRITERIA = ("lora", "grad", "magnitude")


def run_example(out_dir: Path, seed: int, args, importance: str, sparsities: str) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "causal_lm.py"),
        "--output_dir",
        str(out_dir),
        "--seed",
        str(seed),
        "--importance",
        importance,
        "--sparsities",
        sparsities,
        "--max_steps",
        str(args.max_steps),
        "--per_device_train_batch_size",
        str(args.batch),
        "--block_size",
        str(args.block_size),
        "--learning_rate",
        "5e-4",
        "--max_eval_blocks",
        str(args.max_eval_blocks),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "50",
    ]
    if args.pruning_interval:
        cmd += ["--pruning_interval", str(args.pruning_interval)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads((out_dir / "results.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--max_eval_blocks", type=int, default=64)
    parser.add_argument("--pruning_interval", type=int, default=None)
    parser.add_argument("--criteria", default="lora,grad,magnitude")
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument(
        "--dense_lora",
        action="store_true",
        help="also fine-tune a dense LoRA of the same budget (target_sparsity=0) in the 'lora' run",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="keep rows of other seeds already in the result file")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.criteria.split(",")
    rows = []
    if args.append:
        rows = previous_rows(RESULT_NAME, args.out, seeds)
    for seed in seeds:
        for importance in CRITERIA:
            if importance not in wanted:
                continue
            sparsities = ("0," if args.dense_lora and importance == "lora" else "") + args.sparsities
            with tempfile.TemporaryDirectory() as d:
                res = run_example(Path(d), seed, args, importance, sparsities)
            if not any(r["seed"] == seed and r["variant"] == "dense base" for r in rows):
                rows.append({"seed": seed, "variant": "dense base", "perplexity": res["dense_perplexity"]})
            for run in res["runs"]:
                s = run["target_sparsity"]
                rows.append(
                    {
                        "seed": seed,
                        "variant": "dense LoRA" if s == 0 else f"{s:.0%} {importance}",
                        "perplexity": run["perplexity_masked"],
                        "perplexity_exported": run["perplexity_exported_reloaded"],
                        "sparsity_by_unit": run["sparsity_by_unit"],
                        "train_seconds": run["train_seconds"],
                        "params": run["export"].get("params_after"),
                    }
                )
                print(rows[-1], flush=True)
            settings = {
                **vars(args),
                "seeds": ",".join(str(x) for x in sorted({r["seed"] for r in rows})),
                "train_tokens": args.max_steps * args.batch * args.block_size,
            }
            payload = {"settings": settings, "summary": summarise(rows, "perplexity"), "rows": rows}
            path = write_result(RESULT_NAME, payload, args.out)
    for variant, s in summarise(rows, "perplexity").items():
        print(f"{variant:20s} {s['mean']:8.2f} ± {s['std']:.2f} (n={s['n']})")
    print(f"written {path}")


if __name__ == "__main__":
    main()
