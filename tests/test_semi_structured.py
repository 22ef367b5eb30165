"""The 2:4 path of an N:M export: the pattern check and a clear refusal where sparse kernels do not run."""

import pytest
import torch
import transformers
from helpers import training_model
from peft import get_peft_model

from peft_loraprune import LoRAPruneConfig, export_pruned_model
from peft_loraprune.kernels.semi_structured import to_semi_structured, violates_n_m


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


def test_an_unknown_backend_is_refused_before_any_work():
    with pytest.raises(ValueError, match="backend must be one of None, 'cutlass', 'cusparselt'; got 'triton'"):
        to_semi_structured(exported_2of4(), backend="triton")


def test_cutlass_is_refused_on_a_gpu_newer_than_ampere(monkeypatch):
    """PyTorch's CUTLASS 2:4 product fails at the first call on an H100 (compute capability 9.0, seen with torch
    2.11); the check refuses it up front there and lets it through on 8.x (GPU queries faked: no GPU needed)."""
    from peft_loraprune.kernels.semi_structured import check_semi_structured_support

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match=r"CUTLASS 2:4 kernels run on compute capability 8.x only.*has 9.0"):
        check_semi_structured_support(cuda, torch.float16, "cutlass")
    for backend in (None, "cusparselt"):
        check_semi_structured_support(cuda, torch.float16, backend)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    check_semi_structured_support(cuda, torch.bfloat16, "cutlass")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        check_semi_structured_support(cuda, torch.float32, "cutlass")


def test_a_weight_that_breaks_the_pattern_is_named_and_nothing_is_converted(monkeypatch):
    import peft_loraprune.kernels.semi_structured as module

    model = exported_2of4()
    broken = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        broken.weight[3, 0:4] = 1.0
    monkeypatch.setattr(module, "check_semi_structured_support", lambda *args: None)  # as on a GPU
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight breaks the 2:4 pattern at row 3"):
        to_semi_structured(model)
    assert all(
        not m.weight.is_sparse and m.weight.layout == torch.strided
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8, reason="Ampere+ GPU")
@pytest.mark.parametrize("backend", [None, "cutlass", "cusparselt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_on_an_ampere_gpu_keeps_outputs(dtype, backend):  # pragma: no cover - runs where a GPU is lent
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only")
    # PyTorch's 2:4 kernels take weights of at least 32 rows and 64 columns (the test suite's tiny Llama has 32
    # columns), so this one is wider: 4 heads of 32 in 2 KV groups, 256 MLP channels
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(config),
        LoRAPruneConfig(task_type="CAUSAL_LM", granularity="2:4", importance="magnitude"),
    )
    engine = peft_model.base_model.pruning_engine()
    engine.update_importance()
    engine.prune_to(0.5)
    model = export_pruned_model(peft_model, measure_latency=False, progressbar=False, dtype=dtype).model
    model = model.cuda().eval()
    ids = torch.randint(1, 64, (32, 64), device="cuda")
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        converted = to_semi_structured(model, backend=backend)
        sparse = model(input_ids=ids).logits.float()
    assert len(converted) == 2 * 7  # q, k, v, o, gate, up, down of both blocks; lm_head skipped
    assert all(
        isinstance(model.get_submodule(name).weight, torch.sparse.SparseSemiStructuredTensor) for name in converted
    )
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)
