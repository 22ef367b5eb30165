"""Each criterion against an independent computation, the moving average, and non-finite steps.

The tiny Llama of ``conftest`` (4 query heads in 2 KV groups of head_dim 8, 48 MLP channels, default
``head_grouping="kv_group"``) has these group members per block, written out by hand here: q rows, k rows, v rows
and o columns per KV group; gate and up rows and down columns per channel.
"""

import warnings

import pytest
import torch
from conftest import make_inputs, make_model
from helpers import randomize_adapter
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig

BETA = 0.75
# module suffix -> (axis, number of groups along it) for the tiny Llama with kv_group heads
MEMBERS = {
    "q_proj": ("rows", 2),
    "k_proj": ("rows", 2),
    "v_proj": ("rows", 2),
    "o_proj": ("cols", 2),
    "gate_proj": ("rows", 48),
    "up_proj": ("rows", 48),
    "down_proj": ("cols", 48),
}


def one_layer_setup(adaptation, importance, granularity, family="llama", dropout=0.0):
    config = LoRAPruneConfig(
        task_type="CAUSAL_LM",
        adaptation=adaptation,
        importance=importance,
        granularity=granularity,
        lora_dropout=dropout,
        importance_beta=BETA,
        importance_dtype="float32",
    )
    model = get_peft_model(make_model(family), config)
    randomize_adapter(model, seed=4)
    model.train()
    engine = model.base_model.pruning_engine()
    return model, engine


def backward(model, seed=1):
    inputs = make_inputs("llama", seed=seed)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()


def merged_weight(layer):
    w0 = layer.base_weight_2d().detach().float()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    if layer.adaptation["default"].name == "sequential":
        return (torch.eye(w0.shape[0]) + s * b @ a) @ w0
    return w0 + s * b @ a


def expected_element_scores(layer, criterion, true_grad=None):
    """|W ⊙ G| from raw tensors: hand formula for "lora", autograd's G for "grad", |W| for "magnitude"."""
    w = merged_weight(layer)
    if criterion == "magnitude":
        return w.abs()
    if criterion == "grad":
        return (w * true_grad).abs()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    da = layer.lora_A["default"].weight.grad
    db = layer.lora_B["default"].weight.grad
    g_hat = db @ a + b @ da - db @ da
    if layer.adaptation["default"].name == "sequential":
        g_hat = g_hat @ layer.base_weight_2d().detach().float()
    return (w * g_hat).abs()


def member_of(name):
    return MEMBERS[name.rsplit(".", 1)[-1]]


def group_sums(scores, name):
    """Per-group sums of a (d_out, d_in) score matrix along the member's axis (groups are contiguous here)."""
    axis, n_groups = member_of(name)
    vector = scores.sum(1) if axis == "rows" else scores.sum(0)
    return vector.reshape(n_groups, -1).sum(1)


def unit(v):
    return v / v.norm()


def true_merged_gradients(model, layers, seeds=(1,)):
    """Autograd's gradient of every merged weight: each layer runs as F.linear on an explicit leaf."""
    merged_leaves, originals = {}, {}
    for name, layer in layers.items():
        with torch.no_grad():
            w = layer.merged_weight_rows("default").mul_(layer.full_mask("default")).clone()
        merged_leaves[name] = w.requires_grad_(True)
        originals[name] = layer.forward

        def forward(x, *args, _w=w, _layer=layer, **kwargs):
            return torch.nn.functional.linear(x, _w, _layer.merged_bias("default"))

        layer.forward = forward
    for seed in seeds:
        backward(model, seed=seed)
    grads = {n: w.grad.clone() for n, w in merged_leaves.items()}
    for name, layer in layers.items():
        layer.forward = originals[name]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
@pytest.mark.parametrize("importance", ["lora", "magnitude"])
@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_first_update_matches_hand_formula(adaptation, importance, granularity):
    model, engine = one_layer_setup(adaptation, importance, granularity)
    backward(model)
    expected = {n: expected_element_scores(l, importance) for n, l in engine.layers}
    assert engine.update_importance()
    if granularity == "unstructured":
        assert set(engine.stores) == {"element", "feature"} and not engine.feature_averages
        for name, _ in engine.layers:
            torch.testing.assert_close(
                engine.element_averages[name], (1 - BETA) * expected[name], rtol=1e-4, atol=1e-9
            )
        return
    assert set(engine.stores) == {"member"}  # no weight-sized state for structured pruning
    assert len(engine.member_averages) == len(engine.layers)  # kv_group: every module is a member
    for name, _ in engine.layers:
        axis, _ = member_of(name)
        # the reference rule: per member, group sums divided by their L2 norm, then averaged
        torch.testing.assert_close(
            engine.member_averages[f"{name}.{axis}"],
            (1 - BETA) * unit(group_sums(expected[name], name)),
            rtol=1e-4,
            atol=1e-9,
        )


@pytest.mark.parametrize("adaptation", ["parallel", "sequential"])
def test_grad_criterion_uses_the_true_gradient_of_the_merged_weight(adaptation):
    model, engine = one_layer_setup(adaptation, "grad", "unstructured")
    layers = dict(engine.layers)
    true_grads = true_merged_gradients(model, layers)
    backward(model)
    for name in layers:
        torch.testing.assert_close(engine.criterion.gradients[name], true_grads[name], rtol=1e-4, atol=1e-7)
    expected = {n: expected_element_scores(l, "grad", true_grads[n]) for n, l in layers.items()}
    engine.update_importance()
    for name in layers:
        torch.testing.assert_close(engine.element_averages[name], (1 - BETA) * expected[name], rtol=1e-4, atol=1e-9)
        assert not engine.criterion.gradients[name].any()  # reset for the next step


def test_grad_criterion_weighs_a_clipped_step_like_the_optimizer_sees_it():
    """The captured gradient is raw; the Trainer clips the adapter gradients before the update. The "grad"
    scores of a clipped step are scaled by the clipping coefficient, as "lora" scores are."""
    model, engine = one_layer_setup("parallel", "grad", "unstructured")
    layers = dict(engine.layers)
    true_grads = true_merged_gradients(model, layers)
    backward(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    coefficient = 1e-3 / (float(total_norm) + 1e-6)
    assert coefficient < 0.1  # the step was really clipped
    expected = {n: expected_element_scores(l, "grad", true_grads[n] * coefficient) for n, l in layers.items()}
    engine.update_importance()
    for name in layers:
        torch.testing.assert_close(engine.element_averages[name], (1 - BETA) * expected[name], rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_criterion_is_the_taylor_term_of_removing_each_group(dropout):
    """Scaling a group's input columns by a gate γ (1 here) and differentiating gives, by autograd alone, the
    first-order change of the loss when the group is removed: ∂L/∂γ_c. Two micro-batches add up before the abs."""
    model, engine = one_layer_setup("parallel", "activation", "structured", dropout=dropout)
    layers = dict(engine.layers)
    consumers = {n: l for n, l in layers.items() if member_of(n)[0] == "cols"}
    assert sorted(n for n, _ in engine.scored_layers) == sorted(consumers)  # nothing else is read
    gates = {n: torch.ones(l.in_features, requires_grad=True) for n, l in consumers.items()}
    handles = [
        l.register_forward_pre_hook(lambda m, args, _g=gates[n]: (args[0] * _g,) + args[1:])
        for n, l in consumers.items()
    ]
    torch.manual_seed(0)
    backward(model, seed=1)
    backward(model, seed=2)
    for h in handles:
        h.remove()
    engine.criterion.reset()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks
    backward(model, seed=1)
    backward(model, seed=2)
    assert engine.update_importance()
    assert set(engine.member_averages) == {f"{n}.cols" for n in consumers}
    for name in consumers:
        taylor = gates[name].grad.reshape(member_of(name)[1], -1).sum(1).abs()
        torch.testing.assert_close(
            engine.member_averages[f"{name}.cols"], (1 - BETA) * unit(taylor), rtol=1e-4, atol=1e-7
        )


def test_activation_criterion_equals_the_weight_gradient_form():
    """Without dropout the same Taylor term is Σ_{j, c ∈ C} W_jc·G_jc with G the merged weight's gradient."""
    model, engine = one_layer_setup("parallel", "activation", "structured")
    layers = dict(engine.layers)
    true_grads = true_merged_gradients(model, layers)
    backward(model)
    assert engine.update_importance()
    for name, layer in layers.items():
        if member_of(name)[0] == "cols":
            taylor = group_sums(merged_weight(layer) * true_grads[name], name).abs()
            torch.testing.assert_close(
                engine.member_averages[f"{name}.cols"], (1 - BETA) * unit(taylor), rtol=1e-4, atol=1e-7
            )


def test_activation_criterion_refused_for_per_weight_granularities():
    with pytest.raises(ValueError, match="importance='activation'.*granularity='structured'"):
        LoRAPruneConfig(importance="activation", granularity="unstructured")
    with pytest.raises(ValueError, match="importance='activation'.*granularity='structured'"):
        LoRAPruneConfig(importance="activation", granularity="2:4")


def test_lora_criterion_never_gives_pretrained_weights_a_gradient():
    model, engine = one_layer_setup("parallel", "lora", "structured")
    backward(model)
    engine.update_importance()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("granularity", ["structured", "unstructured"])
def test_moving_average_over_two_steps(granularity):
    model, engine = one_layer_setup("parallel", "lora", granularity)
    backward(model, seed=1)
    first = {n: expected_element_scores(l, "lora") for n, l in engine.layers}
    engine.update_importance()
    model.zero_grad()
    backward(model, seed=2)
    second = {n: expected_element_scores(l, "lora") for n, l in engine.layers}
    engine.update_importance()
    for name, _ in engine.layers:
        if granularity == "unstructured":
            expected = BETA * (1 - BETA) * first[name] + (1 - BETA) * second[name]
            torch.testing.assert_close(engine.element_averages[name], expected, rtol=1e-4, atol=1e-9)
        else:
            f, s = (unit(group_sums(x[name], name)) for x in (first, second))
            expected = BETA * (1 - BETA) * f + (1 - BETA) * s
            torch.testing.assert_close(
                engine.member_averages[f"{name}.{member_of(name)[0]}"], expected, rtol=1e-4, atol=1e-9
            )


def test_raw_averaging_normalises_when_ranking():
    """``normalize_each_step=False`` (the study's alternative order) averages raw sums; ranking normalises."""
    model, engine = one_layer_setup("parallel", "lora", "structured")
    engine.normalize_each_step = False
    backward(model)
    expected = {n: expected_element_scores(l, "lora") for n, l in engine.layers}
    engine.update_importance()
    for name, _ in engine.layers:
        raw = (1 - BETA) * group_sums(expected[name], name)
        torch.testing.assert_close(engine.member_averages[f"{name}.{member_of(name)[0]}"], raw, rtol=1e-4, atol=1e-9)
    heads = next(g for g in engine.groups if g.spec.structure == "heads")
    by_hand = sum(unit(group_sums(expected[n], n)) for _, n, _ in heads.members)
    torch.testing.assert_close(engine.group_scores(heads), by_hand, rtol=1e-4, atol=1e-7)


def test_importance_state_stays_float32_when_the_model_is_cast():
    """The engine owns the averages: ``model.to(bfloat16)`` casts the model, not them, and a bfloat16 run's
    averages stay float32 and close to a float32 run's."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, engine = one_layer_setup("parallel", "lora", "structured")
        model.to(dtype)
        for seed in (1, 2):
            backward(model, seed=seed)
            assert engine.update_importance()
            model.zero_grad()
        assert all(v.dtype == torch.float32 for v in engine.member_averages.values())
        results[dtype] = engine.member_averages
    for key, value in results[torch.float32].items():
        torch.testing.assert_close(results[torch.bfloat16][key], value, rtol=0.1, atol=0.02)


def test_non_finite_gradient_skips_update_once_warned_and_leaves_masks():
    model, engine = one_layer_setup("parallel", "lora", "structured")
    backward(model)
    engine.update_importance()
    before = {k: v.clone() for k, v in engine.member_averages.items()}
    masks = {k: v.clone() for k, v in model.state_dict().items() if "mask" in k}
    model.zero_grad()
    backward(model, seed=3)
    first_layer = engine.layers[0][1]
    first_layer.lora_B["default"].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or infinite"):
        assert engine.update_importance() is False
    assert engine.member_averages.keys() == before.keys()
    for key, value in engine.member_averages.items():
        assert torch.equal(value, before[key])
    # a rewrite due now waits for a finite step
    total = 10  # the default schedule's last rewrite is at step 4 = round((1 - 0.6) * 10)
    assert engine.pruning_step(4, total) is None and engine.pending_rewrite
    assert all(torch.equal(v, masks[k]) for k, v in model.state_dict().items() if "mask" in k)
    first_layer.lora_B["default"].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert engine.update_importance() is False
    model.zero_grad()
    backward(model, seed=4)
    assert engine.update_importance()
    assert engine.pruning_step(5, total) == 0.5
    assert model.base_model.sparsity_report().sparsity == pytest.approx(0.5)


def test_a_rewrite_waiting_for_a_finite_step_survives_the_engine_state_round_trip():
    """A rewrite due on a skipped (non-finite) step is pending; a checkpoint taken then must carry it, or the
    resumed run never applies it (no later step is scheduled) and ends short of the target. The restored engine
    prunes at its next finite step to what the original engine prunes to."""
    total = 10  # the default schedule's last rewrite is at step 4 = round((1 - 0.6) * 10)
    engines = []
    for _ in range(2):
        model, engine = one_layer_setup("parallel", "lora", "structured")
        backward(model)
        assert engine.update_importance()
        model.zero_grad()
        backward(model, seed=3)
        engine.layers[0][1].lora_B["default"].weight.grad[0, 0] = float("nan")
        with pytest.warns(UserWarning, match="NaN or infinite"):
            assert engine.update_importance() is False
        assert engine.pruning_step(4, total) is None and engine.pending_rewrite
        engines.append((model, engine))
    (model, engine), (fresh_model, fresh) = engines
    state = engine.state_dict()
    fresh.pending_rewrite, fresh.last_update_ok = False, True  # what a fresh engine holds before the restore
    fresh.load_state_dict(state)
    assert fresh.pending_rewrite is True and fresh.last_update_ok is False
    assert fresh.finish(total) == engine.finish(total) == 0.5  # the waiting rewrite, applied at the end
    for (_, a), (_, b) in zip(engine.layers, fresh.layers):
        assert torch.equal(a.lora_mask_rows["default"], b.lora_mask_rows["default"])
        assert torch.equal(a.lora_mask_cols["default"], b.lora_mask_cols["default"])
    assert fresh_model.base_model.sparsity_report().sparsity == pytest.approx(0.5)


def test_importance_state_round_trips_and_refuses_a_foreign_checkpoint():
    model, engine = one_layer_setup("parallel", "lora", "structured")
    backward(model)
    engine.update_importance()
    state = engine.state_dict()
    _, fresh = one_layer_setup("parallel", "lora", "structured")
    fresh.load_state_dict(state)
    assert fresh.member_averages.keys() == engine.member_averages.keys()
    for key, value in engine.member_averages.items():
        assert torch.equal(fresh.member_averages[key], value)
    _, other = one_layer_setup("parallel", "lora", "unstructured")
    with pytest.raises(ValueError, match="does not fit this adapter"):
        other.load_state_dict(state)


def test_activation_criterion_reads_gated_mlp_channels_at_the_up_projection():
    """With LoRA dropout autograd does not keep down_proj's input x = act(gate)·up, so holding it for the score
    would cost an activation per block; the registry's input factor moves the tap to up_proj's output (kept by
    the product's backward), which gives the same score (the Taylor test above checks the values)."""
    model, engine = one_layer_setup("parallel", "activation", "structured", dropout=0.1)
    layers = dict(engine.layers)
    consumers = {c.name: c for c in engine.consumers()}
    downs = [n for n in consumers if n.endswith("down_proj")]
    assert downs
    for name in downs:
        up = layers[name.replace("down_proj", "up_proj")]
        assert consumers[name].factor is up
        assert up._taps["default"] and not layers[name]._taps.get("default")
    assert all(consumers[n].factor is None for n in consumers if n.endswith("o_proj"))


def _capture_inputs(engine):
    seen = {name: [] for name, _ in engine.layers}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, _n=name: seen[_n].append(args[0].detach()))
        for name, layer in engine.layers
    ]
    return seen, handles


def test_wanda_scores_are_weight_magnitude_times_input_norm_over_the_steps_tokens():
    """ "wanda": |W_ij|·‖x_j‖ with x every token the layer saw in the step's training passes (two micro-batches
    here), computed from inputs captured by plain forward hooks; a no_grad pass in between is not counted. The
    engine keeps only the averaged norms (d_in floats per layer, no per-weight state) and ranks with
    |W|·average(‖x‖), which is the average of the steps' scores while the weight stays put (checked over two
    steps), and prunes by it."""
    model, engine = one_layer_setup("parallel", "wanda", "unstructured")
    norms = []
    for step_seeds in ((1, 2), (3,)):
        seen, handles = _capture_inputs(engine)
        for k, seed in enumerate(step_seeds):
            backward(model, seed=seed)
            if k == 0:
                with torch.no_grad():  # an evaluation pass: not part of the step's scores
                    model(**make_inputs("llama", seed=7))
                for name in seen:
                    seen[name] = seen[name][:1]  # drop what the no_grad pass showed the hooks
        for h in handles:
            h.remove()
        norms.append(
            {
                n: torch.cat([v.reshape(-1, v.shape[-1]) for v in x]).float().pow(2).sum(0).sqrt()
                for n, x in seen.items()
            }
        )
        assert engine.update_importance()
        model.zero_grad()
    assert not engine.element_averages  # no per-weight state
    for name, layer in engine.layers:
        # the average from zero of the two steps' per-weight scores, each |W|·‖x_step‖
        first = (1 - BETA) * merged_weight(layer).abs() * norms[0][name]
        expected = BETA * first + (1 - BETA) * merged_weight(layer).abs() * norms[1][name]
        assert engine.feature_averages[name].shape == (layer.in_features,)
        torch.testing.assert_close(engine._element_scores(name, layer), expected, rtol=1e-4, atol=1e-9)
    engine.prune_to(0.5)
    for name, layer in engine.layers:
        first = (1 - BETA) * merged_weight(layer).abs() * norms[0][name]
        expected = BETA * first + (1 - BETA) * merged_weight(layer).abs() * norms[1][name]
        kept = layer.element_mask("default")
        assert kept.float().mean() == pytest.approx(0.5, abs=1 / kept.numel())
        assert expected[kept].min() >= expected[~kept].max()  # the highest-scored half is kept


def test_wanda_norm_averages_round_trip_through_the_engine_state():
    model, engine = one_layer_setup("parallel", "wanda", "unstructured")
    backward(model)
    engine.update_importance()
    state = engine.state_dict()
    assert {k for k in state if k.startswith("feature.")} == {f"feature.{n}" for n, _ in engine.layers}
    fresh_model, fresh = one_layer_setup("parallel", "wanda", "unstructured")
    fresh.load_state_dict(state)
    for name, value in engine.feature_averages.items():
        assert torch.equal(fresh.feature_averages[name], value)
    engine.prune_to(0.5)
    fresh.prune_to(0.5)
    for (_, a), (_, b) in zip(engine.layers, fresh.layers):
        assert torch.equal(a.element_mask("default"), b.element_mask("default"))
    bad = dict(state)
    name = engine.layers[0][0]
    bad[f"feature.{name}"] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not fit this adapter"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [7, 1 << 20])
@pytest.mark.parametrize("fused", [False, True], ids=["row_blocks", "fused"])
def test_column_square_sums_match_a_float64_sum_and_leave_the_input_alone(dtype, chunk_elements, fused):
    """The wanda tap's per-feature sum of squares: equal to the float64 sum of the (dtype-rounded) input, whether
    the rows go in one block or in blocks of a single row (the CPU path) or in the one fused reduction that every
    other device takes (forced here on the CPU), and the input is not squared in place."""
    from peft_loraprune.kernels.importance import column_square_sums

    x = (torch.randn(13, 5, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    before = x.clone()
    got = column_square_sums(x, chunk_elements=chunk_elements, fused=fused)
    want = (x.double() ** 2).sum(0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="2-D"):
        column_square_sums(x[0], fused=fused)


@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_column_square_sums_off_the_cpu_sum_down_the_rows(device):
    """Off the CPU the fused reduction is chosen by device: one float32 value per column (the meta device checks
    shape and dtype without a GPU); on CUDA (benchmarks/gpu.sh runs it) the values equal a float64 sum on the CPU."""
    from peft_loraprune.kernels.importance import column_square_sums

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = (torch.randn(13, 5, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    got = column_square_sums(x.to(device))
    assert got.device.type == device and got.shape == (5,) and got.dtype == torch.float32
    if device != "meta":
        torch.testing.assert_close(got.cpu().double(), (x.double() ** 2).sum(0), rtol=1e-6, atol=1e-6)


def test_element_scores_written_into_a_tensor_chunk_by_chunk_match_the_hand_formula():
    """``into``: the scores land in the caller's tensor row block by row block (here 2 rows per block, the last
    one short), equal to ``|(W0 + s·B·R) ⊙ G|`` with a per-column G broadcast along the rows."""
    from peft_loraprune.kernels.importance import element_scores

    g = torch.Generator().manual_seed(5)
    w0, b, r = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)
    v = torch.rand(4, generator=g)
    into = torch.full((5, 4), float("nan"))
    chunks = element_scores(
        lambda rows, out: torch.addmm(w0[rows], b[rows], r, alpha=0.5, out=out),
        lambda rows, out: v,
        (5, 4),
        lambda name, shape: torch.empty(shape),
        chunk_elements=8,
        into=into,
    )
    assert [(rows.start, rows.stop) for rows, _ in chunks] == [(0, 2), (2, 4), (4, 5)]
    torch.testing.assert_close(into, ((w0 + 0.5 * b @ r) * v).abs())
