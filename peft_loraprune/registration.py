"""Registration of LoRAPrune as a PEFT method.

PEFT only accepts methods whose name is a member of its ``PeftType`` enum. We add the member ``LORAPRUNE`` to
that enum at import time (``aenum.extend_enum`` works on a standard-library Enum) and then call PEFT's own
``register_peft_method``, which fills the config, tuner and prefix mappings that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` all read.

Both steps are idempotent: a second import, ``importlib.reload(peft_loraprune)`` or a notebook re-run finds the
member and the mapping entries already there and leaves them alone (PEFT itself raises ``KeyError`` on a second
registration).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aenum import extend_enum
from peft.utils.peft_types import PeftType

METHOD_NAME = "loraprune"
# The adapter tensors all start with "lora_" (lora_A, lora_B, lora_mask_*): PEFT 0.21 selects tensors
# structurally, but the prefix is also what older code paths and users grep for.
PREFIX = "lora_"


def _ensure_peft_type() -> PeftType:
    name = METHOD_NAME.upper()
    if name not in PeftType.__members__:
        extend_enum(PeftType, name, name)
    return PeftType[name]


LORAPRUNE_PEFT_TYPE = _ensure_peft_type()


def register(config_cls, model_cls) -> None:
    """Register the config and tuner classes with PEFT, once per process.

    On a re-import (``importlib.reload``) the classes are new objects; the mapping then points to the newest
    ones, so objects built after the reload use the reloaded code.
    """
    from peft import mapping
    from peft.utils import register_peft_method

    already = LORAPRUNE_PEFT_TYPE in mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    if not already:
        register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
        return
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LORAPRUNE_PEFT_TYPE] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[LORAPRUNE_PEFT_TYPE] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LORAPRUNE_PEFT_TYPE] = PREFIX


class MethodNotRegisteredError(RuntimeError):
    """PEFT met a LoRAPrune adapter without the method registered (its own error is a bare ``KeyError``)."""


NOT_REGISTERED = (
    "PEFT does not know the LoRAPrune method in this process (KeyError: 'LORAPRUNE' from PEFT): `import "
    "peft_loraprune` registers it and must come before loading a LoRAPrune adapter (PeftModel.from_pretrained, "
    "AutoPeftModel*, PeftConfig.from_pretrained, transformers' load_adapter), in every process that loads one: "
    "torchrun workers too; for lm-eval run `peft-loraprune lm-eval ...` instead of `lm_eval ...`"
)


@contextmanager
def explain_unregistered_method() -> Iterator[None]:
    """Turn PEFT's bare ``KeyError: 'LORAPRUNE'`` inside the block into a :class:`MethodNotRegisteredError` that
    says what to do; any other ``KeyError`` passes unchanged."""
    try:
        yield
    except KeyError as err:
        if err.args and err.args[0] == LORAPRUNE_PEFT_TYPE.value:
            raise MethodNotRegisteredError(NOT_REGISTERED) from err
        raise
