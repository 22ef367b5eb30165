"""Distillation toward a teacher held in the same model: the chunked KL against autograd, each teacher against an
independent model that computes it, the loss the Trainer optimises, and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TASK, make_inputs, make_model
from helpers import make_dataset, pruned_model, randomize_adapter, training_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, norm_module_names
from peft_loraprune.distillation import DistillationConfig, DistillationTrainer, Distiller
from peft_loraprune.distillation.teachers import teacher_mode
from peft_loraprune.kernels.distill_loss import chunked_kl_divergence


def reference_kl(student, teacher, rows, temperature):
    """T²·KL(teacher ‖ student) averaged over rows, with torch's own kl_div (full tensors, autograd)."""
    s = student.reshape(-1, student.shape[-1])[rows].float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1])[rows].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2 / rows.numel()


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kl_and_its_gradient_match_autograd(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=g)
    rows = torch.tensor([0, 2, 3, 7, 9])  # some positions left out
    flat_teacher = teacher.reshape(-1, 11)
    ours = chunked_kl_divergence(student, lambda i: flat_teacher[i], rows, temperature, chunk)
    (grad_ours,) = torch.autograd.grad(3.0 * ours, student)
    ref = reference_kl(student, teacher, rows, temperature)
    (grad_ref,) = torch.autograd.grad(3.0 * ref, student)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad_ours.reshape(-1, 11)[1].abs().sum() == 0  # a left-out row gets no gradient


def test_kl_of_a_teacher_with_itself_is_zero():
    x = torch.randn(4, 7)
    assert chunked_kl_divergence(x, lambda i: x[i], torch.arange(4), 2.0, 2).abs() < 1e-6


# ---------------------------------------------------------------------- teachers against independent models
def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_unmasked_teacher_is_the_adapter_with_full_masks(family):
    model = pruned_model(family)
    inputs = make_inputs(family)
    reference = copy.deepcopy(model)
    for layer in reference.base_model.modules():
        if hasattr(layer, "lora_mask_rows"):
            for adapter in layer.lora_A:
                layer.set_masks(
                    adapter,
                    rows=torch.ones(layer.out_features, dtype=torch.bool),
                    cols=torch.ones(layer.in_features, dtype=torch.bool),
                )
    student_before = _logits(model, inputs)
    with teacher_mode(model, "unmasked"):
        teacher = _logits(model, inputs)
    torch.testing.assert_close(teacher, _logits(reference, inputs))
    assert not torch.allclose(teacher, student_before)
    torch.testing.assert_close(_logits(model, inputs), student_before)  # masks back on after the context


def test_the_base_teacher_is_the_pretrained_model():
    base_logits = _logits(make_model("llama"), make_inputs("llama"))
    model = pruned_model("llama")
    with teacher_mode(model, "base"):
        torch.testing.assert_close(_logits(model, make_inputs("llama")), base_logits)
    assert not torch.allclose(_logits(model, make_inputs("llama")), base_logits)


def test_the_base_teacher_runs_the_original_norms_when_the_adapter_trains_them():
    base = make_model("llama")
    base_logits = _logits(base, make_inputs("llama"))
    config = LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.0, modules_to_save=norm_module_names(base))
    model = get_peft_model(base, config)
    with torch.no_grad():  # the adapter's copies of the norms move away from the pretrained ones
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.mul_(1.5)
    Distiller(model, DistillationConfig(teacher="base"))  # accepted: the norms are pretrained modules
    with teacher_mode(model, "base"):
        torch.testing.assert_close(_logits(model, make_inputs("llama")), base_logits)
    assert not torch.allclose(_logits(model, make_inputs("llama")), base_logits)


def test_an_adapter_teacher_runs_that_adapter_and_leaves_requires_grad_alone():
    model = training_model("llama", target_sparsity=0.5)
    model.add_adapter("teacher", LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.0, inference_mode=True))
    randomize_adapter(model, seed=3)
    inputs = make_inputs("llama")
    reference = copy.deepcopy(model)
    reference.set_adapter("teacher")
    reference.eval()  # the teacher runs without dropout
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with teacher_mode(model, "teacher"):
        teacher = _logits(model, inputs)
    torch.testing.assert_close(teacher, _logits(reference, inputs))
    assert model.active_adapters == ["default"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all("teacher" not in n for n in trainable)


@pytest.mark.parametrize("teacher", ["unmasked", "base", "teacher"])
def test_a_teacher_pass_is_deterministic_and_training_flags_come_back(teacher):
    """With dropout 0.5 everywhere, two teacher passes agree and equal the eval-mode model's; afterwards every
    module is in the training mode it had (a frozen module left in eval mode stays there)."""
    model = training_model("llama", target_sparsity=0.5, lora_dropout=0.5)
    model.add_adapter("teacher", LoRAPruneConfig(task_type="CAUSAL_LM", target_sparsity=0.0, lora_dropout=0.5))
    randomize_adapter(model, seed=3)
    model.train()
    frozen = model.base_model.model.model.layers[0].mlp
    frozen.eval()
    before = {name: m.training for name, m in model.named_modules()}
    inputs = make_inputs("llama")
    with teacher_mode(model, teacher):
        assert not any(m.training for m in model.modules())
        first, second = _logits(model, inputs), _logits(model, inputs)
    torch.testing.assert_close(first, second)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not torch.equal(_logits(model, inputs), _logits(model, inputs))  # dropout is on again for the student
    model.eval()
    with teacher_mode(model, teacher):
        torch.testing.assert_close(_logits(model, inputs), first)


# ---------------------------------------------------------------------- the loss
@pytest.mark.parametrize("teacher", ["unmasked", "base"])
def test_the_causal_lm_loss_equals_the_hand_computed_one(teacher):
    """Teacher from hidden states and the output head, in chunks; reference: the teacher's full logits."""
    model = pruned_model("llama").train()
    inputs = make_inputs("llama", batch=3)
    labels = inputs["input_ids"].clone()
    labels[0, :2] = -100  # positions without a label do not count
    inputs["labels"] = labels
    distiller = Distiller(model, DistillationConfig(teacher=teacher, weight=0.25, temperature=2.0, chunk_rows=4))
    out = model(**inputs)
    loss, parts = distiller.loss(model, inputs, out, out.loss)
    with teacher_mode(model, teacher):
        teacher_logits = _logits(model, {k: v for k, v in inputs.items() if k != "labels"})
    keep = torch.cat([labels[:, 1:] != -100, torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    rows = keep.reshape(-1).nonzero().squeeze(1)
    assert rows.numel() == 3 * 5 - 1
    expected_kl = reference_kl(out.logits, teacher_logits, rows, 2.0)
    torch.testing.assert_close(parts["distill_kl"], expected_kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, 0.75 * out.loss + 0.25 * expected_kl, rtol=1e-5, atol=1e-6)
    # the teacher's memory: its hidden states plus one chunk of logits, never the full logits
    hidden = model.config.hidden_size
    assert distiller.teacher_bytes == 3 * 6 * hidden * 4 + 4 * model.config.vocab_size * 4


def test_the_sequence_classification_loss_equals_the_hand_computed_one():
    model = pruned_model("bert").train()
    model.base_model.model.dropout.p = 0.0
    inputs = {**make_inputs("bert", batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    distiller = Distiller(model, DistillationConfig(teacher="unmasked", weight=0.5, temperature=3.0))
    out = model(**inputs)
    loss, parts = distiller.loss(model, inputs, out, out.loss)
    with teacher_mode(model, "unmasked"):
        teacher_logits = _logits(model, {k: v for k, v in inputs.items() if k != "labels"})
    expected_kl = reference_kl(out.logits, teacher_logits, torch.arange(4), 3.0)
    torch.testing.assert_close(parts["distill_kl"], expected_kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, 0.5 * out.loss + 0.5 * expected_kl, rtol=1e-5, atol=1e-6)


def test_with_weight_zero_gradients_and_importance_are_those_of_plain_training():
    """The teacher's pass must not reach the criteria's taps or the adapter's gradients."""
    results = []
    for distil in (False, True):
        model = training_model("llama", target_sparsity=0.5)
        randomize_adapter(model, seed=1)
        model.train()
        inputs = {**make_inputs("llama", batch=2), "labels": make_inputs("llama", batch=2)["input_ids"]}
        out = model(**inputs)
        loss = out.loss
        if distil:
            config = DistillationConfig(teacher="unmasked", weight=0.0)
            loss, _ = Distiller(model, config).loss(model, inputs, out, out.loss)
        loss.backward()
        engine = model.base_model.pruning_engine()
        engine.update_importance()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((grads, {k: v.clone() for k, v in engine.member_averages.items()}))
    (g0, a0), (g1, a1) = results
    assert g0.keys() == g1.keys() and a0.keys() == a1.keys() and a0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k])
    for k in a0:
        torch.testing.assert_close(a0[k], a1[k])


# ---------------------------------------------------------------------- Trainer
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_distillation_trainer_trains_prunes_and_logs(family, tmp_path):

    model = training_model(family, target_sparsity=0.5)
    args = transformers.TrainingArguments(
        str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=4,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(family),
        callbacks=[LoRAPruneCallback()],
        distillation=DistillationConfig(teacher="unmasked", weight=0.5),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "distill_kl" in entry]
    assert len(logs) == 2 and all(entry["distill_kl"] >= 0 and "distill_teacher_mib" in entry for entry in logs)
    assert trainer.distiller.teacher_bytes > 0
    assert logs[-1]["distill_kl"] > 0  # masks are on by the end, so student and teacher differ
    report = model.base_model.sparsity_report()
    assert report.sparsity == pytest.approx(0.5, abs=0.1)


def test_a_bf16_trainer_runs_the_teacher_under_its_autocast_from_hidden_states(tmp_path):
    """accelerate autocasts the model's forward only. The teacher's passes start from the loss, so the trainer
    enters the same autocast for them: the backbone then computes in bfloat16 like the student (a float32 teacher
    costs more than the student's forward), and the head on its hidden states matches the model's own bfloat16
    logits to their rounding, so the chunked path is kept (it was dropped, with a warning, before)."""
    import warnings

    model = training_model("llama", target_sparsity=0.5)
    seen = []
    hook = (
        model.get_base_model()
        .model.layers[0]
        .mlp.down_proj.register_forward_hook(
            lambda module, args, out: seen.append((torch.is_grad_enabled(), out.dtype))
        )
    )
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[], bf16=True,
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset("llama"),
        distillation=DistillationConfig(teacher="unmasked", weight=0.5),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fallback's warning would fail here
        trainer.train()
    hook.remove()
    assert trainer.distiller._use_hidden_states
    teacher_passes = [dtype for grad, dtype in seen if not grad]
    assert teacher_passes and all(dtype == torch.bfloat16 for dtype in teacher_passes)


# ---------------------------------------------------------------------- refusals
def test_bad_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="teacher is required"):
        DistillationConfig()
    with pytest.raises(ValueError, match="weight"):
        DistillationConfig(teacher="base", weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(teacher="base", temperature=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        DistillationConfig(teacher="base", chunk_rows=0)
    model = pruned_model("llama")
    with pytest.raises(TypeError, match="distillation=DistillationConfig"):
        DistillationTrainer(model=model, args=transformers.TrainingArguments("unused", report_to="none"))
    with pytest.raises(ValueError, match="teacher='nope'.*adapters: \\['default'\\]"):
        Distiller(model, DistillationConfig(teacher="nope"))
    with pytest.raises(ValueError, match="teacher='default' is the adapter being trained"):
        Distiller(model, DistillationConfig(teacher="default"))
    classifier = get_peft_model(make_model("bert"), LoRAPruneConfig(task_type=TASK["bert"]))
    with pytest.raises(ValueError, match="teacher='base'.*task_type='SEQ_CLS'.*untrained"):
        Distiller(classifier, DistillationConfig(teacher="base"))
    with pytest.raises(TypeError, match="PeftModel"):
        Distiller(make_model("llama"), DistillationConfig(teacher="base"))
