"""The LoRAPrune layer: one adapted linear module with its LoRA factors and its pruning mask.

For a frozen weight ``W0`` (``d_out x d_in``), factors ``A`` and ``B`` and scale ``s``, the layer computes

* parallel adaptation:   ``y = ((W0 + s·B·A) ⊙ M)·x + b ⊙ m_rows``
* sequential adaptation: ``y = (((I + s·B·A)·W0) ⊙ M)·x + ((I + s·B·A)·b) ⊙ m_rows``

The mask ``M`` is stored in the cheapest form its granularity allows:

* ``lora_mask_rows`` (``d_out`` bools) and ``lora_mask_cols`` (``d_in`` bools) always exist. Structured
  pruning only ever uses these: ``M = rows ⊗ cols``, applied to the input and output of the layer, which costs
  two elementwise products and nothing weight-sized.
* ``lora_mask_elements`` exists for "unstructured" and "N:M" adapters: the per-weight mask, bit-packed
  (``d_out x ceil(d_in / 8)`` uint8). The weight-masked product
  (:func:`~peft_loraprune.kernels.masked_linear.element_masked_linear`) unpacks it inside each pass and frees it there,
  so an element-pruned adapter holds an eighth of a byte per weight for its mask.

When the registry says that a layer's output rows are coupled to input columns of a consumer layer (a head's
rows in q/k/v and its columns in o; a channel's rows in gate/up and its column in down), the forward pass skips
the row mask: the consumer's column mask already removes those rows' contribution, so the model's outputs and
every gradient are exactly the same, and one activation-sized product (and the tensor autograd keeps for it) per
layer is saved. Merging and export still apply the full mask, so merged weights are exactly zero there.

All three are persistent buffers whose names start with ``lora_`` and contain ``mask``: PEFT saves them in
``adapter_model.safetensors`` and restores them on load. The pretrained weight is never modified by training or
pruning (only by an explicit merge), so ``disable_adapter()`` gives the original, dense base model.

The layer holds no importance state: the pruning engine owns it (see :mod:`~peft_loraprune.pruning.engine`). A criterion
that must observe the forward and backward pass (the true gradient, activation Taylor scores) installs a *tap*
with :meth:`LoRAPruneLayer.add_tap`: a function called with the layer's input and output at every forward pass
of the adapter, which may register gradient hooks on them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from .kernels.adaptation import adaptation
from .kernels.distributed import full_tensor
from .kernels.mask_packing import packed_shape, unpack_bits
from .kernels.masked_linear import element_masked_linear
from .kernels.quantized import DequantizingWeight, dense_weight, quantization_kind, requantized, restore, snapshot

MASK_NAMES = ("lora_mask_rows", "lora_mask_cols", "lora_mask_elements")


class ScoringFactors(NamedTuple):
    """A layer's pretrained weight ``w0`` (``d_out x d_in``), factors ``a``, ``b`` and ``r`` (``A``, or ``A·W0``
    for sequential adaptation), whole, as importance scoring reads them."""

    w0: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    r: torch.Tensor


class LoRAPruneLayer(BaseTunerLayer):
    """State shared by every LoRAPrune layer type: factors, masks and per-adapter settings."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "adaptation", "straight_through") + MASK_NAMES

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.adaptation: dict[str, str] = {}
        self.straight_through: dict[str, bool] = {}  # element masks: factor gradients of the unmasked B·A
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_mask_rows = BufferDict({}, persistent=True)
        self.lora_mask_cols = BufferDict({}, persistent=True)
        self.lora_mask_elements = BufferDict({}, persistent=True)
        # functions called with (input, output) at every forward pass of an adapter (see add_tap)
        self._taps: dict[str, list[Callable[[torch.Tensor, torch.Tensor], None]]] = {}
        # adapters whose row mask is redundant in the forward pass because every pruned row only feeds input
        # columns that a consumer layer masks (set from the architecture registry, see structure.py)
        self.rows_masked_downstream: set[str] = set()
        self._disable_adapters = False
        # True while a distillation teacher reads the adapter without its masks (see distillation/teachers.py)
        self.ignore_masks = False
        self.merged_adapters: list[str] = []
        self._merge_stash: dict[str, dict[str, torch.Tensor]] = {}
        self._mask_cache: dict[tuple[str, str], tuple[tuple[int, int, torch.device], Any]] = {}
        self.fan_in_fan_out = fan_in_fan_out
        self.kwargs = kwargs

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())}")
        self.in_features = in_features
        self.out_features = out_features
        # "int8" / "4bit" for a bitsandbytes base layer (see quantized.py), None for a float one
        self.quantization: Optional[str] = quantization_kind(self.get_base_layer())
        self._register_load_state_dict_pre_hook(self._check_loaded_adapter_tensors, with_module=False)

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        """Create the factors and all-kept masks of ``adapter_name`` from a ``LoRAPruneConfig``."""
        r = config.r
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        form = adaptation(config.adaptation)
        a_in = form.a_in_features(self.in_features, self.out_features)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.adaptation[adapter_name] = form
        self.straight_through[adapter_name] = getattr(config, "element_mask_gradient", "exact") == "straight_through"
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(a_in, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)

        device = self.get_base_weight().device
        self.lora_mask_rows[adapter_name] = torch.ones(self.out_features, dtype=torch.bool, device=device)
        self.lora_mask_cols[adapter_name] = torch.ones(self.in_features, dtype=torch.bool, device=device)
        if config.is_element_granularity:
            shape = packed_shape((self.out_features, self.in_features))
            self.lora_mask_elements[adapter_name] = torch.full(shape, 255, dtype=torch.uint8, device=device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """LoRA's initialisation: A Kaiming-uniform (or Gaussian 1/r), B zero; ``False`` leaves B random too."""
        if init_lora_weights is False:
            return
        a = self.lora_A[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    # ------------------------------------------------------------------ weights in canonical (d_out, d_in) form
    def base_weight_2d(self) -> torch.Tensor:
        """The pretrained weight as ``(d_out, d_in)``; a transposed view for GPT-2 style ``Conv1D``."""
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w

    def dense_base_weight(self) -> torch.Tensor:
        """The pretrained weight's values as a dense ``(d_out, d_in)`` tensor: :meth:`base_weight_2d` for a float
        base, a fresh dequantized tensor for a bitsandbytes one (read a layer at a time, never kept)."""
        if self.quantization is None:
            return self.base_weight_2d()
        return dense_weight(self.get_base_layer())

    def add_tap(self, adapter_name: str, tap: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Call ``tap(x, y)`` at every forward pass of ``adapter_name`` run with gradients enabled: ``x`` the input
        as the layer uses it (column mask applied), ``y`` the output. Importance criteria use it to register
        gradient hooks; a tap must not modify the tensors."""
        self._taps.setdefault(adapter_name, []).append(tap)

    def remove_tap(self, adapter_name: str, tap) -> None:
        taps = self._taps.get(adapter_name, [])
        if tap in taps:
            taps.remove(tap)

    def has_element_mask(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_mask_elements

    def element_mask(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The unpacked ``(d_out, d_in)`` bool element mask, or None for a structured adapter.

        Unpacked at each call and not kept: a byte per weight held for the whole run would cost half as much as
        the importance scores themselves. The forward pass unpacks inside the masked product instead.
        """
        if not self.has_element_mask(adapter_name):
            return None
        return unpack_bits(self.lora_mask_elements[adapter_name], self.in_features)

    def _mask_is_full(self, adapter_name: str, which: str) -> bool:
        return self._cached(adapter_name, which, lambda t: bool(t.all()))

    def _cached(self, adapter_name: str, which: str, compute):
        tensor = getattr(self, f"lora_mask_{which}")[adapter_name]
        key = (tensor.data_ptr(), tensor._version, tensor.device)
        hit = self._mask_cache.get((adapter_name, which))
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute(tensor)
        self._mask_cache[(adapter_name, which)] = (key, value)
        return value

    def full_mask(self, adapter_name: str) -> torch.Tensor:
        """The whole ``(d_out, d_in)`` bool mask ``rows ⊗ cols ∧ elements`` (weight-sized: merge and export only)."""
        rows = self.lora_mask_rows[adapter_name]
        cols = self.lora_mask_cols[adapter_name]
        mask = rows[:, None] & cols[None, :]
        elements = self.element_mask(adapter_name)
        return mask & elements if elements is not None else mask

    def set_masks(
        self,
        adapter_name: str,
        rows: Optional[torch.Tensor] = None,
        cols: Optional[torch.Tensor] = None,
        elements_packed: Optional[torch.Tensor] = None,
    ) -> None:
        """Overwrite masks in place (keeps the buffers, so optimizers and hooks holding them stay valid)."""
        for name, value in (("rows", rows), ("cols", cols), ("elements", elements_packed)):
            if value is None:
                continue
            buf = getattr(self, f"lora_mask_{name}")
            if adapter_name not in buf:
                raise ValueError(f"adapter {adapter_name!r} has no {name} mask in this layer")
            if buf[adapter_name].shape != value.shape or buf[adapter_name].dtype != value.dtype:
                raise ValueError(
                    f"{name} mask of shape {tuple(value.shape)} / {value.dtype} does not fit this layer, which "
                    f"expects {tuple(buf[adapter_name].shape)} / {buf[adapter_name].dtype}"
                )
            buf[adapter_name].copy_(value)

    def delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, R)`` with ``merged weight = W0 + s·B·R``: ``R = A`` (parallel) or ``A·W0`` (sequential)."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        form = self.adaptation[adapter_name]
        return b, form.right_factor(a, self.dense_base_weight() if form.reads_w0 else None)

    def scoring_factors(self, adapter_name: str) -> ScoringFactors:
        """``W0, A, B`` and ``R`` whole and detached, for scoring: gathered once per layer when FSDP2 shards them
        (see :mod:`~peft_loraprune.kernels.distributed`), the parameters themselves otherwise."""
        a = full_tensor(self.lora_A[adapter_name].weight.detach())
        b = full_tensor(self.lora_B[adapter_name].weight.detach())
        w0 = full_tensor(self.dense_base_weight().detach())
        return ScoringFactors(w0, a, b, self.adaptation[adapter_name].right_factor(a, w0))

    def merged_weight_rows(
        self,
        adapter_name: str,
        start: int = 0,
        stop: Optional[int] = None,
        factors: Optional[ScoringFactors] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the unmasked merged weight ``W0 + s·B·R`` in float32 (a chunk, for scoring).

        ``factors``: from :meth:`scoring_factors`, so that a caller reading many chunks gathers them once.
        ``out``: a float32 tensor of the chunk's shape to write into (never the weight itself)."""
        w0, _, b, r = factors if factors is not None else self.scoring_factors(adapter_name)
        w0 = w0[start:stop]
        alpha = self.scaling[adapter_name]
        if out is None:  # out of place: for a float32 base, .float() is the weight itself and must not be written to
            return torch.addmm(w0.float(), b[start:stop].float(), r.float(), alpha=alpha)
        if w0.dtype == torch.float32:
            return torch.addmm(w0, b[start:stop].float(), r.float(), alpha=alpha, out=out)
        return out.copy_(w0).addmm_(b[start:stop].float(), r.float(), alpha=alpha)

    def masked_merged_weight(self, adapter_name: str, w0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(W0 + s·B·R) ⊙ M`` as a float32 ``(d_out, d_in)`` tensor: what merging writes and export keeps.

        ``w0``: the pretrained weight's values to merge into, ``(d_out, d_in)``; default this layer's own
        (dequantized for a quantized base). The streaming export passes the tensor it read from the checkpoint,
        and a quantized-base export the original-precision weight."""
        factors = None
        if w0 is not None:
            a = self.lora_A[adapter_name].weight.detach()
            b = self.lora_B[adapter_name].weight.detach()
            factors = ScoringFactors(w0, a, b, self.adaptation[adapter_name].right_factor(a, w0))
        return self.merged_weight_rows(adapter_name, factors=factors).mul_(self.full_mask(adapter_name))

    def merged_bias(self, adapter_name: str, bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The merged bias (``b`` or ``(I + s·B·A)·b``), unmasked, float32; None if the layer has no bias.
        ``bias``: the pretrained bias to merge (default this layer's)."""
        bias = self.get_base_layer().bias if bias is None else bias
        if bias is None:
            return None
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return self.adaptation[adapter_name].merged_bias(bias.float(), a, b, self.scaling[adapter_name])

    # ------------------------------------------------------------------ load-time checks
    def _check_loaded_adapter_tensors(self, state_dict, prefix, *args) -> None:
        """Reject adapter tensors of the wrong shape or dtype with a message naming the key and the layer."""
        expected = {}
        for adapter in self.lora_A:
            expected[f"lora_A.{adapter}.weight"] = (tuple(self.lora_A[adapter].weight.shape), None)
            expected[f"lora_B.{adapter}.weight"] = (tuple(self.lora_B[adapter].weight.shape), None)
        for name in MASK_NAMES:
            for adapter, buf in getattr(self, name).items():
                expected[f"{name}.{adapter}"] = (tuple(buf.shape), buf.dtype)
        for key, (shape, dtype) in expected.items():
            value = state_dict.get(prefix + key)
            if value is None:
                continue
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"Adapter tensor '{prefix + key}' has shape {tuple(value.shape)} but this model expects {shape} "
                    f"(base layer {type(self.get_base_layer()).__name__} with in_features={self.in_features}, "
                    f"out_features={self.out_features}). The adapter was saved for a base model of different "
                    "dimensions, or the file is corrupt."
                )
            if dtype is not None and value.dtype != dtype:
                raise ValueError(
                    f"Adapter mask '{prefix + key}' has dtype {value.dtype} but masks of this kind are {dtype}; "
                    "the adapter file was not written by peft_loraprune or is corrupt."
                )
            if dtype is None and not value.dtype.is_floating_point:
                raise ValueError(f"Adapter tensor '{prefix + key}' must be floating point, got {value.dtype}.")

    # ------------------------------------------------------------------ adapters
    def _active_adapter_here(self) -> Optional[str]:
        present = [a for a in self.active_adapters if a in self.lora_A]
        if len(present) > 1:
            raise ValueError(
                f"LoRAPrune layers support one active adapter at a time (each adapter has its own pruning mask); "
                f"got active adapters {present}. Call set_adapter() with a single adapter name."
            )
        return present[0] if present else None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._taps.pop(adapter_name, None)
        self.rows_masked_downstream.discard(adapter_name)
        self._merge_stash.pop(adapter_name, None)
        for key in [k for k in self._mask_cache if k[0] == adapter_name]:
            del self._mask_cache[key]


class Linear(nn.Module, LoRAPruneLayer):
    """LoRAPrune on an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        fan_in_fan_out = isinstance(base_layer, Conv1D)
        LoRAPruneLayer.__init__(self, base_layer, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._active_adapter_here()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if self.ignore_masks:  # the dense adapter, as a teacher sees it: no masks, no taps
            return self._forward_dense(x, adapter, *args, **kwargs)

        cols_pruned = not self._mask_is_full(adapter, "cols")
        if cols_pruned:
            x = x * self.lora_mask_cols[adapter].to(x.dtype)
        if self.has_element_mask(adapter):
            y = self._forward_element_masked(x, adapter)
        else:
            y = self._forward_dense(x, adapter, *args, **kwargs)
        if adapter not in self.rows_masked_downstream and not self._mask_is_full(adapter, "rows"):
            y = y * self.lora_mask_rows[adapter].to(y.dtype)
        if torch.is_grad_enabled():
            for tap in self._taps.get(adapter, ()):
                tap(x, y)
        return y

    def _forward_dense(self, x: torch.Tensor, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base layer plus the low-rank path; row/column masks are applied by the caller."""
        h = self.base_layer(x, *args, **kwargs)
        lora_A = self.lora_A[adapter]
        lora_B = self.lora_B[adapter]
        lora_in = self.adaptation[adapter].adapter_input(x, h)
        lora_in = self._cast_input_dtype(lora_in, lora_A.weight.dtype)
        z = lora_B(lora_A(self.lora_dropout[adapter](lora_in))) * self.scaling[adapter]
        return h + z.to(h.dtype)

    def _forward_element_masked(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        if self.quantization is None:
            weight = self.base_weight_2d()
        else:  # dequantized inside each pass, never kept between them
            weight = DequantizingWeight(self.get_base_layer(), (self.out_features, self.in_features))
        lora_B, lora_R = self.delta_factors(adapter)
        bias = self.get_base_layer().bias
        if bias is not None:
            bias = self.adaptation[adapter].merged_bias(
                bias, self.lora_A[adapter].weight, lora_B, self.scaling[adapter]
            )
        dropout = self.lora_dropout[adapter]
        x_lora = dropout(x) if (self.training and isinstance(dropout, nn.Dropout)) else x
        return element_masked_linear(
            x,
            x_lora,
            weight,
            bias,
            lora_B,
            lora_R,
            self.scaling[adapter],
            self.lora_mask_elements[adapter],
            self.in_features,
            straight_through=self.straight_through.get(adapter, False),
        )

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the masked merged weight into the base layer; pruned weights become exactly zero.

        What merging overwrites and cannot be recomputed is stashed for ``unmerge``: for parallel adaptation the
        pruned entries, restored bit for bit (the kept ones are recovered by subtracting ``s·B·A``, within
        floating-point rounding; a bit-exact stash would copy every weight); for sequential adaptation (whose
        masked product cannot be inverted) and quantized bases, the whole weight, restored bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError(
                f"Only one LoRAPrune adapter can be merged into a layer at a time (masks differ per adapter); "
                f"asked to merge {adapter_names} with {self.merged_adapters} already merged."
            )
        adapter = adapter_names[0]
        if adapter not in self.lora_A:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            mask = self.full_mask(adapter)
            merged = self.masked_merged_weight(adapter)
            rows = self.lora_mask_rows[adapter]
            merged_bias = self.merged_bias(adapter)
            if merged_bias is not None:
                merged_bias = merged_bias * rows
            if safe_merge and not (
                torch.isfinite(merged).all() and (merged_bias is None or torch.isfinite(merged_bias).all())
            ):
                raise ValueError(f"NaNs or infs in the merged weights of adapter {adapter!r}; merge aborted.")
            stash: dict[str, object] = {}
            if base.bias is not None:
                stash["bias"] = base.bias.detach().clone()
            if self.quantization is not None:
                # written back in the layer's own format; the quantized original is small, kept whole
                stash["quantized"] = snapshot(base)
                base.weight = requantized(base, merged)
            else:
                weight_2d = self.base_weight_2d()
                if self.adaptation[adapter].invertible_merge:
                    stash["pruned_values"] = weight_2d[~mask].clone()
                else:
                    stash["weight"] = weight_2d.detach().clone()
                weight_2d.copy_(merged.to(weight_2d.dtype))
            self._merge_stash[adapter] = stash
            if merged_bias is not None:
                base.bias.copy_(merged_bias.to(base.bias.dtype))
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        weight_2d = self.base_weight_2d()
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                stash = self._merge_stash.pop(adapter)
                if "quantized" in stash:
                    restore(base, stash["quantized"])
                elif "weight" in stash:
                    weight_2d.copy_(stash["weight"])
                else:
                    mask = self.full_mask(adapter)
                    b, r = self.delta_factors(adapter)
                    restored = torch.addmm(weight_2d.float(), b.float(), r.float(), alpha=-self.scaling[adapter])
                    restored[~mask] = stash["pruned_values"].float()
                    weight_2d.copy_(restored.to(weight_2d.dtype))
                if "bias" in stash:
                    base.bias.copy_(stash["bias"])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``merged - W0`` under the mask, in the base layer's weight layout (as PEFT's LoRA returns it)."""
        w0 = self.dense_base_weight().float()
        delta = self.merged_weight_rows(adapter_name).mul_(self.full_mask(adapter_name)).sub_(w0)
        delta = delta.to(w0.dtype if self.quantization else self.get_base_layer().weight.dtype)
        return delta.t() if self.fan_in_fan_out else delta

    def use_dense_base(self, weight: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Replace a quantized base layer by a plain ``nn.Linear`` holding ``weight`` (``(d_out, d_in)``, e.g. the
        original-precision weight read from a checkpoint) or, by default, the dequantized weight; in ``dtype``
        (default the weight's). Export calls it before merging, so that the adapter merges into dense weights."""
        base = self.get_base_layer()
        if self.quantization is None:
            raise ValueError("use_dense_base: this layer's base is not quantized")
        weight = self.dense_base_weight() if weight is None else weight
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"use_dense_base: weight of shape {tuple(weight.shape)} does not fit this layer "
                f"({self.out_features} x {self.in_features})"
            )
        dtype = dtype or weight.dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight.detach().to(base.weight.device, dtype), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        self.base_layer = dense
        self.quantization = None

    def __repr__(self) -> str:
        return "loraprune." + super().__repr__()
