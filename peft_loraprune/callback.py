"""``LoRAPruneCallback``: runs the pruning engine inside ``transformers.Trainer``. Orchestration only.

* ``on_train_begin``: finds the LoRAPrune adapter, builds the schedule from the Trainer's total optimizer steps
  (``max_steps``, or the epochs converted by the Trainer), warns when the run is too short for it, and on a
  resumed run restores the importance averages saved with the checkpoint the Trainer actually loaded, wherever
  it is (the folder ``load_adapter`` read, see :func:`~peft_loraprune.hub.saving.loaded_from`), and only if they were
  saved with that checkpoint's adapter file (its SHA-256 is recorded with them).
* ``on_pre_optimizer_step``: importance from the step's complete gradients (all micro-batches accumulated,
  clipped, unscaled), before the optimizer changes the weights. A step with NaN or infinite gradients is skipped
  (with one warning) and, by default, its gradients are zeroed so the optimizer cannot corrupt the adapter.
* ``on_step_end``: rewrites the masks when the schedule says so (a rewrite due on a step whose gradients were
  not finite waits for the next finite step; ``on_train_end`` applies one still waiting).
* ``on_log``: adds sparsity and remaining weights to the Trainer's logs.
* ``on_save``: writes ``loraprune_state.safetensors`` (importance averages) into the checkpoint folder; masks and
  adapter weights are already in the checkpoint's adapter files, and the schedule position is the global step.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .hub.integrity import WEIGHTS_NAME, file_digest
from .hub.saving import adapter_folder, loaded_from
from .lookup import find_tuner
from .pruning.schedule import PruningSchedule

logger = logging.getLogger(__name__)
STATE_FILE = "loraprune_state.safetensors"


class LoRAPruneCallback(TrainerCallback):
    """Prune while the Trainer fine-tunes: ``Trainer(..., callbacks=[LoRAPruneCallback()])``.

    Args:
        adapter_name: the adapter to prune; defaults to the active one.
        zero_nonfinite_gradients: on a step whose gradients are NaN or infinite (on any rank), set the trainable
            parameters' gradients to zero before the optimizer step, so that the step cannot write NaN into the
            adapter (Adam's moments still decay once). The importance update of that step is skipped either way.
    """

    def __init__(self, adapter_name: Optional[str] = None, zero_nonfinite_gradients: bool = True) -> None:
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string or None, got {adapter_name!r}.")
        if not isinstance(zero_nonfinite_gradients, bool):
            raise TypeError(f"zero_nonfinite_gradients must be True or False, got {zero_nonfinite_gradients!r}.")
        self.adapter_name = adapter_name
        self.zero_nonfinite_gradients = zero_nonfinite_gradients
        self.engine = None
        self.schedule: Optional[PruningSchedule] = None
        self._metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_tuner(model, "LoRAPruneCallback")
        adapter = self.adapter_name or tuner.active_adapters[0]
        if adapter not in tuner.peft_config:
            raise ValueError(f"adapter_name={adapter!r} is not an adapter of this model: {sorted(tuner.peft_config)}.")
        self.engine = tuner.pruning_engine(adapter)
        if not state.max_steps or state.max_steps < 1:
            raise ValueError("LoRAPruneCallback needs the Trainer's total number of optimizer steps (max_steps).")
        self.schedule = PruningSchedule.from_config(self.engine.config, state.max_steps)
        steps = self.schedule.pruning_steps()
        too_short = self.schedule.end - self.schedule.start < self.engine.config.pruning_interval
        if self.engine.config.schedule != "one_shot" and too_short:
            warnings.warn(
                f"LoRAPrune: the run has {state.max_steps} optimizer steps, so the schedule rewrites masks only at "
                f"step(s) {steps} (warm-up to step {self.schedule.start}, target at step {self.schedule.end}, every "
                f"{self.engine.config.pruning_interval} steps): pruning is effectively one-shot. Train longer or "
                "lower pruning_interval.",
                stacklevel=2,
            )
        if state.global_step > 0:
            self._restore(args, state)
        self._metrics = self._report_metrics()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.engine.update_importance() and self.zero_nonfinite_gradients:
            for p in self.engine.tuner.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine.pruning_step(state.global_step, state.max_steps) is not None:
            self._metrics = self._report_metrics()
            logger.info("LoRAPrune step %d: %s", state.global_step, self._metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None and self.engine.finish(state.max_steps) is not None:
            self._metrics = self._report_metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.engine is None or "loss" not in logs and "train_loss" not in logs:
            return
        logs.update(self._metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.engine is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        weights = os.path.join(adapter_folder(folder, self.engine.adapter), WEIGHTS_NAME)
        if os.path.isdir(folder):
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            # the adapter file's digest ties this state to the weights and masks saved beside it
            metadata = {"adapter_digest": file_digest(weights) if os.path.isfile(weights) else ""}
            save_file(self.engine.state_dict(), tmp, metadata=metadata)
            os.replace(tmp, os.path.join(folder, STATE_FILE))

    # ------------------------------------------------------------------ helpers
    def _restore(self, args, state) -> None:
        """Load the importance state saved with the checkpoint the Trainer resumed from: the folder the adapter was
        loaded from (not ``output_dir``, which may hold another run's checkpoints), checked against the digest of
        the adapter file it was saved with."""
        folder = loaded_from(self.engine.tuner, self.engine.adapter)
        problem = None
        if folder is None:
            problem = "the adapter was not loaded from a checkpoint folder"
        else:
            # the state sits at the checkpoint's root; a named adapter's files may be in a subfolder of it
            roots = [d for d in (folder, os.path.dirname(folder)) if os.path.isfile(os.path.join(d, STATE_FILE))]
            path = os.path.join(roots[0] if roots else folder, STATE_FILE)
            weights = os.path.join(folder, WEIGHTS_NAME)
            if not os.path.isfile(path):
                problem = f"{path} does not exist"
            else:
                with safe_open(path, framework="pt") as f:
                    saved_with = (f.metadata() or {}).get("adapter_digest")
                    tensors = {key: f.get_tensor(key) for key in f.keys()}
                if saved_with and os.path.isfile(weights) and saved_with != file_digest(weights):
                    problem = f"{path} was saved with another adapter file than {weights} (another run's state)"
                else:
                    self.engine.load_state_dict(tensors)
                    logger.info("LoRAPrune: importance state restored from %s", path)
        if problem:
            warnings.warn(
                f"LoRAPrune: resuming at step {state.global_step} but {problem}; the masks come from the checkpoint, "
                "but the importance averages restart from zero, so later masks may differ from an uninterrupted run.",
                stacklevel=2,
            )

    def _report_metrics(self) -> dict[str, float]:
        report = self.engine.tuner.sparsity_report(self.engine.adapter)
        metrics = {"sparsity": round(report.sparsity, 6), "weights_kept": report.weights_kept}
        for unit, value in report.sparsity_by_unit().items():
            metrics[f"sparsity_{unit}"] = round(value, 6)
        return metrics
