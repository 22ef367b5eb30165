"""Blocked vs whole-weight passes of the element-masked product (:mod:`peft_loraprune.kernels.masked_linear`).

The masked product builds, in each pass, temporaries the size of the weight (mask values, masked weight, masked
gradient). Walking the weight in blocks keeps each block's temporaries in cache from the pass that builds them to
the product that reads them, but every block re-reads the activations. This benchmark times one layer's forward +
backward (the 0.5B model's MLP and attention shapes, float32, 50% random mask, rank 8) with one block per weight
(the behaviour before blocking) and with fixed block sizes, at several token counts, all in one process and
interleaved (each repetition runs every variant once), and reports each variant's median time against one block
measured in the same repetitions. It is what chose :func:`~peft_loraprune.kernels.masked_linear.block_elements`.

    python benchmarks/masked_blocks.py --tokens 128,512 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import table, write_result

import peft_loraprune.kernels.masked_linear as masked_linear
from peft_loraprune.kernels.mask_packing import pack_bits

SHAPES = {"llama-0.5b": [(4096, 1024), (1024, 4096), (1024, 1024)], "tiny": [(64, 48), (48, 64)]}
WHOLE = 1 << 40  # one block per weight


def layer_inputs(d_out: int, d_in: int, tokens: int, shared: bool, generator: torch.Generator) -> dict:
    make = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    x = make(1, tokens, d_in).requires_grad_(True)
    return dict(
        x=x,
        x_lora=x if shared else make(1, tokens, d_in).requires_grad_(True),
        weight=make(d_out, d_in),
        lora_B=make(d_out, 8).requires_grad_(True),
        lora_R=make(8, d_in).requires_grad_(True),
        packed=pack_bits(torch.rand(d_out, d_in, generator=generator) > 0.5),
        n_cols=d_in,
    )


def one_pass(t: dict, straight_through: bool) -> float:
    start = time.perf_counter()
    y = masked_linear.element_masked_linear(
        t["x"], t["x_lora"], t["weight"], None, t["lora_B"], t["lora_R"], 2.0, t["packed"], t["n_cols"],
        straight_through=straight_through,
    )  # fmt: skip
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", default="128,512")
    parser.add_argument("--blocks", default="262144,1048576,4194304", help="fixed block sizes (weights) to try")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    defaults = (masked_linear.MIN_BLOCK_ELEMENTS, masked_linear.ELEMENTS_PER_TOKEN)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for shared in (True, False):
            for straight_through in (False, True):
                g = torch.Generator().manual_seed(0)
                layers = [layer_inputs(o, i, tokens, shared, g) for o, i in SHAPES[args.shapes]]
                masked_linear.MIN_BLOCK_ELEMENTS, masked_linear.ELEMENTS_PER_TOKEN = defaults
                chosen = masked_linear.block_elements(tokens)  # the package's rule (the loop below overrides it)
                variants = {"one block": WHOLE, **{f"{b} weights": b for b in blocks}, "block_elements": chosen}
                times = {name: [] for name in variants}
                for repeat in range(args.repeats + 1):  # the first repetition warms up and is dropped
                    for name, size in variants.items():
                        masked_linear.MIN_BLOCK_ELEMENTS, masked_linear.ELEMENTS_PER_TOKEN = size, 0
                        elapsed = sum(one_pass(t, straight_through) for t in layers)
                        if repeat:
                            times[name].append(elapsed)
                medians = {name: statistics.median(v) for name, v in times.items()}
                row = {
                    "tokens": tokens,
                    "adapter_dropout": not shared,
                    "straight_through": straight_through,
                    "block_elements": chosen,
                    "median_ms": {k: v * 1000 for k, v in medians.items()},
                    "time_vs_one_block": {k: v / medians["one block"] for k, v in medians.items()},
                }
                rows.append(row)
                print(tokens, "dropout" if not shared else "shared", "ste" if straight_through else "exact",
                      {k: round(v, 3) for k, v in row["time_vs_one_block"].items()}, flush=True)  # fmt: skip
    path = write_result(
        f"masked_blocks_{args.shapes}",
        {"settings": vars(args), "rows": rows},
        args.out,
        table=table("median_ms", "lower"),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
