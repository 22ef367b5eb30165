"""The package's user-facing paths on one device, end to end: what ``benchmarks/gpu.sh`` runs on a lent GPU (and the
smoke test runs on the CPU), so that nothing builds a tensor on the CPU for a model that lives elsewhere.

On ``--device``: a tiny random Llama in ``--dtype``, LoRAPrune structured 50% trained by the Trainer with the
callback (``bf16=True`` when the dtype is bfloat16) and by ``DistillationTrainer``, the export with example inputs
on the model's device and its latency, the saved adapter, then the command line on that adapter: ``report`` and
``export --dtype``. Writes ``device_walkthrough_<device>.json`` with what each step returned.

    python benchmarks/device_walkthrough.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from common import table, write_result
from datasets import Dataset
from peft import get_peft_model

from peft_loraprune import (
    DistillationConfig,
    DistillationTrainer,
    LoRAPruneCallback,
    LoRAPruneConfig,
    export_pruned_model,
)
from peft_loraprune.hub.evaluation import DTYPES  # the names the command line accepts too


def tiny_llama(folder: Path) -> str:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def train(path: str, args, distil: bool, out: Path) -> dict:
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
    model = get_peft_model(base, LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.5, pruning_interval=2))
    ids = torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    targs = transformers.TrainingArguments(
        str(out / "run"), max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
    )  # fmt: skip
    kwargs = dict(model=model, args=targs, train_dataset=data, callbacks=[LoRAPruneCallback()])
    trainer = (
        DistillationTrainer(**kwargs, distillation=DistillationConfig(teacher="unmasked"))
        if distil
        else transformers.Trainer(**kwargs)
    )
    start = time.time()
    trainer.train()
    device = next(model.parameters()).device
    report = model.base_model.sparsity_report()
    row = {"distillation": distil, "seconds": time.time() - start, "device": str(device), "sparsity": report.sparsity}
    if distil:
        row["teacher_mib"] = trainer.distiller.teacher_bytes / 2**20
        return row
    model.save_pretrained(out / "adapter")
    example = {"input_ids": torch.randint(0, 512, (1, 32), device=device)}  # built where the model is
    export = export_pruned_model(model, example_inputs=example, measure_latency=True)
    row.update(
        params_before=export.params_before,
        params_after=export.params_after,
        latency_before_ms=export.latency_before_ms,
        latency_after_ms=export.latency_after_ms,
    )
    return row


def cli(*argv) -> str:
    done = subprocess.run([sys.executable, "-m", "peft_loraprune.cli", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no GPU visible")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tiny_llama(tmp / "base")
        rows = [train(path, args, distil=False, out=tmp), train(path, args, distil=True, out=tmp / "kd")]
        report = cli("report", str(tmp / "adapter"), "--base", path, "--summary_only").strip()
        cli("export", str(tmp / "adapter"), "--base", path, "--out", str(tmp / "pruned"), "--dtype", args.dtype)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp / "pruned", device_map=args.device)
        with torch.no_grad():
            logits = reloaded(input_ids=torch.randint(0, 512, (1, 16), device=reloaded.device)).logits
    result = {
        "settings": {**vars(args), "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None},
        "runs": rows,
        "cli_report": report,
        "exported_reloaded": {
            "device": str(reloaded.device),
            "dtype": str(reloaded.dtype),
            "finite": bool(torch.isfinite(logits).all()),
        },
    }
    name = f"device_walkthrough_{args.device.split(':')[0]}"
    path = write_result(name, result, args.out, table=table("params_after", "lower", default_method="loraprune"))
    print(path.read_text())


if __name__ == "__main__":
    main()
