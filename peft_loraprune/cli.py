"""``peft-loraprune``: the command line, from a saved adapter to a smaller model, its scores and its card.

    peft-loraprune report ADAPTER                       # sparsity overall and per layer
    peft-loraprune export ADAPTER --out DIR [--base ORIGINAL] [--dtype bfloat16]   # a plain transformers model,
                                                        # pruned units removed, streamed tensor by tensor
                                  [--quantized_as nf4-dq]  # a QLoRA adapter: into the weights it was trained on
    peft-loraprune eval MODEL_OR_ADAPTER --tasks T1,T2 [--include_path DIR] [--card]   # lm-eval zero-shot
    peft-loraprune lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks ...   # lm-eval's own CLI

The base model of an adapter is read from its ``adapter_config.json`` (``--base`` overrides it). Errors a user can
fix (a missing path, a base the adapter does not fit, an unknown task) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from .config import LoRAPruneConfig
from .export.checkpoint_io import CheckpointReader, parse_size
from .export.merge import export_pruned_model
from .export.streaming import replacement_mismatch, saved_module_tensors, stream_export
from .hub.evaluation import (
    DTYPES,
    eval_results,
    evaluate,
    format_results,
    is_adapter_folder,
    load_adapter_model,
    load_for_evaluation,
    save_results_json,
)
from .hub.model_card import write_eval_results, write_export_card
from .hub.skeleton import check_loraprune_adapter, load_adapter_skeleton
from .kernels.quantized import ROUNDING_FORMATS
from .registration import MethodNotRegisteredError, explain_unregistered_method


class UsageError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def _adapter(path: str, base: Optional[str]):
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    try:
        return load_adapter_model(path, base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err


def cmd_report(args) -> None:
    model = _skeleton(args.adapter, args.base)
    report = model.base_model.sparsity_report()
    print(report.summary())
    if not args.summary_only:
        print(report.markdown_table())


def _skeleton(path: str, base: Optional[str]):
    """The adapter on a weightless base (its factors, masks and whole saved modules only)."""
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    try:
        return load_adapter_skeleton(path, base)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err


def _streaming_skeleton(adapter: str, base: Optional[str]):
    """``(why the streaming export cannot run, None)``, or ``(None, the adapter's skeleton)`` when it can: it needs
    a local safetensors checkpoint that is not pre-quantized and holds every tensor the adapter saves whole (trained
    norms, a head), shaped alike. The skeleton is built once and serves the check, the export and its card."""
    config = LoRAPruneConfig.from_pretrained(adapter)
    base = base or config.base_model_name_or_path
    if not base or not os.path.isdir(base):
        return f"the base {base!r} is not a local folder", None
    try:
        with open(os.path.join(base, "config.json")) as f:
            if "quantization_config" in json.load(f):
                return "the base checkpoint is pre-quantized", None
        reader = CheckpointReader(base)
    except (OSError, ValueError) as err:
        return str(err), None
    skeleton = _skeleton(adapter, base)
    if config.modules_to_save:
        why_not = replacement_mismatch(
            saved_module_tensors(skeleton.base_model.model, skeleton.active_adapter), reader
        )
        if why_not:
            return why_not, None
    return None, skeleton


def cmd_export(args) -> None:
    if not os.path.exists(args.adapter):
        raise UsageError(f"{args.adapter} does not exist")
    if not is_adapter_folder(args.adapter):
        raise UsageError(f"{args.adapter} is not a saved adapter (no adapter_config.json there)")
    try:
        check_loraprune_adapter(args.adapter)
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.quantized_as and (args.in_memory or args.latency):
        raise UsageError(
            "--quantized_as rounds the checkpoint's weights in the streaming export; drop --in_memory/--latency (in "
            "Python, export_pruned_model on the quantized model merges into its dequantized weights)"
        )
    if args.in_memory or args.latency:
        _export_in_memory(args)
        return
    why_not, skeleton = _streaming_skeleton(args.adapter, args.base)
    if why_not and args.quantized_as:
        raise UsageError(f"--quantized_as needs the streaming export, which cannot run here: {why_not}")
    if why_not:
        print(f"exporting in memory: {why_not}")
        _export_in_memory(args)
        return
    config = LoRAPruneConfig.from_pretrained(args.adapter)
    sparsity = skeleton.base_model.sparsity_report()
    try:
        report = stream_export(
            args.adapter,
            args.out,
            args.base,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            max_shard_size=args.max_shard_size,
            progressbar=False,
            skeleton=skeleton,
            quantized_as=args.quantized_as,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    write_export_card(args.out, config, sparsity, report, source_adapter=args.adapter)
    print(report)
    print(f"written {args.out}")


def _export_in_memory(args) -> None:
    model = _adapter(args.adapter, args.base)
    config = model.peft_config[model.active_adapter]
    sparsity = model.base_model.sparsity_report()
    report = export_pruned_model(
        model, measure_latency=args.latency, progressbar=False, dtype=DTYPES[args.dtype] if args.dtype else None
    )
    exported = report.model
    os.makedirs(args.out, exist_ok=True)
    exported.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    tokenizer_source = args.base or config.base_model_name_or_path
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(args.out)
    except (OSError, ValueError):
        logging.getLogger(__name__).info("no tokenizer found at %s; the export has none", tokenizer_source)
    write_export_card(args.out, config, sparsity, report, source_adapter=args.adapter)
    print(report)
    print(f"written {args.out}")


def cmd_eval(args) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks needs at least one task name")
    if args.include_path and not os.path.isdir(args.include_path):
        raise UsageError(f"--include_path {args.include_path} is not a folder")
    try:
        model, tokenizer = load_for_evaluation(args.model, args.base, args.dtype, args.device or _default_device())
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    try:
        results = evaluate(
            model,
            tokenizer,
            tasks,
            include_path=args.include_path,
            limit=args.limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
        )
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    print(format_results(results))
    if args.output:
        save_results_json(results, args.output)
        print(f"written {args.output}")
    if args.card:
        name = os.path.basename(os.path.abspath(args.model))
        path = write_eval_results(args.model, eval_results(results), model_name=name)
        print(f"results added to {path}")


def cmd_lm_eval(rest: list[str]) -> None:
    """lm-eval's own command line, in a process where the LoRAPrune method is registered with PEFT."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise UsageError("lm-eval is not installed: pip install 'peft_loraprune[eval]'") from err
    sys.argv = ["lm_eval", *rest]
    cli_evaluate()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="peft-loraprune",
        description=__doc__.replace("``", ""),  # the docstring's code markup, as plain text
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peft-loraprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{report,export,eval,lm-eval}")

    p = sub.add_parser("report", help="sparsity of a saved adapter, overall and per layer")
    p.add_argument("adapter", help="folder of a saved LoRAPrune adapter")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--summary_only", action="store_true", help="one line, no per-layer table")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("export", help="merge and physically prune a saved adapter into a plain transformers model")
    p.add_argument("adapter", help="folder of a saved LoRAPrune adapter")
    p.add_argument("--out", required=True, help="folder for the exported model")
    p.add_argument(
        "--base",
        default=None,
        help="base checkpoint to merge into (default: the adapter's base_model_name_or_path); for an adapter trained "
        "on a quantized base, the original-precision checkpoint",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="dtype of the saved weights (default: the base's)"
    )
    p.add_argument(
        "--latency", action="store_true", help="also time a forward pass before and after (CPU; loads the model)"
    )
    p.add_argument(
        "--max_shard_size", default="5GB", help="largest safetensors shard written, e.g. 5GB or 500MB (default 5GB)"
    )
    p.add_argument(
        "--quantized_as",
        choices=ROUNDING_FORMATS,
        default=None,
        help="the adapter was trained on a bitsandbytes base of this format (int8: load_in_8bit; nf4/fp4: "
        "load_in_4bit with that quant type; -dq: double quantization): merge into the checkpoint's Linear weights "
        "rounded as that base held them, the model the adapter was trained with (default: the original-precision "
        "values; compare both on held-out data)",
    )
    p.add_argument(
        "--in_memory",
        action="store_true",
        help="load the whole model and export it in memory (default: stream a local safetensors base tensor by "
        "tensor, peak memory about one module; the in-memory path is taken anyway for a Hub id, a pre-quantized "
        "base or a module the adapter saves whole that the base checkpoint lacks, such as a new head)",
    )
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("eval", help="zero-shot evaluation with lm-evaluation-harness")
    p.add_argument("model", help="an exported model folder or a saved adapter folder (merged for evaluation)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include_path", default=None, help="folder of extra task YAML files (local tasks)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (for quick checks)")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument(
        "--base", default=None, help="base model of an adapter (default: the adapter's base_model_name_or_path)"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="dtype the model is loaded in (default: as saved)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the model is loaded and evaluated: cpu, cuda, cuda:1 or auto (accelerate's device_map; "
        "default: cuda when a GPU is visible, else cpu)",
    )
    p.add_argument("--output", default=None, help="write lm-eval's results as JSON here")
    p.add_argument("--card", action="store_true", help="add the results to the folder's README.md (model-index)")
    p.set_defaults(run=cmd_eval)

    sub.add_parser(
        "lm-eval", help="lm-eval's own command line, with LoRAPrune adapters loadable (peft=...)", add_help=False
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        try:
            cmd_lm_eval(argv[1:])
        except UsageError as err:
            print(f"peft-loraprune: error: {err}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        with explain_unregistered_method():
            args.run(args)
    except (UsageError, MethodNotRegisteredError) as err:
        print(f"peft-loraprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
