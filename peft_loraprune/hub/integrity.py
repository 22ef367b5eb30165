"""Integrity of saved adapters: the config records a digest of itself and of the weights file saved with it.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` first and ``adapter_config.json`` after it,
each straight into the target folder. A run killed in between, a disk that fills up, or a file edited by hand
could otherwise leave a folder that loads without complaint but holds the wrong adapter. So a LoRAPrune save
records in ``adapter_config.json`` a ``save_digest``: the SHA-256 over the weights file's bytes (the file just
written: the config comes after it) and the config's other fields, and writes the config atomically (temporary
file, then rename).

:func:`verify_saved_adapter` recomputes it. ``LoRAPruneConfig.from_pretrained`` calls it for a local folder, and
that is the path ``PeftModel.from_pretrained``, ``AutoPeftModel*.from_pretrained`` and ``PeftModel.load_adapter``
(hence the Trainer's resume from a checkpoint) take; it refuses a truncated or modified weights file or config,
and a config and weights from two different saves. It covers everything in the file, ``modules_to_save`` (a
classifier head) included. transformers' own ``model.load_adapter(path)`` reads the config through the generic
``PeftConfig`` and never reaches this check: call ``peft_loraprune.verify_saved_adapter(path)`` first there.
Repositories on the Hub are downloaded file by file into the cache; the check applies to a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os

from peft.utils import CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_NAME
from peft.utils import WEIGHTS_NAME as PICKLE_WEIGHTS_NAME


def file_digest(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_digest(weights_hash: str, config: dict) -> str:
    """The config's ``save_digest``: SHA-256 over the weights file's digest and the config's fields (as written
    to JSON, without ``save_digest`` itself)."""
    fields = {k: v for k, v in config.items() if k != "save_digest"}
    payload = weights_hash + json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def verify_saved_adapter(directory: str) -> None:
    """Check that ``adapter_config.json`` and ``adapter_model.safetensors`` in ``directory`` were saved together.

    Raises ``ValueError`` naming the folder when the config is not valid JSON; when only a pickle weights file is
    present (LoRAPrune adapters load from safetensors only); or when the config's ``save_digest`` does not match the
    weights file and the config's other fields: a truncated or modified file, or a config and weights from two
    different saves. A config without ``save_digest`` (saved on its own) is not checked here.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path to a saved adapter folder, got {directory!r}.")
    config_path = os.path.join(directory, CONFIG_NAME)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, PICKLE_WEIGHTS_NAME)):
        raise ValueError(
            f"{directory} holds {PICKLE_WEIGHTS_NAME} but no {WEIGHTS_NAME}: LoRAPrune adapters are loaded from "
            "safetensors only (pickle files can run code when loaded). Save with safe_serialization=True."
        )
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): the file is truncated or was modified.") from err
    expected = config.get("save_digest") if isinstance(config, dict) else None
    if expected is None:
        return
    if not os.path.isfile(weights):
        raise ValueError(f"{config_path} was saved with {WEIGHTS_NAME}, which is missing from {directory}.")
    if save_digest(file_digest(weights), config) != expected:
        raise ValueError(
            f"{weights} and {config_path} do not match the digest saved with them: one of them is truncated or was "
            "modified, or they come from different saves (e.g. a save_pretrained interrupted between writing the "
            "weights and the config). Save the adapter again."
        )
