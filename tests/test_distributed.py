"""DDP with two CPU processes (gloo, loopback): masks identical on every rank at every step, and equal to one
process training on the same global batch. Launched with torchrun, as users do."""

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


def launch(out: Path, *args: str, processes: int = 1) -> None:
    if processes == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER)]
    done = subprocess.run(cmd + ["--out", str(out), *args], env=ENV, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("granularity, importance", [("structured", "lora"), ("unstructured", "grad")])
def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path, granularity, importance):
    launch(tmp_path / "one", "--batch", "8", "--granularity", granularity, "--importance", importance)
    launch(tmp_path / "ddp", "--batch", "4", "--granularity", granularity, "--importance", importance, processes=2)

    one = json.loads((tmp_path / "one" / "rank0.json").read_text())["steps"]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(one) == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 12
    assert len({s["masks"] for s in one}) >= 4  # the masks did change during the run
    for s1, s0, s2 in zip(one, ranks[0]["steps"], ranks[1]["steps"]):
        assert s0["masks"] == s2["masks"], f"ranks disagree after step {s0['step']}"
        assert s0["masks"] == s1["masks"], f"DDP and one process disagree after step {s0['step']}"
        assert s0["loss"] == pytest.approx(s1["loss"], rel=1e-5)

    single = load_file(tmp_path / "one" / "rank0.safetensors")
    for r in (0, 1):
        state = load_file(tmp_path / "ddp" / f"rank{r}.safetensors")
        assert state.keys() == single.keys()
        for key, value in single.items():
            if "mask" in key:
                assert torch.equal(state[key], value), key
            else:
                torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
