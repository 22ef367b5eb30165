"""The Trainer with LoRAPruneCallback: targets reached exactly, monotone masks, N:M, accumulation, resume."""

import math

import pytest
import torch
import transformers
from conftest import make_model
from helpers import make_dataset, trainer_for, training_model

from peft_loraprune import LoRAPruneCallback
from peft_loraprune.pruning.selection import prune_count
from peft_loraprune.pruning.structure import find_structured_groups


class MaskSpy(transformers.TrainerCallback):
    def __init__(self):
        self.history = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append({k: v.clone() for k, v in model.state_dict().items() if "lora_mask" in k})


CASES = [
    (g, b)
    for g in ("structured", "unstructured", "2:4")
    for b in ("local", "global")
    if not (g == "2:4" and b == "global")
]


@pytest.mark.parametrize("granularity, budget", CASES)
def test_trainer_reaches_target_exactly(family, granularity, budget, tmp_path):
    target = 0.5
    model = training_model(family, granularity=granularity, budget=budget, target_sparsity=target)
    spy = MaskSpy()
    trainer = trainer_for(model, family, tmp_path, callbacks=[spy])
    trainer.train()
    tuner = model.base_model

    if granularity == "structured":
        groups = find_structured_groups(tuner, "default")
        for structure in ("heads", "channels"):
            of_kind = [g for g in groups if g.spec.structure == structure]
            kept = [int(g.kept("default").sum()) for g in of_kind]
            if budget == "local":
                assert kept == [g.spec.n_groups - prune_count(g.spec.n_groups, target) for g in of_kind]
            else:
                total = sum(g.spec.n_groups for g in of_kind)
                assert sum(kept) == total - round(target * total) and min(kept) >= 1
            # every member of a group agrees (q, k, v rows and o columns lose the same heads)
            for g in of_kind:
                ref = g.kept("default")
                for member, _, layer in g.members:
                    axis = layer.lora_mask_rows if member.axis == "rows" else layer.lora_mask_cols
                    from peft_loraprune.kernels.group_ops import groups_kept

                    assert torch.equal(groups_kept(axis["default"], member.layout), ref)
    else:
        kept = [int(layer.element_mask("default").sum()) for _, layer in tuner.prune_layers()]
        sizes = [layer.out_features * layer.in_features for _, layer in tuner.prune_layers()]
        if granularity == "2:4":
            for _, layer in tuner.prune_layers():
                runs = layer.element_mask("default").reshape(layer.out_features, -1, 4)
                assert torch.all(runs.sum(-1) == 2), "2:4 pattern on every row"
        elif budget == "local":
            assert kept == [n - round(target * n) for n in sizes]
        else:
            assert sum(kept) == sum(sizes) - round(target * sum(sizes))
    report = tuner.sparsity_report()
    assert report.sparsity == pytest.approx(target, abs=0.02)
    assert trainer.state.log_history[-2]["sparsity"] == pytest.approx(report.sparsity, abs=1e-6)

    # masks only ever lose entries
    for before, after in zip(spy.history, spy.history[1:]):
        for key in before:
            if before[key].dtype == torch.bool:
                assert torch.all(after[key] <= before[key]), key
            else:
                assert torch.equal(after[key] & before[key], after[key]), key
    # no pretrained weight ever holds a gradient with the "lora" criterion
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_gradient_accumulation_gives_the_same_importance(tmp_path):
    states = []
    for batch, accum in ((8, 1), (2, 4)):
        model = training_model("llama", target_sparsity=0.5)
        trainer_for(model, "llama", tmp_path / f"b{batch}", steps=4, batch=batch, accum=accum).train()
        importance = model.base_model.pruning_engine().member_averages
        assert importance
        states.append(
            (
                {k: v.clone() for k, v in importance.items()},
                {n: l.lora_mask_rows["default"].clone() for n, l in model.base_model.prune_layers()},
            )
        )
    assert states[0][0].keys() == states[1][0].keys()
    for key in states[0][0]:
        torch.testing.assert_close(states[0][0][key], states[1][0][key], rtol=1e-3, atol=1e-9)
    for name in states[0][1]:
        assert torch.equal(states[0][1][name], states[1][1][name])


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def final_state(model):
    """LoRA weights, masks and importance state: what a resumed run must end with exactly."""
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k} | {
        f"importance.{k}": v.clone() for k, v in model.base_model.pruning_engine().state_dict().items()
    }


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = training_model("llama", target_sparsity=0.5)
    trainer_for(straight, "llama", tmp_path / "a", steps=12, save_strategy="steps", save_steps=6).train()

    first = training_model("llama", target_sparsity=0.5)
    trainer_for(
        first, "llama", tmp_path / "b", steps=12, save_strategy="steps", save_steps=6, callbacks=[StopAt(6)]
    ).train()
    assert (tmp_path / "b" / "checkpoint-6" / "loraprune_state.safetensors").is_file()
    resumed = training_model("llama", target_sparsity=0.5)
    trainer_for(resumed, "llama", tmp_path / "b", steps=12, save_strategy="steps", save_steps=6).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6")
    )
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def poison_losses(trainer, steps):
    """Make the loss NaN at the given optimizer steps (1-based), as a diverging batch would."""
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if trainer.state.global_step + 1 in steps else loss

    trainer.compute_loss = poisoned
    return trainer


def test_resume_right_after_a_non_finite_last_pruning_step_ends_on_the_uninterrupted_masks(tmp_path):
    """The loss is NaN at the schedule's last rewrite, so that rewrite waits for the next finite step; a checkpoint
    taken right then must carry the waiting rewrite, or the resumed run (no rewrite scheduled any more) ends short
    of the target. Resumed, it ends on the uninterrupted run's masks and exactly on the target."""
    from safetensors.torch import load_file

    from peft_loraprune.pruning.schedule import PruningSchedule

    steps, target = 12, 0.5
    straight = training_model("llama", target_sparsity=target)
    schedule = PruningSchedule.from_config(straight.peft_config["default"], steps)
    last = schedule.end
    assert schedule.is_pruning_step(last) and 0 < schedule.sparsity_at(last - 1) < target
    with pytest.warns(UserWarning, match="NaN or infinite"):
        poison_losses(trainer_for(straight, "llama", tmp_path / "a", steps=steps), {last}).train()

    first = training_model("llama", target_sparsity=target)
    run = trainer_for(
        first, "llama", tmp_path / "b", steps=steps, save_strategy="steps", save_steps=last, callbacks=[StopAt(last)]
    )
    with pytest.warns(UserWarning, match="NaN or infinite"):
        poison_losses(run, {last}).train()
    saved = load_file(tmp_path / "b" / f"checkpoint-{last}" / "loraprune_state.safetensors")
    assert int(saved["pending_rewrite"]) == 1  # the rewrite still waits in the checkpoint
    resumed = training_model("llama", target_sparsity=target)
    poison_losses(trainer_for(resumed, "llama", tmp_path / "b", steps=steps), {last}).train(
        resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{last}")
    )
    masks = [{k: v for k, v in m.state_dict().items() if "lora_mask" in k} for m in (straight, resumed)]
    assert masks[0].keys() == masks[1].keys() and masks[0]
    for key in masks[0]:
        assert torch.equal(masks[0][key], masks[1][key]), key
    for model in (straight, resumed):
        assert model.base_model.sparsity_report().sparsity == pytest.approx(target)
        assert not model.base_model.pruning_engine().pending_rewrite


def test_resume_from_a_moved_checkpoint_with_another_output_dir_equals_uninterrupted_run(tmp_path):
    """The importance state comes from the checkpoint the Trainer loaded, wherever it is; a state file of another
    run, in the folder the Trainer would once have looked in, is never read."""
    import shutil
    import warnings

    straight = training_model("llama", target_sparsity=0.5)
    trainer_for(straight, "llama", tmp_path / "a", steps=12, save_strategy="steps", save_steps=6).train()
    first = training_model("llama", target_sparsity=0.5)
    trainer_for(
        first, "llama", tmp_path / "b", steps=12, save_strategy="steps", save_steps=6, callbacks=[StopAt(6)]
    ).train()
    shutil.move(tmp_path / "b" / "checkpoint-6", tmp_path / "moved" / "checkpoint-6")
    # a stale checkpoint-6 of another run (other seed) in the new output folder
    other = training_model("llama", target_sparsity=0.3)
    trainer_for(
        other, "llama", tmp_path / "c", steps=12, save_strategy="steps", save_steps=6, callbacks=[StopAt(6)]
    ).train()
    resumed = training_model("llama", target_sparsity=0.5)
    trainer_for(resumed, "llama", tmp_path / "c", steps=12, save_strategy="steps", save_steps=6).train(
        resume_from_checkpoint=str(tmp_path / "moved" / "checkpoint-6")
    )
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)

    # the state file beside a checkpoint is refused when it was saved with another adapter file
    shutil.copy(tmp_path / "c" / "checkpoint-6" / "loraprune_state.safetensors", tmp_path / "moved" / "checkpoint-6")
    again = training_model("llama", target_sparsity=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(again, "llama", tmp_path / "d", steps=12, save_strategy="no").train(
            resume_from_checkpoint=str(tmp_path / "moved" / "checkpoint-6")
        )
    assert any("another run's state" in str(w.message) for w in caught)


def test_callback_refuses_other_models_and_warns_on_short_runs(tmp_path):
    plain = make_model("llama")
    with pytest.raises(TypeError, match="LoRAPrune adapter"):
        trainer_for(plain, "llama", tmp_path, steps=2).train()
    with pytest.warns(UserWarning, match="effectively one-shot"):
        trainer_for(training_model("llama", pruning_interval=10), "llama", tmp_path, steps=3).train()
    with pytest.raises(TypeError, match="adapter_name"):
        LoRAPruneCallback(adapter_name=3)


def test_one_shot_prunes_everything_at_one_step(tmp_path):
    model = training_model("llama", schedule="one_shot", target_sparsity=0.5, pruning_start=0.5, pruning_end=1.0)
    spy = MaskSpy()
    trainer_for(model, "llama", tmp_path, steps=6, callbacks=[spy]).train()
    h = spy.history  # h[i]: masks after optimizer step i + 1
    assert all(v.all() for step in h[:2] for v in step.values())  # steps 1-2: warm-up, all kept
    assert any(not v.all() for v in h[2].values())  # step 3 = 0.5 * 6 prunes everything at once
    assert all(torch.equal(h[2][k], later[k]) for later in h[3:] for k in later)  # nothing changes afterwards
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5)


def test_query_head_grouping_prunes_the_same_count_in_every_kv_group(tmp_path):
    model = training_model("llama", head_grouping="query_head", target_sparsity=0.5, prune_structures=["heads"])
    trainer_for(model, "llama", tmp_path).train()
    for name, layer in model.base_model.prune_layers():
        rows = layer.lora_mask_rows["default"]
        if name.endswith("q_proj"):
            per_head = rows.reshape(4, 8).all(dim=1)  # 4 query heads of head_dim 8
            assert per_head.reshape(2, 2).sum(dim=1).tolist() == [1, 1]  # 2 KV groups, one query head left in each
        if name.endswith(("k_proj", "v_proj")):
            assert rows.all()  # KV heads untouched


def test_reference_dense_layers_and_epoch_based_total(tmp_path):
    model = training_model("bert", dense_layers="reference", target_sparsity=0.5)
    args_steps = trainer_for(model, "bert", tmp_path, steps=-1, num_train_epochs=2)
    args_steps.train()
    assert args_steps.state.max_steps == 2 * math.ceil(48 / 4)
    report = model.base_model.sparsity_report()
    # 2 blocks: the first 10% is int(0.2) = 0 blocks, the last block (1) stays dense
    assert {layer.block for layer in report.layers} == {0}
    masks = {k: v for k, v in model.state_dict().items() if "lora_mask" in k}
    assert all(v.all() for k, v in masks.items() if ".layer.1." in k)
    assert not all(v.all() for k, v in masks.items() if ".layer.0." in k)


@pytest.mark.parametrize("importance", ["grad", "magnitude", "wanda"])
def test_other_criteria_train_to_target(importance, tmp_path):
    model = training_model("gpt2", importance=importance, granularity="unstructured", target_sparsity=0.3)
    trainer_for(model, "gpt2", tmp_path).train()
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_straight_through_trains_to_target_and_changes_only_the_factor_gradients(granularity, tmp_path):
    """element_mask_gradient="straight_through" reaches the target like the exact default; on the same weights and
    masks the loss and the pretrained path are the same, and only the factor gradients differ."""
    model = training_model(
        "llama", granularity=granularity, target_sparsity=0.5, element_mask_gradient="straight_through",
        lora_dropout=0.1,
    )  # fmt: skip
    layers = dict(model.base_model.prune_layers())
    assert all(layer.straight_through["default"] for layer in layers.values())
    trainer_for(model, "llama", tmp_path).train()
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5, abs=1e-3)

    ids = torch.tensor(make_dataset("llama", n=4)["input_ids"])
    grads = {}
    for straight_through in (True, False):
        for layer in layers.values():
            layer.straight_through["default"] = straight_through
        model.zero_grad()
        model.eval()  # no dropout: the same function both times
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[straight_through] = (
            loss.detach(),
            {n: l.lora_B["default"].weight.grad.clone() for n, l in layers.items()},
        )
    assert torch.equal(grads[True][0], grads[False][0])
    assert any(not torch.allclose(grads[True][1][n], grads[False][1][n]) for n in layers)


def test_documented_manual_loop_matches_the_callback(tmp_path):
    """The README's own-loop recipe gives the same masks as the Trainer callback on the same batches."""
    model = training_model("llama", target_sparsity=0.5)
    data = make_dataset("llama", n=40)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    engine = model.base_model.pruning_engine()
    total = 10
    model.train()
    for step in range(1, total + 1):
        batch = data[(step - 1) * 4 : step * 4]
        ids = torch.tensor(batch["input_ids"])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        engine.update_importance()
        optimizer.step()
        optimizer.zero_grad()
        engine.pruning_step(step, total)
    report = model.base_model.sparsity_report()
    assert report.sparsity_by_unit() == {"channels": 0.5, "heads": 0.5}


def _importance_state(engine) -> dict:
    return {f"{kind}.{k}": v.float().clone() for kind, store in engine.stores.items() for k, v in store.items()}


def _masks(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize(
    "granularity, importance",
    [("structured", "activation"), ("unstructured", "wanda"), ("2:4", "wanda")],
)
def test_gradient_checkpointing_changes_neither_importance_nor_masks(tmp_path, reentrant, granularity, importance):
    """Each default criterion (and the paper's estimator) reads the same values whether a block is recomputed in
    backward (reentrant) or its saved tensors are (non-reentrant): the activation and wanda taps see each input
    once per micro-batch, and the element-masked product (unstructured, N:M) recomputes to the same output."""
    states, masks = [], []
    for checkpointing in (False, True):
        model = training_model("llama", target_sparsity=0.5, importance=importance, granularity=granularity)
        kwargs = {}
        if checkpointing:
            kwargs = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
            model.enable_input_require_grads()
        trainer_for(model, "llama", tmp_path / str(checkpointing), steps=4, **kwargs).train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        states.append(_importance_state(model.base_model.pruning_engine()))
        masks.append(_masks(model))
    assert states[0] and states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-7, msg=key)
    pruned = [k for k, v in masks[0].items() if v.dtype == torch.bool and not v.all()]
    assert pruned or any(v.dtype == torch.uint8 for v in masks[0].values())
    for key in masks[0]:
        assert torch.equal(masks[0][key], masks[1][key]), key


@pytest.mark.parametrize(
    "granularity, importance", [("structured", "activation"), ("unstructured", "wanda"), ("2:4", "wanda")]
)
def test_trainer_with_bf16_prunes_each_granularity_to_target(tmp_path, granularity, importance):
    """``bf16=True`` (CPU autocast): the defaults score under autocast, keep float32 averages, and reach the
    target; the kept set stays close to the float32 run's (bfloat16 rounds the scores, so not exactly equal)."""
    results = []
    for bf16 in (False, True):
        model = training_model("llama", target_sparsity=0.5, importance=importance, granularity=granularity)
        trainer_for(model, "llama", tmp_path / str(bf16), steps=8, bf16=bf16).train()
        engine = model.base_model.pruning_engine()
        state = _importance_state(engine)
        assert state and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
        assert engine.n_updates == 8 and engine.n_skipped == 0
        report = model.base_model.sparsity_report()
        results.append((report, _masks(model)))
    (fp32, masks32), (bf16, masks16) = results
    expected = 0.5
    assert bf16.sparsity == pytest.approx(fp32.sparsity) and fp32.sparsity == pytest.approx(expected, abs=0.05)
    agree = sum(int((masks32[k] == masks16[k]).sum()) for k in masks32)
    total = sum(masks32[k].numel() for k in masks32)
    assert agree / total > 0.6
