"""Physical removal of pruned rows and columns: new, smaller Linear/Conv1D modules in a merged model."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D


def shrunk_module(module: torch.nn.Module, axis: str, index: torch.Tensor) -> torch.nn.Module:
    """A new Linear/Conv1D keeping only rows (output features) or columns (input features) ``index``."""
    weight = module.weight.data
    bias = module.bias.data if module.bias is not None else None
    if isinstance(module, Conv1D):  # weight is (in, out)
        if axis == "rows":
            new_w, new_b = weight[:, index], (bias[index] if bias is not None else None)
        else:
            new_w, new_b = weight[index, :], bias
        new = Conv1D(new_w.shape[1], new_w.shape[0])
    else:
        if axis == "rows":
            new_w, new_b = weight[index, :], (bias[index] if bias is not None else None)
        else:
            new_w, new_b = weight[:, index], bias
        new = torch.nn.Linear(new_w.shape[1], new_w.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.data = new_w.contiguous().clone()
    if bias is not None:
        new.bias.data = new_b.contiguous().clone()
    return new


def remove_pruned(model: torch.nn.Module, removals, progressbar: bool = True) -> None:
    """Replace every ``(module name, axis, kept index)`` of ``removals`` in ``model`` by its shrunk copy."""
    for name, axis, index in tqdm(
        removals, desc="Removing pruned structures", disable=not progressbar or not removals
    ):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        setattr(parent, child, shrunk_module(module, axis, index.to(module.weight.device)))
