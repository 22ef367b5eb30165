"""A small Trainer run for the tests that need their own processes (torchrun DDP, SIGKILL and resume).

Trains the tiny grouped-query Llama of ``conftest.py`` with ``LoRAPruneCallback`` and writes, per rank,
``<out>/rank<R>.json`` (the loss and a digest of every mask after every optimizer step) and
``<out>/rank<R>.safetensors`` (final LoRA weights, masks and importance averages).

    python tests/workers/train_worker.py --out DIR [--batch 8] [--save_steps 4 --kill_after_step 6] [--resume]
    python -m torch.distributed.run --nproc_per_node 2 tests/workers/train_worker.py --out DIR --batch 4
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import make_model  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig  # noqa: E402


def mask_digest(model) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if "lora_mask" in key:
            h.update(key.encode())
            h.update(value.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Recorder(transformers.TrainerCallback):
    """Loss and mask digest after every optimizer step."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sharded = any(type(p).__name__ == "DTensor" or "Flat" in type(p).__name__ for p in model.parameters())
        record = {"step": state.global_step, "masks": mask_digest(model), "sharded": sharded}
        tuner = getattr(model, "module", model).base_model
        engine = tuner.derived.engines.get("default")
        for name in ("depth_averages", "stream_averages"):  # the whole-model averages, to compare across ranks
            average = getattr(engine, name, {}).get("average")
            if average is not None:
                record[name] = average.tolist()
        self.steps.append(record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.steps:
            self.steps[-1]["loss"] = logs["loss"]


class KillAfterStep(transformers.TrainerCallback):
    """SIGKILL this process at the end of optimizer step ``step`` (no chance to clean up or save)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    faulthandler.dump_traceback_later(150, exit=True)  # a hung collective shows its stack instead of hanging CI
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="per process and micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--kill_after_step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--granularity", default="structured")
    parser.add_argument("--importance", default="lora")
    parser.add_argument("--structures", default="heads,channels", help="prune_structures, comma-separated")
    parser.add_argument("--layer_importance", default="taylor")
    parser.add_argument("--fsdp", type=int, default=0, help="FSDP version (1 or 2) through the Trainer; 0: none")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = get_peft_model(
        make_model("llama"),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            target_sparsity=0.5,
            granularity=args.granularity,
            importance=args.importance,
            prune_structures=args.structures.split(","),
            layer_importance=args.layer_importance,
            pruning_interval=2,
            lora_dropout=0.0,
            pruning_end=0.9,  # the reference window: masks change through most of the short run
        ),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (96, 8), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    recorder = Recorder()
    callbacks = [LoRAPruneCallback(), recorder]
    if args.kill_after_step is not None:
        callbacks.append(KillAfterStep(args.kill_after_step))
    training_args = transformers.TrainingArguments(
        str(out / "run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=5e-3,
        gradient_accumulation_steps=args.accum,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        **(
            {
                "fsdp": "full_shard",
                "fsdp_config": {
                    "fsdp_version": args.fsdp,
                    "use_orig_params": True,
                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                },
            }
            if args.fsdp
            else {}
        ),
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    rank = int(os.environ.get("RANK", "0"))
    final = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in model.base_model.pruning_engine().state_dict().items():
        if key.startswith(("member.", "element.")):
            final[f"importance.{key}"] = value.float().clone()
    save_file(final, str(out / f"rank{rank}.safetensors"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": world, "steps": recorder.steps}))
    # Teardown in a fixed order. The DDP wrapper (its reducer holds the gloo group) is freed while the group still
    # exists, then the group is destroyed, then the process ends without running C++ destructors at interpreter
    # exit: CI once saw rank 0 hang for 150 s after its results were written, in a destructor that ran when
    # main()'s frame was freed (the faulthandler stack showed only the module line calling main()).
    del trainer, model
    gc.collect()
    if torch.distributed.is_initialized():  # a gloo group left open can abort the process at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
