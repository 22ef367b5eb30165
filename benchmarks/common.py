"""Shared pieces of the benchmarks: machine and version info, result files, model builders."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the benchmarks train with the examples' code (tasks, local assets, metrics, machine info): one copy of each
sys.path.insert(0, str(ROOT / "examples"))

import stats  # noqa: E402
from machine import machine_info  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


def write_result(
    name: str, payload: dict, out_dir: str | None = None, libraries: tuple[str, ...] = (), *, table: dict
) -> Path:
    """Write ``payload`` plus the machine description (with the versions of ``libraries`` beside the usual ones,
    e.g. a peer's package) and the ``table`` block (:func:`table`: what the file's rows are ranked by) to
    ``<out_dir>/<name>.json``."""
    payload = {"table": table, **{k: v for k, v in payload.items() if k != "table"}}
    directory = Path(out_dir) if out_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    machine = machine_info(extra_libraries=("datasets", *libraries))
    path.write_text(json.dumps({"machine": machine, **payload}, indent=2, default=str))
    return path


def summarise(rows: list[dict], metric: str) -> dict:
    """Mean, sample standard deviation and count of ``metric`` per ``variant``, in first-seen order."""
    return {
        variant: stats.summary(r[metric] for r in rows if r["variant"] == variant)._asdict()
        for variant in dict.fromkeys(r["variant"] for r in rows)
    }


def table(metric: str, direction: str, *, default_method: str | None = None, peers=(), current: bool = True) -> dict:
    """What a result file's renderer must know and must not guess, stored in the file (``"table"``): the metric
    its rows are ranked by, whether lower or higher is better, the package's default method among the rows and
    the peers it is compared with (in table order), and whether the file measures the current defaults."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    return {
        "metric": metric,
        "direction": direction,
        "default_method": default_method,
        "peers": list(peers),
        "current": current,
    }


def previous_rows(name: str, out_dir: str | None, seeds: list[int]) -> list[dict]:
    """Rows of other seeds in an existing result file (benchmarks that run seeds in several sittings)."""
    path = (Path(out_dir) if out_dir else RESULTS_DIR) / f"{name}.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if r["seed"] not in seeds]


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(name: str, seed: int = 0):
    """'smollm2' (real, offline), 'llama-0.5b' (random Llama of about 0.5B parameters), 'llama-1b', 'tiny'."""
    import transformers

    torch.manual_seed(seed)
    if name == "smollm2":
        import local_assets

        return transformers.AutoModelForCausalLM.from_pretrained(local_assets.smollm2_fp32_dir())
    sizes = {
        "tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
        ),
        "llama-0.5b": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=32000,
        ),
        "llama-1b": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=32000,
        ),
    }
    if name not in sizes:
        raise ValueError(f"model must be one of smollm2, {', '.join(sizes)}; got {name!r}")
    config = transformers.LlamaConfig(max_position_embeddings=2048, **sizes[name])
    return transformers.AutoModelForCausalLM.from_config(config)
