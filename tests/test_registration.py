import importlib
import subprocess
import sys

from peft import mapping
from peft.utils.peft_types import PeftType

import peft_loraprune


def test_import_registers_the_method():
    assert PeftType.LORAPRUNE.value == "LORAPRUNE"
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORAPRUNE] is peft_loraprune.LoRAPruneConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORAPRUNE] is peft_loraprune.LoRAPruneModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LORAPRUNE] == "lora_"


def test_reload_does_not_fail_or_register_twice():
    n_types = len(PeftType)
    n_configs = len(mapping.PEFT_TYPE_TO_CONFIG_MAPPING)
    reloaded = importlib.reload(peft_loraprune)
    assert len(PeftType) == n_types
    assert len(mapping.PEFT_TYPE_TO_CONFIG_MAPPING) == n_configs
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORAPRUNE] is reloaded.LoRAPruneConfig


def test_fresh_process_imports_twice():
    code = (
        "import importlib, peft_loraprune, peft_loraprune.registration as r\n"
        "importlib.reload(r); importlib.reload(peft_loraprune)\n"
        "from peft.utils.peft_types import PeftType\n"
        "assert [t for t in PeftType if t.value == 'LORAPRUNE'] == [PeftType.LORAPRUNE]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
