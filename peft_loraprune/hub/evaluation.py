"""Zero-shot evaluation with lm-evaluation-harness, and its results as Hub model-index metadata.

lm-eval (``pip install peft_loraprune[eval]``) is how pruning papers report zero-shot accuracy. This module:

* loads what a user has on disk, a saved LoRAPrune adapter or an exported (pruned) transformers model, as an
  in-memory model (:func:`load_for_evaluation`); an adapter is merged, so pruned weights are exact zeros;
* runs lm-eval on it (:func:`evaluate`, lm-eval's ``HFLM`` over the in-memory model), with optional local task
  folders (``include_path``), and returns lm-eval's ``results`` dictionary;
* turns those results into ``huggingface_hub.EvalResult`` entries (:func:`eval_results`) for a model card.

``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER`` loads the adapter with ``PeftModel`` in a process
that never imported this package, which PEFT refuses (unknown method). ``peft-loraprune lm-eval ...`` runs lm-eval's
own command line after importing the plugin, so that form works too (see :mod:`peft_loraprune.cli`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import transformers
from huggingface_hub import EvalResult

from ..config import LoRAPruneConfig
from ..registration import MethodNotRegisteredError, explain_unregistered_method
from .integrity import WEIGHTS_NAME
from .skeleton import auto_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _num_labels_in_adapter(path: str) -> Optional[int]:
    """Rows of a saved classification head (``modules_to_save``), if the adapter has one."""
    from safetensors import safe_open

    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return None
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def load_adapter_model(path: str, base: Optional[str] = None, dtype: Optional[str] = None, device=None):
    """A saved LoRAPrune adapter on its base model (``base`` overrides the adapter's ``base_model_name_or_path``),
    loaded in ``dtype`` onto ``device`` (a device or accelerate ``device_map``; None: the CPU).

    Raises ``FileNotFoundError``/``ValueError`` with one-line messages: no adapter there, no base model named, a
    base the adapter does not fit."""
    from peft import PeftModel

    if not is_adapter_folder(path):
        raise FileNotFoundError(f"{path} is not a saved adapter (no adapter_config.json there)")
    with explain_unregistered_method():
        config = LoRAPruneConfig.from_pretrained(path)
    base = base or config.base_model_name_or_path
    if not base:
        raise ValueError(f"the adapter in {path} does not name its base model; pass --base")
    auto = auto_class(config.task_type)
    kwargs = _load_kwargs(dtype, device)
    if config.task_type == "SEQ_CLS":
        n = _num_labels_in_adapter(path)
        if n:
            kwargs["num_labels"] = n
    try:
        base_model = auto.from_pretrained(base, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"cannot load the base model {base!r}: {str(err).splitlines()[0]}") from err
    try:
        with explain_unregistered_method():
            return PeftModel.from_pretrained(base_model, path)
    except MethodNotRegisteredError:
        raise
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the adapter in {path} does not fit the base model {base!r}: {str(err).splitlines()[0]}"
        ) from err


def _load_kwargs(dtype: Optional[str], device) -> dict:
    kwargs = {"dtype": DTYPES[dtype]} if dtype else {}
    if device is not None:
        kwargs["device_map"] = device
    return kwargs


def load_for_evaluation(path: str, base: Optional[str] = None, dtype: Optional[str] = None, device=None):
    """``(model, tokenizer source)`` for an adapter folder (merged) or a plain transformers model folder, loaded in
    ``dtype`` onto ``device``: evaluation then runs where the model is."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if is_adapter_folder(path):
        peft_model = load_adapter_model(path, base, dtype, device)
        source = base or peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
        return peft_model.merge_and_unload(), source
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    return transformers.AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(dtype, device)), path


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    include_path: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    num_fewshot: Optional[int] = None,
) -> dict:
    """Run lm-eval on an in-memory model; returns lm-eval's ``results`` (task -> metric -> value).

    Raises ``ValueError`` naming the tasks lm-eval does not know (with ``include_path`` folders searched too)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-eval is not installed: pip install 'peft_loraprune[eval]'") from err
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`"
            + ("" if include_path else ", or pass --include_path for a folder of local task YAML files")
        )
    if isinstance(tokenizer, str):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
    model.eval()
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    return out["results"]


def eval_results(results: dict, dataset_names: Optional[dict] = None) -> list[EvalResult]:
    """Hub ``EvalResult`` entries (one per task and numeric metric) from lm-eval's ``results``."""
    entries = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, _filter = key.partition(",")  # lm-eval's metric keys are "metric,filter"
            if (
                not comma
                or metric.endswith("_stderr")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            if not math.isfinite(float(value)):
                continue
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=task,
                    dataset_name=(dataset_names or {}).get(task, task),
                    metric_type=metric,
                    metric_value=float(value),
                    source_name="lm-evaluation-harness",
                    source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                )
            )
    return entries


def format_results(results: dict) -> str:
    """A small text table of lm-eval results (task, metric, value)."""
    lines = [f"{'task':28s} {'metric':20s} value"]
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")
            if (
                comma
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not metric.endswith("_stderr")
            ):
                lines.append(f"{task:28s} {metric:20s} {value:.4f}")
    return "\n".join(lines)


def save_results_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
