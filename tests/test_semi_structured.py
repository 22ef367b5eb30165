"""The 2:4 path of an N:M export: the pattern check and a clear refusal where sparse kernels do not run."""

import pytest
import torch
from helpers import training_model

from peft_loraprune import export_pruned_model
from peft_loraprune.semi_structured import to_semi_structured, violates_n_m


def test_pattern_check_finds_the_first_run_with_too_many_non_zeros():
    w = torch.randn(3, 8)
    w[:, [1, 3, 4, 6]] = 0  # 2 of every 4 kept
    assert violates_n_m(w) is None
    w[2, 5] = 0
    w[2, 6] = 1.0  # row 2, columns 4-7: still two non-zeros
    assert violates_n_m(w) is None
    w[1, 4] = 1.0  # row 1, columns 4-7: three non-zeros
    assert violates_n_m(w) == (1, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        violates_n_m(torch.ones(2, 6))


def exported_2of4(dtype=torch.bfloat16):
    model = training_model("llama", granularity="2:4")
    model.base_model.pruning_engine().prune_to(0.5)
    return export_pruned_model(model, measure_latency=False, progressbar=False, dtype=dtype).model


def test_a_2of4_export_keeps_the_pattern_in_bfloat16():
    model = exported_2of4()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert linears and all(m.weight.dtype == torch.bfloat16 for _, m in linears)
    for name, module in linears:
        assert violates_n_m(module.weight) is None, name
        assert (module.weight == 0).float().mean() == 0.5, name  # exactly half, exact zeros after the cast


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no sparse kernels exist")
def test_conversion_is_refused_clearly_on_cpu():
    with pytest.raises(RuntimeError, match="NVIDIA GPUs .*compute capability 8.0"):
        to_semi_structured(exported_2of4())


def test_a_weight_that_breaks_the_pattern_is_named_and_nothing_is_converted(monkeypatch):
    import peft_loraprune.semi_structured as module

    model = exported_2of4()
    broken = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        broken.weight[3, 0:4] = 1.0
    monkeypatch.setattr(module, "check_semi_structured_support", lambda device, dtype: None)  # as on a GPU
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight breaks the 2:4 pattern at row 3"):
        to_semi_structured(model)
    assert all(
        not m.weight.is_sparse and m.weight.layout == torch.strided
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8, reason="Ampere+ GPU")
def test_conversion_on_an_ampere_gpu_keeps_outputs():  # pragma: no cover - runs where a GPU is lent
    model = exported_2of4(torch.float16).cuda().eval()
    ids = torch.randint(1, 64, (32, 64), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        converted = to_semi_structured(model)
        sparse = model(input_ids=ids).logits
    assert converted
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)
