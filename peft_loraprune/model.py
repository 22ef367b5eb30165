"""The LoRAPrune tuner: walks the model, wraps the target modules, and exposes what the pruning engine,
the reports, the model card and export need.

``get_peft_model(model, LoRAPruneConfig(...))`` builds a ``PeftModel`` whose ``base_model`` is a
:class:`LoRAPruneModel`. PEFT forwards unknown attributes of the ``PeftModel`` to it, so
``peft_model.print_sparsity()`` and ``peft_model.sparsity_report()`` work on the ``PeftModel`` directly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from .config import LoRAPruneConfig
from .kernels.quantized import check_supported, keep_standard_layout
from .layer import Linear, LoRAPruneLayer
from .pruning.architectures import block_of, get_architecture
from .pruning.depth import find_block_gates
from .pruning.engine import PruningEngine
from .pruning.stream import StreamMask, find_residual_stream
from .pruning.structure import find_structured_groups, mark_rows_masked_downstream
from .registration import PREFIX

logger = logging.getLogger(__name__)


def _candidate_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the Linear/Conv1D modules of a model: what ``target_modules`` can name."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not isinstance(module, BaseTunerLayer):
            parts = name.split(".")
            names.add(parts[-1])
            if len(parts) > 1 and not parts[-2].isdigit():
                names.add(".".join(parts[-2:]))
    return sorted(names)


_UNSET = object()


@dataclass
class _DerivedState:
    """What the tuner computes from its adapters and keeps: none of it is saved, all of it can be rebuilt."""

    structured_groups: dict = field(default_factory=dict)  # (adapter, include_all) -> groups bound to layers
    block_gates: dict = field(default_factory=dict)  # (adapter, include_all) -> residual writers of each block
    streams: dict = field(default_factory=dict)  # adapter -> ResidualStream (hidden-size pruning)
    stream_masks: dict = field(default_factory=dict)  # adapter -> StreamMask hook on the input embedding
    engines: dict = field(default_factory=dict)  # adapter -> PruningEngine
    eval_results: dict = field(default_factory=dict)  # adapter -> lm-eval results for the model card
    loaded_from: dict = field(default_factory=dict)  # adapter -> folder it was loaded from (resume reads it)
    consumed_by: Optional[str] = None  # the export that merged the adapters into the model it returned
    model_type: object = _UNSET  # config.model_type of the wrapped model, read once


class LoRAPruneModel(BaseTuner):
    """Tuner of a LoRAPrune adapter (see :class:`~peft_loraprune.LoRAPruneConfig`).

    Only one LoRAPrune adapter can be active at a time: each adapter carries its own pruning mask, and two masks
    cannot both apply to one forward pass. Several adapters can be held (``add_adapter``, ``load_adapter``),
    switched (``set_adapter``) and deleted (``delete_adapter``).
    """

    prefix: str = PREFIX
    is_loraprune_tuner = True  # how lookup.find_tuner recognises it without importing this module
    tuner_layer_cls = LoRAPruneLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        # Derived, per-adapter state. Set before BaseTuner injects the adapter, since injection already reads it;
        # BaseTuner forwards unknown attribute reads to the wrapped model, so every field exists from the start.
        self.derived = _DerivedState()
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: LoRAPruneConfig, model_config: dict) -> LoRAPruneConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            spec = get_architecture(model_type)
            if spec is not None:
                peft_config.target_modules = set(spec.prunable_modules)
            elif model_type in self.target_module_mapping:
                default = self.target_module_mapping[model_type]
                # PEFT's mapping holds lists of names or a regex string (e.g. gemma4's); a string stays a regex
                peft_config.target_modules = default if isinstance(default, str) else set(default)
            else:
                raise ValueError(
                    f"target_modules is None and the model type {model_type!r} has no default; set "
                    f"target_modules to some of this model's linear modules: {_candidate_module_names(self.model)}"
                )
        return peft_config

    def _pre_injection_hook(self, model: torch.nn.Module, config: LoRAPruneConfig, adapter_name: str) -> None:
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        matched = [name for name, _ in model.named_modules() if check_target_module_exists(config, name)]
        if not matched:
            raise ValueError(
                f"target_modules={sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r} "
                f"matches no module of this {type(model).__name__}. Candidate module names: "
                f"{_candidate_module_names(model)}"
            )

    def _check_new_adapter_config(self, config: LoRAPruneConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, LoRAPruneConfig):
            raise TypeError(f"A LoRAPrune model only takes LoRAPruneConfig adapters, got {type(config).__name__}.")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LoRAPruneLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        check_supported(base, current_key)  # a quantized layer other than bitsandbytes' 8/4-bit: one clear error
        if not isinstance(base, (torch.nn.Linear, Conv1D)):
            raise TypeError(
                f"LoRAPrune adapts torch.nn.Linear and transformers Conv1D modules; '{current_key}' is a "
                f"{type(base).__name__}. Remove it from target_modules."
            )
        keep_standard_layout(base)
        if isinstance(base, Conv1D) and not config.fan_in_fan_out:
            # as PEFT's LoRA does: the module type decides the weight layout; say so once and record it
            warnings.warn(
                f"'{current_key}' is a Conv1D (weight stored (in, out)); setting fan_in_fan_out=True.", stacklevel=2
            )
            config.fan_in_fan_out = True
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: torch.nn.Module, config: LoRAPruneConfig, adapter_name: str) -> None:
        # Structured pruning must know the family and see every member of every group: fail now, not at the
        # first pruning step hours into a run.
        if not config.is_element_granularity:
            self.derived.structured_groups.clear()  # a new adapter: the layers changed
            self.derived.block_gates.clear()
            mark_rows_masked_downstream(self.structured_groups(adapter_name, include_all=True), adapter_name)
            self.structured_groups(adapter_name)  # validates the pruned structures
            if "layers" in config.prune_structures:
                self.block_gates(adapter_name)  # validates that every block can be gated
            if "hidden" in config.prune_structures:
                self._install_stream_mask(adapter_name)
        if not config.inference_mode:
            # criteria that observe the backward pass (true gradient, activation Taylor) install their taps when
            # the engine is created: it must exist before the first forward pass of training
            self.pruning_engine(adapter_name)

    # ------------------------------------------------------------------ adapters
    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        if not isinstance(adapter_name, str):
            names = list(adapter_name)
            if len(names) != 1:
                raise ValueError(
                    f"LoRAPrune activates one adapter at a time (each has its own pruning mask); got {names}."
                )
            adapter_name = names[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's entry point for per-call forward arguments: refuse mixed-adapter batches clearly (PEFT would
        otherwise drop ``adapter_names`` for a tuner without it and run every sample on the active adapter)."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "LoRAPrune does not support mixed-adapter batches (adapter_names=...): each adapter carries its own "
                "pruning mask, applied to whole weight rows and columns. Run one adapter per batch with "
                "set_adapter(name)."
            )
        yield

    # ------------------------------------------------------------------ access for the engine, reports, export
    def resolve_adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name`` checked against this model's adapters; None means the active one."""
        if adapter_name is None:
            return self.active_adapters[0]
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string or None, got {adapter_name!r}.")
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"adapter_name={adapter_name!r} is not an adapter of this model: {sorted(self.peft_config)}."
            )
        return adapter_name

    def prune_layers(self, adapter_name: Optional[str] = None) -> Iterator[tuple[str, LoRAPruneLayer]]:
        """``(module name relative to the wrapped model, layer)`` for every layer holding ``adapter_name``."""
        adapter_name = self.resolve_adapter(adapter_name)
        for name, module in self.model.named_modules():
            if isinstance(module, LoRAPruneLayer) and adapter_name in module.lora_A:
                yield name, module

    def structured_groups(self, adapter_name: Optional[str] = None, include_all: bool = False):
        """The adapter's groups (heads, channels) bound to its layers (:func:`structure.find_structured_groups`),
        computed once per adapter and kept: the engine, reports, logs and export all read them."""
        adapter_name = self.resolve_adapter(adapter_name)
        cache = self.derived.structured_groups
        key = (adapter_name, include_all)
        if key not in cache:
            cache[key] = find_structured_groups(self, adapter_name, include_all=include_all)
        return cache[key]

    def block_gates(self, adapter_name: Optional[str] = None, include_all: bool = False):
        """The residual writers of every block of the adapter (:func:`depth.find_block_gates`), through which whole
        blocks are pruned; computed once per adapter and kept."""
        adapter_name = self.resolve_adapter(adapter_name)
        cache = self.derived.block_gates
        key = (adapter_name, include_all)
        if key not in cache:
            cache[key] = find_block_gates(self, adapter_name, include_all=include_all)
        return cache[key]

    def residual_stream(self, adapter_name: Optional[str] = None):
        """The readers, writers and norms of the residual stream (:func:`stream.find_residual_stream`), for pruning
        the hidden size; computed once per adapter and kept."""
        adapter_name = self.resolve_adapter(adapter_name)
        if adapter_name not in self.derived.streams:
            self.derived.streams[adapter_name] = find_residual_stream(self, adapter_name)
        return self.derived.streams[adapter_name]

    def stream_mask(self, adapter_name: Optional[str] = None) -> Optional[StreamMask]:
        """The hook masking the input embedding's output for a hidden-size adapter, or None."""
        return self.derived.stream_masks.get(self.resolve_adapter(adapter_name))

    def _install_stream_mask(self, adapter_name: str) -> None:
        self.derived.streams.pop(adapter_name, None)
        old = self.derived.stream_masks.pop(adapter_name, None)
        if old is not None:
            old.remove()
        stream = self.residual_stream(adapter_name)
        embedding = self.model.get_submodule(stream.embedding)
        self.derived.stream_masks[adapter_name] = StreamMask(embedding, stream, adapter_name)

    def _remove_stream_masks(self, zero_removed_channels: bool) -> None:
        """Remove the embedding hooks; when merging, first write the active adapter's stream mask into the
        embedding (its removed columns become exact zeros, as merged writers' rows do)."""
        for adapter_name, hook in list(self.derived.stream_masks.items()):
            if zero_removed_channels and adapter_name in self.active_adapters:
                keep = hook.stream.kept(adapter_name)
                with torch.no_grad():
                    hook.embedding.weight.mul_(keep.to(hook.embedding.weight))
            hook.remove()
        self.derived.stream_masks.clear()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        self._remove_stream_masks(zero_removed_channels=merge)
        for engine in self.derived.engines.values():  # their hooks on whole blocks would outlive the adapter
            engine.close()
        self.derived.engines.clear()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @property
    def model_type(self) -> Optional[str]:
        """``config.model_type`` of the wrapped model (read once)."""
        if self.derived.model_type is _UNSET:
            self.derived.model_type = self.get_model_config(self.model).get("model_type")
        return self.derived.model_type

    def block_index(self, module_name: str) -> Optional[int]:
        """Index of the transformer block a module belongs to (see :func:`architectures.block_of`)."""
        return block_of(self.model_type, module_name)

    def pruning_engine(self, adapter_name: Optional[str] = None):
        """The :class:`~peft_loraprune.pruning.engine.PruningEngine` of an adapter (created once, then reused)."""
        adapter_name = self.resolve_adapter(adapter_name)
        engines = self.derived.engines
        if adapter_name not in engines:
            engines[adapter_name] = PruningEngine.for_adapter(self, adapter_name)
        return engines[adapter_name]

    def update_importance(self, adapter_name: Optional[str] = None) -> bool:
        """Fold the current gradients into the importance averages (call before ``optimizer.zero_grad()``)."""
        return self.pruning_engine(adapter_name).update_importance()

    def pruning_step(self, step: int, total_steps: int, adapter_name: Optional[str] = None) -> Optional[float]:
        """Rewrite masks if the schedule says so at ``step`` completed optimizer steps; returns the sparsity."""
        return self.pruning_engine(adapter_name).pruning_step(step, total_steps)

    def delete_adapter(self, adapter_name: str) -> None:
        self.derived.structured_groups.clear()
        self.derived.block_gates.clear()
        self.derived.streams.pop(adapter_name, None)
        hook = self.derived.stream_masks.pop(adapter_name, None)
        if hook is not None:
            hook.remove()
        engine = self.derived.engines.pop(adapter_name, None)
        if engine is not None:
            engine.close()
        super().delete_adapter(adapter_name)

    def merge_and_prune(
        self,
        adapter_name: Optional[str] = None,
        example_inputs: Optional[dict] = None,
        measure_latency: bool = False,
        progressbar: bool = True,
    ):
        """Merge the adapter and physically remove the pruned heads and channels; returns a plain transformers
        model that ``from_pretrained`` reloads. The export report goes to this module's logger (INFO);
        ``peft_loraprune.export_pruned_model`` returns it (arguments as there; latency only with
        ``measure_latency=True``). Consumes the model, like ``merge_and_unload``."""
        from .export.merge import export_pruned_model  # export is the layer above the tuner

        report = export_pruned_model(
            self, adapter_name, example_inputs=example_inputs, measure_latency=measure_latency, progressbar=progressbar
        )
        logger.info("%s", report)
        return report.model

    def check_not_consumed(self, action: str) -> None:
        """Raise a ``RuntimeError`` if an export consumed this model: its adapter layers were merged into the
        exported model, so ``action`` (a save, a report, another export) would find no adapter tensors."""
        if self.derived.consumed_by is None:
            return
        raise RuntimeError(
            f"This LoRAPrune model was consumed by {self.derived.consumed_by}: its adapter was merged into the "
            f"exported model and its LoRAPrune layers are gone, so {action} would find no adapter tensors (a save "
            "would write an empty adapter that does not reload). Save the adapter before exporting: "
            "model.save_pretrained(path), then export_pruned_model(model); an adapter saved earlier reloads with "
            "PeftModel.from_pretrained(base_model, path) after `import peft_loraprune`."
        )

    def sparsity_report(self, adapter_name: Optional[str] = None):
        """Sparsity overall and per layer (see :mod:`peft_loraprune.hub.reporting`)."""
        self.check_not_consumed("a sparsity report")
        adapter_name = self.resolve_adapter(adapter_name)
        from .hub.reporting import build_sparsity_report  # reports belong to the hub layer, above the tuner

        return build_sparsity_report(self, adapter_name)

    def print_sparsity(self, adapter_name: Optional[str] = None) -> None:
        """Print a one-line summary in the spirit of ``print_trainable_parameters()``."""
        print(self.sparsity_report(adapter_name).summary())

    # ------------------------------------------------------------------ evaluation results for the model card
    def record_eval_results(self, results: dict, adapter_name: Optional[str] = None) -> None:
        """Keep lm-eval results (the ``results`` of ``lm_eval.simple_evaluate``, task -> metric -> value) for an
        adapter: ``save_pretrained`` and ``push_to_hub`` then write them into the model card's model-index."""
        if not isinstance(results, dict):
            raise TypeError(f"results must be lm-eval's results dict (task -> metrics), got {type(results).__name__}")
        adapter_name = self.resolve_adapter(adapter_name)
        self.derived.eval_results.setdefault(adapter_name, {}).update(results)

    def recorded_eval_results(self, adapter_name: Optional[str] = None):
        """``huggingface_hub.EvalResult`` entries of what :meth:`record_eval_results` kept (empty if nothing)."""
        adapter_name = self.resolve_adapter(adapter_name)
        from .hub.evaluation import eval_results

        return eval_results(self.derived.eval_results.get(adapter_name, {}))
