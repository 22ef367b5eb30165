"""Pure tensor maths, no model state: the masked products, mask packing, the block workspace, N:M patterns,
the two adaptation forms, importance formulas, group-axis operations and quantized-weight formats.

Nothing here imports another part of the package; every layer above may import it.
"""
