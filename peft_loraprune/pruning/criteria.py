"""Importance criteria: how the gradients of one optimizer step become scores.

Each criterion is a small object with one interface (the engine never branches on a criterion's name):

* :meth:`Criterion.attach` installs what it must observe during the forward/backward pass (a *tap* on a layer,
  see :meth:`~peft_loraprune.layer.LoRAPruneLayer.add_tap`); :meth:`Criterion.detach` removes it;
* :meth:`Criterion.synchronize` averages rank-local accumulators over ranks (distributed training);
* :meth:`Criterion.finite_inputs` lists the tensors whose finiteness decides whether a step is scored;
* :meth:`Criterion.element_chunks` yields ``(rows, |W ⊙ G|)`` chunks of one layer (element-wise criteria only);
* a *separable* criterion (a weight's score is ``|W_ij|·v_j``) gives the step's vector ``v`` by
  :meth:`Criterion.step_features` and scores any vector by :meth:`Criterion.chunks_for`: the engine then
  averages ``v`` (``d_in`` floats per layer) and scores the current weight only when it rewrites masks;
* :meth:`Criterion.member_scores` gives one member's raw per-group scores for this step (structured pruning);
* a criterion that :attr:`~Criterion.scores_writers` also observes the outputs of the modules that write into the
  residual stream (:meth:`Criterion.attach_writers`) and gives their per-row sums (:meth:`Criterion.writer_sums`):
  whole blocks are scored from them (:mod:`~peft_loraprune.pruning.depth`);
* :meth:`Criterion.reset` clears per-step accumulators after the step.

The criteria (``LoRAPruneConfig.importance``):

``"lora"``  -- :class:`LoRAGradientEstimate`, the paper's estimator. The gradient of the merged weight is
    estimated from the adapter gradients alone, ``G_hat = dB·A + B·dA − dB·dA`` (``·W0`` for sequential
    adaptation), and a weight scores ``|W ⊙ G_hat|``. A group sums its weights' scores in each member module.
    Since ``dB = s·G·Aᵀ`` and ``dA = s·Bᵀ·G``, ``G_hat`` is the true gradient projected on A's row space and B's
    column space (rank ≤ 2r): good for the rows of producing modules, near noise for the columns of consuming
    modules while ``B ≈ 0`` (the columns then see only ``G·AᵀA``, a fixed random mix; the criterion study in
    ``benchmarks/criteria.py`` measured the consequence).
``"grad"``  -- :class:`TrueGradient`: ``|W ⊙ G|`` with the true gradient ``G`` of the merged weight, accumulated
    during backward (one weight-sized float32 buffer per scored layer): the memory-heavy baseline.
``"magnitude"`` -- :class:`Magnitude`: ``|W|``.
``"wanda"`` -- :class:`InputNormMagnitude`: ``|W_ij|·‖x_j‖₂`` (Sun et al., "A Simple and Effective Pruning
    Approach for Large Language Models", 2023), with ``‖x_j‖`` the norm of input feature ``j`` over this step's
    tokens, from the forward pass: no gradient of any kind, ``d_in`` floats of state per layer.
``"activation"`` -- :class:`ActivationTaylor` (structured only): the first-order Taylor estimate of the loss
    change when a whole group is removed, taken where the group enters its consuming module. Zeroing input
    column ``c`` of a consumer (o_proj for a head, down_proj for a channel) removes the group exactly, and
    ``Σ_j W_jc·G_jc = Σ_tokens x_c·(∂L/∂x)_c``: the input activation times its gradient, which the backward pass
    computes anyway. A group scores ``|Σ_{c ∈ group} Σ_tokens x_c·(∂L/∂x)_c|`` per step (Molchanov et al.,
    "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017). No weight gradient, no
    weight-sized state: ``d_in`` floats per consumer module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Optional

import torch

from ..kernels.distributed import all_reduce_mean_, full_tensor
from ..kernels.group_ops import sum_over_groups
from ..kernels.importance import column_square_sums, element_scores, lora_gradient_factors
from ..kernels.workspace import WORKSPACE


def parameter_gradient(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The full gradient of a parameter: ``p.grad``, or DeepSpeed's accessor when ZeRO keeps it elsewhere."""
    if param.grad is not None:
        return param.grad
    try:  # pragma: no cover - only under DeepSpeed ZeRO
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    except Exception:
        return None


class Consumer(NamedTuple):
    """A group member scored on its input columns: its full module name and layer, and ``factor``, the layer of
    its family's registered input factor (see :class:`~peft_loraprune.pruning.architectures.GroupSpec`) when adapted."""

    name: str
    layer: object
    factor: Optional[object] = None


class Criterion:
    """Interface of an importance criterion (see the module docstring). Subclasses set ``name``."""

    name: str = ""
    #: True when the criterion scores single weights (it then serves "unstructured" and "N:M" too)
    elementwise: bool = True
    #: True when scoring reads each layer's whole pretrained weight (impossible under DeepSpeed ZeRO-3)
    reads_weights: bool = True
    #: True when a weight's score is ``|W_ij|·v_j`` with one vector ``v`` per layer and step
    #: (:meth:`step_features`, :meth:`chunks_for`)
    separable: bool = False
    #: True when the criterion can score whole blocks from their residual writers (:meth:`attach_writers`)
    scores_writers: bool = False

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self._axis_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per-step cache of member_scores

    def scores_axis(self, axis: str) -> bool:
        """Whether the criterion scores a group member on ``axis`` ("rows" of a producer, "cols" of a consumer)."""
        return True

    def attach(self, layers: list[tuple[str, object]], consumers: list[Consumer]) -> None:
        """Install taps on the scored ``layers`` (``consumers``: those scored on their input columns)."""

    def attach_writers(self, writers: list[tuple[str, object]]) -> None:
        """Observe the outputs of the residual ``writers`` (``(name, layer)``) for :meth:`writer_sums`."""
        raise ValueError(f"the {self.name!r} criterion cannot score whole blocks")

    def writer_sums(self, name: str) -> Optional[torch.Tensor]:
        """Per output row ``r`` of writer ``name``: this step's signed ``Σ_tokens y_r·(∂L/∂y)_r`` (float32), or None
        when the writer was not used. Summed over rows it is the first-order loss change of removing the writer's
        whole contribution to the residual stream."""
        raise ValueError(f"the {self.name!r} criterion cannot score whole blocks")

    def detach(self) -> None:
        """Remove every tap and accumulator installed by :meth:`attach` and :meth:`attach_writers`."""

    def synchronize(self) -> None:
        """Average rank-local accumulators over ranks (a no-op in one process)."""

    def finite_inputs(self, name: str, layer) -> list[torch.Tensor]:
        """Tensors of ``layer`` read this step whose finiteness decides whether the step is scored."""
        return [layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight]

    def element_chunks(self, name: str, layer) -> Optional[Iterator[tuple[slice, torch.Tensor]]]:
        """``(rows, |W ⊙ G|)`` float32 chunks of one layer for this step; None when the layer was not used.

        Chunks are scratch buffers reused from one chunk to the next: fold each in before asking for the next."""
        raise NotImplementedError(f"the {self.name!r} criterion does not score single weights")

    def step_features(self, name: str) -> Optional[torch.Tensor]:
        """Separable criteria: this step's ``v`` (``d_in`` float32) of layer ``name``, or None (layer unused)."""
        raise NotImplementedError(f"the {self.name!r} criterion is not separable")

    def chunks_for(
        self, layer, features: torch.Tensor, into: Optional[torch.Tensor] = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Separable criteria: ``(rows, |W_ij|·features_j)`` float32 chunks of ``layer``'s merged weight
        (scratch buffers, as in :meth:`element_chunks`; with ``into``, a float32 tensor of the weight's shape,
        the chunks are written into its rows instead, so a caller that needs every score skips a copy)."""
        raise NotImplementedError(f"the {self.name!r} criterion is not separable")

    def member_scores(self, name: str, layer, axis: str, layout) -> Optional[torch.Tensor]:
        """Raw scores of the groups laid out along ``axis`` of ``layer`` for this step, or None (layer unused).

        Element-wise criteria sum ``|W ⊙ G|`` over each group's rows (or columns), computed once per layer and
        step."""
        sums = self._axis_sums.get(name)
        if sums is None:
            chunks = self.element_chunks(name, layer)
            if chunks is None:
                return None
            rows = torch.zeros(layer.out_features, device=layer.base_weight_2d().device)
            cols = torch.zeros(layer.in_features, device=rows.device)
            for r, block in chunks:
                rows[r] = block.sum(dim=1)
                cols += block.sum(dim=0)
            sums = self._axis_sums[name] = (rows, cols)
        return sum_over_groups(sums[0] if axis == "rows" else sums[1], layout)

    def reset(self) -> None:
        """Forget this step's accumulators (called after every update, scored or skipped)."""
        self._axis_sums.clear()


def _merged_rows(layer, adapter, factors):
    return lambda r, out: layer.merged_weight_rows(adapter, r.start, r.stop, factors, out=out)


def _scratch(layer):
    """Float32 scratch blocks for scoring chunks on ``layer``'s device, reused across chunks and layers."""
    device = layer.base_weight_2d().device
    return lambda name, shape: WORKSPACE.get(name, shape, torch.float32, device)


class Magnitude(Criterion):
    """``|W|`` of the merged weight."""

    name = "magnitude"

    def element_chunks(self, name, layer):
        factors = layer.scoring_factors(self.adapter)
        return element_scores(
            _merged_rows(layer, self.adapter, factors), None, (layer.out_features, layer.in_features), _scratch(layer)
        )


class FeatureSums(Criterion):
    """Base of the criteria that keep one float32 vector per tapped layer (``sums``), added to by forward taps,
    averaged over ranks, checked for finiteness and zeroed after every step; ``touched`` names the layers whose
    tap fired this step. Subclasses create the vectors and taps in :meth:`attach` with :meth:`_new_sums` and
    :meth:`_add_tap`."""

    def __init__(self, adapter: str) -> None:
        super().__init__(adapter)
        self.sums: dict[str, torch.Tensor] = {}
        self.touched: set[str] = set()
        self._taps: list[tuple[object, object]] = []

    def _new_sums(self, name: str, layer) -> torch.Tensor:
        """A zero vector of ``layer``'s input size for ``name``, on its device."""
        self.sums[name] = torch.zeros(layer.in_features, device=layer.base_weight_2d().device)
        return self.sums[name]

    def _add_tap(self, source, tap) -> None:
        source.add_tap(self.adapter, tap)
        self._taps.append((source, tap))

    def detach(self):
        for layer, tap in self._taps:
            layer.remove_tap(self.adapter, tap)
        self._taps.clear()
        self.sums.clear()

    def synchronize(self):
        # sums of this rank's tokens: the mean over ranks ranks groups and weights as the sum over all tokens does
        all_reduce_mean_(self.sums.values())

    def finite_inputs(self, name, layer):
        extra = [self.sums[key] for key in (name, _writer_key(name)) if key in self.sums]
        return super().finite_inputs(name, layer) + extra

    def reset(self):
        super().reset()
        self.touched.clear()
        for v in self.sums.values():
            v.zero_()


class InputNormMagnitude(FeatureSums):
    """``|W_ij|·‖x_j‖₂``: the merged weight times the norm of its input feature over the step's tokens (Wanda).

    A tap on each scored layer computes ``Σ_tokens x_j²`` at every forward pass run with gradients and adds it to a
    ``d_in`` float32 accumulator when that pass's backward reaches the layer (micro-batches of one step add up;
    evaluation passes under ``no_grad``, and forward passes never backpropagated, are not seen). The norm
    is the square root of that sum. The criterion is separable: for unstructured and N:M pruning the engine
    averages the norms over steps and multiplies the average by the merged weight of the rewrite step, which
    equals the average of the per-step scores while the weight stays put, and reads no weight between rewrites
    and keeps no per-weight state. Why it is offered: on SmolLM2 at 50% unstructured the paper's estimator
    (``"lora"``) trailed llm-compressor's one-shot Wanda followed by LoRA by a wide margin (README,
    "Benchmarks"); this is Wanda's rule, scored while fine-tuning.
    """

    name = "wanda"
    separable = True

    def attach(self, layers, consumers):
        for name, layer in layers:
            self._add_tap(layer, self._tap(name, self._new_sums(name, layer)))

    def _tap(self, name: str, buffer: torch.Tensor):
        touched = self.touched

        def tap(x: torch.Tensor, y: torch.Tensor) -> None:
            if not y.requires_grad:
                return
            pending = column_square_sums(x.detach().reshape(-1, x.shape[-1]))  # d_in floats until the backward

            def hook(grad_y: torch.Tensor) -> None:
                # counted when the output's gradient arrives: once per micro-batch, also under non-reentrant
                # gradient checkpointing, whose recomputation runs this layer's forward a second time with
                # gradients enabled (the recomputed output gets no gradient, so its hook never fires)
                buffer.add_(pending)
                touched.add(name)

            y.register_hook(hook)

        return tap

    def step_features(self, name):
        return self.sums[name].sqrt() if name in self.touched else None

    def chunks_for(self, layer, features, into=None):
        factors = layer.scoring_factors(self.adapter)
        return element_scores(
            _merged_rows(layer, self.adapter, factors),
            lambda r, out: features,  # broadcast along the rows
            (layer.out_features, layer.in_features),
            _scratch(layer),
            into=into,
        )

    def element_chunks(self, name, layer):
        features = self.step_features(name)
        return None if features is None else self.chunks_for(layer, features)


class LoRAGradientEstimate(Criterion):
    """``|W ⊙ G_hat|`` with ``G_hat`` estimated from the adapter gradients (the paper's criterion)."""

    name = "lora"

    def finite_inputs(self, name, layer):
        tensors = super().finite_inputs(name, layer)
        return tensors + [g for g in (parameter_gradient(t) for t in tensors) if g is not None]

    def element_chunks(self, name, layer):
        da = parameter_gradient(layer.lora_A[self.adapter].weight)
        db = parameter_gradient(layer.lora_B[self.adapter].weight)
        if da is None or db is None:
            return None
        factors = layer.scoring_factors(self.adapter)  # gathered once, read by both sides of the product
        # whole tensors: FSDP2 keeps shards (see distributed.py); a no-op otherwise
        da, db = full_tensor(da.detach()), full_tensor(db.detach())
        p, q = lora_gradient_factors(factors.a, da, layer.adaptation[self.adapter].gradient_w0(factors.w0))
        # G_hat = dB·P + B·Q as one rank-2r product: [dB | B] @ [P; Q] (one weight-sized write, not two)
        left = torch.cat([db.float(), factors.b.float()], dim=1)
        right = torch.cat([p, q], dim=0)
        return element_scores(
            _merged_rows(layer, self.adapter, factors),
            lambda r, out: torch.mm(left[r], right, out=out),
            (layer.out_features, layer.in_features),
            _scratch(layer),
        )


class TrueGradient(Criterion):
    """``|W ⊙ G|`` with the true gradient ``G = Σ grad_yᵀ·x`` of the merged weight, captured during backward.

    The captured gradient is raw (before the Trainer clips and unscales gradients), while the adapter gradients
    the optimizer sees are clipped and unscaled. So that both criteria weigh steps alike, ``G`` is rescaled by
    ``‖dB‖ / ‖s·G·Rᵀ‖`` (the exact gradient of B is ``s·G·Rᵀ``): the factor the Trainer applied to this step.
    """

    name = "grad"

    def __init__(self, adapter: str) -> None:
        super().__init__(adapter)
        self.gradients: dict[str, torch.Tensor] = {}
        self._taps: list[tuple[object, object]] = []
        self._scale: Optional[float] = None

    def attach(self, layers, consumers):
        quantized = [(name, layer.quantization) for name, layer in layers if layer.quantization is not None]
        if quantized:
            raise ValueError(
                f"importance='grad' is not supported on a quantized base ('{quantized[0][0]}' is bitsandbytes "
                f"{quantized[0][1]}): it accumulates a float32 gradient per pretrained weight, 8x the memory "
                "of a 4-bit base. Use a criterion that reads no weight gradient: 'activation' (structured), 'wanda' "
                "(any granularity), 'lora' or 'magnitude'."
            )
        for name, layer in layers:
            buffer = torch.zeros(layer.out_features, layer.in_features, device=layer.base_weight_2d().device)
            self.gradients[name] = buffer
            tap = _gradient_tap(buffer)
            layer.add_tap(self.adapter, tap)
            self._taps.append((layer, tap))

    def detach(self):
        for layer, tap in self._taps:
            layer.remove_tap(self.adapter, tap)
        self._taps.clear()
        self.gradients.clear()

    def synchronize(self):
        # accumulated from this rank's activations: average over ranks, as DDP averages p.grad
        all_reduce_mean_(self.gradients.values())

    def finite_inputs(self, name, layer):
        return super().finite_inputs(name, layer) + [self.gradients[name]]

    def element_chunks(self, name, layer):
        g = self.gradients[name]
        factors = layer.scoring_factors(self.adapter)
        scale = self._clip_scale(layer, factors, g)
        return element_scores(
            _merged_rows(layer, self.adapter, factors),
            lambda r, out: torch.mul(g[r], scale, out=out),
            (layer.out_features, layer.in_features),
            _scratch(layer),
        )

    def _clip_scale(self, layer, factors, g) -> float:
        """``‖dB‖ / ‖s·G·Rᵀ‖``, measured once per step on the first layer where both are non-zero."""
        if self._scale is None:
            db = parameter_gradient(layer.lora_B[self.adapter].weight)
            if db is None:
                return 1.0
            expected = (g @ factors.r.float().t()).mul_(layer.scaling[self.adapter]).norm()
            seen = full_tensor(db.detach()).float().norm()
            if not (expected > 0 and seen > 0):
                return 1.0
            self._scale = float(seen / expected)
        return self._scale

    def reset(self):
        super().reset()
        self._scale = None
        for g in self.gradients.values():
            g.zero_()


def _gradient_tap(buffer: torch.Tensor):
    def tap(x: torch.Tensor, y: torch.Tensor) -> None:
        if not y.requires_grad:
            return
        x = x.detach()

        def hook(grad_y: torch.Tensor) -> None:
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(buffer.dtype)
            buffer.addmm_(g.t(), x.reshape(-1, x.shape[-1]).to(buffer.dtype))

        y.register_hook(hook)

    return tap


def _writer_key(name: str) -> str:
    """Key of a residual writer's per-row sums in :attr:`FeatureSums.sums` (a writer can also be a consumer)."""
    return name + "#rows"


class ActivationTaylor(FeatureSums):
    """``|Σ_{c ∈ group} Σ_tokens x_c·(∂L/∂x)_c|`` at the group's consuming module (structured pruning only).

    A tap on each consuming module keeps a reference to its input ``x`` and adds ``Σ_tokens x·∂L/∂x`` to a
    ``d_in`` float32 accumulator when the gradient of ``x`` arrives. Autograd keeps ``x`` anyway for LoRA's ``A``
    gradient when ``lora_dropout`` is 0; with dropout it keeps only the dropped-out copy, and holding ``x`` costs
    one activation of that module per micro-batch until its backward. Where the family registers an input factor
    (a gated MLP's up projection ``u``, with ``x = act(gate) ⊙ u``), the tap reads ``Σ_tokens u·∂L/∂u`` at that
    layer's output instead: equal token by token, and ``u`` is kept by the product's backward whatever the
    dropout. Micro-batches of one optimizer step add up (the signed sum is the first-order term of the whole
    step's loss); the absolute value is taken per group, at the update.
    """

    name = "activation"
    elementwise = False
    reads_weights = False
    scores_writers = True

    def scores_axis(self, axis):
        return axis == "cols"

    def attach(self, layers, consumers):
        for name, layer, factor in consumers:
            source = layer if factor is None else factor
            self._add_tap(source, self._tap(name, self._new_sums(name, layer), read_output=factor is not None))

    def attach_writers(self, writers):
        """Whole blocks: a tap on each residual writer adds ``Σ_tokens y·∂L/∂y`` per output row (``d_out`` float32);
        a block's gate multiplies exactly these outputs, so their sum over the block's writers is the Taylor
        estimate of closing it."""
        for name, layer in writers:
            key = _writer_key(name)
            self.sums[key] = torch.zeros(layer.out_features, device=layer.base_weight_2d().device)
            self._add_tap(layer, self._tap(key, self.sums[key], read_output=True, slot="writer_product"))

    def writer_sums(self, name):
        key = _writer_key(name)
        return self.sums[key] if key in self.touched else None

    def _tap(self, name: str, buffer: torch.Tensor, read_output: bool, slot: str = "activation_product"):
        """A tap adding ``Σ_tokens v·∂L/∂v`` to ``buffer`` (``name``'s column sums), ``v`` the tapped layer's
        input, or its output when ``read_output`` (the consumer's input factor, or a residual writer). ``slot``:
        the workspace buffer of the token-wise product."""
        touched = self.touched

        def tap(x: torch.Tensor, y: torch.Tensor) -> None:
            v = y if read_output else x
            if not v.requires_grad:
                return
            saved = v.detach()

            def hook(grad_x: torch.Tensor) -> None:
                x2, g2 = saved.reshape(-1, saved.shape[-1]), grad_x.reshape(-1, grad_x.shape[-1])
                # the token-wise product in a reused buffer: a fresh activation-sized tensor per consumer and
                # micro-batch would fragment the heap between the activations still waiting for their backward
                product = WORKSPACE.get(slot, tuple(x2.shape), torch.float32, x2.device)
                if x2.dtype == torch.float32 and g2.dtype == torch.float32:
                    torch.mul(x2, g2, out=product)
                else:
                    product.copy_(x2).mul_(g2)
                buffer.add_(product.sum(dim=0))
                touched.add(name)

            v.register_hook(hook)

        return tap

    def member_scores(self, name, layer, axis, layout):
        if axis != "cols" or name not in self.touched:
            return None
        return sum_over_groups(self.sums[name], layout).abs()


_ELEMENTWISE = {c.name: c for c in (LoRAGradientEstimate, TrueGradient, Magnitude, InputNormMagnitude)}
_GROUPWISE = {ActivationTaylor.name: ActivationTaylor}


def make_criterion(name: str, adapter: str) -> Criterion:
    """The criterion object for a ``LoRAPruneConfig.importance`` value."""
    cls = _ELEMENTWISE.get(name) or _GROUPWISE.get(name)
    if cls is None:
        raise ValueError(
            f"importance={name!r} is not a criterion; allowed: {sorted(_ELEMENTWISE) + sorted(_GROUPWISE)}"
        )
    return cls(adapter)
