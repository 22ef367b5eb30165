"""LoRAPrune beside the structured pruners people use, in the same runs: equal parameters removed, equal tokens.

Tasks (``--task``):

* ``smollm2``: SmolLM2-135M (Llama, 9 query heads in 3 KV groups) on the Wikipedia leads that ship offline;
  held-out perplexity of the pruned model, and zero-shot accuracy through lm-evaluation-harness on local tasks
  (``examples/local_tasks.py``: Rotten Tomatoes sentiment, Wikipedia next-sentence choice).
* ``minilm``: all-MiniLM-L6-v2 (BERT) fine-tuned on Rotten Tomatoes sentences; test accuracy.

Methods (``--methods``), all pruning the same units (heads as query heads inside KV groups, MLP channels) to the
same fraction in every block, all trained with the same LoRA (rank, alpha, dropout, learning rate, steps, batch):

* ``loraprune-<criterion>``: LoRAPrune while fine-tuning on the package's default schedule (cubic, pruning from
  10% to 40% of the steps), criterion ``activation`` (the package default), ``lora`` (the paper's estimator),
  ``grad`` (true gradient), ``magnitude``; ``loraprune-<criterion>-oneshot``: all pruning at the warm-up step;
  ``loraprune-<criterion>-cdNN``: the cubic schedule ending at ``pruning_end = 1 - NN/100`` (``cd10``: the reference
  code's window, pruning until 90% of the steps, the package default before 0.3.0). Every row records its schedule.
* ``llm-pruner``: LLM-Pruner's recipe: one-shot structured pruning of the pretrained model with first-order
  Taylor group importance (``|W ⊙ G|`` summed over the group's weights in every coupled module, true gradients
  from calibration batches), then LoRA recovery with the masks fixed. Channel scores come from Torch-Pruning
  (``tp.DependencyGraph`` groups of gate/up/down, ``tp.importance.GroupTaylorImportance``), the dependency engine
  LLM-Pruner is built on. Torch-Pruning 1.6.1 does not finish building the attention groups of these models
  (``get_pruning_group`` on q_proj or o_proj ran past 100 s on a two-block model), so head scores use the same
  rule, computed here from the same gradients.
* ``wanda-sp``: structured Wanda (An et al., FLAP's baseline): a consumer input column ``j`` (o_proj for a head,
  down_proj for a channel) scores ``‖X_j‖₂ · Σ_i |W_ij|`` with ``X`` its input on calibration batches; a head
  sums its columns. One-shot, then LoRA recovery.
* ``shortgpt``: ShortGPT's layer removal (Men et al., 2024): every block scores its Block Influence, ``1 -`` the
  mean cosine similarity between its input and output hidden states over calibration batches; the blocks with the
  lowest influence are deleted one-shot (as many as ``layers`` at the cell's fraction removes), then LoRA recovery.
* ``minitron``: Minitron's one-shot activation-based importance (Muralidharan et al., "Compact Language Models via
  Pruning and Knowledge Distillation", 2024) over the units the row prunes (``+axes=``, heads and channels by
  default): a head scores the mean over calibration tokens of the L2 norm of its output (its columns of o_proj's
  input), an MLP channel the mean magnitude of its activation (down_proj's input), a channel of the hidden size the
  mean magnitude of every RMSNorm's output at it, a layer its Block Influence (as ShortGPT; Minitron ranks depth by
  perplexity or Block Influence). Each axis loses the cell's fraction (per structure), then LoRA recovery.
* ``dense-lora``: LoRA without pruning (the ceiling). Its adapter is saved in ``<work_dir>/dense-lora/`` for
  the ``kd=dense`` teacher below.
* ``pretrained`` (SmolLM2): the pretrained model itself, evaluated without training (no adapter): what the
  ``kd=base`` teacher predicts; 0 training tokens.

Modifiers, appended to any method with ``+`` (the study of recovery, rendered by ``benchmarks/report_distill.py``):

* ``+kd=<teacher>/<weight>/<temperature>``: train with :class:`peft_loraprune.DistillationTrainer` toward
  ``unmasked`` (the adapter with its masks off), ``base`` (adapters off) or ``dense`` (the ``dense-lora`` adapter
  of the same seed and steps, loaded as a second adapter; its training tokens and seconds are recorded in the row
  and count in ``total_train_tokens``);
* ``+r=<rank>``: LoRA rank (alpha stays 2 x rank); ``+lr=<rate>``: learning rate;
* ``+norms``: the normalisation layers train too (saved whole through ``modules_to_save``; every module whose
  class name ends in ``Norm``: Llama's RMSNorms, BERT's LayerNorms);
* ``+bias`` (``loraprune-*``, structured, without ``--zero_shot``): a bias on every consumer layer, FLAP's
  compensation for the removed inputs' mean plus a trained part (``benchmarks/consumer_bias.py``; a probe: the
  package has no such bias and export drops it, so the adapter model is what is evaluated);
* ``+recovery_lr=<factor>``: once the masks are final (from ``pruning_end`` of the steps on), the learning rate
  is the schedule's times ``factor``: more room for the adapter to recover what the last rewrites removed;
* ``+budget=global`` (MiniLM: the package refuses a global budget over query heads in KV groups): each kind of
  unit (heads, channels) ranked across blocks, the same count removed;
* ``+steps=<n>`` (SmolLM2): that many optimizer steps instead of ``--steps``: the equal-token baseline of a cell
  whose teacher's training also counts;
* ``+channels=<fraction>`` (structured): only MLP channels are pruned, to that fraction; heads are kept. With 3
  query heads per KV group, SmolLM2's 20% removes a third of the heads (1 of 3 per group) and 20% of the
  channels; ``+channels=0.2832`` removes as many weights from MLP channels alone (both keep 78.8% of the adapted
  modules' weights, recorded in every row as ``weights_kept_in_adapted_modules``), so the two spend one budget
  on different units;
* ``+joint=<fraction>`` (structured): ``allocation="joint"``: that fraction of the blocks' head and channel weights
  is removed, split between heads and channels by the importance (one split for the whole model, chosen again at
  every rewrite); the peers' one-shot scores choose the split the same way. SmolLM2's default removes 22.66% of
  those weights at 20% and 46.67% at 50% (a third of the heads plus 20% or 50% of the channels), so
  ``+joint=0.2266`` and ``+joint=0.4667`` spend the default's budget;
* ``+axes=<unit>/<unit>...`` (structured): the units pruned, among ``heads``, ``channels`` and ``layers`` (whole
  blocks; ``prune_structures``); with ``+joint=<fraction>`` one weight budget is split between them by the
  importance, whole blocks included (the front: ``benchmarks/front.py``);
* ``+blocks=taylor|influence`` (with ``layers`` in ``+axes``): ``layer_importance``, how LoRAPrune scores whole
  blocks while training: the gate's Taylor estimate or Block Influence measured on the adapted model (the
  package's default, except with ``+joint``; rows before 2026-12-08 without ``+blocks`` were scored by Taylor);
* ``+split=<unit>:<fraction>/...`` (with ``+axes``): ``structure_sparsity``, a fixed fraction removed per named kind
  (``+axes=layers/hidden+split=layers:0.4/hidden:0.2``); kinds not named lose the cell's sparsity;
* ``+init=dense``: the pruned adapter starts from the ``dense-lora`` adapter of the same seed (its LoRA factors and
  saved modules) instead of B = 0: pruning continues from the fine-tuned model; its training counts in
  ``total_train_tokens`` as for ``kd=dense``.

``--granularity unstructured`` (SmolLM2 only): ``sparsegpt`` and ``wanda``, llm-compressor's one-shot pruners
(``SparseGPTModifier``, ``WandaPruningModifier``, 50% per Linear of the blocks, calibration batches of the training
data), then LoRA recovery with their zeros as fixed element masks, against ``loraprune-lora``, ``loraprune-grad`` and
``loraprune-wanda`` (Wanda's rule scored while fine-tuning) pruning while fine-tuning. llm-compressor pins transformers <= 5.17, so this table runs in an environment of its
own (``pip install llmcompressor``); the versions are in the result file.

One process per cell (method, sparsity, seed), so peak memory is the cell's own; results are appended to
``benchmarks/results/peers_<task>.json`` after every cell, and cells already there are skipped.

    python benchmarks/peers.py --task smollm2 --steps 1000 --sparsities 0.5,0.2 --seeds 0,1
    python benchmarks/peers.py --task minilm --sparsities 0.5 --seeds 0,1,2

The distillation study (``peers_smollm2_distill.json``; the rows without distillation are in ``peers_smollm2.json``,
same settings):

    python benchmarks/peers.py --task smollm2 --steps 1000 --bf16 --zero_shot --zero_shot_limit 500 --tag distill \
        --sparsities 0.2,0.5 --seeds 0 --methods loraprune-activation+kd=unmasked/0.5/2,dense-lora,\
loraprune-activation+kd=dense/0.5/2,loraprune-activation+kd=base/0.5/2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from common import RESULTS_DIR, peak_rss_mib, summarise, table, write_result
from consumer_bias import ConsumerBias
from peft import get_peft_model

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, norm_module_names
from peft_loraprune.kernels.group_ops import sum_over_groups
from peft_loraprune.kernels.mask_packing import pack_bits
from peft_loraprune.pruning.criteria import make_criterion

PEERS = ("llm-pruner", "wanda-sp")  # structured one-shot peers of heads and channels
DEPTH_PEERS = ("shortgpt", "minitron")  # one-shot peers whose units can include whole blocks and the hidden size
UNPRUNED = ("dense-lora", "pretrained")  # references: one row per seed, at sparsity 0
UNSTRUCTURED_PEERS = ("sparsegpt", "wanda")  # llm-compressor's one-shot pruners
PEER_LIBRARIES = ("torch-pruning", "llmcompressor", "compressed-tensors", "lm_eval")  # versions in every result file


# ---------------------------------------------------------------------------------------------------- tasks
def make_trainer(model, targs, callbacks, distillation, **data):
    """The HF Trainer, or the package's DistillationTrainer when the method distils."""
    if distillation is None:
        return transformers.Trainer(model=model, args=targs, callbacks=callbacks, **data)
    from peft_loraprune import DistillationTrainer

    return DistillationTrainer(model=model, args=targs, callbacks=callbacks, distillation=distillation, **data)


class SmolLM2Wikipedia:
    """Causal LM on Wikipedia leads; metric: held-out perplexity (lower is better)."""

    name = "smollm2"
    metric = "perplexity"
    direction = "lower"
    task_type = "CAUSAL_LM"
    head_grouping = "query_head"

    def __init__(self, args):
        import local_assets
        from causal_lm import blocks_of, load_text

        self.args = args
        self.path = str(local_assets.smollm2_fp32_dir())
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        text = load_text("wikipedia_leads", 0)  # one fixed split for every seed
        self.train = blocks_of(text["train"], self.tokenizer, args.block_size, getattr(args, "max_train_blocks", None))
        self.test = blocks_of(text["test"], self.tokenizer, args.block_size, args.max_eval_blocks)

    def model(self):
        return transformers.AutoModelForCausalLM.from_pretrained(self.path)

    def training_args(self, out_dir, seed):
        return dict(
            max_steps=self.args.steps,
            per_device_train_batch_size=self.args.batch,
            learning_rate=self.args.lr or 5e-4,
            seed=seed,
        )

    def train_tokens(self):
        return self.args.steps * self.args.batch * self.args.block_size

    def calibration(self, n_batches, seed):
        """Batches from the training data (not the test split), as one-shot pruners draw them."""
        g = torch.Generator().manual_seed(1000 + seed)
        order = torch.randperm(len(self.train), generator=g)[: n_batches * self.args.batch].tolist()
        ids = torch.tensor(self.train.select(order)["input_ids"])
        return [{"input_ids": b, "labels": b} for b in ids.split(self.args.batch)], ids.numel()

    def trainer(self, model, targs, callbacks, distillation=None):
        return make_trainer(model, targs, callbacks, distillation, train_dataset=self.train)

    def evaluate(self, model, trainer):
        from causal_lm import perplexity

        return {"perplexity": perplexity(model, self.test)}

    def zero_shot(self, model, limit):
        import lm_eval
        import local_tasks
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        folder = local_tasks.write_tasks(
            Path(self.args.work_dir) / "local_tasks", limit=limit, tasks=("rt_sentiment", "wiki_continuation")
        )
        res = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=32),
            tasks=["rt_sentiment", "wiki_continuation"],
            task_manager=TaskManager(include_path=str(folder)),
            log_samples=False,
        )["results"]
        return {
            "rt_sentiment_acc": res["rt_sentiment"]["acc,none"],
            "wiki_continuation_acc_norm": res["wiki_continuation"]["acc_norm,none"],
        }


class MiniLMRottenTomatoes:
    """Sentence classification; metric: test accuracy (higher is better)."""

    name = "minilm"
    metric = "accuracy"
    direction = "higher"
    task_type = "SEQ_CLS"
    head_grouping = "kv_group"

    def __init__(self, args):
        import local_assets

        self.args = args
        self.path = local_assets.resolve_model("minilm")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        raw = local_assets.rotten_tomatoes(0)
        raw["train"] = raw["train"].select(range(args.max_train_samples))
        if getattr(args, "max_eval_samples", None):
            raw["test"] = raw["test"].select(range(args.max_eval_samples))
        self.data = raw.map(
            lambda b: self.tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
        )

    def model(self):
        return transformers.AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2)

    def training_args(self, out_dir, seed):
        return dict(
            num_train_epochs=1.0, per_device_train_batch_size=32, learning_rate=self.args.lr or 1e-3, seed=seed
        )

    def train_tokens(self):
        return int(sum(len(x) for x in self.data["train"]["input_ids"]))

    def calibration(self, n_batches, seed):
        collate = transformers.DataCollatorWithPadding(self.tokenizer)
        rows = self.data["train"].shuffle(seed=1000 + seed).select(range(n_batches * 32))
        batches = [collate([rows[i] for i in range(s, s + 32)]) for s in range(0, len(rows), 32)]
        for b in batches:
            b["labels"] = b.pop("label") if "label" in b else b["labels"]
        return batches, int(sum(int(b["attention_mask"].sum()) for b in batches))

    def trainer(self, model, targs, callbacks, distillation=None):
        return make_trainer(
            model,
            targs,
            callbacks,
            distillation,
            train_dataset=self.data["train"],
            data_collator=transformers.DataCollatorWithPadding(self.tokenizer),
        )

    def evaluate(self, model, trainer):
        import numpy as np

        pred = trainer.predict(self.data["test"])
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    def zero_shot(self, model, limit):
        return {}


TASKS = {t.name: t for t in (SmolLM2Wikipedia, MiniLMRottenTomatoes)}


# ---------------------------------------------------------------------------------------------------- peers' scores
def plain_groups(model, head_grouping: str):
    """``(GroupSpec, [(member, module name)])`` of every block of a plain (not yet adapted) model, from the
    package's architecture registry: the units and layouts LoRAPrune prunes, so every method removes the same."""
    from peft_loraprune.pruning.architectures import require_architecture

    spec = require_architecture(model.config.model_type)
    by_block = {}
    for name, _ in model.named_modules():
        located = spec.locate(name)
        if located is not None:
            by_block.setdefault(located[0], {})[located[1]] = name
    return [
        (g, [(m, modules[m.module]) for m in g.members])
        for _, modules in sorted(by_block.items())
        for g in spec.groups(model.config, head_grouping)
    ]


def wanda_sp_scores(base, groups, batches) -> dict:
    """``‖X_j‖₂ · Σ_i |W_ij|`` per consumer input column, summed over each group's columns."""
    modules = dict(base.named_modules())
    consumers = [(m, name) for _, members in groups for m, name in members if m.axis == "cols"]
    squares, hooks = {}, []
    for _, name in consumers:

        def hook(module, args, _name=name):
            x = args[0].detach().float()
            squares[_name] = squares.get(_name, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        hooks.append(modules[name].register_forward_pre_hook(hook))
    base.eval()
    with torch.no_grad():
        for batch in batches:
            base(**{k: v for k, v in batch.items() if k != "labels"})
    for h in hooks:
        h.remove()
    scores = {}
    for member, name in consumers:
        w = modules[name].weight.detach().float().abs().sum(0)
        scores[f"{name}.cols"] = sum_over_groups(squares[name].sqrt() * w, member.layout)
    return scores


def llm_pruner_scores(base, groups, batches, model_inputs) -> tuple[dict, dict]:
    """First-order Taylor group importance from true gradients on calibration batches (LLM-Pruner's
    element-wise rule: ``|W ⊙ G|`` summed over the group's weights in each coupled module, then over modules).
    Channels through Torch-Pruning's dependency graph and ``GroupTaylorImportance``; heads by the same rule."""
    import torch_pruning as tp

    base.train()
    base.requires_grad_(True)
    base.zero_grad()
    for batch in batches:
        base(**batch).loss.backward()
    modules = dict(base.named_modules())
    scores, check = {}, {}
    graph = tp.DependencyGraph().build_dependency(
        base, example_inputs=model_inputs, forward_fn=lambda m, x: m(**x).logits
    )
    importance = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    for g, members in groups:
        per_member = []
        for member, name in members:
            w = modules[name].weight
            e = (w.detach() * w.grad).abs().float()
            axis_sum = e.sum(1) if member.axis == "rows" else e.sum(0)
            per_member.append(sum_over_groups(axis_sum, member.layout))
        own = torch.stack(per_member).sum(0)
        key = f"{members[0][1]}.{members[0][0].axis}"
        if g.structure == "channels":
            root = modules[members[0][1]]  # gate_proj / intermediate.dense
            group = graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=list(range(g.n_groups)))
            scores[key] = importance(group).float()
            check[key] = float(torch.corrcoef(torch.stack([scores[key], own]))[0, 1])
        else:
            scores[key] = own
    base.zero_grad(set_to_none=True)
    base.requires_grad_(False)
    return scores, check


def llm_compressor_prune(base, task, method: str, sparsity: float, batches) -> None:
    """SparseGPT or Wanda (unstructured, one-shot) from llm-compressor on the adapted Linear modules, in place."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    ids = torch.cat([b["input_ids"] for b in batches])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=["lm_head"])
    oneshot(
        model=base,
        processor=task.tokenizer,
        dataset=data,
        recipe=[recipe],
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
    )


def minitron_scores(base, groups, batches) -> tuple[dict, torch.Tensor]:
    """Minitron's activation importance on calibration batches: per consumer member (o_proj / down_proj input
    columns, keyed like the engine's member averages) the mean over tokens of each head's output L2 norm or each
    channel's activation magnitude; and per channel of the hidden size, the mean magnitude of every RMSNorm's
    output at it, summed over the norms."""
    modules = dict(base.named_modules())
    consumers = [(g, m, name) for g, members in groups for m, name in members if m.axis == "cols"]
    sums, hooks, tokens = {}, [], [0]
    for g, member, name in consumers:

        def hook(module, args, _name=name, _member=member, _heads=g.structure == "heads"):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if _heads:  # per token, the L2 norm of each head's slice
                outer, n, inner = _member.layout
                value = x.reshape(-1, outer, n, inner).pow(2).sum(dim=(1, 3)).sqrt().sum(0)
            else:
                value = sum_over_groups(x.abs().sum(0), _member.layout)
            sums[_name] = sums.get(_name, 0) + value

        hooks.append(modules[name].register_forward_pre_hook(hook))
    hidden = torch.zeros(base.config.hidden_size)
    for module in modules.values():
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            if module.weight.numel() == base.config.hidden_size:

                def norm_hook(module, args, output):
                    hidden.add_(output.detach().float().reshape(-1, output.shape[-1]).abs().sum(0))

                hooks.append(module.register_forward_hook(norm_hook))
    base.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            tokens[0] += int(inputs["input_ids"].numel())
            base(**inputs)
    for h in hooks:
        h.remove()
    return {f"{name}.cols": v / tokens[0] for name, v in sums.items()}, hidden / tokens[0]


def block_influence(base, batches) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder block: ``1 - mean_tokens cos(h_in, h_out)`` over ``batches``."""
    blocks = base.model.layers
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    handles = []
    for i, block in enumerate(blocks):

        def hook(module, args, kwargs, output, _i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[_i] += float(cos.sum())
            counts[_i] += cos.numel()

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                base(input_ids=batch["input_ids"])
    finally:
        for h in handles:
            h.remove()
    return (1 - sums / counts).float()


# ---------------------------------------------------------------------------------------------------- one cell
def loraprune_method(method: str) -> tuple[str, dict]:
    """``loraprune-<criterion>[-<schedule>]`` -> (criterion, schedule fields of the config).

    No suffix: the config's default schedule. ``oneshot``: everything pruned at the warm-up step. ``cdNN``: the
    cubic schedule ending at ``1 - NN/100`` of the steps (``cd60``: pruning from 10% to 40%, then 60% of the
    steps at the final structure).
    """
    parts = method.split("-")
    if len(parts) not in (2, 3):
        raise SystemExit(f"method {method!r}: expected loraprune-<criterion>[-oneshot|-cdNN]")
    if len(parts) == 2:
        return parts[1], {}
    suffix = parts[2]
    if suffix == "oneshot":
        return parts[1], {"schedule": "one_shot"}
    if suffix.startswith("cd") and suffix[2:].isdigit():
        return parts[1], {"schedule": "cubic", "pruning_end": 1 - int(suffix[2:]) / 100}
    raise SystemExit(f"method {method!r}: schedule suffix must be 'oneshot' or 'cdNN' (cooldown in percent)")


#: modifier -> whether a value is allowed (the flags take none)
MODIFIERS = {
    "kd": bool,
    "r": bool,
    "lr": bool,
    "recovery_lr": bool,
    "budget": lambda v: v in ("local", "global"),
    "steps": lambda v: v.isdigit() and int(v) > 0,
    "init": lambda v: v == "dense",
    "norms": lambda v: False,
    "bias": lambda v: False,
    "channels": lambda v: _fraction(v),  # defined below
    "joint": lambda v: _fraction(v),
    "axes": lambda v: all(a in ("heads", "channels", "layers", "hidden") for a in v.split("/")),
    "blocks": lambda v: v in ("taylor", "influence"),
    "split": lambda v: _split(v) is not None,
}


#: modifiers without a value
FLAGS = ("norms", "bias")


def _split(value: str):
    """``layers:0.4/hidden:0.2`` -> {"layers": 0.4, "hidden": 0.2}, or None when malformed."""
    out = {}
    for part in value.split("/"):
        kind, _, fraction = part.partition(":")
        if kind not in ("heads", "channels", "layers", "hidden") or not _fraction(fraction):
            return None
        out[kind] = float(fraction)
    return out


def _fraction(value: str) -> bool:
    try:
        return 0.0 < float(value) < 1.0
    except ValueError:
        return False


def split_modifiers(method: str) -> tuple[str, dict]:
    """``loraprune-activation+kd=unmasked/0.5/2+r=32`` -> ("loraprune-activation", {"kd": ..., "r": "32"}).

    The modifiers and what they change are listed in the module docstring.
    """
    name, *mods = method.split("+")
    out = {}
    for mod in mods:
        key, sep, value = mod.partition("=")
        valid = MODIFIERS.get(key)
        if valid is None or (sep and not (value and valid(value))) or (not sep and key not in FLAGS):
            raise SystemExit(
                f"method {method!r}: modifier {mod!r} must be kd=<teacher>/<weight>/<T>, r=<rank>, lr=<x>, "
                "norms, bias, recovery_lr=<factor>, budget=local|global, steps=<optimizer steps>, init=dense, "
                "channels=<fraction between 0 and 1>, joint=<fraction between 0 and 1>, axes=<unit>/<unit> (heads, hidden, "
                "channels, layers), blocks=taylor|influence or split=<unit>:<fraction>/..."
            )
        out[key] = value
    return name, out


def check_methods(task: str, methods: list[str], granularity: str = "structured") -> None:
    """Refuse, before any cell runs, a method whose modifiers the task cannot take."""
    for method in methods:
        name, mods = split_modifiers(method)
        if "channels" in mods and granularity != "structured":
            raise SystemExit(f"method {method!r}: channels=<fraction> prunes MLP channels (--granularity structured)")
        if "joint" in mods and granularity != "structured":
            raise SystemExit(
                f"method {method!r}: joint=<fraction> shares heads and channels (--granularity structured)"
            )
        if name == "pretrained" and (mods or TASKS[task].task_type != "CAUSAL_LM"):
            raise SystemExit(
                f"method {method!r}: pretrained evaluates the causal LM as it is (--task smollm2, no modifiers); a "
                "classifier's head is untrained"
            )
        if "bias" in mods and (not name.startswith("loraprune-") or granularity != "structured"):
            raise SystemExit(
                f"method {method!r}: bias adds a bias to the layers whose input columns LoRAPrune's structured "
                "pruning removes (loraprune-* methods, --granularity structured)"
            )
        if "axes" in mods and ("channels" in mods or granularity != "structured"):
            raise SystemExit(f"method {method!r}: axes=<units> sets the structured units pruned (not with channels=)")
        if "joint" in mods and "channels" in mods:
            raise SystemExit(f"method {method!r}: joint=<fraction> and channels=<fraction> both set the units pruned")
        if mods.get("budget") == "global" and TASKS[task].head_grouping == "query_head":
            raise SystemExit(
                f"method {method!r}: budget=global needs head_grouping='kv_group' (task {task} prunes query heads "
                "inside KV groups, which the package's global ranking refuses); use it with --task minilm"
            )


class RecoveryLearningRate(transformers.TrainerCallback):
    """From ``from_fraction`` of the training steps on, the learning rate is the scheduler's times ``factor``.

    Applied after the scheduler's own step (``on_step_end`` follows ``lr_scheduler.step()`` in the Trainer), so
    the next optimizer step uses it; the Trainer's schedules recompute every step's rate from the initial rates,
    so the factor is not compounded. The logged ``learning_rate`` is the scheduler's, without the factor.
    """

    def __init__(self, factor: float, from_fraction: float):
        self.factor, self.from_fraction, self.first_step = factor, from_fraction, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = math.ceil(self.from_fraction * state.max_steps)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step >= self.first_step:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor


def distillation_of(value: str):
    from peft_loraprune import DistillationConfig

    teacher, weight, temperature = value.split("/")
    return DistillationConfig(
        teacher="teacher" if teacher == "dense" else teacher, weight=float(weight), temperature=float(temperature)
    ), teacher


def dense_adapter_dir(args, seed: int) -> Path:
    return Path(args.work_dir) / "dense-lora" / f"{args.task}-steps{args.steps}-r{args.r}-seed{seed}"


def load_dense_adapter_into_default(model, args, seed: int) -> tuple[str, float]:
    """The dense-lora adapter's saved tensors copied into the ``default`` adapter; returns its folder and the
    largest difference left between a saved tensor and the model's (0.0: every tensor arrived)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = dense_adapter_dir(args, seed)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, saved, adapter_name="default")
    if result.unexpected_keys:
        raise SystemExit(f"init=dense: {folder} has tensors the model lacks: {result.unexpected_keys[:5]}")
    now = get_peft_model_state_dict(model, adapter_name="default")
    diff = max((now[k].float() - v.float()).abs().max().item() for k, v in saved.items())
    return str(folder), diff


def run_cell(task, method: str, sparsity: float, seed: int, args) -> dict:
    transformers.set_seed(seed)
    start = time.time()
    full_method = method
    method, mods = split_modifiers(method)
    if "steps" in mods:
        if task.name != "smollm2":
            raise SystemExit(f"method {full_method!r}: steps=<n> applies to smollm2 (minilm trains for one epoch)")
        task = copy.copy(task)  # the same data; only the training length differs
        task.args = argparse.Namespace(**{**vars(args), "steps": int(mods["steps"])})
    rank = int(mods.get("r", args.r))
    base = task.model()
    if method == "pretrained":
        return pretrained_row(task, base, full_method, seed, start, args)
    criterion, schedule = "magnitude", {}  # peers: masks set once; the criterion is never used
    if method.startswith("loraprune-"):
        criterion, schedule = loraprune_method(method)
    elif method in DEPTH_PEERS:
        criterion = "activation"  # whole blocks need a block-scoring criterion; masks are set once all the same
    if args.granularity != "structured" and criterion == "activation":
        raise SystemExit("the activation criterion is structured only")
    norms = norm_module_names(base) if "norms" in mods else None  # before PEFT wraps them
    target = float(mods.get("channels", mods.get("joint", sparsity)))  # the row keeps the cell's sparsity
    config = LoRAPruneConfig(
        task_type=task.task_type,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.05,
        target_sparsity=0.0 if method == "dense-lora" else target,
        granularity=args.granularity,
        importance=criterion,
        **schedule,
        head_grouping=task.head_grouping,
        pruning_interval=args.pruning_interval,
        budget=mods.get("budget", "local"),
        **({"prune_structures": ["channels"]} if "channels" in mods else {}),
        **({"prune_structures": ["layers"]} if method == "shortgpt" else {}),
        **({"prune_structures": mods["axes"].split("/")} if "axes" in mods else {}),
        **({"allocation": "joint"} if "joint" in mods else {}),
        **({"layer_importance": mods["blocks"]} if "blocks" in mods else {}),
        **({"structure_sparsity": _split(mods["split"])} if "split" in mods else {}),
        modules_to_save=list(norms) if norms else None,  # a copy: PEFT appends a classification head to it
    )
    row = {
        "task": task.name,
        "method": full_method,
        "sparsity": sparsity,
        "seed": seed,
        "train_tokens": task.train_tokens(),
        "calibration_tokens": 0,
        "r": rank,
    }
    if "channels" in mods or "axes" in mods or method in DEPTH_PEERS:
        row["prune_structures"] = list(config.prune_structures)
    if "joint" in mods:
        row["allocation"] = config.allocation
    if "layers" in config.prune_structures:
        row["layer_importance"] = config.layer_importance
    if "split" in mods:
        row["structure_sparsity"] = dict(config.structure_sparsity)
    if method.startswith("loraprune-"):
        row["schedule"] = {k: getattr(config, k) for k in ("schedule", "pruning_start", "pruning_end")}
        if config.is_element_granularity:  # separable: per-feature averages, the weight scored at rewrites only
            row["separable_scoring"] = make_criterion(config.importance, "default").separable
    callbacks = []
    if method in PEERS:
        batches, row["calibration_tokens"] = task.calibration(args.calibration_batches, seed)
        groups = plain_groups(base, task.head_grouping)
        if method == "wanda-sp":
            scores = wanda_sp_scores(base, groups, batches)
        else:
            inputs = {k: v[:1] for k, v in batches[0].items() if k != "labels"}
            scores, check = llm_pruner_scores(base, groups, batches, inputs)
            row["torch_pruning_vs_own_channel_corr"] = min(check.values()) if check else None
        model = get_peft_model(base, config)
        engine = model.base_model.pruning_engine()
        engine.member_averages.clear()
        engine.member_averages.update(scores)
        if config.allocation == "joint":  # the peers' scores are raw already: compared across kinds as they are
            engine.member_scales.update({key: torch.ones(1) for key in scores})
        engine.prune_to(target)
        row["calibration_seconds"] = time.time() - start
    elif method in DEPTH_PEERS:
        batches, row["calibration_tokens"] = task.calibration(args.calibration_batches, seed)
        structures = config.prune_structures
        member_scores = {}
        if method == "minitron" and ({"heads", "channels", "hidden"} & set(structures)):
            member_scores, hidden_scores = minitron_scores(base, plain_groups(base, task.head_grouping), batches)
        influence = block_influence(base, batches) if "layers" in structures else None
        model = get_peft_model(base, config)
        engine = model.base_model.pruning_engine()
        engine.member_averages.update(member_scores)
        if influence is not None:
            engine.depth_averages["average"] = influence
            row["block_influence"] = influence.tolist()
        if "hidden" in structures:
            engine.stream_averages["average"] = hidden_scores
        engine.prune_to(target)
        row["calibration_seconds"] = time.time() - start
    elif method in UNSTRUCTURED_PEERS:
        batches, row["calibration_tokens"] = task.calibration(args.calibration_batches, seed)
        llm_compressor_prune(base, task, method, sparsity, batches)
        model = get_peft_model(base, config)
        for _, layer in model.base_model.prune_layers():  # the one-shot zeros become the adapter's fixed masks
            layer.set_masks("default", elements_packed=pack_bits(layer.base_weight_2d() != 0))
        row["calibration_seconds"] = time.time() - start
    else:
        model = get_peft_model(base, config)
        if method != "dense-lora":
            callbacks = [LoRAPruneCallback()]
    distillation = None
    if "kd" in mods:
        distillation, teacher = distillation_of(mods["kd"])
        row["distillation"] = {
            "teacher": teacher,
            "weight": distillation.weight,
            "temperature": distillation.temperature,
        }
        if teacher == "dense":
            model.load_adapter(str(dense_adapter_dir(args, seed)), adapter_name="teacher")
            model.set_adapter("default")
    if "init" in mods:
        row["init_from"], row["init_max_abs_diff"] = load_dense_adapter_into_default(model, args, seed)
    if "init" in mods or mods.get("kd", "").startswith("dense/"):  # the dense adapter's training counts, once
        meta = json.loads((dense_adapter_dir(args, seed) / "training.json").read_text())  # from the dense-lora cell
        row["teacher_train_tokens"], row["teacher_train_seconds"] = meta["train_tokens"], meta["seconds"]
    row["total_train_tokens"] = row["train_tokens"] + row.get("teacher_train_tokens", 0)
    if "budget" in mods:
        row["budget"] = config.budget
    training = task.training_args(args.work_dir, seed)
    if "lr" in mods:
        training["learning_rate"] = float(mods["lr"])
    row["learning_rate"] = training["learning_rate"]
    consumer_bias = None
    if "bias" in mods:
        if args.zero_shot:
            raise SystemExit(
                f"method {full_method!r}: bias lives in hooks that merging drops; run it without --zero_shot"
            )
        consumer_bias = ConsumerBias(model)
        callbacks = [*callbacks, consumer_bias]  # after LoRAPruneCallback: it sees the masks just rewritten
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if "norms" in mods:
        row["trainable_norms"] = norms
        row["modules_to_save"] = sorted(config.modules_to_save)  # PEFT adds a classification head's own
    if "recovery_lr" in mods:
        final = 0.0 if method in PEERS or method in UNSTRUCTURED_PEERS else config.pruning_end  # masks set once
        recovery = RecoveryLearningRate(float(mods["recovery_lr"]), final)
        callbacks = [*callbacks, recovery]
        row["recovery_lr"] = {"factor": recovery.factor, "from_fraction": recovery.from_fraction}
    targs = transformers.TrainingArguments(
        output_dir=str(Path(args.work_dir) / "run"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=50,
        bf16=args.bf16,
        **training,
    )
    trainer = task.trainer(model, targs, callbacks, distillation)
    trainer.train()
    row["optimizer_steps"] = trainer.state.global_step
    row["seconds"] = time.time() - start
    row["load_average_1min"] = os.getloadavg()[0]  # > 2 on these 2 cores: another process shared the CPU
    row["peak_rss_mib"] = peak_rss_mib()
    if consumer_bias is not None:
        row["consumer_bias"] = consumer_bias.summary()
    if distillation is not None:
        row["teacher_memory_mib"] = trainer.distiller.teacher_bytes / 2**20
    if method == "dense-lora" and not mods:  # the kd=dense teacher of later cells
        folder = dense_adapter_dir(args, seed)
        model.save_pretrained(str(folder))
        (folder / "training.json").write_text(
            json.dumps({"train_tokens": row["train_tokens"], "seconds": row["seconds"]})
        )
    report = model.base_model.sparsity_report()
    row["sparsity_by_unit"] = report.sparsity_by_unit()
    row["weights_kept_in_adapted_modules"] = report.weights_kept
    if "layers" in config.prune_structures:  # which blocks went (LoRAPrune's choice against ShortGPT's)
        engine = model.base_model.pruning_engine()
        row["blocks_removed"] = [g.block for g, kept in zip(engine.gates, engine.blocks_kept().tolist()) if not kept]
    if "budget" in mods:  # where a global ranking put the pruning: kept/total per block and unit
        row["kept_by_block"] = [[layer.block, layer.unit, layer.kept, layer.total] for layer in report.layers]
    row.update(task.evaluate(model, trainer))
    if args.zero_shot:
        merged = model.merge_and_unload()
        row.update(task.zero_shot(merged, args.zero_shot_limit))
    elif args.export_dir and args.granularity == "structured":
        row["export"] = export_row(model, Path(args.export_dir) / cell_folder(full_method, sparsity, seed), task)
    return row


def cell_folder(method: str, sparsity: float, seed: int) -> str:
    """The folder name of a cell's exported model (method modifiers kept, slashes replaced)."""
    return f"{method.replace('/', '_')}_{sparsity:g}_{seed}"


def export_row(model, folder: Path, task) -> dict:
    """Export the trained model (consumed) with the package's export, save it with its tokenizer to ``folder``,
    and return what the row records of it: parameters, file size, config updates, removed units."""
    from peft_loraprune import export_pruned_model

    report = export_pruned_model(model, measure_latency=False, progressbar=False)
    report.model.save_pretrained(folder)
    task.tokenizer.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "folder": str(folder),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_fraction_removed": 1 - report.params_after / report.params_before,
        "file_bytes": size,
        "removed_per_block": report.removed,
        "config_updates": {k: v for k, v in report.config_updates.items() if not isinstance(v, list)},
        "config": report.model.config.to_diff_dict(),  # the shapes, to rebuild the model where the files are not
    }


def pretrained_row(task, model, method: str, seed: int, start: float, args) -> dict:
    """The pretrained model evaluated as it is: no adapter, no training (the ``kd=base`` teacher's quality)."""
    model.eval()
    row = {"task": task.name, "method": method, "sparsity": 0.0, "seed": seed, "train_tokens": 0}
    row.update(calibration_tokens=0, total_train_tokens=0, optimizer_steps=0)
    row.update(task.evaluate(model, None))
    if args.zero_shot:
        row.update(task.zero_shot(model, args.zero_shot_limit))
    row["seconds"] = time.time() - start
    row["load_average_1min"] = os.getloadavg()[0]
    row["peak_rss_mib"] = peak_rss_mib()
    return row


# ---------------------------------------------------------------------------------------------------- driver
DEFAULT_METHOD = {"structured": "loraprune-activation", "unstructured": "loraprune-wanda"}  # the package defaults


def table_of(args) -> dict:
    """The result file's ``table`` block (common.table): metric, direction, default method and its peers."""
    task = TASKS[args.task]
    return table(
        task.metric,
        task.direction,
        default_method=DEFAULT_METHOD[args.granularity],
        peers=PEERS + DEPTH_PEERS if args.granularity == "structured" else UNSTRUCTURED_PEERS,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="smollm2")
    parser.add_argument(
        "--granularity",
        choices=("structured", "unstructured"),
        default="structured",
        help="unstructured: methods sparsegpt, wanda (llm-compressor) and loraprune-lora/grad",
    )
    parser.add_argument("--methods", default="loraprune-activation,llm-pruner,wanda-sp,loraprune-lora,loraprune-grad")
    parser.add_argument("--sparsities", default="0.5,0.2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=1000, help="smollm2: optimizer steps of batch x block_size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--max_eval_blocks", type=int, default=64)
    parser.add_argument("--max_train_samples", type=int, default=4000, help="minilm: training sentences")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="minilm: test sentences (smoke runs)")
    parser.add_argument("--max_train_blocks", type=int, default=None, help="smollm2: training blocks (smoke runs)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--pruning_interval", type=int, default=5)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training (every method)")
    parser.add_argument("--zero_shot", action="store_true", help="smollm2: lm-eval local tasks on each model")
    parser.add_argument("--zero_shot_limit", type=int, default=None)
    parser.add_argument("--work_dir", default="/tmp/peers")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--tag", default="", help="suffix of the result file, for a table with other settings (e.g. 'full_train')"
    )
    parser.add_argument(
        "--export_dir",
        default=None,
        help="structured, without --zero_shot: export every trained model (the package's export) into this folder",
    )
    parser.add_argument("--name", default=None, help="result file name (default peers_<task>[_<tag>])")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # method,sparsity,seed: one cell, then exit
    args = parser.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    if args.cell:
        method, sparsity, seed = args.cell.split(",")
        row = run_cell(TASKS[args.task](args), method, float(sparsity), int(seed), args)
        print("ROW " + json.dumps(row), flush=True)
        return

    name = f"peers_{args.task}" + ("" if args.granularity == "structured" else f"_{args.granularity}")
    name += f"_{args.tag}" if args.tag else ""
    name = args.name or name
    path = (Path(args.out) if args.out else RESULTS_DIR) / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    # before any cell runs: a queue of cells must not stop half-way
    check_methods(args.task, args.methods.split(","), args.granularity)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for method in args.methods.split(","):
                s = 0.0 if split_modifiers(method)[0] in UNPRUNED else sparsity
                if any(r["method"] == method and r["sparsity"] == s and r["seed"] == seed for r in rows):
                    continue
                cmd = [sys.executable, __file__, *sys.argv[1:], "--cell", f"{method},{s},{seed}"]
                out = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    cwd=Path(__file__).parent,
                    env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                )
                found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
                if out.returncode != 0 or not found:
                    print(out.stdout[-2000:], out.stderr[-6000:], file=sys.stderr)
                    raise SystemExit(f"cell {method} {s} seed {seed} failed")
                # re-read the file: rows written or annotated while this cell ran (another sitting, a note on
                # the conditions of a run) are kept, not overwritten with the copy read at start
                rows = json.loads(path.read_text())["rows"] if path.exists() else []
                rows.append(json.loads(found[-1]))
                print(rows[-1], flush=True)
                for r in rows:
                    r["variant"] = f"{r['method']} {r['sparsity']:.0%}"
                settings = {
                    k: v for k, v in vars(args).items() if k not in ("cell", "out", "work_dir", "tag", "export_dir")
                }
                write_result(
                    name,
                    {"settings": settings, "summary": summarise(rows, TASKS[args.task].metric), "rows": rows},
                    args.out,
                    libraries=PEER_LIBRARIES,
                    table=table_of(args),
                )
    for variant, s in summarise(rows, TASKS[args.task].metric).items():
        print(f"{variant:32s} {s['mean']:9.4f} ± {s['std']:.4f} (n={s['n']})")


if __name__ == "__main__":
    main()
