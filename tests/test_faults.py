"""Faults: a run SIGKILLed between checkpoints and resumed; NaN losses; interrupted, truncated, tampered or
pickled saves."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TASK, make_inputs, make_model, model_output
from helpers import randomize_adapter, saved_adapter
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_loraprune
from peft_loraprune import LoRAPruneConfig, verify_saved_adapter

WORKER = Path(__file__).parent / "workers" / "train_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


def test_sigkill_between_checkpoints_then_resume_equals_uninterrupted(tmp_path):
    straight = worker(tmp_path / "straight", "--save_steps", "4")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = worker(tmp_path / "killed", "--save_steps", "4", "--kill_after_step", "6")
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "killed" / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    assert not (tmp_path / "killed" / "rank0.json").exists()

    resumed = worker(tmp_path / "killed", "--save_steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "importance averages restart" not in resumed.stderr  # the state file was found and restored
    a = load_file(tmp_path / "straight" / "rank0.safetensors")
    b = load_file(tmp_path / "killed" / "rank0.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if "mask" in key:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    steps_a = json.loads((tmp_path / "straight" / "rank0.json").read_text())["steps"]
    steps_b = json.loads((tmp_path / "killed" / "rank0.json").read_text())["steps"]
    assert [s["masks"] for s in steps_a[4:]] == [s["masks"] for s in steps_b]  # steps 5..12 after the resume


def test_nan_losses_skip_mask_updates_warn_and_training_goes_on(tmp_path):
    import transformers
    from test_training import make_dataset

    poisoned = {3, 4}  # optimizer steps (1-based) whose loss is NaN; a rewrite is due after step 4

    class NaNLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step + 1 in poisoned else loss

    class Masks(transformers.TrainerCallback):
        history = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.history.append({k: v.clone() for k, v in model.state_dict().items() if "lora_mask" in k})

    model = get_peft_model(
        make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", pruning_interval=2, lora_dropout=0.0)
    )
    args = transformers.TrainingArguments(
        str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = NaNLossTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset("llama"),
        callbacks=[peft_loraprune.LoRAPruneCallback(), Masks()],
    )
    with pytest.warns(UserWarning, match="NaN or infinite"):
        trainer.train()
    engine = model.base_model.pruning_engine()
    assert engine.n_skipped == len(poisoned) and engine.n_updates == 10 - len(poisoned)
    h = Masks.history
    for step in poisoned:  # masks after a poisoned step are those of the step before
        assert all(torch.equal(h[step - 1][k], h[step - 2][k]) for k in h[0]), step
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5)
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------- saves
def test_clean_save_records_a_digest_and_reloads(tmp_path):
    model = saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["save_digest"]) == 64
    verify_saved_adapter(str(tmp_path))
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    inputs = make_inputs("llama")
    torch.testing.assert_close(model_output(reloaded, inputs), model_output(model, inputs), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".config-")]  # no temporary left behind


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weight_byte", "edit_config_value", "truncate_config"])
def test_damaged_files_fail_on_load_with_a_clear_error(tmp_path, damage):
    saved_adapter(tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "truncate_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_weight_byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x40  # inside the last tensor's data: the header still parses
        weights.write_bytes(bytes(data))
    elif damage == "edit_config_value":
        c = json.loads(config.read_text())
        c["lora_alpha"] = 64  # valid on its own, but changes every output
        config.write_text(json.dumps(c))
    else:
        config.write_text(config.read_text()[:100])
    # PEFT parses the config before any LoRAPrune code runs: a truncated one is its json.JSONDecodeError (a
    # ValueError naming line and column); verify_saved_adapter names the file
    with pytest.raises(ValueError, match="do not match the digest|line \\d+ column"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="do not match the digest|adapter_config.json is not valid JSON"):
        verify_saved_adapter(str(tmp_path))


def test_save_interrupted_between_weights_and_config_does_not_load(tmp_path, monkeypatch):
    model = saved_adapter(tmp_path, seed=0)
    randomize_adapter(model, seed=1)  # more training happened

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the weights were written, before the config

    monkeypatch.setattr(LoRAPruneConfig, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different saves"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_save_interrupted_while_writing_weights_does_not_load(tmp_path, monkeypatch):
    import peft.peft_model

    model = saved_adapter(tmp_path, seed=0)
    randomize_adapter(model, seed=1)
    real_save = peft.peft_model.safe_save_file

    def dies_halfway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 3])
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", dies_halfway)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_real_sigkill_during_save_leaves_a_folder_that_does_not_load(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import randomize_adapter, saved_adapter
from peft_loraprune import LoRAPruneConfig
model = saved_adapter({str(tmp_path)!r}, seed=0)
randomize_adapter(model, seed=1)
LoRAPruneConfig.save_pretrained = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
model.save_pretrained({str(tmp_path)!r})
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=200, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    with pytest.raises(ValueError, match="different saves"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_pickle_is_neither_written_nor_read(tmp_path):
    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type=TASK["llama"]))
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # refused before anything was written
    # a pickle written by other means beside a config is not read either
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, tmp_path / "adapter_model.bin")
    LoRAPruneConfig(task_type=TASK["llama"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
