"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: the documented manual loop over a sharded
LoRAPrune model. Rank r trains on micro-batch r; ``--single`` trains one process on both micro-batches at once
(the same global batch). Writes ``<out>/rank<R>.json`` (mask digest after every step) and the final masks.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/fsdp_worker.py --out DIR
    python tests/workers/fsdp_worker.py --out DIR --single
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from conftest import make_inputs, make_model
from peft import get_peft_model
from safetensors.torch import save_file
from train_worker import mask_digest

from peft_loraprune import LoRAPruneConfig

STEPS = 8


def main():
    faulthandler.dump_traceback_later(150, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--granularity", default="structured")
    parser.add_argument("--importance", default="lora")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = get_peft_model(
        make_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            granularity=args.granularity,
            importance=args.importance,
            pruning_interval=1,
            lora_dropout=0.0,
            pruning_end=0.9,  # the reference window: masks change through most of the short run
        ),
    )
    micro = [make_inputs("llama", batch=4, seed=10 + r) for r in range(2)]
    rank = 0
    if args.single:
        inputs = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        inputs = micro[rank]
    engine = model.base_model.pruning_engine()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps, sharded = [], False
    for step in range(1, STEPS + 1):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        sharded = sharded or any(type(p).__name__ == "DTensor" for p in model.parameters())
        engine.update_importance()
        optimizer.step()
        optimizer.zero_grad()
        engine.pruning_step(step, STEPS)
        steps.append({"step": step, "masks": mask_digest(model)})
    final = {k: v.clone().contiguous() for k, v in model.state_dict().items() if "lora_mask" in k}
    save_file(final, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"sharded": sharded, "steps": steps}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
