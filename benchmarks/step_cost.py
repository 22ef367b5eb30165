"""Claim 1: time and memory of one optimizer step, plain LoRA vs LoRAPrune vs the full-gradient baseline.

Each configuration runs in its own process (the resident-memory high-water mark is per process), on the same
model, batch and sequence length: warm-up steps (with importance updates), then the masks are set to 50% sparsity
once (so the measured steps run the masked forward pass, the steady state of a pruning run), then the median wall
time of the measured steps. A step is forward + backward, importance update (LoRAPrune) and optimizer step. A mask
rewrite happens only every ``pruning_interval`` steps (10 by default), so it is timed separately and reported per
step amortised over the interval: the median of 3 rewrites that each remove 2% more (52%, 54%, 56%), as a schedule's
rewrites do. (A rewrite to the sparsity already reached skips the selection. Result files whose rows carry no
``rewrite_sparsities`` timed those, which under-reported an unstructured rewrite on the 0.5B model by 5x.)

The VM this runs on drifts: the same configuration's step time moved by up to 15% between runs minutes apart. With
``--rounds N`` every configuration is measured N times, interleaved, each ratio is taken against the baseline of
its own round, and the median over rounds is reported (each round's numbers are kept in the row).

    python benchmarks/step_cost.py --model smollm2 --batch 4 --seq 128
    python benchmarks/step_cost.py --model llama-0.5b --batch 1 --seq 128 --rounds 3 --steps 3
    python benchmarks/step_cost.py --model llama-0.5b --batch 1 --seq 128 --device cuda --dtype bfloat16

On a GPU (``--device cuda``) the memory measure is PyTorch's peak allocated device memory
(``torch.cuda.max_memory_allocated``), and every timer waits for the device (``torch.cuda.synchronize``).
``--dtype bfloat16`` loads the pretrained weights in bfloat16 (the adapters stay float32, as PEFT keeps them).
``--autocast bfloat16`` keeps them float32 and prepares the model as the Trainer's ``bf16=True`` does (accelerate:
the forward pass under bfloat16 autocast, its outputs converted to float32; the distillation loss under the
accelerator's autocast): the setting of ``peers.py --bf16``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import load_model, peak_rss_mib, table, write_result

CONFIGS = {
    "lora": None,  # plain PEFT LoRA, the baseline
    "loraprune_structured": dict(granularity="structured", importance="activation"),  # the default criterion
    "loraprune_structured_lora": dict(granularity="structured", importance="lora"),  # the paper's estimator
    # the paper's estimator, the per-weight default before 0.4.0; the "_wanda" rows below are the default now
    "loraprune_unstructured": dict(granularity="unstructured", importance="lora"),
    "loraprune_2of4": dict(granularity="2:4", importance="lora"),
    # Wanda's rule while fine-tuning: one input norm per feature averaged, the weight scored at rewrites only
    "loraprune_unstructured_wanda": dict(granularity="unstructured", importance="wanda"),
    "loraprune_2of4_wanda": dict(granularity="2:4", importance="wanda"),
    "grad_structured": dict(granularity="structured", importance="grad"),
    # the same without adapter dropout: dropout gives the adapter path its own input, which under an element mask
    # costs a second weight-sized product in the forward pass and a third in the backward
    "lora_nodrop": None,
    "loraprune_unstructured_nodrop": dict(granularity="unstructured", importance="lora"),
    "loraprune_2of4_nodrop": dict(granularity="2:4", importance="lora"),
    "loraprune_unstructured_wanda_nodrop": dict(granularity="unstructured", importance="wanda"),
    # the opt-in straight-through gradient of the masked update (no weight-sized product in backward)
    "loraprune_unstructured_ste": dict(
        granularity="unstructured", importance="lora", element_mask_gradient="straight_through"
    ),
    "loraprune_unstructured_ste_nodrop": dict(
        granularity="unstructured", importance="lora", element_mask_gradient="straight_through"
    ),
    # the same opt-in with the default per-weight criterion
    "loraprune_unstructured_wanda_ste": dict(
        granularity="unstructured", importance="wanda", element_mask_gradient="straight_through"
    ),
    "loraprune_unstructured_wanda_ste_nodrop": dict(
        granularity="unstructured", importance="wanda", element_mask_gradient="straight_through"
    ),
    # the default with distillation (weight 0.5, T 2), toward the adapter with its masks off, or toward a second,
    # dense adapter on the same base (the kd=dense teacher of benchmarks/peers.py); ratios also against the default
    "loraprune_structured_kd": dict(granularity="structured", importance="activation"),
    "loraprune_structured_kd_adapter": dict(granularity="structured", importance="activation"),
    # the axes beyond heads and channels (benchmarks/front.py): whole layers, the hidden size, and one joint budget
    # over all four; each against the structured default in the same round
    "loraprune_layers": dict(granularity="structured", importance="activation", prune_structures=["layers"]),
    "loraprune_layers_taylor": dict(
        granularity="structured", importance="activation", prune_structures=["layers"], layer_importance="taylor"
    ),
    "loraprune_hidden": dict(granularity="structured", importance="activation", prune_structures=["hidden"]),
    "loraprune_all_joint": dict(
        granularity="structured",
        importance="activation",
        prune_structures=["heads", "channels", "layers", "hidden"],
        allocation="joint",
    ),
}
#: configurations measured against the structured default (besides plain LoRA)
AGAINST_DEFAULT = ("loraprune_layers", "loraprune_layers_taylor", "loraprune_hidden", "loraprune_all_joint")
#: configuration -> its distillation teacher
DISTILLED = {"loraprune_structured_kd": "unmasked", "loraprune_structured_kd_adapter": "teacher"}
#: the recovery recipe of the quickstart (rank 32, alpha 64, the normalisation layers trained through
#: ``modules_to_save``) -> the rank-8 configuration it changes, measured against it in the same round
RECIPE = {
    "lora_recipe": "lora",
    "loraprune_structured_recipe": "loraprune_structured",
    "loraprune_unstructured_wanda_recipe": "loraprune_unstructured_wanda",
}
CONFIGS.update({name: CONFIGS[changed] for name, changed in RECIPE.items()})


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: ``--quantization`` -> the bitsandbytes config of the base (the QLoRA comparison; ``none``: the plain base)
QUANTIZATION = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
}


def quantized_model(model_name: str, seed: int, device: str, dtype: str, quantization: str):
    """The model of ``load_model`` on a bitsandbytes base, as a QLoRA user loads one: saved once as a checkpoint
    (in the temporary folder, per model, seed and dtype; random weights are never downloaded), then
    ``from_pretrained(..., quantization_config=...)`` onto ``device`` and ``prepare_model_for_kbit_training``."""
    import tempfile

    import transformers
    from peft import prepare_model_for_kbit_training

    folder = Path(tempfile.gettempdir()) / f"step_cost_{model_name}_seed{seed}_{dtype}"
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + f".partial{os.getpid()}")
        load_model(model_name, seed).to(DTYPES[dtype]).save_pretrained(partial)
        partial.rename(folder)  # whole or absent: a run stopped while saving leaves no half checkpoint behind
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATION[quantization]),
        device_map={"": device},
        dtype=DTYPES[dtype],
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build(
    name: str,
    model_name: str,
    batch: int,
    seq: int,
    seed: int,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: str = "none",
):
    """The model of configuration ``name`` in training mode, its pruning engine (None for plain LoRA), an AdamW
    optimizer over the adapter, one fixed batch of random token ids and the configuration's distiller (or None).
    ``quantization``: ``int8`` or ``nf4`` puts the pretrained weights on a bitsandbytes base (QLoRA)."""
    from peft import LoraConfig, get_peft_model

    import peft_loraprune  # noqa: F401
    from peft_loraprune import DistillationConfig, Distiller, LoRAPruneConfig, norm_module_names

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if quantization == "none":
        model = load_model(model_name, seed).to(device=device, dtype=DTYPES[dtype])
    else:
        model = quantized_model(model_name, seed, device, dtype, quantization)
    options = CONFIGS[name]
    dropout = 0.0 if name.endswith("_nodrop") else 0.05
    rank, saved = (32, norm_module_names(model)) if name in RECIPE else (8, None)
    if options is None:
        # same rank, alpha and dropout as the LoRAPrune configurations (dropout costs an input-sized copy per layer)
        model = get_peft_model(
            model,
            LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                lora_dropout=dropout,
                target_modules=targets,
                modules_to_save=saved,
                task_type="CAUSAL_LM",
            ),
        )
        engine = None
    else:
        config = LoRAPruneConfig(
            r=rank,
            lora_alpha=2 * rank,
            modules_to_save=saved,
            target_modules=targets,
            task_type="CAUSAL_LM",
            lora_dropout=dropout,
            target_sparsity=0.5,
            **options,
        )
        model = get_peft_model(model, config)
        engine = model.base_model.pruning_engine()
    distiller = None
    if name in DISTILLED:
        if DISTILLED[name] == "teacher":
            model.add_adapter(
                "teacher", LoRAPruneConfig(r=8, lora_alpha=16, target_modules=targets, target_sparsity=0)
            )
            model.set_adapter("default")
        distiller = Distiller(model, DistillationConfig(teacher=DISTILLED[name], weight=0.5, temperature=2.0))
    if quantization == "none":  # (bitsandbytes refuses .to on a quantized model; its adapters sit on its device)
        model.to(device)  # PEFT creates adapters beside the base weights; this moves anything created elsewhere
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    return model, engine, optimizer, ids, distiller


#: the timed mask rewrites, after the measured steps at 50%: each removes 2% more, as a schedule's rewrites do
REWRITE_SPARSITIES = (0.52, 0.54, 0.56)


def run_one(
    name: str,
    model_name: str,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    seed: int,
    device: str = "cpu",
    dtype: str = "float32",
    autocast: str = "none",
    quantization: str = "none",
) -> dict:
    model, engine, optimizer, ids, distiller = build(name, model_name, batch, seq, seed, device, dtype, quantization)
    amp, seen = contextlib.nullcontext, {}
    if autocast != "none":  # what the Trainer's bf16=True does: accelerate wraps the forward pass (autocast, then
        # outputs converted to float32); DistillationTrainer enters accelerator.autocast() for the distillation loss
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision="bf16", cpu=not device.startswith("cuda"))
        model = accelerator.prepare_model(model)
        amp = accelerator.autocast

    def record_head_dtype(module, args, output):  # returns None: the output is left as it is
        seen.setdefault("head_output_dtype", str(output.dtype))

    model.get_output_embeddings().register_forward_hook(record_head_dtype)
    base_rss = peak_rss_mib()
    on_gpu = device.startswith("cuda")
    base_allocated = torch.cuda.memory_allocated() / 2**20 if on_gpu else None
    times, importance_times, rewrite_times = [], [], []
    total = warmup + steps
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, total + 1):
        if step == warmup + 1 and engine is not None:
            engine.prune_to(0.5)  # steady state: the measured steps run with masks in place
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        with amp():
            loss = (
                out.loss
                if distiller is None
                else distiller.loss(model, {"input_ids": ids, "labels": ids}, out, out.loss)[0]
            )
        loss.backward()
        sync(device)
        t_imp = time.perf_counter()
        if engine is not None:
            engine.update_importance()
        sync(device)
        t_imp = time.perf_counter() - t_imp
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
        if step > warmup:
            times.append(elapsed)
            importance_times.append(t_imp)
    if engine is not None:
        for sparsity in REWRITE_SPARSITIES:
            sync(device)
            start = time.perf_counter()
            engine.prune_to(sparsity)
            sync(device)
            rewrite_times.append(time.perf_counter() - start)
    return {
        "config": name,
        "median_step_s": statistics.median(times),
        "median_importance_s": statistics.median(importance_times),
        "median_mask_rewrite_s": statistics.median(rewrite_times) if rewrite_times else 0.0,
        "rewrite_sparsities": list(REWRITE_SPARSITIES) if rewrite_times else None,
        "pruning_interval": engine.config.pruning_interval if engine is not None else None,
        "step_times_s": times,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_loading_mib": base_rss,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "cuda_allocated_after_loading_mib": base_allocated,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "autocast": autocast,
        "quantization": quantization,
        "base_layer": next(  # what the adapted layers wrap: torch's Linear or a bitsandbytes layer
            type(m.get_base_layer()).__name__ for m in model.modules() if hasattr(m, "get_base_layer")
        ),
        "head_output_dtype": seen["head_output_dtype"],  # the output layer's: bfloat16 under bfloat16 autocast
        "lora_rank": 32 if name in RECIPE else 8,
        "recipe_of": RECIPE.get(name),  # the rank-8 configuration the recipe changes (time_vs_default: against it)
        "teacher": DISTILLED.get(name),
        "teacher_memory_mib": distiller.teacher_bytes / 2**20 if distiller is not None else None,
    }


def measure(name: str, args) -> dict:
    """One configuration in a fresh process (its resident-memory high-water mark is its own)."""
    cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--autocast", args.autocast]
    cmd += ["--quantization", args.quantization]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


#: ratios and derived numbers of a row, recomputed per round and reported as their median over rounds
DERIVED = (
    "amortised_step_s",
    "time_vs_lora",
    "amortised_time_vs_lora",
    "rss_vs_lora",
    "training_rss_mib",
    "rss_vs_grad",
    "gpu_memory_vs_lora",
    "gpu_memory_vs_grad",
    "time_vs_default",
    "rss_vs_default",
)


def compare(r: dict, rows: dict) -> None:
    """Add to row ``r`` its ratios against the baselines measured in the same round (``rows``)."""
    # each configuration against plain LoRA with the same adapter dropout
    base = rows.get("lora_nodrop" if r["config"].endswith("_nodrop") else "lora")
    grad = rows.get("grad_structured")
    interval = r["pruning_interval"] or 1
    r["amortised_step_s"] = r["median_step_s"] + r["median_mask_rewrite_s"] / interval
    if base:
        r["time_vs_lora"] = r["median_step_s"] / base["median_step_s"]
        r["amortised_time_vs_lora"] = r["amortised_step_s"] / base["median_step_s"]
        r["rss_vs_lora"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        if r.get("cuda_max_allocated_mib") and base.get("cuda_max_allocated_mib"):
            r["gpu_memory_vs_lora"] = r["cuda_max_allocated_mib"] / base["cuda_max_allocated_mib"]
        # memory the training itself added on top of the loaded model
        r["training_rss_mib"] = r["peak_rss_mib"] - r["rss_after_loading_mib"]
    # what distillation adds to the default; what the recipe adds to the configuration it changes
    default = rows.get(RECIPE[r["config"]] if r["config"] in RECIPE else "loraprune_structured")
    if (r["config"] in DISTILLED or r["config"] in RECIPE or r["config"] in AGAINST_DEFAULT) and default:
        r["time_vs_default"] = r["median_step_s"] / default["median_step_s"]
        r["rss_vs_default"] = r["peak_rss_mib"] / default["peak_rss_mib"]
    if grad:
        r["rss_vs_grad"] = r["peak_rss_mib"] / grad["peak_rss_mib"]
        if r.get("cuda_max_allocated_mib") and grad.get("cuda_max_allocated_mib"):
            r["gpu_memory_vs_grad"] = r["cuda_max_allocated_mib"] / grad["cuda_max_allocated_mib"]


def combine(per_round: list[dict]) -> dict:
    """One row from a configuration's rows of every round: medians of the per-round numbers (the ratios are
    medians of per-round ratios, not ratios of medians), every step time, and each round's own numbers."""
    if len(per_round) == 1:
        return per_round[0]
    row = dict(per_round[0])
    measures = (
        "median_step_s",
        "median_importance_s",
        "median_mask_rewrite_s",
        "peak_rss_mib",
        "cuda_max_allocated_mib",
    )
    for key in measures + DERIVED:
        values = [r[key] for r in per_round if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["step_times_s"] = [t for r in per_round for t in r["step_times_s"]]
    row["rounds"] = [
        {k: r.get(k) for k in ("median_step_s", "median_importance_s", "peak_rss_mib", "time_vs_lora", "rss_vs_lora")}
        for r in per_round
    ]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: peak device memory, synchronised timers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the pretrained weights' dtype")
    parser.add_argument(
        "--autocast", choices=["none", "bfloat16"], default="none", help="autocast of the forward pass and loss"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration this many times, interleaved (round 1 runs them all, then round 2...); "
        "ratios are taken within a round and their median reported, so a machine whose speed drifts over minutes "
        "moves a ratio much less than it moves the times",
    )
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument(
        "--note", default=None, help="what differs from the current code (shown in the report), e.g. an older commit"
    )
    parser.add_argument("--tag", default=None, help="appended to the result file's name (keeps a variant apart)")
    parser.add_argument(
        "--quantization",
        choices=["none", *QUANTIZATION],
        default="none",
        help="a bitsandbytes base (int8: LLM.int8; nf4: NF4, double quant, bf16 compute): LoRA is then QLoRA",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    if args.one:
        print(
            "RESULT "
            + json.dumps(
                run_one(
                    args.one,
                    args.model,
                    args.batch,
                    args.seq,
                    args.warmup,
                    args.steps,
                    args.seed,
                    args.device,
                    args.dtype,
                    args.autocast,
                    args.quantization,
                )
            )
        )
        return
    names = args.configs.split(",")
    rounds = []  # one {config: row} per round: every configuration once per round, in the same order
    for i in range(args.rounds):
        rows = {}
        for name in names:
            rows[name] = measure(name, args)
            r = rows[name]
            print(
                f"round {i + 1}/{args.rounds} {name:24s} step {r['median_step_s'] * 1000:8.1f} ms  "
                f"importance {r['median_importance_s'] * 1000:7.1f} ms  "
                f"mask rewrite {r['median_mask_rewrite_s'] * 1000:8.1f} ms  peak RSS {r['peak_rss_mib']:8.0f} MiB"
                + (f"  peak GPU {r['cuda_max_allocated_mib']:8.0f} MiB" if r.get("cuda_max_allocated_mib") else ""),
                flush=True,
            )
        for r in rows.values():
            compare(r, rows)
        rounds.append(rows)
    rows = [combine([rows[name] for rows in rounds]) for name in names]
    suffix = "" if args.device == "cpu" and args.dtype == "float32" else f"_{args.device}_{args.dtype}"
    suffix += "" if args.autocast == "none" else f"_autocast_{args.autocast}"
    suffix += "" if args.quantization == "none" else f"_{args.quantization}"
    suffix += f"_{args.tag}" if args.tag else ""
    path = write_result(
        f"step_cost_{args.model}_b{args.batch}x{args.seq}{suffix}",
        {"settings": vars(args), "rows": rows},
        args.out,
        table=table("time_vs_lora", "lower"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
