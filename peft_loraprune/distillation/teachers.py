"""Running the model as its teacher: the same modules and weights, switched for one forward pass.

Nothing is copied. A teacher is a context in which the model's forward pass computes the teacher:

* ``"base"``: PEFT's ``disable_adapter()``: every adapted layer (and ``modules_to_save``) runs its base module
  (refused for a classification task, whose head is new and untrained);
* ``"unmasked"``: every LoRAPrune layer runs its active adapter densely (``LoRAPruneLayer.ignore_masks``);
* an adapter name: every module that holds that adapter (LoRAPrune layers, ``modules_to_save`` wrappers) runs it
  instead of the active one; ``requires_grad`` is left alone (PEFT's ``set_adapter`` would change it).

Teacher passes run in eval mode (no dropout) and under ``torch.no_grad()``, so criteria taps (which run only with gradients enabled) do not see
them and the importance of the student is not disturbed.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..layer import LoRAPruneLayer
from .config import TEACHER_KINDS

#: PEFT task types whose head comes new with the task (PEFT adds it to ``modules_to_save``): the pretrained model has
#: no trained head, so it cannot teach. Other ``modules_to_save`` (trainable norms of a causal LM) are pretrained
#: modules: the base teacher runs their original weights.
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _peft_model(model):
    """The PeftModel inside whatever the Trainer or accelerate hands over (DDP, compiled, ...)."""
    while hasattr(model, "module") and not hasattr(model, "disable_adapter"):
        model = model.module
    if not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
        raise TypeError(
            f"distillation needs the PeftModel returned by get_peft_model (or one loaded with "
            f"PeftModel.from_pretrained), got {type(model).__name__}"
        )
    return model


def check_teacher(model, teacher: str) -> None:
    """A ``ValueError`` naming ``teacher`` and what is allowed, before any training step runs."""
    peft_model = _peft_model(model)
    if teacher in TEACHER_KINDS:
        task_type = getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", None)
        if teacher == "base" and task_type in HEAD_TASK_TYPES:  # a str enum: compares with the names
            raise ValueError(
                f"teacher='base' runs the pretrained model, whose task head (task_type={getattr(task_type, 'value', task_type)!r}, "
                f"modules_to_save {sorted(peft_model.modules_to_save or [])}) is untrained; use "
                "teacher='unmasked' or a trained adapter's name."
            )
        return
    if teacher not in peft_model.peft_config:
        raise ValueError(
            f"teacher={teacher!r} is neither 'unmasked' nor 'base' nor an adapter of this model "
            f"(adapters: {sorted(peft_model.peft_config)})"
        )
    if teacher in peft_model.active_adapters:
        raise ValueError(
            f"teacher={teacher!r} is the adapter being trained; to distil from it without its masks use "
            "teacher='unmasked'."
        )


@contextmanager
def teacher_mode(model, teacher: str):
    """Inside, ``model``'s forward pass computes ``teacher`` (see the module docstring) in eval mode (no dropout:
    the teacher is deterministic); the adapters, masks and each module's training flag are restored on exit."""
    peft_model = _peft_model(model)
    modules = list(peft_model.modules())  # one traversal serves the mode and the switch (thousands of modules)
    training = [m for m in modules if m.training]
    for module in training:  # what ``eval()`` does, without a second recursive walk per teacher pass
        module.training = False
    try:
        with _switched(peft_model, modules, teacher):
            yield
    finally:
        for module in training:
            module.training = True


@contextmanager
def _switched(peft_model, modules: list, teacher: str):
    if teacher == "base":
        with peft_model.disable_adapter():
            yield
        return
    layers = [m for m in modules if isinstance(m, LoRAPruneLayer)]
    if teacher == "unmasked":
        previous = [layer.ignore_masks for layer in layers]
        for layer in layers:
            layer.ignore_masks = True
        try:
            yield
        finally:
            for layer, value in zip(layers, previous):
                layer.ignore_masks = value
        return
    switched = [(m, m._active_adapter) for m in modules if hasattr(m, "_active_adapter") and _holds(m, teacher)]
    for module, previous in switched:
        module._active_adapter = teacher if isinstance(previous, str) else [teacher]
    try:
        yield
    finally:
        for module, previous in switched:
            module._active_adapter = previous


def _holds(module, adapter: str) -> bool:
    for attribute in ("lora_A", "modules_to_save"):
        store = getattr(module, attribute, None)
        if store is not None and adapter in store:
            return True
    return False
