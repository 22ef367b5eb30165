"""What the pruning engine needs from ``torch.distributed`` so that every rank computes the same masks.

Under DDP (and FSDP, DeepSpeed) every rank runs the engine on its own copy of the adapter. The "lora" and
"magnitude" criteria read what every rank already shares (adapter gradients after the framework averaged them,
weights), and the mask selection is deterministic, so every rank arrives at the same masks. What is rank-local is
made global here: the accumulators that criteria fill from each rank's own activations ("grad": full-weight
gradients; "activation": ``Σ x·∂L/∂x`` per consumer column; "wanda": ``Σ x²`` per input feature), averaged over
ranks like DDP averages ``p.grad``, and the decision to skip a step whose gradients are not finite (all ranks skip
if any rank would). With a single process these are no-ops.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters and their gradients are ``DTensor`` shards
between forward passes. The importance of a layer needs its whole weight, factors and factor gradients, so the
engine gathers them one layer at a time (:func:`full_tensor`, an all-gather: transient memory of one layer's
weight) and every rank computes the same scores; masks are buffers, which FSDP does not shard.

Every rank must call the engine's ``update_importance`` (the Trainer callback does); a rank that skips the call
would leave the others waiting in the collective.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes of the default group, 1 without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over all ranks, in place (what DDP does to gradients)."""
    n = world_size()
    if n == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from its shards for an FSDP2 ``DTensor``, else ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (no communication), else ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t
