"""Physical removal of pruned rows and columns: new, smaller Linear/Conv1D modules in a merged model."""

from __future__ import annotations

import math

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


def kept_blocks(blocks: torch.nn.ModuleList, index: torch.Tensor) -> torch.nn.ModuleList:
    """A module list of the blocks ``index`` (in order), each renumbered: every submodule's ``layer_idx`` (the
    key-value cache slot of attention in transformers) becomes the block's new position, as a model built with
    the smaller ``num_hidden_layers`` numbers them."""
    kept = torch.nn.ModuleList([blocks[i] for i in index.tolist()])
    for position, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    return kept


def norm_weight_kept(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight over the stream channels ``index`` only, scaled by ``sqrt(H / H')`` (with the norm's
    epsilon scaled by ``H / H'`` in the config, the norm of the kept channels then equals the masked norm over all
    ``H``; see :mod:`~peft_loraprune.pruning.stream`)."""
    return weight[index] * math.sqrt(weight.numel() / index.numel())


def _shrink_embedding(model: torch.nn.Module, module: torch.nn.Module, index: torch.Tensor) -> None:
    """Keep the embedding columns ``index``; every module sharing its weight (a tied output layer) follows."""
    old = module.weight
    new = torch.nn.Parameter(old.data[:, index].contiguous().clone(), requires_grad=old.requires_grad)
    for other in model.modules():
        if getattr(other, "weight", None) is old:
            other.weight = new
            if isinstance(other, torch.nn.Linear):
                other.in_features = new.shape[1]
    module.embedding_dim = new.shape[1]


def remove_pruned(model: torch.nn.Module, removals, progressbar: bool = True) -> None:
    """Carry out ``removals`` in ``model``: every ``(module name, axis, kept index)`` with axis "rows" or "cols"
    replaces a Linear/Conv1D by its shrunk copy; "norm" keeps entries of an RMSNorm's weight
    (:func:`norm_weight_kept`), "embedding" columns of an embedding (a tied output layer follows); "blocks" replaces
    a module list of blocks by the blocks kept (done last, so that module names of the other removals still hold)."""
    ordered = sorted(removals, key=lambda removal: removal[1] == "blocks")
    for name, axis, index in tqdm(ordered, desc="Removing pruned structures", disable=not progressbar or not removals):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if axis == "blocks":
            setattr(parent, child, kept_blocks(module, index))
        elif axis == "norm":
            weight = module.weight
            module.weight = torch.nn.Parameter(
                norm_weight_kept(weight.data, index.to(weight.device)), requires_grad=weight.requires_grad
            )
        elif axis == "embedding":
            _shrink_embedding(model, module, index.to(module.weight.device))
        else:
            setattr(parent, child, shrunk_module(module, axis, index.to(module.weight.device)))
