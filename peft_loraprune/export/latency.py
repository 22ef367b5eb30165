"""Latency of a forward pass, for export reports: median wall time on fixed example inputs."""

from __future__ import annotations

import statistics
import time

import torch


def default_example_inputs(model: torch.nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict:
    """Inputs for a latency measurement, on the model's device: random pixels (in the model's floating dtype) when
    the model's ``main_input_name`` (transformers' own attribute, so no family knowledge here) is
    ``pixel_values``, else random tokens."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    if name == "pixel_values":
        size = config.image_size
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        pixels = torch.randn(batch_size, config.num_channels, size, size, generator=g)
        return {"pixel_values": pixels.to(device=device, dtype=dtype)}
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", seq_len)
    length = min(seq_len, max_len)
    return {"input_ids": torch.randint(0, config.vocab_size, (batch_size, length), generator=g).to(device)}


def _synchronize(inputs: dict) -> None:
    """Wait for the GPUs the inputs live on: CUDA kernels run asynchronously, so a timer read without waiting
    measures only how long it took to queue them."""
    for device in {v.device for v in inputs.values() if isinstance(v, torch.Tensor) and v.device.type == "cuda"}:
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency_ms(model: torch.nn.Module, inputs: dict, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of a forward pass in milliseconds (no grad, eval mode; on a GPU, until its kernels end)."""
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(repeats):
        _synchronize(inputs)
        start = time.perf_counter()
        model(**inputs)
        _synchronize(inputs)
        times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return statistics.median(times)
