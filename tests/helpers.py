"""Test helpers: build adapted models, prune their masks at random the way a pruning step would (without the
engine), and run them through the Trainer. One place for every builder the test files share."""

from __future__ import annotations

import torch
import transformers
from conftest import TASK, make_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig
from peft_loraprune.kernels.mask_packing import pack_bits
from peft_loraprune.pruning.structure import find_structured_groups


def randomize_adapter(peft_model, seed: int = 0) -> None:
    """Give LoRA B (zero at init) random values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def random_prune(peft_model, fraction: float = 0.5, seed: int = 0, adapter_name: str = "default") -> None:
    """Prune about ``fraction`` of each layer's units at random (groups for structured, weights otherwise)."""
    g = torch.Generator().manual_seed(seed)
    tuner = peft_model.base_model
    config = tuner.peft_config[adapter_name]
    if config.is_element_granularity:
        for _, layer in tuner.prune_layers(adapter_name):
            keep = torch.rand(layer.out_features, layer.in_features, generator=g) >= fraction
            layer.set_masks(adapter_name, elements_packed=pack_bits(keep))
    else:
        for groups in find_structured_groups(tuner, adapter_name):
            n = groups.spec.n_groups
            keep = torch.ones(n, dtype=torch.bool)
            drop = torch.randperm(n, generator=g)[: max(1, int(n * fraction)) if n > 1 else 0]
            keep[drop] = False
            groups.apply(adapter_name, keep)


def pruned_model(family: str, granularity: str = "structured", adaptation: str = "parallel", seed: int = 0, **cfg):
    """A LoRAPrune model of a tiny ``family`` with random adapter weights and about half its units pruned at
    random (dropout off, eval mode): outputs differ from the base and are deterministic."""
    cfg.setdefault("lora_dropout", 0.0)
    config = LoRAPruneConfig(task_type=TASK[family], granularity=granularity, adaptation=adaptation, **cfg)
    model = get_peft_model(make_model(family), config)
    randomize_adapter(model, seed=seed)
    random_prune(model, 0.5, seed=seed)
    return model.eval()


def training_model(family: str, **cfg):
    """A fresh LoRAPrune model for Trainer runs: masks rewritten every 2 steps, no dropout."""
    cfg.setdefault("pruning_interval", 2)
    cfg.setdefault("lora_dropout", 0.0)
    return get_peft_model(make_model(family), LoRAPruneConfig(task_type=TASK[family], **cfg))


def make_dataset(family, n=48, seed=0):
    import datasets  # here, not at the top: the GPU checks run these helpers where datasets is not installed

    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return datasets.Dataset.from_dict(
            {
                "pixel_values": torch.randn(n, 1, 8, 8, generator=g).tolist(),
                "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
            }
        )
    ids = torch.randint(1, 64, (n, 8), generator=g)
    if family == "bert":
        return datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "labels": torch.randint(0, 2, (n,), generator=g).tolist()}
        )
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def trainer_for(model, family, tmp_path, steps=10, batch=4, accum=1, callbacks=(), seed=0, **kwargs):
    """A Trainer with ``LoRAPruneCallback`` over a random dataset of ``family``'s inputs."""
    args = transformers.TrainingArguments(
        str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=5e-3,
        report_to=[],
        save_strategy=kwargs.pop("save_strategy", "no"),
        use_cpu=True,
        logging_steps=5,
        seed=seed,
        disable_tqdm=True,
        **kwargs,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=make_dataset(family), callbacks=[LoRAPruneCallback(), *callbacks]
    )


def saved_adapter(folder, seed=0):
    """A random, randomly pruned Llama adapter saved to ``folder`` (returned in eval mode)."""
    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type=TASK["llama"]))
    randomize_adapter(model, seed=seed)
    random_prune(model, seed=seed)
    model.save_pretrained(folder)
    return model.eval()
