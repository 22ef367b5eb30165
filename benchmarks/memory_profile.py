"""Where the memory of a training step goes, phase by phase: forward, backward, importance update, optimizer step,
mask rewrite.

Each configuration of ``step_cost.py`` runs in its own process, on the same model and batch: warm-up steps, masks
set to 50% sparsity (the steady state of a pruning run), then one profiled step. A sampling thread reads the C
allocator's live bytes (glibc ``mallinfo2``: every tensor torch allocates on the CPU and everything else the process
holds) and the resident set every millisecond, and the main thread marks where each phase starts. Per phase the
result gives the highest live heap above what was live when the step began, and the live heap left when it ends
(what a phase keeps: activations after the forward pass, gradients after the backward pass); ``state_mib`` is what
the pruning state holds between steps (importance scores, masks, unpacked-mask caches), measured as the live heap
after the step minus plain LoRA's. Peak RSS minus peak live heap is what the allocator kept but did not use.

    python benchmarks/memory_profile.py --model llama-0.5b --batch 1 --seq 128
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import threading
import time

from common import table, write_result
from step_cost import DISTILLED, build

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_heap_bytes() -> int:
    """Bytes the C allocator has handed out and not yet got back: heap chunks in use plus mmapped chunks."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PhaseSampler:
    """Samples live heap and RSS in a thread; :meth:`phase` marks the start of a named phase."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[str, int, int]] = []
        self.current = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.current, live_heap_bytes(), rss_bytes()))
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        self.samples.append((self.current, live_heap_bytes(), rss_bytes()))  # the previous phase's last value
        self.current = name
        self.samples.append((name, live_heap_bytes(), rss_bytes()))

    def __exit__(self, *exc) -> None:
        self.phase("end")
        self._stop.set()
        self._thread.join()

    def summary(self, origin: int) -> dict:
        out = {}
        for name in dict.fromkeys(s[0] for s in self.samples):
            rows = [s for s in self.samples if s[0] == name]
            out[name] = {
                "peak_live_above_step_start_mib": (max(r[1] for r in rows) - origin) / MIB,
                "live_at_end_above_step_start_mib": (rows[-1][1] - origin) / MIB,
                "peak_rss_mib": max(r[2] for r in rows) / MIB,
                "samples": len(rows),
            }
        return out


def profile_one(name: str, model_name: str, batch: int, seq: int, warmup: int, seed: int) -> dict:
    model, engine, optimizer, ids, _distiller = build(name, model_name, batch, seq, seed)
    gc.collect()
    loaded = live_heap_bytes()

    def step(sampler=None):
        mark = sampler.phase if sampler else (lambda _: None)
        mark("forward")
        loss = model(input_ids=ids, labels=ids).loss
        mark("backward")
        loss.backward()
        del loss
        mark("importance update")
        if engine is not None:
            engine.update_importance()
        mark("optimizer step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step()
        if i == 0 and engine is not None:
            engine.prune_to(0.5)
    gc.collect()
    origin = live_heap_bytes()
    with PhaseSampler() as sampler:
        step(sampler)
        if engine is not None:
            sampler.phase("mask rewrite")
            engine.prune_to(0.5)
    gc.collect()
    return {
        "config": name,
        "live_after_loading_mib": loaded / MIB,
        "live_between_steps_mib": origin / MIB,
        "live_after_step_mib": live_heap_bytes() / MIB,
        "phases": sampler.summary(origin),
        "adapted_parameters": sum(
            layer.in_features * layer.out_features for _, layer in model.base_model.prune_layers()
        )
        if engine is not None
        else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-0.5b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", default="lora,loraprune_structured,loraprune_unstructured,loraprune_2of4,grad_structured"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = profile_one(args.one, args.model, args.batch, args.seq, args.warmup, args.seed)
        print("RESULT " + json.dumps(row))
        return
    distilled = [name for name in args.configs.split(",") if name in DISTILLED]
    if distilled:
        raise SystemExit(f"--configs: {distilled} distil; this profile runs no teacher (step_cost.py measures them)")
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k in ("model", "batch", "seq", "warmup", "seed")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    lora = next((r for r in rows if r["config"] == "lora"), None)
    for r in rows:
        if lora is not None:
            r["state_mib_vs_lora"] = r["live_after_step_mib"] - lora["live_after_step_mib"]
            if r["adapted_parameters"]:
                r["state_bytes_per_adapted_parameter"] = r["state_mib_vs_lora"] * MIB / r["adapted_parameters"]
        peak = max(p["peak_live_above_step_start_mib"] for p in r["phases"].values())
        print(
            f"{r['config']:30s} between steps {r['live_between_steps_mib']:8.0f} MiB  "
            f"state vs LoRA {r.get('state_mib_vs_lora', 0):7.0f} MiB  step peak +{peak:6.0f} MiB  "
            + "  ".join(f"{k}: +{v['peak_live_above_step_start_mib']:.0f}" for k, v in r["phases"].items())
        )
    path = write_result(
        f"memory_profile_{args.model}_b{args.batch}x{args.seq}",
        {"settings": vars(args), "rows": rows},
        args.out,
        table=table("peak_rss_mib", "lower"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
