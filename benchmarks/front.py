"""The fastest model for its quality: held-out perplexity against CPU latency of the exported SmolLM2-135M.

Rows are trained by ``benchmarks/peers.py`` into ``benchmarks/results/front_smollm2.json`` (256,000 tokens, the
recipe: rank 32, trained norms, learning rate 1e-3, bfloat16 autocast), each exported with the package's export
(``--export_dir``): LoRAPrune over heads and channels, whole layers (``+axes=layers``), the hidden size
(``+axes=hidden``) and one joint budget over several axes (``+axes=...+joint=<fraction>``), and the peers given the
same LoRA recovery (Wanda-sp, LLM-Pruner, ShortGPT)::

    R=+lr=0.001+r=32+norms
    python benchmarks/peers.py --task smollm2 --steps 1000 --bf16 --name front_smollm2 \\
        --export_dir /tmp/front_exports --sparsities 0.5 --seeds 0 \\
        --methods "loraprune-activation$R+axes=layers,shortgpt$R,wanda-sp$R"

This script then times every exported model against the dense model, in one process, in interleaved rounds (the
dense model and every row once per round; a row's ratio is its median over rounds of the per-round ratio), and
writes into each row:

* ``decode_latency_vs_dense``: batch-1 greedy decoding of ``--new_tokens`` (128) tokens after a 16-token prompt,
  with the key-value cache, time per generated token against the dense model's;
* ``prefill_latency_vs_dense``: one forward pass over ``--prefill`` (512) tokens at batch 1;
* ``latency``: the milliseconds, the per-round ratios, the threads and the load average while timing.

    python benchmarks/front.py latency

On a GPU (``benchmarks/gpu.sh``, part 6) the same rows are timed from their recorded configs (random weights of the
exported shapes: the export folders stay on the machine that trained them), in eager mode and compiled
(``torch.compile`` with ``mode="reduce-overhead"``, CUDA graphs, and a static key-value cache for decoding); the
result goes to ``front_smollm2_<device>_<dtype>.json``::

    python benchmarks/front.py latency --device cuda --dtype bfloat16 --from_configs --compile

Rows of the recovery study with the same recipe and settings (``peers_smollm2_distill.json``: dense LoRA, LoRAPrune
over heads and channels, Wanda-sp, LLM-Pruner) are copied in with ``"copied_from"`` (their zero-shot scores
aside, the settings are the same)::

    python benchmarks/front.py import-rows

Rows whose export folder is gone are timed on random weights in their recorded exported config when one was recorded
(``"timed_on": "recorded config"``), else on a *shape twin* when their shapes follow from their settings alone
(heads and channels pruned per structure, as ``benchmarks/export_speed.py`` does: CPU latency depends on the
shapes, not on the values), marked ``"timed_on": "shape twin"``; other rows keep no latency. The dense row is the
pretrained model (dense LoRA merges into the same shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import RESULTS_DIR, write_result
from peers import split_modifiers

import peft_loraprune  # noqa: F401

RESULT = "front_smollm2"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Wall time per generated token of greedy decoding with the cache (the prompt's prefill included); a compiled
    model decodes with a static cache, as transformers' compiled generation does."""
    compiled = getattr(model, "_front_compiled", False)
    _sync(prompt.device)
    start = time.perf_counter()
    model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
        **({"cache_implementation": "static"} if compiled else {}),
    )
    _sync(prompt.device)
    return (time.perf_counter() - start) * 1000 / new_tokens


def prefill_ms(model, ids: torch.Tensor) -> float:
    _sync(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return (time.perf_counter() - start) * 1000


@torch.no_grad()
def time_model(model, args, g: torch.Generator) -> dict:
    """Median decode ms per token and prefill ms of one model (after one warm-up of each)."""
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (1, 16), generator=g).to(device)
    ids = torch.randint(0, vocab, (1, args.prefill), generator=g).to(device)
    # warm-up; compiled, at the timed length: a static cache of another length would recompile inside the timing
    decode_ms_per_token(model, prompt, args.new_tokens if getattr(model, "_front_compiled", False) else 8)
    prefill_ms(model, ids)
    return {
        "decode_ms_per_token": statistics.median(
            decode_ms_per_token(model, prompt, args.new_tokens) for _ in range(args.repeats)
        ),
        "prefill_ms": statistics.median(prefill_ms(model, ids) for _ in range(args.repeats)),
    }


def shape_twin(row: dict, dense_path: str):
    """A model with the shapes a per-structure heads/channels row exports to (one-shot magnitude masks), or None
    when the row's shapes depend on its importance (joint allocation, whole layers, the hidden size)."""
    from peft import get_peft_model

    from peft_loraprune import LoRAPruneConfig, export_pruned_model

    structures = row.get("prune_structures", ["heads", "channels"])
    if row.get("allocation") == "joint" or not set(structures) <= {"heads", "channels"}:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_path)
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        importance="magnitude",
        target_sparsity=float(split_modifiers(row["method"])[1].get("channels", row["sparsity"])),
        head_grouping="query_head",
        prune_structures=list(structures),
    )
    peft_model = get_peft_model(model, config)
    engine = peft_model.base_model.pruning_engine()
    engine.update_importance()
    engine.prune_to(config.target_sparsity)
    return export_pruned_model(peft_model, measure_latency=False, progressbar=False).model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def from_config(config: dict):
    """Random weights in the shapes of a recorded config (a row's exported model, or the dense one)."""
    config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def prepared(model, args):
    """The model on the timing device and dtype, in eval mode; compiled (CUDA graphs on a GPU) with ``--compile``."""
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    if args.compile:
        mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
        model.forward = torch.compile(model.forward, mode=mode)
        model._front_compiled = True
    return model


def models_to_time(data: dict, args) -> tuple[dict, dict]:
    """``({"dense" or row index: model}, {row index: what it is timed on})``."""
    timed_on = {}
    if args.from_configs:
        dense_config = data.get("dense_config")
        if dense_config is None:
            raise SystemExit("the result file records no dense config yet: run the CPU latency once first")
        models = {"dense": prepared(from_config(dense_config), args)}
        for i, row in enumerate(data["rows"]):
            config = row.get("export", {}).get("config")
            if config is not None and not row["method"].startswith("dense"):
                models[i], timed_on[i] = prepared(from_config(config), args), "recorded config"
        return models, timed_on
    import local_assets

    dense_path = str(local_assets.smollm2_fp32_dir())
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_path)
    data["dense_config"] = dense.config.to_diff_dict()
    models = {"dense": prepared(dense, args)}
    for i, row in enumerate(data["rows"]):
        if row["method"].startswith("dense"):
            continue
        folder = row.get("export", {}).get("folder")
        if folder and Path(folder).is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder)
            row["export"]["config"] = model.config.to_diff_dict()
            models[i], timed_on[i] = prepared(model, args), "export"
        elif row.get("export", {}).get("config") is not None:  # folder gone, shapes recorded: time those shapes
            models[i], timed_on[i] = prepared(from_config(row["export"]["config"]), args), "recorded config"
        else:
            twin = shape_twin(row, dense_path)
            if twin is not None:
                export = row.setdefault("export", {})
                export["config"] = twin.config.to_diff_dict()
                export["params_fraction_removed"] = 1 - sum(p.numel() for p in twin.parameters()) / sum(
                    p.numel() for p in dense.parameters()
                )
                models[i], timed_on[i] = prepared(twin, args), "shape twin"
    return models, timed_on


def latency(args) -> None:
    torch.set_num_threads(args.threads)
    path = Path(args.out or RESULTS_DIR) / f"{RESULT}.json"
    data = json.loads(path.read_text())
    models, timed_on = models_to_time(data, args)
    rounds: dict = {key: [] for key in models}
    load = []
    for r in range(args.rounds):
        g = torch.Generator().manual_seed(r)
        for key, model in models.items():
            rounds[key].append(time_model(model, args, torch.Generator().manual_seed(g.initial_seed())))
            load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for key, measured in rounds.items():
        ratios = {
            metric: [m[metric] / d[metric] for m, d in zip(measured, rounds["dense"])]
            for metric in ("decode_ms_per_token", "prefill_ms")
        }
        entry = {
            "decode_ms_per_token": statistics.median(m["decode_ms_per_token"] for m in measured),
            "prefill_ms": statistics.median(m["prefill_ms"] for m in measured),
            "decode_ratio_per_round": ratios["decode_ms_per_token"],
            "prefill_ratio_per_round": ratios["prefill_ms"],
            "new_tokens": args.new_tokens,
            "prefill_tokens": args.prefill,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
            "compiled": args.compile,
            "max_load_average_1min": max(load),
            "params": sum(p.numel() for p in models[key].parameters()),
            "timed_on": ("recorded config" if args.from_configs else "pretrained model")
            if key == "dense"
            else timed_on[key],
        }
        if key == "dense":
            for row in data["rows"]:
                if row["method"].startswith("dense"):
                    row.update(latency=entry, decode_latency_vs_dense=1.0, prefill_latency_vs_dense=1.0)
            data["dense_latency"] = entry
            continue
        row = data["rows"][key]
        row["latency"] = entry
        row["decode_latency_vs_dense"] = statistics.median(ratios["decode_ms_per_token"])
        row["prefill_latency_vs_dense"] = statistics.median(ratios["prefill_ms"])
        print(f"{row['method']} {row['sparsity']}: decode {row['decode_latency_vs_dense']:.3f}x, prefill "
              f"{row['prefill_latency_vs_dense']:.3f}x, perplexity {row['perplexity']:.2f}", flush=True)  # fmt: skip
    table = data.pop("table")
    data.pop("machine", None)
    data["latency_settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "command")}
    if args.device == "cpu" and not args.compile:
        write_result(RESULT, data, args.out, table=table)
    else:  # another device or mode: a file of its own, the CPU front stays as measured
        name = f"{RESULT}_{args.device.split(':')[0]}_{args.dtype}" + ("_compiled" if args.compile else "")
        write_result(name, data, args.out, table=table)


#: the recovery study's rows with the front's recipe (rank 32, trained norms, learning rate 1e-3)
RECIPE = "+lr=0.001+r=32+norms"
IMPORTED = ("dense-lora", "loraprune-activation", "wanda-sp", "llm-pruner")
SAME_SETTINGS = ("steps", "batch", "block_size", "max_eval_blocks", "pruning_interval", "calibration_batches", "bf16")


def import_rows(args) -> None:
    """Copy the recovery study's recipe rows (heads and channels) into the front's file, once each."""
    source_name = "peers_smollm2_distill"
    source = json.loads((RESULTS_DIR / f"{source_name}.json").read_text())
    path = Path(args.out or RESULTS_DIR) / f"{RESULT}.json"
    data = json.loads(path.read_text())
    different = {k: (source["settings"][k], data["settings"][k]) for k in SAME_SETTINGS
                 if source["settings"][k] != data["settings"][k]}  # fmt: skip
    if different:
        raise SystemExit(f"{source_name} was run with other settings than the front: {different}")
    have = {(r["method"], r["sparsity"], r["seed"]) for r in data["rows"]}
    added = 0
    for row in source["rows"]:
        name, mods = split_modifiers(row["method"])
        if (
            name not in IMPORTED
            or not row["method"].startswith(name + RECIPE)
            or set(mods) - {"lr", "r", "norms", "channels"}
        ):
            continue
        if (row["method"], row["sparsity"], row["seed"]) in have:
            continue
        copied = {k: v for k, v in row.items() if not k.endswith("_acc") and not k.endswith("_acc_norm")}
        copied["copied_from"] = f"{source_name}.json"
        copied["variant"] = f"{row['method']} {row['sparsity']:.0%}"
        data["rows"].append(copied)
        added += 1
    table = data.pop("table")
    data.pop("machine", None)
    write_result(RESULT, data, args.out, table=table)
    print(f"{added} rows copied from {source_name}.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency", help="time every exported row against the dense model")
    lat.add_argument("--new_tokens", type=int, default=128)
    lat.add_argument("--prefill", type=int, default=512)
    lat.add_argument("--rounds", type=int, default=3)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    lat.add_argument("--compile", action="store_true", help="torch.compile (CUDA graphs on a GPU), static cache")
    lat.add_argument("--from_configs", action="store_true", help="random weights in each row's recorded shapes")
    lat.add_argument("--out", default=None, help="folder of front_smollm2.json (default benchmarks/results)")
    imp = sub.add_parser("import-rows", help="copy the recovery study's recipe rows into the front's file")
    imp.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "latency":
        latency(args)
    else:
        import_rows(args)


if __name__ == "__main__":
    main()
