"""Property-based tests (hypothesis): thousands of generated inputs to the config, the public entry points and
the pure selection/schedule maths. Bad input must raise ValueError or TypeError with a message naming what is
wrong; good input must satisfy the invariants the engine relies on."""

import dataclasses
import math

import pytest
import torch
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig, verify_saved_adapter
from peft_loraprune.kernels.mask_packing import pack_bits, unpack_bits
from peft_loraprune.pruning.schedule import PruningSchedule
from peft_loraprune.pruning.selection import keep_top, keep_top_global, n_m_mask, prune_count


def examples(n: int):
    """Fixed, reproducible draws (derandomize): CI sees the same inputs on every run."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "structured",
            "unstructured",
            "2:4",
            "1:4",
            "4:8",
            "3:2",
            "0:4",
            "N:M",
            "lora",
            "grad",
            "magnitude",
            "parallel",
            "sequential",
            "local",
            "global",
            "cubic",
            "one_shot",
            "heads",
            "channels",
            "kv_group",
            "query_head",
            "bfloat16",
            "float32",
            "reference",
            "q_proj",
            "all-linear",
        ]
    ),
    st.lists(st.one_of(st.integers(-2, 5), st.sampled_from(["heads", "channels", "q_proj", "x"])), max_size=3),
)
FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "target_sparsity",
    "granularity",
    "adaptation",
    "importance",
    "importance_beta",
    "importance_dtype",
    "pruning_interval",
    "budget",
    "initial_sparsity",
    "pruning_start",
    "pruning_end",
    "warmup_ratio",
    "cooldown_ratio",
    "schedule",
    "prune_structures",
    "head_grouping",
    "dense_layers",
    "save_digest",
]


def _clear(err: Exception, names) -> bool:
    """A ValueError/TypeError whose message names one of the arguments it is about (not Python's own message
    for a wrong type deep inside the code)."""
    return isinstance(err, (ValueError, TypeError)) and any(name in str(err) for name in names)


@examples(1500)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=6))
def test_config_accepts_or_rejects_clearly(kwargs):
    try:
        config = LoRAPruneConfig(**kwargs)
    except Exception as err:  # noqa: BLE001 - the property is about the exception type
        assert _clear(err, kwargs), f"{type(err).__name__}: {err!r} for {kwargs!r}"
        return
    # accepted: the invariants the engine relies on, and a lossless round trip through the saved dict
    assert 0.0 <= config.effective_target_sparsity < 1.0
    assert 0.0 <= config.initial_sparsity <= config.effective_target_sparsity or config.n_m is not None
    assert config.r >= 1 and config.pruning_interval >= 1
    names = {f.name for f in dataclasses.fields(LoRAPruneConfig) if f.init}
    again = LoRAPruneConfig(**{k: v for k, v in config.to_dict().items() if k in names})
    assert again.to_dict() == config.to_dict()


@pytest.fixture(scope="module")
def tiny():
    return get_peft_model(make_model("llama"), LoRAPruneConfig(task_type="CAUSAL_LM", pruning_interval=1))


ARG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.just("default"),
)


@examples(600)
@given(st.sampled_from(["pruning_step", "prune_to", "sparsity_report", "callback", "verify", "schedule"]), ARG, ARG)
def test_public_entry_points_accept_or_reject_clearly(tiny, entry, a, b):
    tuner = tiny.base_model
    calls = {
        "pruning_step": lambda: tuner.pruning_step(a, b),
        "prune_to": lambda: tuner.pruning_engine().prune_to(a),
        "sparsity_report": lambda: tuner.sparsity_report(a),
        "callback": lambda: LoRAPruneCallback(a, b),
        "verify": lambda: verify_saved_adapter(a),
        "schedule": lambda: PruningSchedule(total_steps=a, target=b),
    }
    names = {
        "pruning_step": ("step", "total_steps"),
        "prune_to": ("sparsity",),
        "sparsity_report": ("adapter_name",),
        "callback": ("adapter_name", "zero_nonfinite_gradients"),
        "verify": ("directory",),
        "schedule": ("total_steps", "target"),
    }[entry]
    try:
        result = calls[entry]()
    except Exception as err:  # noqa: BLE001
        assert _clear(err, names), f"{entry}({a!r}, {b!r}) raised {type(err).__name__}: {err!r}"
        return
    if entry in ("pruning_step", "prune_to"):  # whatever was accepted left valid masks
        report = tuner.sparsity_report()
        assert 0.0 <= report.sparsity < 1.0
        if result is not None:
            assert 0.0 <= result < 1.0


@examples(400)
@given(st.integers(0, 64), st.floats(0, 1, exclude_max=True), st.booleans())
def test_prune_count(n, sparsity, keep_one):
    k = prune_count(n, sparsity, keep_at_least_one=keep_one)
    assert 0 <= k <= n
    if keep_one and n > 0:
        assert k <= n - 1
    if not keep_one or k < n - 1:
        assert abs(k - sparsity * n) <= 0.5 + 1e-9


@examples(400)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n),
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.integers(0, n + 2),
        )
    )
)
def test_keep_top_keeps_the_best_of_the_kept(data):
    scores, kept, n_keep = torch.tensor(data[0]), torch.tensor(data[1]), data[2]
    new = keep_top(scores, kept, n_keep)
    assert not (new & ~kept).any()  # never regrows
    assert int(new.sum()) == min(n_keep, int(kept.sum()))
    dropped = kept & ~new
    if new.any() and dropped.any():
        assert scores[new].min() >= scores[dropped].max()


@examples(300)
@given(st.integers(1, 5), st.integers(1, 19), st.sampled_from([(1, 4), (2, 4), (4, 8), (1, 2)]), st.integers(0, 9))
def test_n_m_mask_pattern(rows, cols, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=g)
    kept = torch.rand(rows, cols, generator=g) > 0.2
    new = n_m_mask(scores, kept, n, m)
    assert new.shape == (rows, cols) and not (new & ~kept).any()
    padded = torch.nn.functional.pad(new, (0, (-cols) % m)).reshape(rows, -1, m)
    assert (padded.sum(-1) <= n).all()


@examples(300)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.integers(0, 40), st.integers(0, 9))
def test_keep_top_global_budget_and_floor(sizes, n_keep, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(s, generator=g) for s in sizes]
    kept = [torch.ones(s, dtype=torch.bool) for s in sizes]
    new = keep_top_global(scores, kept, n_keep)
    assert all(int(m.sum()) >= 1 for m in new)
    assert sum(int(m.sum()) for m in new) == max(min(n_keep, sum(sizes)), len(sizes))


@examples(300)
@given(st.integers(1, 7), st.integers(1, 40), st.integers(0, 99))
def test_pack_unpack_round_trip(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (rows, math.ceil(cols / 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, cols), mask)


@examples(400)
@given(
    st.integers(1, 300), st.floats(0, 0.95), st.floats(0, 0.45), st.floats(0, 0.45), st.integers(1, 20), st.booleans()
)
def test_schedule_is_monotone_and_ends_on_target(total, target, warmup, cooldown, interval, one_shot):
    s = PruningSchedule(
        total_steps=total,
        target=target,
        start_fraction=warmup,
        end_fraction=1 - cooldown,
        interval=interval,
        one_shot=one_shot,
    )
    values = [s.sparsity_at(t) for t in range(total + 1)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= target + 1e-12 for v in values)
    steps = s.pruning_steps()
    assert steps and steps[-1] == s.end and s.end <= total
    assert s.sparsity_at(s.end) == target
