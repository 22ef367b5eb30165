"""Peak resident memory of the command-line export of a >= 1B-parameter model: streaming against in memory.

Builds a Llama of Llama-3.2-1B's shape (1.24B parameters, grouped-query attention, random weights) and saves it as a
bfloat16 safetensors checkpoint (2.47 GB), gives it a LoRAPrune adapter pruned to 50% structured (random masks:
the export's work does not depend on which units go), then runs, each in a fresh process,

    peft-loraprune export ADAPTER --base CHECKPOINT --out DIR --dtype bfloat16 [--in_memory]

and records each process's peak resident memory (``ru_maxrss`` of the child), its wall time, the model's bf16 size,
and whether the two exports wrote identical tensors (compared one tensor at a time).

    python benchmarks/streaming_export.py --work_dir /tmp/streaming_export
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import table, write_result
from safetensors import safe_open

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
SHAPES = {
    "llama-1b": LLAMA_1B,
    # the smoke run's: the same code paths (grouped-query attention, tied embeddings) in seconds
    "tiny": {**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256},
}  # fmt: skip


def build(work: Path, sparsity: float, shape: dict) -> tuple[Path, Path, int]:
    """The bf16 checkpoint and the adapter (done in a child process so this one stays small)."""
    script = f"""
import sys, torch, transformers
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "tests")!r})
from peft import get_peft_model
from peft_loraprune import LoRAPruneConfig
from helpers import randomize_adapter, random_prune
torch.manual_seed(0)
config = transformers.LlamaConfig(**{shape!r})
model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained({str(work / "base")!r})
peft_model = get_peft_model(model, LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity={sparsity}, inference_mode=True))
randomize_adapter(peft_model)
random_prune(peft_model, {sparsity})
peft_model.save_pretrained({str(work / "adapter")!r})
print(sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return work / "base", work / "adapter", int(out.stdout.strip().splitlines()[-1])


def run_export(adapter: Path, base: Path, out: Path, in_memory: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(Path(sys.executable).parent / "peft-loraprune"), "export", str(adapter), "--base", str(base)]
    argv += ["--out", str(out), "--dtype", "bfloat16"] + (["--in_memory"] if in_memory else [])
    start = time.perf_counter()
    child = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = child.stdout + child.stderr
    if child.returncode != 0:
        raise RuntimeError(f"export failed:\n{output}")
    return {"in_memory": in_memory, "wall_s": wall, "output_tail": output.strip().splitlines()[-8:]}


def tensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return dict.fromkeys(f.keys(), folder / "model.safetensors")


def identical(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    if sorted(ta) != sorted(tb):
        return False
    for key in ta:
        with safe_open(ta[key], framework="pt") as fa, safe_open(tb[key], framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/streaming_export")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="tiny: the smoke run's")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base, adapter, n_params = build(work, args.sparsity, SHAPES[args.shape])
    build_s = time.perf_counter() - start
    # RUSAGE_CHILDREN is the largest of all waited-for children: the build child is the largest so far, so each
    # export runs from a fresh launcher process that reports only its own child
    rows = []
    for in_memory in (False, True):
        script = f"""
import json, resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from streaming_export import run_export
from pathlib import Path
row = run_export(Path({str(adapter)!r}), Path({str(base)!r}), Path({str(work / ("memory" if in_memory else "stream"))!r}), {in_memory})
row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(row))
"""
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(row)
        rows.append(row)
    model_bf16_mib = n_params * 2 / 2**20
    for row in rows:
        row["peak_rss_vs_bf16_model"] = row["peak_rss_mib"] / model_bf16_mib
    same = identical(work / "stream", work / "memory")
    payload = {
        "benchmark": "streaming_export",
        "model": f"random Llama of {'Llama-3.2-1B' if args.shape == 'llama-1b' else 'tiny'} shape (bfloat16 checkpoint)",
        "config": SHAPES[args.shape],
        "parameters": n_params,
        "model_bf16_mib": model_bf16_mib,
        "adapter": f"LoRAPrune structured {args.sparsity:.0%}, random masks, r=8",
        "build_s": build_s,
        "identical_tensors": same,
        "rows": rows,
    }
    path = write_result(
        f"streaming_export_{args.shape}",
        payload,
        args.out,
        table=table("peak_rss_mib", "lower", default_method="streaming"),
    )
    print(json.dumps({k: v for k, v in payload.items() if k != "config"}, indent=1, default=str))
    print(f"written {path}")


if __name__ == "__main__":
    main()
