"""Image classification with LoRAPrune on a ViT.

No real pretrained image weights ship in any offline package, so by default this example first PRETRAINS A SMALL
ViT FROM SCRATCH on Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and says so in its results. It then
fine-tunes that model on a second task, scikit-learn's handwritten digits (upsampled to 28x28), twice: with a
dense LoRA baseline and with LoRAPrune to the target structured sparsity (heads and MLP channels, both physically
removable from a transformers 5 ViT), exports the pruned model and reloads it with plain
``AutoModelForImageClassification``.

With a network, pass ``--model_name_or_path google/vit-base-patch16-224-in21k`` (or any Hub ViT) to skip the
pretraining; images are then resized to the model's input size.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import datasets
import local_assets
import numpy as np
import torch
import transformers
from machine import machine_info
from metrics import accuracy
from peft import LoraConfig, get_peft_model
from plotting import plot_sparsity_per_layer
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer, TrainingArguments, ViTConfig

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, export_pruned_model


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="pretrain", metadata={"help": "'pretrain' (a small ViT pretrained here on Fashion-MNIST) or a Hub ViT"}
    )
    pretrain_epochs: float = field(default=1.0)
    pretrain_samples: Optional[int] = field(default=None)
    hidden_size: int = field(default=128)
    num_layers: int = field(default=4)
    num_heads: int = field(default=8)


@dataclass
class DataArguments:
    pretrain_dataset: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist' or 'digits'"})
    max_train_samples: Optional[int] = field(default=None)
    max_eval_samples: Optional[int] = field(default=None)


@dataclass
class PruningArguments:
    target_sparsity: float = field(default=0.5)
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    pruning_interval: int = field(default=5)
    run_dense_baseline: bool = field(default=True)


def to_model_inputs(dataset: datasets.Dataset, size: int) -> datasets.Dataset:
    """Grey images in [0, 1] -> normalised ``pixel_values`` of shape (1, size, size)."""

    def convert(batch):
        images = torch.tensor(np.asarray(batch["image"], dtype=np.float32)).unsqueeze(1)
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return {"pixel_values": ((images - 0.5) / 0.5).numpy(), "labels": batch["label"]}

    out = dataset.map(convert, batched=True, remove_columns=dataset.column_names, desc="Preparing images")
    return out.with_format("torch")


def pretrain(model_args, data_args, training_args) -> str:
    """Train a small ViT from scratch on the pretraining set; returns its directory (reused if present)."""
    out = os.path.join(training_args.output_dir, "pretrained_vit")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    raw = local_assets.fashion_mnist() if data_args.pretrain_dataset == "fashion_mnist" else local_assets.digits()
    train = raw["train"]
    if model_args.pretrain_samples:
        train = train.select(range(min(model_args.pretrain_samples, len(train))))
    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_layers,
        num_attention_heads=model_args.num_heads,
        intermediate_size=4 * model_args.hidden_size,
        num_labels=10,
    )
    model = AutoModelForImageClassification.from_config(config)
    args = TrainingArguments(
        **{
            **training_args.to_dict(),
            "output_dir": out + ".run",
            "num_train_epochs": model_args.pretrain_epochs,
            "max_steps": -1,
            "learning_rate": 1e-3,
        }
    )
    Trainer(model=model, args=args, train_dataset=to_model_inputs(train, 28)).train()
    model.save_pretrained(out)
    return out


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, TrainingArguments))
    model_args, data_args, prune_args, training_args = parser.parse_args_into_dataclasses()
    transformers.set_seed(training_args.seed)
    os.makedirs(training_args.output_dir, exist_ok=True)
    pretrained_here = model_args.model_name_or_path == "pretrain"
    model_path = pretrain(model_args, data_args, training_args) if pretrained_here else model_args.model_name_or_path

    size = transformers.AutoConfig.from_pretrained(model_path).image_size
    task = local_assets.digits(seed=training_args.seed)
    if data_args.max_train_samples:
        task["train"] = task["train"].select(range(min(data_args.max_train_samples, len(task["train"]))))
    if data_args.max_eval_samples:
        task["test"] = task["test"].select(range(min(data_args.max_eval_samples, len(task["test"]))))
    train, test = to_model_inputs(task["train"], size), to_model_inputs(task["test"], size)

    def fresh_model():
        return AutoModelForImageClassification.from_pretrained(model_path, num_labels=10, ignore_mismatched_sizes=True)

    results = {
        "task": "image classification (second task: sklearn digits)",
        "pretrained": (
            f"small ViT pretrained from scratch here on {data_args.pretrain_dataset} (no real pretrained image "
            "weights ship offline)"
            if pretrained_here
            else model_path
        ),
        "settings": {
            **asdict(prune_args),
            **asdict(model_args),
            "epochs": training_args.num_train_epochs,
            "seed": training_args.seed,
        },
        "machine": machine_info(),
    }
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    if prune_args.run_dense_baseline:
        lora = get_peft_model(
            fresh_model(),
            LoraConfig(
                r=prune_args.lora_r,
                lora_alpha=prune_args.lora_alpha,
                target_modules=targets,
                modules_to_save=["classifier"],
            ),
        )
        trainer = Trainer(model=lora, args=training_args, train_dataset=train)
        trainer.train()
        results["dense_lora"] = {"test_accuracy": accuracy(trainer, test)}
        print(f"dense LoRA: {results['dense_lora']}")

    config = LoRAPruneConfig(
        r=prune_args.lora_r,
        lora_alpha=prune_args.lora_alpha,
        target_modules=targets,
        modules_to_save=["classifier"],
        target_sparsity=prune_args.target_sparsity,
        pruning_interval=prune_args.pruning_interval,
    )
    model = get_peft_model(fresh_model(), config)
    start = time.time()
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[LoRAPruneCallback()])
    trainer.train()
    report = model.base_model.sparsity_report()
    model.print_sparsity()
    results["loraprune"] = {
        "train_seconds": time.time() - start,
        "test_accuracy": accuracy(trainer, test),
        "sparsity_by_unit": report.sparsity_by_unit(),
    }
    model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
    plot_sparsity_per_layer(
        report,
        os.path.join(training_args.output_dir, "sparsity_per_layer.png"),
        title=f"ViT LoRAPrune {prune_args.target_sparsity:.0%}",
    )
    model_device = next(model.parameters()).device  # where the Trainer left the model
    batch = {
        "pixel_values": torch.stack([test[i]["pixel_values"] for i in range(min(32, len(test)))]).to(model_device)
    }
    export = export_pruned_model(model, example_inputs=batch, measure_latency=True)
    print(export)
    export_dir = os.path.join(training_args.output_dir, "pruned_model")
    export.model.save_pretrained(export_dir)
    reloaded = AutoModelForImageClassification.from_pretrained(export_dir)
    results["export"] = export.to_dict()
    results["export"]["test_accuracy_after_reload"] = accuracy(Trainer(model=reloaded, args=training_args), test)
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in results.items() if k in ("dense_lora", "loraprune")}, indent=2))
    print(f"exported and reloaded: test accuracy {results['export']['test_accuracy_after_reload']:.4f}")


if __name__ == "__main__":
    main()
