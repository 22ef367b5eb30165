"""DDP (through the Trainer) and FSDP2 (sharded parameters, manual loop) with two CPU processes on gloo over
loopback: masks identical on every rank at every step, and equal to one process training on the same global
batch. Launched with torchrun, as users do."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "workers" / "train_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *args: str, processes: int = 1, worker: Path = WORKER) -> None:
    if processes == 1:
        cmd = [sys.executable, str(worker)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--nnodes=1",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(worker),
        ]
    done = subprocess.run(cmd + ["--out", str(out), *args], env=ENV, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "granularity, importance, accum, extra",
    [
        ("structured", "lora", 1, []),
        ("unstructured", "grad", 2, []),
        ("structured", "activation", 2, []),
        ("2:4", "wanda", 2, []),  # wanda and the element-masked product (unstructured shares both)
        # whole blocks by Block Influence (hooks on the blocks, reduced over ranks) and the residual stream's channels
        ("structured", "activation", 2, ["--structures", "channels,layers,hidden", "--layer_importance", "influence"]),
    ],
)
def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path, granularity, importance, accum, extra):
    """Masks are recorded at the end of each step, before DDP's next forward broadcasts rank 0's buffers (which
    would hide a difference). The "grad" case runs with gradient accumulation (2 micro-batches per rank)."""
    common = ["--granularity", granularity, "--importance", importance, *extra]
    launch(tmp_path / "one", "--batch", "8", *common)
    launch(tmp_path / "ddp", "--batch", str(4 // accum), "--accum", str(accum), *common, processes=2)

    one = json.loads((tmp_path / "one" / "rank0.json").read_text())["steps"]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(one) == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 12
    # the masks did change during the run (2:4 has three states: none, 1 and 2 of every 4 pruned)
    assert len({s["masks"] for s in one}) >= (3 if ":" in granularity else 4)
    for s1, s0, s2 in zip(one, ranks[0]["steps"], ranks[1]["steps"]):
        assert s0["masks"] == s2["masks"], f"ranks disagree after step {s0['step']}"
        assert s0["masks"] == s1["masks"], f"DDP and one process disagree after step {s0['step']}"
        assert s0["loss"] == pytest.approx(s1["loss"], rel=1e-5)
        for name in ("depth_averages", "stream_averages"):  # each rank's scores are those of the global batch
            assert (name in s0) == (name in s1) == ("--structures" in common)
            if name in s1:
                assert s0[name] == pytest.approx(s1[name], rel=1e-4, abs=1e-6), (name, s0["step"])
                assert s2[name] == pytest.approx(s1[name], rel=1e-4, abs=1e-6), (name, s0["step"])

    single = load_file(tmp_path / "one" / "rank0.safetensors")
    for r in (0, 1):
        state = load_file(tmp_path / "ddp" / f"rank{r}.safetensors")
        assert state.keys() == single.keys()
        for key, value in single.items():
            if "mask" in key:
                assert torch.equal(state[key], value), key
            else:
                torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-3, atol=1e-4, msg=key)


FSDP_WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"


@pytest.mark.parametrize(
    "granularity, importance",
    [
        ("structured", "lora"),
        ("unstructured", "grad"),
        ("structured", "activation"),
        ("2:4", "wanda"),
    ],
)
def test_fsdp2_sharded_parameters_give_the_masks_of_one_process(tmp_path, granularity, importance):
    """FSDP2 on CPU: parameters and gradients are DTensor shards; the engine gathers one layer at a time.
    (The Trainer cannot run FSDP on CPU: transformers/accelerate need an accelerator for it.)"""
    common = ["--granularity", granularity, "--importance", importance]
    launch(tmp_path / "one", "--single", *common, worker=FSDP_WORKER)
    launch(tmp_path / "fsdp", *common, processes=2, worker=FSDP_WORKER)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not one["sharded"] and all(r["sharded"] for r in ranks)
    assert len({s["masks"] for s in one["steps"]}) >= (3 if ":" in granularity else 4)
    for s1, s0, s2 in zip(one["steps"], ranks[0]["steps"], ranks[1]["steps"]):
        assert s0["masks"] == s2["masks"] == s1["masks"], f"masks differ after step {s0['step']}"


def test_deepspeed_gradient_accessor_is_used_when_p_grad_is_empty(monkeypatch):
    """Under DeepSpeed ZeRO-1/2, gradients live in the optimizer's partitions and ``p.grad`` is None; the engine
    asks ``deepspeed.utils.safe_get_full_grad``. DeepSpeed does not install on this CPU-only machine, so the
    accessor is a stand-in returning the real gradients: importance must equal the ``p.grad`` path's."""
    import types

    from conftest import make_inputs, make_model
    from peft import get_peft_model

    from peft_loraprune import LoRAPruneConfig

    def trained_engine():
        torch.manual_seed(0)
        model = get_peft_model(
            make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", lora_dropout=0.0, importance="lora")
        )
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        inputs = make_inputs("llama", batch=4)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return model, model.base_model.pruning_engine()

    model, engine = trained_engine()
    assert engine.update_importance()
    expected = {k: v.clone() for k, v in engine.member_averages.items()}
    assert expected

    model, engine = trained_engine()
    stash, asked = {}, []
    for p in model.parameters():
        if p.grad is not None:
            stash[id(p)] = p.grad
            p.grad = None
    fake = types.ModuleType("deepspeed")
    fake.utils = types.ModuleType("deepspeed.utils")
    fake.utils.safe_get_full_grad = lambda p: asked.append(id(p)) or stash.get(id(p))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake.utils)
    assert engine.update_importance()
    assert len(set(asked)) == 2 * len(engine.scored_layers)  # A and B of every scored layer
    assert engine.member_averages.keys() == expected.keys()
    for key, value in engine.member_averages.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("importance", ["lora", "grad", "magnitude"])
def test_deepspeed_zero3_partitioned_weights_are_refused_clearly(importance):
    """ZeRO-3 partitions the pretrained weights after get_peft_model (deepspeed.initialize comes later), so the
    criteria that read whole weights refuse at their first update; the activation criterion reads none."""
    from conftest import make_inputs, make_model
    from peft import get_peft_model

    from peft_loraprune import LoRAPruneConfig

    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", importance=importance))
    for _, layer in model.base_model.prune_layers():
        layer.get_base_layer().weight.ds_tensor = torch.empty(0)  # what ZeRO-3 attaches to a partitioned parameter
    inputs = make_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match="ZeRO stage 3"):
        model.base_model.pruning_engine().update_importance()


def test_deepspeed_zero3_is_not_refused_for_the_activation_criterion():
    from conftest import make_inputs, make_model
    from peft import get_peft_model

    from peft_loraprune import LoRAPruneConfig

    model = get_peft_model(make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", importance="activation"))
    for _, layer in model.base_model.prune_layers():
        layer.get_base_layer().weight.ds_tensor = torch.empty(0)
    inputs = make_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.base_model.pruning_engine().update_importance()
