"""Claim 2: accuracy after pruning, by criterion and schedule, beside the dense LoRA model (MiniLM, Rotten Tomatoes).

Runs ``examples/text_classification.py`` once per variant and seed (each in its own process) and collects the
test accuracies:

* dense LoRA (the example's baseline, trained once per seed);
* 50% structured and 50% unstructured with the "lora", "grad" and "magnitude" criteria (cubic schedule);
* 50% structured and unstructured with "lora" and one-shot pruning at the warm-up step.

    python benchmarks/quality.py --seeds 0,1,2 --max_train_samples 4000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, previous_rows, summarise, table, write_result

VARIANTS = [  # (granularity, importance, schedule, element_mask_gradient)
    ("structured", "lora", "cubic", "exact"),
    ("structured", "grad", "cubic", "exact"),
    ("structured", "magnitude", "cubic", "exact"),
    ("structured", "lora", "one_shot", "exact"),
    ("unstructured", "lora", "cubic", "exact"),
    ("unstructured", "grad", "cubic", "exact"),
    ("unstructured", "magnitude", "cubic", "exact"),
    ("unstructured", "lora", "one_shot", "exact"),
    # the opt-in approximation of the masked update's gradient, its quality cost beside the exact row above
    ("unstructured", "lora", "cubic", "straight_through"),
]


def variant_name(granularity: str, importance: str, schedule: str, gradient: str) -> str:
    return f"{granularity} {importance} {schedule}" + ("" if gradient == "exact" else f" {gradient}")


def run_example(
    out_dir: Path, seed: int, args, granularity: str, importance: str, schedule: str, gradient: str, dense: bool
) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "text_classification.py"),
        "--output_dir",
        str(out_dir),
        "--seed",
        str(seed),
        "--granularity",
        granularity,
        "--importance",
        importance,
        "--schedule",
        schedule,
        "--element_mask_gradient",
        gradient,
        "--target_sparsity",
        str(args.sparsity),
        "--run_dense_baseline",
        str(dense).lower(),
        "--num_train_epochs",
        str(args.epochs),
        "--per_device_train_batch_size",
        "32",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
    ]
    if args.max_train_samples:
        cmd += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        cmd += ["--max_eval_samples", str(args.max_eval_samples)]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps), "--pruning_interval", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads((out_dir / "results.json").read_text())


RESULT_NAME = "quality_minilm_rotten_tomatoes"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max_train_samples", type=int, default=4000)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--max_steps", type=int, default=None, help="smoke runs only")
    parser.add_argument("--variants", default="all", help="'all' or comma-separated indices into the variant list")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of other seeds and variants already in the result file (run in several sittings)",
    )
    args = parser.parse_args()
    variants = VARIANTS if args.variants == "all" else [VARIANTS[int(i)] for i in args.variants.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = {variant_name(*v) for v in variants}
    rows = []
    if args.append:  # everything but the (seed, variant) cells about to be run
        rows = [
            r for r in previous_rows(RESULT_NAME, args.out, []) if not (r["seed"] in seeds and r["variant"] in names)
        ]
    for seed in seeds:
        for i, variant in enumerate(variants):
            # the dense baseline once per seed, with the first variant run, unless the file has it
            dense = i == 0 and not any(r["seed"] == seed and r["variant"] == "dense LoRA" for r in rows)
            with tempfile.TemporaryDirectory() as d:
                res = run_example(Path(d), seed, args, *variant, dense=dense)
            if dense:
                rows.append(
                    {"seed": seed, "variant": "dense LoRA", "test_accuracy": res["dense_lora"]["test_accuracy"]}
                )
                print(rows[-1])
            rows.append(
                {
                    "seed": seed,
                    "variant": variant_name(*variant),
                    "test_accuracy": res["loraprune"]["test_accuracy"],
                    "test_accuracy_exported": res["export"]["test_accuracy_after_reload"],
                    "sparsity": res["loraprune"]["sparsity"],
                }
            )
            print(rows[-1])
            # Written after every run, so a stopped sitting keeps what it measured.
            summary = summarise(rows, "test_accuracy")
            settings = {  # what the file holds, over every sitting
                **vars(args),
                "seeds": ",".join(str(s) for s in sorted({r["seed"] for r in rows})),
                "variants": sorted({r["variant"] for r in rows}),
            }
            path = write_result(
                RESULT_NAME,
                {"settings": settings, "summary": summary, "rows": rows},
                args.out,
                table=table("test_accuracy", "higher"),
            )
    for variant, s in summary.items():
        print(f"{variant:36s} {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})")
    print(f"written {path}")


if __name__ == "__main__":
    main()
