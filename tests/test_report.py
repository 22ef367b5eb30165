"""benchmarks/report.py: the sentences it writes into README and RESULTS.md are computed from rows, checked here
against values worked out by hand."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def rows_of(table):
    return [
        {"method": m, "sparsity": 0.5, "seed": seed, "perplexity": value}
        for m, values in table.items()
        for seed, value in enumerate(values)
    ]


def test_unstructured_verdict_compares_the_unstructured_default_with_llm_compressor_peers():
    rows = rows_of({"loraprune-wanda": [30.0, 32.0], "sparsegpt": [31.0, 33.5], "wanda": [29.0, 34.0]})
    rows += rows_of({"loraprune-lora": [33.0, 35.0], "loraprune-grad": [25.0, 27.0]})  # not the default: no verdict
    rows += rows_of({"wanda-sp": [1.0, 1.0]})  # wanda-sp is no unstructured peer
    verdicts = report.peers_verdicts(rows, "perplexity", [0.5], "unstructured")
    # default mean 31 (std sqrt(2) = 1.41); nearest peer wanda (31.5): margin 0.5 inside the spread; seed 0 lost
    # (30 vs 29), seed 1 won (32 vs 34)
    assert verdicts[0] == (
        "50%: the default (`wanda`) perplexity 31; ahead of every peer (sparsegpt 32.25, wanda 31.5) (the nearest "
        "margin, 0.5, is within the default's seed-to-seed spread, std 1.41; better than wanda on 1 of 2 paired "
        "seeds)."
    )
    assert verdicts[1] == "50%: the paper's estimator (`lora`) / true gradient (`grad`) perplexity: 1.308."  # 34/26


def test_structured_verdict_names_the_peer_that_wins():
    rows = rows_of({"loraprune-activation": [50.0], "llm-pruner": [60.0], "wanda-sp": [45.0], "sparsegpt": [1.0]})
    (verdict,) = report.peers_verdicts(rows, "perplexity", [0.5], "structured")
    assert verdict == (
        "50%: the default (`activation`) perplexity 50; behind wanda-sp (llm-pruner 60, wanda-sp 45) (one seed: the "
        "margins are not tested against seed noise)."
    )
