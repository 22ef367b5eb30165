"""A probe for a possible recovery feature: a bias on every consumer layer (``o_proj``, ``down_proj``: the layers
whose input columns structured pruning removes), added to the layer's output, in two parts:

* ``compensation``: FLAP's bias compensation, recomputed whenever the layer's column mask changes:
  ``W[:, removed] @ mean(x)[removed]``, with ``W = W0 + s·B·R`` the consumer's merged weight at that moment and
  ``mean(x)`` its unmasked input averaged over every training token seen so far: what the removed inputs
  contributed on average, kept as a constant. ``benchmarks/split_cost.py`` measured it before training (SmolLM2,
  the default's 20% split: held-out loss 5.921 without, 4.948 with).
* ``learned``: a trainable bias, zero at first, trained with the adapter (LoRA's update is linear in the input, so
  the adapter alone cannot add a constant).

Benchmark only (``peers.py``'s ``+bias`` modifier): the model is evaluated with the hooks in place; the package has
no consumer bias, so export and merging do not carry it.
"""

from __future__ import annotations

from functools import partial

import torch
import transformers


class ConsumerBias(transformers.TrainerCallback):
    """Adds ``learned + compensation`` to every consumer's output; recomputes ``compensation`` after mask rewrites.

    Create it after ``get_peft_model`` and before the Trainer (its ``learned`` biases must be in the optimizer), and
    list it after :class:`~peft_loraprune.LoRAPruneCallback`, whose ``on_step_end`` rewrites the masks first.
    """

    def __init__(self, model, adapter: str = "default") -> None:
        self.adapter = adapter
        self.consumers = model.base_model.pruning_engine(adapter).consumers()
        if not self.consumers:
            raise ValueError("+bias: this adapter has no consumer layers (structured pruning only)")
        self.learned, self.compensation, self.sums, self.counts, self.previous = {}, {}, {}, {}, {}
        self.handles = []
        for c in self.consumers:
            d_out, d_in = c.layer.base_weight_2d().shape
            self.learned[c.name] = torch.nn.Parameter(torch.zeros(d_out))
            c.layer.register_parameter("consumer_bias", self.learned[c.name])  # the Trainer's optimizer finds it
            self.compensation[c.name] = torch.zeros(d_out)
            self.sums[c.name] = torch.zeros(d_in, dtype=torch.float64)
            self.counts[c.name] = 0
            self.previous[c.name] = torch.ones(d_in, dtype=torch.bool)  # no compensation until a column goes
            self.handles.append(c.layer.register_forward_pre_hook(partial(self._observe, c.name)))
            self.handles.append(c.layer.register_forward_hook(partial(self._add, c.name)))

    def _observe(self, name: str, module, args) -> None:
        """Accumulates the unmasked input's per-feature sum over training tokens (not at evaluation)."""
        if module.training and torch.is_grad_enabled():
            x = args[0].detach()
            self.sums[name] += x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)
            self.counts[name] += x.numel() // x.shape[-1]

    def _add(self, name: str, module, args, output):
        return output + (self.learned[name] + self.compensation[name]).to(output.dtype)

    def mean_input(self, name: str) -> torch.Tensor:
        return (self.sums[name] / max(self.counts[name], 1)).float()

    @torch.no_grad()
    def refresh(self) -> int:
        """Recomputes the compensation of every consumer whose column mask changed; returns how many changed."""
        changed = 0
        for c in self.consumers:
            cols = c.layer.lora_mask_cols[self.adapter]
            if torch.equal(cols, self.previous[c.name]):
                continue
            removed = ~cols
            weight = c.layer.merged_weight_rows(self.adapter)  # (d_out, d_in) float32, unmasked
            self.compensation[c.name] = weight[:, removed] @ self.mean_input(c.name)[removed]
            self.previous[c.name] = cols.clone()
            changed += 1
        return changed

    def on_step_end(self, args, state, control, **kwargs):
        self.refresh()

    def summary(self) -> dict:
        """Norms of the two parts at the end of training (how much each carries)."""
        return {
            "consumers": len(self.consumers),
            "compensation_norm": sum(v.norm().item() for v in self.compensation.values()),
            "learned_norm": sum(v.detach().norm().item() for v in self.learned.values()),
        }
