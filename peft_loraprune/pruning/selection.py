"""Mask selection, pure functions: which units to keep given their scores and what is already pruned.

Every function only chooses among units that are still kept, so masks only ever lose entries. Ties are broken
by position (stable sort), so identical inputs give identical masks on every process.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Optional

import torch


def prune_count(n_units: int, sparsity: float, keep_at_least_one: bool = True) -> int:
    """How many of ``n_units`` a sparsity removes: the nearest integer to ``sparsity · n``, halves rounded down
    (50% of 3 heads removes 1, not 2), leaving at least one unit when asked."""
    n = max(0, math.ceil(sparsity * n_units - 0.5))
    return min(n, n_units - 1) if keep_at_least_one and n_units > 0 else min(n, n_units)


def keep_top(scores: torch.Tensor, kept: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` best of the currently kept entries of a 1-D score vector.

    A selection, not a sort: the ``n_keep``-th largest kept score (the threshold) is found, everything above it
    is kept, and among entries equal to it the earliest positions fill the rest, which is exactly what a stable
    descending sort would keep. Long vectors (unstructured mask rewrites call this once per layer, on millions of
    scores) find the threshold with :func:`_threshold_by_band`; short ones with one ``kthvalue``. Scores may be
    infinite but not NaN (the engine skips non-finite importance updates).
    """
    n_kept = int(torch.count_nonzero(kept))
    if n_keep >= n_kept:
        return kept.clone()
    if n_keep <= 0:
        return torch.zeros_like(kept)
    s = scores.float()
    if s.numel() >= BAND_MIN_ENTRIES:
        found = _threshold_by_band(s, kept, n_kept, n_keep)
        if found is not None:
            return found
    s = s.masked_fill(~kept, float("-inf"))
    threshold = torch.kthvalue(s, s.numel() - n_keep + 1).values  # the n_keep-th largest, a kept entry's score
    new = s > threshold
    ties = torch.nonzero((s == threshold) & kept).flatten()  # a -inf threshold must not revive pruned entries
    new[ties[: n_keep - int(torch.count_nonzero(new))]] = True
    return new


#: Vectors at least this long are selected through a sampled band (:func:`_threshold_by_band`).
BAND_MIN_ENTRIES = 1 << 16
#: Scores drawn (with a fixed seed, so every process draws the same) to place the band.
BAND_SAMPLE = 1 << 16


@functools.lru_cache(maxsize=64)
def band_sample_positions(n: int) -> torch.Tensor:
    """The positions :func:`_threshold_by_band` samples in a vector of ``n`` scores (fixed seed, on the CPU;
    drawn once per length: a model has a handful of layer shapes). Read-only: callers index with it."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, n, (BAND_SAMPLE,), generator=generator)


def _threshold_by_band(s: torch.Tensor, kept: torch.Tensor, n_kept: int, n_keep: int) -> Optional[torch.Tensor]:
    """:func:`keep_top` of a long vector in a few elementwise passes instead of a full ``kthvalue``.

    A sample of the kept scores brackets the threshold (the ``n_keep``-th largest kept score) between two of its
    order statistics, four standard deviations of the sample rank either side. One pass counts the kept scores
    above the bracket, another lists the kept scores inside it (about 2% of them), and the threshold is the
    right order statistic of that short list; entries above it are kept, ties fill the rest in position order.
    Exact whatever the sample: when the bracket misses the threshold it returns None and :func:`keep_top` falls
    back to the full ``kthvalue``. The sampled positions are the same at every call (drawn on the CPU with a fixed
    seed, so every process and device agrees), so a miss is a property of the input, not luck: for scores whose
    order is unrelated to those positions, a four-deviation bracket misses with probability below 1e-4; scores
    arranged against the sample fall back every time, which costs time, never exactness. Measured on a 2816 x 1024
    layer (CPU): 7 ms against 45 ms for the ``masked_fill`` + ``kthvalue`` path.
    """
    n = s.numel()
    idx = band_sample_positions(n).to(s.device)
    sample = s[idx][kept[idx]]
    m = sample.numel()
    if m < 1024:
        return None
    fraction = n_keep / n_kept  # of the kept scores, the share that stays
    rank = fraction * m  # the threshold's expected descending rank in the sample
    margin = 4.0 * math.sqrt(m * fraction * (1.0 - fraction)) + 2.0
    upper_rank, lower_rank = int(rank - margin), int(math.ceil(rank + margin))
    # descending rank q (1-based) is ascending rank m - q + 1
    upper = torch.kthvalue(sample, m - upper_rank + 1).values if upper_rank >= 1 else None
    lower = torch.kthvalue(sample, m - lower_rank + 1).values if lower_rank <= m else None
    above = kept & (s > upper) if upper is not None else torch.zeros_like(kept)
    n_above = int(torch.count_nonzero(above))
    band = kept & ~above
    if lower is not None:
        band &= s >= lower
    band_index = torch.nonzero(band).flatten()  # ascending positions
    band_scores = s[band_index]
    need = n_keep - n_above  # how many of the band stay
    if not 0 < need <= band_scores.numel():
        return None
    threshold = torch.kthvalue(band_scores, band_scores.numel() - need + 1).values
    new = above
    greater = band_index[band_scores > threshold]
    new[greater] = True
    ties = band_index[band_scores == threshold]
    new[ties[: need - greater.numel()]] = True
    return new


#: Rows up to this length are ranked by pairwise comparison (m·(m-1)/2 elementwise passes) instead of ``topk``.
#: Measured on a 4096 x 1024 score matrix in 2:4 blocks (CPU): 12 ms against ``topk``'s 29 ms (and, with pruned
#: entries handled by boolean operations, 4.4 against 7.3 ms on 2816 x 1024).
SHORT_ROW = 8


def keep_top_per_row(scores: torch.Tensor, kept: torch.Tensor, n_keep: int) -> torch.Tensor:
    """:func:`keep_top` along the last dimension (partitions, N:M blocks).

    Short rows (N:M blocks, at most :data:`SHORT_ROW` entries) go through :func:`_keep_top_short_rows`, which
    breaks ties by position like the rest of this module; longer rows use ``topk`` (about twice as fast as a full
    sort), whose ties are deterministic but not ordered by position.
    """
    n_keep = max(0, min(n_keep, scores.shape[-1]))
    if scores.shape[-1] <= SHORT_ROW:
        return _keep_top_short_rows(scores.float(), kept, n_keep)
    # kept -inf scores are lifted above the pruned entries' fill, so topk never prefers a pruned entry
    s = scores.float().clamp_min(torch.finfo(torch.float32).min).masked_fill(~kept, float("-inf"))
    idx = s.topk(n_keep, dim=-1, sorted=False).indices
    new = torch.zeros_like(kept)
    new.scatter_(-1, idx, True)
    return new & kept


def _keep_top_short_rows(s: torch.Tensor, kept: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` largest still-kept entries of every short row of ``s``, ties to the earlier position.

    Each entry's rank is the number of entries of its row ahead of it (kept, and larger or equal and earlier, or
    ahead of a pruned one); a kept entry stays when its rank is below ``n_keep``. Every pair of positions is
    compared once, on whole (strided) columns, so the cost is a few elementwise passes over the scores rather
    than one small ``topk`` per row, and pruned entries are handled with boolean operations instead of filling
    the scores with ``-inf`` (a float-and-bool pass that was a third of an N:M rewrite on the CPU).
    """
    m = s.shape[-1]
    scores = s.unbind(-1)
    kept_cols = [k.contiguous() for k in kept.unbind(-1)]
    pruned_cols = [~k for k in kept_cols]
    ranks = [torch.zeros(kept_cols[0].shape, dtype=torch.uint8, device=s.device) for _ in range(m)]
    for later in range(m):
        for earlier in range(later):
            earlier_ahead = torch.ge(scores[earlier], scores[later])
            earlier_ahead |= pruned_cols[later]
            earlier_ahead &= kept_cols[earlier]
            ranks[later] += earlier_ahead.view(torch.uint8)
            ranks[earlier] += (~earlier_ahead).view(torch.uint8)
    return torch.stack([torch.lt(rank, n_keep).logical_and_(k) for rank, k in zip(ranks, kept_cols)], dim=-1)


def n_m_mask(scores: torch.Tensor, kept: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """In every run of ``m`` consecutive entries of each row, keep the ``n_keep`` best still-kept ones.

    A trailing run shorter than ``m`` (when the row length is not a multiple of ``m``) keeps at most ``n_keep``.
    """
    rows, cols = scores.shape
    pad = (-cols) % m
    if pad:
        scores = torch.nn.functional.pad(scores.float(), (0, pad), value=float("-inf"))
        kept = torch.nn.functional.pad(kept, (0, pad), value=False)
    new = keep_top_per_row(scores.reshape(rows, -1, m), kept.reshape(rows, -1, m), n_keep)
    return new.reshape(rows, -1)[:, :cols]


def keep_top_global(
    scores: list[torch.Tensor], kept: list[torch.Tensor], n_keep: int, min_keep_each: int = 1
) -> list[torch.Tensor]:
    """Keep the ``n_keep`` best entries across several 1-D score vectors, at least ``min_keep_each`` in each.

    The ``min_keep_each`` best kept entries of every vector are reserved first; the rest of the budget goes to
    the best remaining entries overall.
    """
    reserved = [keep_top(s, k, min(min_keep_each, int(torch.count_nonzero(k)))) for s, k in zip(scores, kept)]
    n_reserved = sum(int(torch.count_nonzero(r)) for r in reserved)
    remaining = max(0, n_keep - n_reserved)
    flat_scores = torch.cat([s.float().flatten().cpu() for s in scores])
    flat_avail = torch.cat([(k & ~r).flatten().cpu() for k, r in zip(kept, reserved)])
    chosen = keep_top(flat_scores, flat_avail, remaining)
    out, offset = [], 0
    for r in reserved:
        n = r.numel()
        out.append(r | chosen[offset : offset + n].reshape(r.shape).to(r.device))
        offset += n
    return out


def removal_loss_curve(scores: torch.Tensor, kept: torch.Tensor, partitions: int = 1) -> torch.Tensor:
    """The estimated cost of removing ``n`` units from every partition of one block, for ``n = 0 .. per - 1``.

    ``scores`` (``partitions * per`` entries, non-negative) estimate what removing each unit costs; units already
    pruned cost nothing and go first, then the cheapest kept ones. With several partitions (the KV groups of
    ``head_grouping="query_head"``) the ``n``-th removal takes the ``n``-th cheapest unit of every partition, as the
    local selection does. Entry ``n`` of the result is the summed cost of the first ``n`` removals; the last unit of
    each partition is never removed, so the curve has ``per`` entries.
    """
    s = scores.float().reshape(partitions, -1).masked_fill(~kept.reshape(partitions, -1), 0.0)
    order = torch.where(kept.reshape(partitions, -1), s, torch.full_like(s, -1.0))  # pruned units first
    ranked = s.gather(1, order.argsort(dim=1, stable=True))
    per_removal = ranked.sum(dim=0)[:-1]
    return torch.cat([per_removal.new_zeros(1), per_removal.cumsum(0)])


def split_weight_budget(
    curves: list[torch.Tensor], unit_weights: list[int], min_counts: list[int], budget: float
) -> list[int]:
    """How many units of each kind every block loses so that about ``budget`` weights go, at the least cost.

    Kind ``k`` removes ``n_k`` units per partition from every block; one such removal takes ``unit_weights[k]``
    weights of a block (all partitions together) and ``curves[k][n]`` is the summed estimated cost of removing
    ``n`` (:func:`removal_loss_curve`, added over blocks). At least ``min_counts[k]`` are removed (units already
    pruned stay pruned) and at most ``len(curves[k]) - 1``. The kind with the smallest units takes the rounding:
    every count of the other kinds is tried, the finest kind's count is the nearest integer to what the budget
    leaves (halves rounded down), and the cheapest feasible combination wins (ties: the first tried, fewer of the
    coarse units). When no combination fits the bounds, the one nearest the budget wins.
    """
    return best_weight_split(curves, unit_weights, min_counts, budget)[2]


def best_weight_split(
    curves: list[torch.Tensor], unit_weights: list[int], min_counts: list[int], budget: float
) -> tuple[float, float, list[int]]:
    """:func:`split_weight_budget` with how good its answer is: ``(distance, cost, counts)``, where ``distance`` is 0
    when the finest kind could take the rounding, else how many weights the split misses the budget by, and ``cost``
    the summed estimate of the removals."""
    if not (len(curves) == len(unit_weights) == len(min_counts)) or not curves:
        raise ValueError("split_weight_budget needs one curve, unit weight and minimum count per kind")
    finest = min(range(len(curves)), key=lambda k: unit_weights[k])
    others = [k for k in range(len(curves)) if k != finest]
    best = None  # (infeasible distance, cost, counts)
    for combo in itertools.product(*(range(min_counts[k], len(curves[k])) for k in others)):
        counts = dict(zip(others, combo))
        left = budget - sum(n * unit_weights[k] for k, n in counts.items())
        wanted = math.ceil(left / unit_weights[finest] - 0.5)
        n_fine = min(max(wanted, min_counts[finest]), len(curves[finest]) - 1)
        counts[finest] = n_fine
        removed = sum(n * unit_weights[k] for k, n in counts.items())
        distance = 0.0 if n_fine == wanted else abs(removed - budget)
        cost = sum(float(curves[k][n]) for k, n in counts.items())
        if best is None or (distance, cost) < best[:2]:
            best = (distance, cost, [counts[k] for k in range(len(curves))])
    return best


def split_with_blocks(
    block_curve: torch.Tensor,
    block_weights: int,
    min_blocks: int,
    per_block_curves: list[list[torch.Tensor]],
    unit_weights: list[int],
    per_block_min_counts: list[list[int]],
    budget: float,
) -> tuple[int, list[int]]:
    """How many whole blocks go, and how many units of each kind every remaining block loses, so that about
    ``budget`` weights go at the least estimated cost.

    Blocks go in a fixed order (closed ones first, then the cheapest), so ``block_curve[k]`` is the summed cost of
    removing the first ``k`` (:func:`removal_loss_curve` of the block scores, ``n`` entries for ``n`` blocks), and
    entry ``b`` of ``per_block_curves`` / ``per_block_min_counts`` is the ``b``-th block *in that order*: its own
    removal curve and minimum count of each kind (empty lists when only blocks are pruned). ``block_weights``: the
    weights one block holds; ``min_blocks``: blocks already closed. For every number ``k`` of removed blocks (from
    ``min_blocks`` to all but one) the remaining blocks share what the budget leaves by :func:`best_weight_split`
    over their summed curves; with blocks alone, ``k`` is the nearest count to the budget (halves rounded down). The
    cheapest ``k`` that meets the budget within the finest unit's rounding wins, else the nearest. Returns
    ``(k, counts)``.
    """
    splitter = BlockSplitter(
        block_curve, block_weights, min_blocks, per_block_curves, unit_weights, per_block_min_counts
    )
    return splitter.best(budget)[2:]


class BlockSplitter:
    """:func:`split_with_blocks` for many budgets over the same curves: the curves summed over the blocks that
    remain when the first ``k`` go are computed once (suffix sums), so each budget costs one
    :func:`best_weight_split` per ``k``. ``max_blocks``: the most blocks that may go (0 when whole blocks are not
    pruned; default all but one)."""

    def __init__(
        self,
        block_curve: torch.Tensor,
        block_weights: int,
        min_blocks: int,
        per_block_curves: list[list[torch.Tensor]],
        unit_weights: list[int],
        per_block_min_counts: list[list[int]],
        max_blocks: Optional[int] = None,
    ) -> None:
        self.n = int(block_curve.numel())
        self.block_curve = block_curve
        self.block_weights = block_weights
        self.unit_weights = unit_weights
        self.ks = range(min(min_blocks, self.n - 1), (self.n - 1 if max_blocks is None else max_blocks) + 1)
        self.suffix_curves, self.suffix_mins = [], []
        for kind in range(len(unit_weights)):
            stacked = torch.stack([per_block_curves[b][kind].float() for b in range(self.n)])
            self.suffix_curves.append(stacked.flip(0).cumsum(0).flip(0))  # row k: summed over blocks k..n-1
            mins = torch.tensor([per_block_min_counts[b][kind] for b in range(self.n)])
            self.suffix_mins.append(mins.flip(0).cummax(0).values.flip(0).tolist())

    def best(self, budget: float) -> tuple[float, float, int, list[int]]:
        """``(distance, cost, k, counts)`` of the best split of ``budget`` (see :func:`split_with_blocks`)."""
        kinds = range(len(self.unit_weights))
        wanted_blocks = math.ceil(budget / self.block_weights - 0.5)
        best = None
        for k in self.ks:
            left = budget - k * self.block_weights
            if kinds:
                curves = [self.suffix_curves[kind][k] for kind in kinds]
                mins = [self.suffix_mins[kind][k] for kind in kinds]
                distance, cost, counts = best_weight_split(curves, self.unit_weights, mins, left / (self.n - k))
                distance *= self.n - k
            else:
                distance, cost, counts = (0.0 if k == wanted_blocks else abs(left)), 0.0, []
            candidate = (distance, cost + float(self.block_curve[k]), k, counts)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return best


def split_with_stream(
    stream_curve: torch.Tensor,
    kept_options: list[int],
    stream_size: int,
    stream_only_weights: int,
    blocks: BlockSplitter,
    fraction: float,
) -> tuple[int, int, list[int]]:
    """How many channels of the residual stream stay, how many blocks go, and how many units of each kind every
    remaining block loses, so that about ``fraction`` of the weights go at the least estimated cost.

    Every weight of a block, and every weight of the embedding (and untied output layer: ``stream_only_weights``
    at the full width), has one stream dimension: keeping ``H'`` of ``stream_size`` channels keeps ``H'/H`` of all
    of them. So for each candidate ``H'`` of ``kept_options`` (multiples of the heads kept, at most the channels
    kept now) the weights that may stay fix what the blocks must lose, counted at the full width, and ``blocks``
    (:class:`BlockSplitter`) splits that; ``stream_curve[m]`` is the summed cost of removing ``m`` channels
    (:func:`removal_loss_curve`). The cheapest split that meets the budget within the finest unit's rounding wins,
    else the nearest. Returns ``(H', k, counts)``."""
    total = blocks.n * blocks.block_weights + stream_only_weights
    may_stay = (1.0 - fraction) * total
    best = None
    for kept in kept_options:
        scale = kept / stream_size
        block_budget = blocks.n * blocks.block_weights - (may_stay - stream_only_weights * scale) / scale
        distance, cost, k, counts = blocks.best(block_budget)
        candidate = (distance * scale, cost + float(stream_curve[stream_size - kept]), kept, k, counts)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return best[2], best[3], best[4]
