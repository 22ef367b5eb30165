"""Quantized base layers: which ones LoRAPrune adapts, and how their weights are read and rewritten.

A QLoRA run keeps the pretrained weights in bitsandbytes' 8-bit (LLM.int8) or 4-bit (NF4/FP4, optionally double
quantized) form and trains the LoRA factors in a float dtype. LoRAPrune fits that form without ever holding a dense
copy of the model:

* the forward pass of a structured adapter calls the quantized layer as it is: row and column masks multiply the
  layer's input and output, which a quantized matmul takes like any other tensor;
* the default structured criterion (``"activation"``) reads no weight at all;
* criteria that read ``W`` (``"wanda"`` at a mask rewrite, ``"lora"`` and ``"magnitude"`` at each update) get the
  weight dequantized one layer at a time (:func:`dense_weight`) and drop it after scoring that layer;
* an element-masked layer needs ``W0 ⊙ M``: its product dequantizes the layer's weight once in each pass
  (:class:`DequantizingWeight`) and drops it at the end of the pass, so at most one layer's dense weight exists at
  any moment and none is kept from the forward to the backward pass (bitsandbytes' own 4-bit backward dequantizes
  the whole weight the same way);
* merging writes the masked merged weight back in the layer's own quantized format (:func:`requantized`); pruned
  weights quantize to exact zeros in LLM.int8, NF4 and FP4 alike, and the original quantized weight is kept so that
  ``unmerge`` restores it bit for bit.

``"grad"`` is refused on a quantized base: it accumulates a float32 gradient per weight, eight times the 4-bit base
it would score. Other quantized layers that PEFT's LoRA wraps (torchao, HQQ, GPTQ, AWQ, EETQ, quanto, FP8) are
refused with one error naming what is supported (:func:`check_supported`): each needs its own dequantize and
requantize pair, and none is installed where this package is tested.
"""

from __future__ import annotations

from typing import Optional

import torch

from .workspace import WORKSPACE

#: what a user is told is supported, in every refusal
SUPPORTED = (
    "torch.nn.Linear and transformers Conv1D in float32/bfloat16/float16, and bitsandbytes Linear8bitLt (LLM.int8) "
    "and Linear4bit (NF4 or FP4, with or without double quantization)"
)

# top-level packages whose layers are quantized formats LoRAPrune does not read
_OTHER_QUANTIZERS = ("torchao", "hqq", "awq", "auto_gptq", "gptqmodel", "optimum", "eetq", "quanto", "fbgemm_gpu")


def quantization_kind(module: torch.nn.Module) -> Optional[str]:
    """``"int8"`` or ``"4bit"`` for a bitsandbytes layer, None for a plain float layer.

    Recognised by the weight's class name, so that nothing here imports bitsandbytes unless a quantized layer is
    actually present."""
    name = type(getattr(module, "weight", None)).__name__
    if name == "Int8Params":
        return "int8"
    if name == "Params4bit":
        return "4bit"
    return None


def _looks_quantized(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if type(module).__module__.split(".")[0] in _OTHER_QUANTIZERS + ("bitsandbytes",):
        return True
    if hasattr(module, "W_q") or hasattr(module, "qweight"):  # HQQ, GPTQ/AWQ
        return True
    if weight is None:
        return False
    if type(weight).__module__.split(".")[0] in _OTHER_QUANTIZERS:  # torchao tensor subclasses
        return True
    return not weight.dtype.is_floating_point or weight.dtype.itemsize == 1  # int8 or a float8 format


def check_supported(module: torch.nn.Module, where: str) -> None:
    """Raise a ``TypeError`` naming ``where`` and what is supported when ``module`` is a quantized layer that
    LoRAPrune cannot read (a bitsandbytes 8-bit or 4-bit layer, or any unquantized layer, passes)."""
    if quantization_kind(module) is not None or not _looks_quantized(module):
        return
    weight = getattr(module, "weight", None)
    raise TypeError(
        f"'{where}' is a quantized layer LoRAPrune does not support ({type(module).__module__}."
        f"{type(module).__name__}, weight {type(weight).__name__} {getattr(weight, 'dtype', None)}). Supported: "
        f"{SUPPORTED}. Load the base with BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True, or in "
        "bfloat16/float16/float32."
    )


def describe(module: torch.nn.Module) -> str:
    """One phrase for reports: ``"bitsandbytes 4-bit nf4, double quantization"``, ``"bitsandbytes LLM.int8"``, or
    the weight's dtype."""
    kind = quantization_kind(module)
    if kind == "int8":
        return "bitsandbytes LLM.int8"
    if kind == "4bit":
        state = module.weight.quant_state
        double = ", double quantization" if getattr(state, "nested", False) else ""
        return f"bitsandbytes 4-bit {state.quant_type}{double}"
    return str(module.weight.dtype).removeprefix("torch.")


def _int8_scales(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(
            "this bitsandbytes 8-bit layer holds no row scales (SCB): its weight was never quantized (move the model "
            "to its device first) or it uses has_fp16_weights=True"
        )
    return scb


def _int8_row_scales(scb: torch.Tensor, device) -> torch.Tensor:
    """LLM.int8's per-row factors: ``int8 · SCB / 127`` is the dequantized weight."""
    return scb.to(device).float().div(127.0)[:, None]


def dense_weight(module: torch.nn.Module, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's weight as a dense float ``(d_out, d_in)`` tensor (``weight`` itself for an unquantized layer).

    A bitsandbytes weight is dequantized: LLM.int8 as ``int8 · SCB / 127`` (float32), 4-bit through
    ``bitsandbytes.functional.dequantize_4bit`` (in the dtype the weight was quantized from). ``out``: a tensor of
    the result's shape to write into (any float dtype)."""
    kind = quantization_kind(module)
    if kind is None:
        return module.weight if out is None else out.copy_(module.weight)
    if kind == "int8":
        weight = module.weight
        scale = _int8_row_scales(_int8_scales(module), weight.device)
        if out is None:
            return weight.data.float().mul_(scale)
        return (
            torch.mul(weight.data, scale, out=out)
            if out.dtype == torch.float32
            else out.copy_(weight.data).mul_(scale)
        )
    import bitsandbytes.functional as bnbf

    _check_standard_layout(module)
    dense = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)  # (no out= kernel on the CPU)
    return dense if out is None else out.copy_(dense)


#: what ``rounded_as`` can round to: bitsandbytes' storage of a base loaded with ``BitsAndBytesConfig(load_in_8bit=True)``
#: (``int8``) or ``load_in_4bit=True`` with that ``bnb_4bit_quant_type`` (``-dq``: ``bnb_4bit_use_double_quant=True``)
ROUNDING_FORMATS = ("int8", "nf4", "nf4-dq", "fp4", "fp4-dq")


def rounded_as(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (dense, ``(d_out, d_in)``) quantized the way bitsandbytes stores a base loaded in ``fmt`` (one of
    :data:`ROUNDING_FORMATS`; 4-bit blocks of 64, bitsandbytes' default), then dequantized as :func:`dense_weight`
    reads it: the values a QLoRA adapter was trained on. Float32 for ``int8``, ``weight``'s dtype for 4-bit."""
    if fmt not in ROUNDING_FORMATS:
        raise ValueError(f"quantized_as={fmt!r}: allowed {', '.join(ROUNDING_FORMATS)}")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(
            f"quantized_as={fmt!r} rounds with bitsandbytes: pip install 'peft_loraprune[quantized]'"
        ) from err
    data = weight.detach().to("cpu").contiguous()
    if fmt == "int8":
        q = bnb.nn.Int8Params(data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return q.data.float().mul_(_int8_row_scales(q.SCB, q.device))
    quant_type, _, double = fmt.partition("-")
    q = bnb.nn.Params4bit(
        data.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=bool(double), blocksize=64
    ).to("cpu")
    return bnb.functional.dequantize_4bit(q.data, q.quant_state)


def keep_standard_layout(module: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel.

    At the first forward pass in eval mode without gradients on a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites
    the weight into another layout (``quant_state.packing_format_for_cpu``), with bfloat16 block scales; its inverse
    does not give back the weight that was trained on (measured: 0.04 max error on weights of size 0.08), and
    ``dequantize_4bit`` cannot read the repacked form. A wrapped layer keeps the standard layout; eval on the CPU
    then runs bitsandbytes' generic 4-bit kernel."""
    if quantization_kind(module) == "4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def _check_standard_layout(module: torch.nn.Module) -> None:
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "this bitsandbytes 4-bit weight was repacked for bitsandbytes' CPU inference kernel (an eval-mode forward "
            "pass ran before get_peft_model), and its packed form cannot be dequantized exactly. Load the base model "
            "again and call get_peft_model before running it in eval mode."
        )


def requantized(module: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Parameter:
    """``weight`` (dense, ``(d_out, d_in)``) quantized in the format and with the settings of ``module``'s weight, as
    a new parameter to assign to ``module.weight``. Exact zeros stay exact zeros in every supported format."""
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if quantization_kind(module) == "int8":
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        new = new.to(device)
        state = getattr(module, "state", None)
        if state is not None:
            state.reset_grads()
            state.SCB = None
        return new
    _check_standard_layout(module)
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(requires_grad=False, bnb_quantized=False, quant_state=None)
    dtype = old.quant_state.dtype
    return bnb.nn.Params4bit(weight.to("cpu", dtype), **kwargs).to(device)


def snapshot(module: torch.nn.Module) -> dict:
    """What :func:`restore` needs to put the layer's quantized weight back exactly (the quantized tensors are
    referenced, not copied: a merge assigns a new parameter and leaves them untouched)."""
    snap = {"weight": module.weight}
    if quantization_kind(module) == "int8":
        snap["scales"] = _int8_scales(module)
    return snap


def restore(module: torch.nn.Module, snap: dict) -> None:
    """Put back the quantized weight :func:`snapshot` recorded. LLM.int8 moves a weight's ``CB``/``SCB`` into the
    layer's matmul state at its first forward pass; they are handed back on the weight so that the next forward
    pass takes them up again."""
    weight = snap["weight"]
    module.weight = weight
    if "scales" in snap:
        weight.CB, weight.SCB = weight.data, snap["scales"]
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None


class DequantizingWeight:
    """A quantized layer's weight as the element-masked product reads it: shape and device up front, the dense
    values only inside a pass (:meth:`materialize`), in a workspace buffer that every layer reuses."""

    def __init__(self, module: torch.nn.Module, shape: tuple[int, int]) -> None:
        self.module = module
        self.shape = torch.Size(shape)
        self.device = module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if quantization_kind(self.module) == "int8" else self.module.weight.quant_state.dtype

    def materialize(self) -> torch.Tensor:
        """The dense weight, valid until the next call (by any layer). LLM.int8 dequantizes into the workspace;
        bitsandbytes' 4-bit dequantization has no ``out=`` form on every device, so its result is a fresh tensor,
        dropped at the end of the pass."""
        if quantization_kind(self.module) == "4bit":
            return dense_weight(self.module)
        out = WORKSPACE.get("dequantized", tuple(self.shape), self.dtype, self.device)
        return dense_weight(self.module, out=out)
