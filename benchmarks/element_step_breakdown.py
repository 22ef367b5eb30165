"""Where the time of an element-masked (unstructured / N:M) layer step goes, against the same layer under plain LoRA.

The step-cost benchmark gives the whole-model ratio; this one explains it. For the 0.5B model's layer shapes
(float32, rank 8, 50% random mask) it times, interleaved in one process:

* the layer's forward + backward under plain LoRA (``F.linear`` plus the low-rank path, as PEFT computes it) and
  under :func:`~peft_loraprune.kernels.masked_linear.element_masked_linear`, exact and straight-through, with and without
  adapter dropout (dropout gives the adapter path its own input);
* each weight-sized kernel the masked layer runs, alone, on the whole weight: the product with the activations,
  the product ``G = grad_yᵀ·x``, unpacking the bit-packed mask into 0/1 values, rebuilding ``(W0 + s·B·A) ⊙ M``
  (one ``addmm``, one mask multiply), a mask multiply, and the two thin products that turn ``G ⊙ M`` into the
  factor gradients.

Each variant's kernel counts (:data:`COUNTS`, read off :mod:`peft_loraprune.kernels.masked_linear`) times the kernel times,
plus what plain LoRA spends outside its two weight-sized products, gives a predicted time; the result file keeps
it beside the measured one, and two floors: **products** (LoRA plus the extra weight-sized products the variant
cannot avoid) and **eager** (the products plus the elementwise passes over the weight that PyTorch's separate
kernels need; a fused kernel could do those in one read of the weight).

    python benchmarks/element_step_breakdown.py --tokens 128,512 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from common import table, write_result
from masked_blocks import SHAPES, layer_inputs

import peft_loraprune.kernels.masked_linear as masked_linear

SCALE = 2.0

#: Weight-sized kernels per forward + backward of one layer, by variant. "products": products with the
#: activations (forward output, input gradients, and the exact factor gradient's ``G``); "unpack": mask
#: unpacked to values (once per pass); "rebuild": ``(W0 + s·B·A) ⊙ M`` or ``s·(B·A) ⊙ M`` (rank-r product into
#: the weight buffer plus the mask multiply); "mask_multiply": the other mask multiplies (``W0 ⊙ M`` with dropout,
#: ``G ⊙ M``); "thin": ``(G ⊙ M)·Aᵀ`` and ``Bᵀ·(G ⊙ M)``.
COUNTS = {
    ("exact", False): dict(products=3, unpack=2, rebuild=2, mask_multiply=1, thin=2),
    ("straight_through", False): dict(products=2, unpack=2, rebuild=2, mask_multiply=0, thin=0),
    ("exact", True): dict(products=5, unpack=2, rebuild=2, mask_multiply=3, thin=2),
    ("straight_through", True): dict(products=4, unpack=2, rebuild=2, mask_multiply=2, thin=0),
}
LORA_PRODUCTS = 2  # forward output and input gradient


def lora_step(t: dict, dropout: bool) -> None:
    """Plain LoRA's forward + backward of the layer: ``x·W0ᵀ + s·(x_lora·Aᵀ)·Bᵀ``."""
    x, x_lora = t["x"], (t["x_lora"] if dropout else t["x"])
    y = torch.nn.functional.linear(x, t["weight"]) + (x_lora @ t["lora_R"].t()) @ t["lora_B"].t() * SCALE
    y.backward(torch.ones_like(y))


def masked_step(t: dict, straight_through: bool) -> None:
    y = masked_linear.element_masked_linear(
        t["x"], t["x_lora"], t["weight"], None, t["lora_B"], t["lora_R"], SCALE, t["packed"], t["n_cols"],
        straight_through=straight_through,
    )  # fmt: skip
    y.backward(torch.ones_like(y))


def kernels(t: dict) -> dict:
    """The weight-sized kernels of the masked layer, each a closure over the whole weight."""
    w, packed, n_cols = t["weight"], t["packed"], t["n_cols"]
    B, R = t["lora_B"].detach(), t["lora_R"].detach()
    x2 = t["x"].detach().reshape(-1, n_cols)
    gy = torch.ones(x2.shape[0], w.shape[0])
    mask = masked_linear._mask_values(packed, n_cols, w.dtype).clone()
    g = torch.empty_like(w)
    buffer = torch.empty_like(w)
    return {
        "product": lambda: torch.mm(x2, w.t()),
        "gradient_product": lambda: torch.mm(gy.t(), x2, out=g),
        "unpack": lambda: masked_linear._mask_values(packed, n_cols, w.dtype),
        "rebuild": lambda: torch.addmm(w, B, R, alpha=SCALE, out=buffer).mul_(mask),
        "mask_multiply": lambda: g.mul_(mask),
        "thin": lambda: (g @ R.t(), B.t() @ g),
    }


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", default="128,512")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for dropout in (False, True):
            g = torch.Generator().manual_seed(0)
            layers = [layer_inputs(o, i, tokens, not dropout, g) for o, i in SHAPES[args.shapes]]
            layer_kernels = [kernels(t) for t in layers]
            variants = {
                "lora": partial(lora_step, dropout=dropout),
                "exact": partial(masked_step, straight_through=False),
                "straight_through": partial(masked_step, straight_through=True),
            }
            times = {name: [] for name in [*variants, *layer_kernels[0]]}
            for repeat in range(args.repeats + 1):  # the first repetition warms up and is dropped
                elapsed = {name: sum(timed(fn, t) for t in layers) for name, fn in variants.items()}
                for name in layer_kernels[0]:
                    elapsed[name] = sum(timed(k[name]) for k in layer_kernels)
                if repeat:
                    for name, value in elapsed.items():
                        times[name].append(value * 1000)
            ms = {name: statistics.median(v) for name, v in times.items()}
            kernel_names = list(layer_kernels[0])
            # LoRA outside its two weight-sized products: the low-rank path, autograd, the output gradient
            lora_rest = ms["lora"] - LORA_PRODUCTS * ms["product"]
            variant_rows = {}
            for variant in ("exact", "straight_through"):
                counts = COUNTS[(variant, dropout)]
                extra_products = (counts["products"] - LORA_PRODUCTS) * ms["product"]
                if variant == "exact":  # one of the products is G, timed on its own
                    extra_products += ms["gradient_product"] - ms["product"]
                elementwise = sum(counts[k] * ms[k] for k in ("unpack", "rebuild", "mask_multiply", "thin"))
                predicted = ms["lora"] + extra_products + elementwise
                variant_rows[variant] = {
                    "measured_ms": ms[variant],
                    "vs_lora": ms[variant] / ms["lora"],
                    "predicted_ms": predicted,
                    "products_floor_vs_lora": (ms["lora"] + extra_products) / ms["lora"],
                    "eager_floor_vs_lora": predicted / ms["lora"],
                    "elementwise_share_of_step": elementwise / ms[variant],
                    "counts": counts,
                }
            rows.append(
                {
                    "tokens": tokens,
                    "adapter_dropout": dropout,
                    "lora_ms": ms["lora"],
                    "lora_outside_products_ms": lora_rest,
                    "kernel_ms": {k: ms[k] for k in kernel_names},
                    "variants": variant_rows,
                }
            )
            print(
                f"{tokens} tokens, dropout {dropout}: LoRA {ms['lora']:.1f} ms; "
                + "; ".join(
                    f"{v} {r['measured_ms']:.1f} ms ({r['vs_lora']:.2f}x; products floor "
                    f"{r['products_floor_vs_lora']:.2f}x, eager {r['eager_floor_vs_lora']:.2f}x)"
                    for v, r in variant_rows.items()
                )
                + "; kernels "
                + ", ".join(f"{k} {ms[k]:.1f}" for k in kernel_names),
                flush=True,
            )
    path = write_result(
        f"element_step_breakdown_{args.shapes}",
        {"settings": vars(args), "rows": rows},
        args.out,
        table=table("median_ms", "lower"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
