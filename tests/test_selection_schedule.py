"""Pure maths: mask selection and the schedule, against hand-derived values."""

import pytest
import torch

from peft_loraprune.kernels.group_ops import expand_groups, groups_kept, sum_over_groups
from peft_loraprune.pruning.schedule import PruningSchedule
from peft_loraprune.pruning.selection import (
    keep_top,
    keep_top_global,
    n_m_mask,
    prune_count,
    removal_loss_curve,
    split_weight_budget,
)


def test_keep_top_only_chooses_among_kept():
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0])
    kept = torch.tensor([False, True, True, True, True])
    assert keep_top(scores, kept, 2).tolist() == [False, False, True, True, False]
    # asking for more than is kept never regrows
    assert keep_top(scores, kept, 5).tolist() == kept.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_keep_top_equals_a_stable_sort_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = 5000
    scores = torch.randint(0, 40, (n,), generator=g).float()  # few distinct values: ties everywhere
    kept = torch.rand(n, generator=g) > 0.3
    for n_keep in (0, 1, 17, n // 4, int(kept.sum()) - 1, int(kept.sum()), n):
        # reference: stable descending sort of the kept entries (pruned ones last), first n_keep positions
        order = sorted(range(n), key=lambda i: (not kept[i].item(), -scores[i].item(), i))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[[i for i in order[:n_keep] if kept[i]]] = True
        assert torch.equal(keep_top(scores, kept, n_keep), expected), n_keep


def _stable_top(scores: torch.Tensor, kept: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Reference: a stable descending sort of the kept scores (pruned entries last), first ``n_keep`` positions."""
    by_score = torch.sort(scores.double(), descending=True, stable=True).indices
    # then kept entries first, stably: kept ones in score order (ties by position), pruned ones after
    order = by_score[torch.sort((~kept[by_score]).to(torch.uint8), stable=True).indices]
    expected = torch.zeros_like(kept)
    expected[order[: min(n_keep, int(kept.sum()))]] = True
    return expected


@pytest.mark.parametrize("distinct", [None, 40, 3])
def test_keep_top_on_long_vectors_equals_a_stable_sort(monkeypatch, distinct):
    """Long vectors (a layer's worth of scores) go through the sampled band; the result is the stable sort's,
    with continuous scores, with ties everywhere (40 values) and with huge tie groups (3 values), and the band
    (not the fallback) produced it for continuous scores."""
    from peft_loraprune import selection

    used_band = []
    band = selection._threshold_by_band
    monkeypatch.setattr(selection, "_threshold_by_band", lambda *a: used_band.append(band(*a)) or used_band[-1])
    g = torch.Generator().manual_seed(1)
    n = 3 * selection.BAND_MIN_ENTRIES
    scores = torch.rand(n, generator=g) if distinct is None else torch.randint(0, distinct, (n,), generator=g).float()
    kept = torch.rand(n, generator=g) > 0.3
    n_kept = int(kept.sum())
    for n_keep in (1, 17, n_kept // 3, n_kept // 2, n_kept - 1):
        assert torch.equal(selection.keep_top(scores, kept, n_keep), _stable_top(scores, kept, n_keep)), n_keep
    assert used_band and all(r is not None for r in used_band)


def test_keep_top_when_the_band_misses_the_threshold():
    """Scores arranged against the fixed sample (every sampled position scores 0, every other 1): the bracket
    cannot hold the threshold, the band gives up and the full selection answers as the stable sort does."""
    from peft_loraprune import selection

    n = 3 * selection.BAND_MIN_ENTRIES
    scores = torch.ones(n)
    scores[selection.band_sample_positions(n)] = 0.0
    kept = torch.ones(n, dtype=torch.bool)
    kept[::5] = False
    n_kept = int(kept.sum())
    assert selection._threshold_by_band(scores, kept, n_kept, n_kept // 2) is None
    assert torch.equal(selection.keep_top(scores, kept, n_kept // 2), _stable_top(scores, kept, n_kept // 2))


@pytest.mark.parametrize("n", [50, 3 * (1 << 16)], ids=["short", "long"])
def test_keep_top_with_infinite_scores_never_revives_pruned_entries(n):
    """Kept entries scoring -inf tie with the fill of pruned ones: the earliest kept -inf entries are chosen,
    never a pruned one."""
    g = torch.Generator().manual_seed(4)
    scores = torch.where(torch.rand(n, generator=g) > 0.5, float("-inf"), torch.rand(n, generator=g))
    scores[:3] = float("inf")
    kept = torch.rand(n, generator=g) > 0.3
    finite_kept = int((kept & (scores > float("-inf"))).sum())
    for n_keep in (1, finite_kept, finite_kept + 2):
        new = keep_top(scores, kept, n_keep)
        assert int(new.sum()) == n_keep and not torch.any(new & ~kept)
        assert torch.equal(new, _stable_top(scores, kept, n_keep)), n_keep


def test_keep_top_per_row_on_long_rows_prefers_kept_infinite_scores_to_pruned_entries():
    from peft_loraprune.pruning.selection import keep_top_per_row

    scores = torch.tensor([[float("-inf")] * 12])
    kept = torch.tensor([[False, True] * 6])
    assert keep_top_per_row(scores, kept, 3).sum() == 3
    assert not torch.any(keep_top_per_row(scores, kept, 3) & ~kept)


def test_keep_top_falls_back_to_the_full_selection_when_the_sample_is_too_thin():
    """Few kept entries in a long vector: the sample cannot place a band, and the full selection gives the same
    answer as the stable sort."""
    from peft_loraprune import selection

    g = torch.Generator().manual_seed(2)
    n = 2 * selection.BAND_MIN_ENTRIES
    scores = torch.rand(n, generator=g)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.randperm(n, generator=g)[:900]] = True
    assert selection._threshold_by_band(scores, kept, 900, 400) is None
    assert torch.equal(selection.keep_top(scores, kept, 400), _stable_top(scores, kept, 400))


def test_keep_top_ties_break_by_position():
    scores = torch.zeros(6)
    kept = torch.ones(6, dtype=torch.bool)
    assert keep_top(scores, kept, 2).tolist() == [True, True, False, False, False, False]


def test_n_m_mask_pattern_on_every_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 13, generator=g)
    kept = torch.ones(7, 13, dtype=torch.bool)
    mask = n_m_mask(scores, kept, 2, 4)
    full = mask[:, :12].reshape(7, 3, 4)
    assert torch.all(full.sum(-1) == 2)
    assert torch.all(mask[:, 12:].sum(-1) <= 2)
    # the kept two are the two largest of each run
    top2 = scores[:, :12].reshape(7, 3, 4).topk(2, dim=-1).indices
    assert torch.all(full.gather(-1, top2))
    # from 3:4 to 2:4 only removes
    m3 = n_m_mask(scores, kept, 3, 4)
    m2 = n_m_mask(scores, m3, 2, 4)
    assert torch.all(m2 <= m3) and torch.all(m2[:, :12].reshape(7, 3, 4).sum(-1) == 2)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_keep_top_per_row_matches_a_stable_sort_with_ties_and_pruned_entries(m):
    """Short rows (N:M blocks) are ranked by pairwise comparison, long rows by topk: both keep the n best of the
    still-kept entries; short rows break ties by position, as a stable descending sort does."""
    from peft_loraprune.pruning.selection import SHORT_ROW, keep_top_per_row

    g = torch.Generator().manual_seed(m)
    scores = torch.randint(0, 4, (50, 7, m), generator=g).float()  # few distinct values: many ties
    kept = torch.rand(50, 7, m, generator=g) > 0.25
    for n_keep in range(m + 1):
        new = keep_top_per_row(scores, kept, n_keep)
        assert torch.all(new <= kept)
        assert torch.equal(new.sum(-1), torch.clamp(kept.sum(-1), max=n_keep))
        # nothing kept scores below something dropped in the same row
        s = scores.masked_fill(~kept, float("nan"))
        lowest_kept = s.masked_fill(~new, float("inf")).amin(-1)
        highest_dropped = s.masked_fill(new | ~kept, float("-inf")).amax(-1)
        assert torch.all(lowest_kept >= highest_dropped)
        if m <= SHORT_ROW:
            order = scores.masked_fill(~kept, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
            expected = torch.zeros_like(kept).scatter_(-1, order[..., :n_keep], True) & kept
            assert torch.equal(new, expected)


def test_global_selection_keeps_at_least_one_each_and_the_exact_budget():
    a = torch.tensor([0.1, 0.2, 0.3])
    b = torch.tensor([5.0, 6.0, 7.0, 8.0])
    out = keep_top_global([a, b], [torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)], 3)
    assert out[0].tolist() == [False, False, True]  # reserved best of a
    assert out[1].tolist() == [False, False, True, True]
    assert sum(int(o.sum()) for o in out) == 3


def test_prune_count_rounds_and_keeps_one():
    assert prune_count(10, 0.5) == 5 and prune_count(2, 0.99) == 1
    assert prune_count(3, 0.5) == 1 and prune_count(3, 0.6) == 2 and prune_count(5, 0.5) == 2  # halves round down
    assert prune_count(2, 0.99, keep_at_least_one=False) == 2


def test_group_ops_with_fused_layout():
    # GPT-2 c_attn rows: (3, heads=2, head_dim=2); group 1 is rows 2,3 / 6,7 / 10,11
    v = torch.arange(12.0)
    assert sum_over_groups(v, (3, 2, 2)).tolist() == [0 + 1 + 4 + 5 + 8 + 9, 2 + 3 + 6 + 7 + 10 + 11]
    mask = expand_groups(torch.tensor([True, False]), (3, 2, 2))
    assert mask.nonzero().flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert groups_kept(mask, (3, 2, 2)).tolist() == [True, False]
    with pytest.raises(ValueError, match="does not fit"):
        sum_over_groups(torch.ones(10), (3, 2, 2))


def test_cubic_schedule_values():
    s = PruningSchedule(total_steps=100, target=0.5, initial=0.0, start_fraction=0.1, end_fraction=0.9, interval=10)
    assert (s.start, s.end) == (10, 90)
    assert s.sparsity_at(9) == 0.0
    assert s.sparsity_at(10) == 0.0
    assert s.sparsity_at(50) == pytest.approx(0.5 - 0.5 * 0.5**3)
    assert s.sparsity_at(90) == 0.5 and s.sparsity_at(100) == 0.5
    assert s.pruning_steps() == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    uneven = PruningSchedule(total_steps=100, target=0.5, interval=7)
    assert uneven.pruning_steps()[-1] == 90  # the last rewrite lands on the target even off the interval grid
    values = [uneven.sparsity_at(t) for t in range(101)]
    assert values == sorted(values)  # monotone


def test_one_shot_and_tiny_runs():
    s = PruningSchedule(total_steps=50, target=0.3, start_fraction=0.2, one_shot=True)
    assert s.pruning_steps() == [10] and s.sparsity_at(10) == 0.3
    tiny = PruningSchedule(total_steps=1, target=0.4)
    assert tiny.pruning_steps() == [1] and tiny.sparsity_at(1) == 0.4
    with pytest.raises(ValueError, match="total_steps"):
        PruningSchedule(total_steps=0, target=0.5)


def test_removal_loss_curve_takes_pruned_units_first_then_the_cheapest_of_every_partition():
    # two partitions of three units; unit 1 of the first partition is already pruned (its score is ignored)
    scores = torch.tensor([5.0, 9.0, 1.0, 2.0, 7.0, 3.0])
    kept = torch.tensor([True, False, True, True, True, True])
    curve = removal_loss_curve(scores, kept, partitions=2)
    # removal 1: pruned unit (0) + 2.0; removal 2: 1.0 + 3.0; the last unit of each partition is never removed
    assert curve.tolist() == [0.0, 2.0, 6.0]
    assert removal_loss_curve(torch.tensor([4.0, 1.0, 3.0]), torch.ones(3, dtype=torch.bool)).tolist() == [0, 1, 4]


def _brute_force_split(curves, weights, mins, budget):
    """Every combination of counts, nearest the budget in whole finest units, then cheapest."""
    import itertools

    finest = min(range(len(weights)), key=lambda k: weights[k])
    combos = list(itertools.product(*(range(m, len(c)) for c, m in zip(curves, mins))))

    def removed(combo):
        return sum(n * w for n, w in zip(combo, weights))

    nearest = min(abs(removed(c) - budget) for c in combos)
    fits = [c for c in combos if abs(removed(c) - budget) <= weights[finest] / 2 + 1e-9]
    pool = fits or [c for c in combos if abs(removed(c) - budget) == nearest]
    return min(pool, key=lambda c: sum(float(curve[n]) for curve, n in zip(curves, c)))


@pytest.mark.parametrize("seed", range(20))
def test_split_weight_budget_is_the_cheapest_split_within_half_a_finest_unit(seed):
    g = torch.Generator().manual_seed(seed)
    heads = removal_loss_curve(torch.rand(6, generator=g) * 10, torch.ones(6, dtype=torch.bool), partitions=2)
    channels = removal_loss_curve(torch.rand(40, generator=g), torch.ones(40, dtype=torch.bool))
    budget = float(torch.rand(1, generator=g)) * 0.8 * (6 * 50 + 40 * 7)
    counts = split_weight_budget([heads, channels], [100, 7], [0, 0], budget)
    expected = _brute_force_split([heads, channels], [100, 7], [0, 0], budget)
    assert abs(counts[0] * 100 + counts[1] * 7 - budget) <= 3.5
    cost = float(heads[counts[0]] + channels[counts[1]])
    assert cost == pytest.approx(float(heads[expected[0]] + channels[expected[1]]))


def test_split_weight_budget_follows_the_costs_and_respects_what_is_already_pruned():
    flat = torch.arange(11, dtype=torch.float32)  # each channel costs 1
    cheap_heads = torch.tensor([0.0, 0.5, 100.0])  # one head removal (worth 5 channels) costs 0.5
    assert split_weight_budget([cheap_heads, flat], [5, 1], [0, 0], 6) == [1, 1]
    dear_heads = torch.tensor([0.0, 50.0, 100.0])
    assert split_weight_budget([dear_heads, flat], [5, 1], [0, 0], 6) == [0, 6]
    # a head already removed stays removed, even where channels would be cheaper
    assert split_weight_budget([dear_heads, flat], [5, 1], [1, 0], 6) == [1, 1]
    # the budget cannot be met (channels run out): the split nearest to it
    assert split_weight_budget([dear_heads, flat], [5, 1], [0, 0], 25) == [2, 10]
    with pytest.raises(ValueError, match="one curve"):
        split_weight_budget([flat], [1, 2], [0], 3)
