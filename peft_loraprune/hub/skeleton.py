"""A saved adapter on a base model that holds no weights: what reports and the streaming export read.

Counting masks, planning an export and computing merged weights one module at a time need the adapter's tensors
(factors and masks, a few MB) and the base model's structure (module names, shapes, config), never the base
weights. :func:`load_adapter_skeleton` builds the base model from its ``config.json`` on the meta device
(``from_config`` under ``torch.device("meta")``: nothing allocated, instant for any size), wraps it with the
adapter's config, and puts the adapter's saved tensors in place on the CPU. PEFT's own loader would move them to
the base layer's device, the meta device, so they are assigned here by name: PEFT saves a layer's tensor
``<module>.<tensor>.<adapter>`` under ``<module>.<tensor>`` (the adapter name removed), and that is the only
mapping needed. Modules the adapter saves whole (``modules_to_save``: trained norms, a classification head) are
put in place the same way, as real CPU tensors; the originals they replace stay weightless.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import transformers
from safetensors.torch import load_file

from ..config import LoRAPruneConfig
from ..layer import LoRAPruneLayer
from ..registration import LORAPRUNE_PEFT_TYPE, explain_unregistered_method
from .integrity import WEIGHTS_NAME

# task_type of an adapter -> the transformers class that builds its base model
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def auto_class(task_type: Optional[str]):
    """The transformers ``Auto*`` class that builds the base model of an adapter of ``task_type``."""
    return getattr(transformers, AUTO_CLASSES.get(task_type or "", "AutoModel"))


def check_loraprune_adapter(path: str) -> None:
    """Raise a one-line ``ValueError`` unless ``path/adapter_config.json`` says ``"peft_type": "LORAPRUNE"``: an
    adapter of another PEFT method (plain LoRA) has no pruning masks, and read as LoRAPrune it would seem not to
    fit its base model."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path) as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{config_path} cannot be read as an adapter config: {err}") from err
    if peft_type != LORAPRUNE_PEFT_TYPE.value:
        raise ValueError(
            f"the adapter in {path} is a {peft_type or 'untyped'} adapter (peft_type {peft_type!r} in its "
            f"adapter_config.json), not a LoRAPrune one ({LORAPRUNE_PEFT_TYPE.value!r}): it holds no pruning masks "
            "to report or export; merge it with PEFT instead (PeftModel.from_pretrained(base, path).merge_and_unload())"
        )


def load_adapter_skeleton(path: str, base: Optional[str] = None):
    """The adapter saved in ``path`` on a weightless (meta-device) copy of its base model: a ``PeftModel`` whose
    LoRAPrune factors and masks are real CPU tensors and whose pretrained weights are absent.

    ``base``: the base model's folder or Hub id (its ``config.json`` is all that is read); default the adapter's
    ``base_model_name_or_path``. Raises ``FileNotFoundError``/``ValueError`` with one-line messages."""
    from peft import get_peft_model

    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")) or not os.path.isfile(weights):
        raise FileNotFoundError(f"{path} is not a saved adapter (adapter_config.json and {WEIGHTS_NAME} expected)")
    check_loraprune_adapter(path)
    with explain_unregistered_method():
        config = LoRAPruneConfig.from_pretrained(path)
    base = base or config.base_model_name_or_path
    if not base:
        raise ValueError(f"the adapter in {path} does not name its base model; pass --base")
    try:
        base_config = transformers.AutoConfig.from_pretrained(base)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the base model's config {base!r}: {str(err).splitlines()[0]}") from err
    base_config.__dict__.pop("quantization_config", None)  # the structure is the same; nothing is loaded
    saved = load_file(weights)
    with torch.device("meta"):
        skeleton = auto_class(config.task_type).from_config(base_config)
    config.inference_mode = True
    with explain_unregistered_method():
        peft_model = get_peft_model(skeleton, config)
    adapter = peft_model.active_adapter
    used = set()
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoRAPruneLayer):
            continue
        for dict_name in ("lora_A", "lora_B"):
            key = f"{name}.{dict_name}.weight"
            tensor = _take(saved, key, used, path)
            module = getattr(layer, dict_name)[adapter]
            if tuple(tensor.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"the adapter in {path} does not fit the base model {base!r}: {key} has shape "
                    f"{tuple(tensor.shape)}, the base model expects {tuple(module.weight.shape)}"
                )
            module.weight = torch.nn.Parameter(tensor, requires_grad=False)
        for mask_name in ("lora_mask_rows", "lora_mask_cols", "lora_mask_elements"):
            buffers = getattr(layer, mask_name)
            if adapter not in buffers:
                continue
            tensor = _take(saved, f"{name}.{mask_name}", used, path)
            if tuple(tensor.shape) != tuple(buffers[adapter].shape) or tensor.dtype != buffers[adapter].dtype:
                raise ValueError(f"the adapter in {path} does not fit the base model {base!r}: {name}.{mask_name}")
            buffers[adapter] = tensor
    for name, wrapper in saved_module_wrappers(peft_model):
        trained = wrapper.modules_to_save[adapter]
        for tensor_name, param in list(trained.named_parameters()):
            key = f"{name}.{tensor_name}"
            tensor = _take(saved, key, used, path)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"the adapter in {path} does not fit the base model {base!r}: {key} has shape "
                    f"{tuple(tensor.shape)}, the base model expects {tuple(param.shape)}"
                )
            owner, _, leaf = tensor_name.rpartition(".")
            setattr(trained.get_submodule(owner), leaf, torch.nn.Parameter(tensor, requires_grad=False))
    unused = sorted(set(saved) - used)
    if unused:
        raise ValueError(f"the adapter in {path} does not fit the base model {base!r}: no layer takes {unused[0]!r}")
    return peft_model


def saved_module_wrappers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, wrapper)`` of every module an adapter saves whole (``modules_to_save``: trained norms, a
    classification head), named as in ``model``. PEFT saves the trained copy's tensor ``<tensor>`` under
    ``<name>.<tensor>`` with names from the ``PeftModel``."""
    from peft.utils.other import ModulesToSaveWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _take(saved: dict, key: str, used: set, path: str) -> torch.Tensor:
    if key not in saved:
        raise ValueError(f"the adapter in {path} does not fit the base model: it has no tensor {key!r}")
    used.add(key)
    return saved[key]
