"""Finding the LoRAPrune tuner inside whatever a user or a framework hands over.

The callback receives the Trainer's model (a ``PeftModel``, possibly wrapped by DDP or accelerate), export and the
command line receive a ``PeftModel`` or the tuner itself. One function answers for all of them. It recognises the
tuner by a class attribute (``LoRAPruneModel.is_loraprune_tuner``), so this module depends on nothing else in the
package and every other module can use it.
"""

from __future__ import annotations


def find_tuner(model, who: str = "This function"):
    """The ``LoRAPruneModel`` in ``model`` (itself, a ``PeftModel``'s ``base_model``, or inside DDP/accelerate
    wrappers' ``module``), else a ``TypeError`` naming ``who`` needs it."""
    seen = model
    for _ in range(4):  # PeftModel -> base_model; DDP/accelerate wrappers -> module
        if getattr(type(seen), "is_loraprune_tuner", False):
            return seen
        seen = getattr(seen, "base_model", None) or getattr(seen, "module", None)
        if seen is None:
            break
    raise TypeError(
        f"{who} needs a PeftModel holding a LoRAPrune adapter (get_peft_model(model, LoRAPruneConfig(...))); "
        f"got {type(model).__name__}."
    )
