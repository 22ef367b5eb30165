"""What saving a LoRAPrune adapter adds to ``PeftModel.save_pretrained``, done by the saver, not by the config.

PEFT's ``save_pretrained`` creates the folder and a generic ``README.md``, then writes, per adapter, the weights
file and ``adapter_config.json``. For LoRAPrune adapters this module wraps it (once, at import) so that:

* **before anything is written**, ``safe_serialization=False`` is refused: LoRAPrune adapters are safetensors only
  (a pickle file can run code when loaded), and the folder is left exactly as it was;
* **when an adapter is loaded** (``from_pretrained``, ``load_adapter``, the Trainer's resume), the folder it came
  from is recorded on the tuner (:func:`loaded_from`), so the callback finds the importance state saved there;
* **after PEFT has written the files**, ``adapter_config.json`` gets its ``save_digest`` (SHA-256 over the weights
  file just written and the config's fields, see :mod:`~peft_loraprune.hub.integrity`), rewritten atomically, and
  ``README.md`` gets the LoRAPrune section (method, criterion, sparsity per layer; :mod:`model_card`).

Adapters of other PEFT methods in the same process are saved exactly as PEFT saves them.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile

from peft import PeftModel
from peft.utils import CONFIG_NAME

from ..config import LoRAPruneConfig
from .integrity import WEIGHTS_NAME, file_digest, save_digest
from .model_card import write_model_card

_MARK = "_loraprune_save_wrapper"
_LOAD_MARK = "_loraprune_load_wrapper"


def adapter_folder(save_directory: str, adapter_name: str) -> str:
    """Where PEFT writes an adapter's files: the folder itself for "default", a subfolder otherwise."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def record_save_digest(folder: str) -> None:
    """Write ``save_digest`` into ``folder/adapter_config.json`` from the weights file beside it (atomically)."""
    config_path = os.path.join(folder, CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    config["save_digest"] = save_digest(file_digest(os.path.join(folder, WEIGHTS_NAME)), config)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        os.replace(tmp, config_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _loraprune_adapters(model, selected) -> list[str]:
    names = list(model.peft_config) if selected is None else list(selected)
    return [n for n in names if isinstance(model.peft_config.get(n), LoRAPruneConfig)]


def _wrap(save_pretrained):
    signature = inspect.signature(save_pretrained)

    @functools.wraps(save_pretrained)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        ours = _loraprune_adapters(self, options.get("selected_adapters"))
        if ours:
            self.base_model.check_not_consumed("save_pretrained")  # before anything is written
        if ours and not options.get("safe_serialization", True):
            raise ValueError(
                f"LoRAPrune adapters {ours} are saved as safetensors only (pickle files can run code when loaded); "
                "call save_pretrained without safe_serialization=False. Nothing was written."
            )
        result = save_pretrained(*bound.args, **bound.kwargs)
        if ours and options.get("is_main_process", True):
            tuner = self.base_model
            for name in ours:
                folder = adapter_folder(os.fspath(options["save_directory"]), name)
                record_save_digest(folder)
                write_model_card(
                    folder,
                    self.peft_config[name],
                    tuner.sparsity_report(name),
                    eval_results=tuner.recorded_eval_results(name),
                )
        return result

    setattr(wrapper, _MARK, True)
    return wrapper


def _wrap_load(load_adapter):
    """Record where each LoRAPrune adapter was last loaded from (``PeftModel.from_pretrained`` and the Trainer's
    resume both go through ``load_adapter``): the callback restores the importance state saved beside those
    files, from whatever folder the checkpoint is in."""

    @functools.wraps(load_adapter)
    def wrapper(self, model_id, adapter_name, *args, **kwargs):
        result = load_adapter(self, model_id, adapter_name, *args, **kwargs)
        if isinstance(self.peft_config.get(adapter_name), LoRAPruneConfig) and os.path.isdir(os.fspath(model_id)):
            subfolder = kwargs.get("subfolder")
            folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
            self.base_model.derived.loaded_from[adapter_name] = os.path.abspath(folder)
        return result

    setattr(wrapper, _LOAD_MARK, True)
    return wrapper


def loaded_from(tuner, adapter_name: str):
    """The local folder ``adapter_name`` was last loaded from (None if it was created, not loaded)."""
    return tuner.derived.loaded_from.get(adapter_name)


def install() -> None:
    """Wrap ``PeftModel.save_pretrained`` and ``load_adapter`` once per process (a re-import leaves the wrappers
    in place)."""
    if not getattr(PeftModel.save_pretrained, _MARK, False):
        PeftModel.save_pretrained = _wrap(PeftModel.save_pretrained)
    if not getattr(PeftModel.load_adapter, _LOAD_MARK, False):
        PeftModel.load_adapter = _wrap_load(PeftModel.load_adapter)
