"""TRL's ``SFTTrainer`` with ``LoRAPruneCallback``: a base model with ``peft_config=LoRAPruneConfig(...)`` or a model
already wrapped by ``get_peft_model``, on plain text, packed text and prompt/completion data (completion-only loss),
with gradient checkpointing as TRL sets it up, and with the package's distillation loss. Every run reaches the
target exactly, reloads bit-exactly from ``save_pretrained`` and exports to a model with the adapter's logits.

The runs train in float32 (``bf16=False``: CPU autocast costs several times the step here), but for one with TRL's
default, ``bf16=True``, after which accelerate's autocast wrapper stays on the trained model's ``forward``: the
comparisons take it off first with ``unwrap_model(keep_fp32_wrapper=False)``, as the how-to says
(docs/how-to/trl.md).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_inputs, make_model, model_output
from peft import PeftModel, get_peft_model

from peft_loraprune import (
    DistillationConfig,
    DistillationTrainer,
    LoRAPruneCallback,
    LoRAPruneConfig,
    export_pruned_model,
)

trl = pytest.importorskip("trl")

WORDS = [f"w{i}" for i in range(61)]  # with [UNK], [EOS] and [PAD]: the tiny Llama's 64 tokens
TARGET = 0.5
DATA = ("plain", "packing", "completion_only")


def word_tokenizer():
    """A word-level tokenizer built offline (no Hub): one token per word of ``WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "[PAD]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    )


def text_dataset(kind: str, n: int = 48, seed: int = 0):
    """Random sentences: ``{"text"}`` (plain, packing) or ``{"prompt", "completion"}`` (completion-only loss)."""
    import datasets

    g = torch.Generator().manual_seed(seed)

    def sentence(low, high):
        length = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g).tolist())

    if kind == "completion_only":
        return datasets.Dataset.from_dict(
            {"prompt": [sentence(4, 9) for _ in range(n)], "completion": [sentence(2, 6) for _ in range(n)]}
        )
    return datasets.Dataset.from_dict({"text": [sentence(3, 12) for _ in range(n)]})


def lora_prune_config(**kwargs):
    kwargs.setdefault("pruning_interval", 2)
    return LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=TARGET, lora_dropout=0.0, **kwargs)


def sft_config(folder, kind: str, steps: int = 8, **kwargs):
    """TRL's defaults but for a short, quiet, CPU-only run in float32 (``bf16=None`` leaves TRL's default)."""
    kwargs.setdefault("bf16", False)
    return trl.SFTConfig(
        str(folder),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_length=32,
        packing=kind == "packing",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=4,
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def sft_trainer(folder, kind, setup="peft_config", trainer_class=None, steps=8, args=None, config=None, **kwargs):
    """``SFTTrainer`` (or ``trainer_class``) on a tiny Llama with ``LoRAPruneCallback``; ``setup`` says whether TRL
    wraps the base (``peft_config=``) or gets a model already wrapped by ``get_peft_model``."""
    base = make_model("llama")
    config = config or lora_prune_config()
    if setup == "peft_config":
        model, extra = base, {"peft_config": config}
    else:
        model, extra = get_peft_model(base, config), {}
    return (trainer_class or trl.SFTTrainer)(
        model=model,
        args=args or sft_config(folder, kind, steps),
        train_dataset=text_dataset(kind),
        processing_class=word_tokenizer(),
        callbacks=[LoRAPruneCallback()],
        **extra,
        **kwargs,
    )


def trained_model(trainer):
    """The trained PeftModel without accelerate's autocast wrapper (TRL trains under bf16 autocast by default and
    the wrapper stays on ``forward`` after training): its forward runs in float32, as a reloaded one does."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert isinstance(model, PeftModel)
    return model.eval()


def check_target_reload_export(trainer, tmp_path):
    """The target reached exactly, a bit-exact reload from ``save_pretrained`` and an export with the adapter's
    logits (float32 rounding apart) that is really smaller."""
    model = trained_model(trainer)
    report = model.base_model.sparsity_report()
    assert report.sparsity_by_unit() == {"channels": TARGET, "heads": TARGET}
    assert trainer.state.log_history[-1]["sparsity"] == report.sparsity

    inputs = make_inputs("llama")
    logits = model_output(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter").eval()
    masks = {k: v for k, v in model.state_dict().items() if "mask" in k}
    assert masks and all(torch.equal(v, reloaded.state_dict()[k]) for k, v in masks.items())
    assert torch.equal(model_output(reloaded, inputs), logits)
    assert not torch.equal(model_output(make_model("llama"), inputs), logits)  # the adapter changed the model

    export = export_pruned_model(model, measure_latency=False, progressbar=False)
    assert export.params_after < export.params_before
    torch.testing.assert_close(model_output(export.model, inputs), logits, rtol=0, atol=1e-5)


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("setup", ["peft_config", "peft_model"])
def test_sft_trainer_prunes_to_target_reloads_and_exports(setup, kind, tmp_path):
    trainer = sft_trainer(tmp_path / "run", kind, setup)
    batch = first_batch(trainer)
    if kind == "packing":  # several sequences per row, told apart by restarting positions (TRL's padding-free BFD)
        assert len(trainer.train_dataset) < 48
        assert int((batch["position_ids"] == 0).sum()) > batch["position_ids"].shape[0]
    if kind == "completion_only":  # the prompts' tokens carry no label
        assert trainer.completion_only_loss
        assert int((batch["labels"] == -100).sum()) > int((batch["attention_mask"] == 0).sum())
    trainer.train()
    check_target_reload_export(trainer, tmp_path)


def test_sft_trainer_with_trls_default_precision(tmp_path):
    """TRL's default ``bf16=True`` trains under CPU autocast and leaves accelerate's autocast wrapper on the PeftModel's
    forward; ``unwrap_model(keep_fp32_wrapper=False)`` takes it off, and the run checks out in float32."""
    args = sft_config(tmp_path / "run", "plain", steps=4, bf16=None)  # 4 steps: autocast is slow on a CPU
    trainer = sft_trainer(tmp_path / "run", "plain", args=args, config=lora_prune_config(pruning_interval=1))
    assert trainer.args.bf16  # TRL's default (the Trainer's is False)
    trainer.train()
    inputs = make_inputs("llama")
    under_autocast = model_output(trainer.model.eval(), inputs)
    assert not torch.equal(under_autocast, model_output(trained_model(trainer), inputs))
    check_target_reload_export(trainer, tmp_path)


def _masks(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}


def _importance(model) -> dict:
    engine = model.base_model.pruning_engine()
    return {f"{kind}.{k}": v.float().clone() for kind, store in engine.stores.items() for k, v in store.items()}


def test_sft_trainer_with_gradient_checkpointing_gives_the_same_importance_and_masks(tmp_path):
    """``SFTConfig(gradient_checkpointing=True)``, set up by TRL (input gradients enabled on the PeftModel): the
    backbone recomputes its blocks, the importance and masks come out as without checkpointing, and the run checks
    out."""
    runs = []
    for checkpointing in (False, True):
        args = sft_config(tmp_path / str(checkpointing), "plain", gradient_checkpointing=checkpointing)
        trainer = sft_trainer(tmp_path, "plain", args=args)
        trainer.train()
        model = trained_model(trainer)
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        runs.append((_importance(model), _masks(model)))
    (importance, masks), (importance_gc, masks_gc) = runs
    assert importance and importance.keys() == importance_gc.keys()
    for key in importance:
        torch.testing.assert_close(importance_gc[key], importance[key], rtol=1e-4, atol=1e-7, msg=key)
    assert masks.keys() == masks_gc.keys() and any(not v.all() for v in masks.values())
    for key in masks:
        assert torch.equal(masks[key], masks_gc[key]), key
    check_target_reload_export(trainer, tmp_path)


class DistillationSFTTrainer(DistillationTrainer, trl.SFTTrainer):
    """The documented pattern: the distillation loss first, TRL's data handling after it."""


@pytest.mark.parametrize("kind", ["plain", "completion_only"])
def test_distillation_loss_through_sft_trainer(kind, tmp_path):
    """``DistillationTrainer`` combined with ``SFTTrainer``: TRL prepares the data (completion-only labels too), the
    loss is task + KL toward the unmasked adapter with the student's gradient, and the run checks out."""
    distillation = DistillationConfig(teacher="unmasked", weight=0.5, temperature=2.0)
    trainer = sft_trainer(tmp_path / "run", kind, trainer_class=DistillationSFTTrainer, distillation=distillation)
    assert trainer.completion_only_loss == (kind == "completion_only")
    student_logits = []  # what the KL is computed from: the student's logits, with their gradient
    loss = trainer.distiller.loss

    def spy(model, inputs, outputs, *args, **kwargs):
        student_logits.append(outputs.logits.requires_grad)
        return loss(model, inputs, outputs, *args, **kwargs)

    trainer.distiller.loss = spy
    trainer.train()
    assert student_logits == [True] * 8
    logged = [entry for entry in trainer.state.log_history if "distill_kl" in entry]
    assert len(logged) == 2 and all("task_loss" in entry for entry in logged)
    assert logged[-1]["distill_kl"] > 0  # the masked student and the unmasked teacher differ once pruned
    check_target_reload_export(trainer, tmp_path)
