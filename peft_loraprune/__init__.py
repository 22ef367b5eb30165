"""LoRAPrune as a PEFT method: LoRA fine-tuning that prunes the model it adapts.

Importing this package registers the method with PEFT (``PeftType.LORAPRUNE``), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` all know it. Every process
that loads a LoRAPrune adapter (torchrun workers included) must import it first.
"""

from ._moved import install as _install_moved_paths
from .callback import LoRAPruneCallback
from .config import LoRAPruneConfig
from .distillation import DistillationConfig, DistillationTrainer, Distiller
from .export.merge import ExportReport, export_pruned_model
from .hub.integrity import verify_saved_adapter
from .hub.push import push_to_hub
from .hub.reporting import SparsityReport
from .hub.saving import install as _install_saving
from .layer import LoRAPruneLayer
from .model import LoRAPruneModel
from .norms import norm_module_names
from .pruning.architectures import (
    ArchitectureSpec,
    ExportSpec,
    GroupMember,
    GroupSpec,
    multi_head_groups,
    register_architecture,
    supported_model_types,
    unregister_architecture,
)
from .registration import LORAPRUNE_PEFT_TYPE, register

__version__ = "0.5.0"

register(LoRAPruneConfig, LoRAPruneModel)
_install_saving()
_install_moved_paths(__name__)

__all__ = [
    "LORAPRUNE_PEFT_TYPE",
    "ArchitectureSpec",
    "DistillationConfig",
    "DistillationTrainer",
    "Distiller",
    "ExportSpec",
    "GroupMember",
    "GroupSpec",
    "ExportReport",
    "LoRAPruneCallback",
    "LoRAPruneConfig",
    "LoRAPruneLayer",
    "LoRAPruneModel",
    "multi_head_groups",
    "norm_module_names",
    "SparsityReport",
    "export_pruned_model",
    "push_to_hub",
    "register_architecture",
    "supported_model_types",
    "unregister_architecture",
    "verify_saved_adapter",
]
