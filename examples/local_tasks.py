"""Zero-shot lm-evaluation-harness tasks built offline from data that ships in installed packages.

Every pruning paper's zero-shot table comes from lm-eval (BoolQ, PIQA, HellaSwag, ...), which downloads its data
from the Hub. These tasks run with ``HF_HUB_OFFLINE=1``: each is a YAML file over a local JSONL file
(``dataset_path: json``), written by :func:`write_tasks` into a folder that lm-eval reads with
``TaskManager(include_path=...)`` or ``lm_eval --include_path``.

* ``rt_sentiment``: Rotten Tomatoes review sentences (the held-out split of ``local_assets.rotten_tomatoes``),
  two-way multiple choice " negative" / " positive" after "Review: ...\\nSentiment:"; accuracy.
* ``wiki_continuation``: HellaSwag-style four-way multiple choice on held-out Wikipedia leads: the first
  sentence is the context, the true second sentence competes with the second sentences of three other
  articles; accuracy and length-normalised accuracy.
* ``wiki_leads_ppl``: rolling log-likelihood of the held-out Wikipedia leads (word perplexity, bits per byte).

    python examples/local_tasks.py --out local_tasks      # then: lm_eval --include_path local_tasks --tasks ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

import local_assets

TASKS = ("rt_sentiment", "wiki_continuation", "wiki_leads_ppl")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

_YAML = {
    "rt_sentiment": """task: rt_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "wiki_continuation": """task: wiki_continuation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "wiki_leads_ppl": """task: wiki_leads_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _rt_docs(limit: int | None) -> list[dict]:
    test = local_assets.rotten_tomatoes(0)["test"]
    docs = [{"text": t, "label": int(y)} for t, y in zip(test["text"], test["label"])]
    return docs[:limit] if limit else docs


def _wiki_continuation_docs(limit: int | None, seed: int = 0) -> list[dict]:
    texts = local_assets.wikipedia_leads(0)["test"]["text"]
    pairs = []
    for text in texts:
        parts = _sentences(text)
        if len(parts) >= 2 and 20 <= len(parts[0]) <= 400 and 20 <= len(parts[1]) <= 400:
            pairs.append((parts[0], parts[1]))
    rng = random.Random(seed)
    docs = []
    for i, (context, answer) in enumerate(pairs):
        others = [pairs[j][1] for j in rng.sample([j for j in range(len(pairs)) if j != i], 3)]
        label = rng.randrange(4)
        choices = others[:label] + [answer] + others[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    return docs[:limit] if limit else docs


def _wiki_ppl_docs(limit: int | None) -> list[dict]:
    texts = local_assets.wikipedia_leads(0)["test"]["text"]
    docs = [{"text": t} for t in texts]
    return docs[:limit] if limit else docs


_BUILDERS = {"rt_sentiment": _rt_docs, "wiki_continuation": _wiki_continuation_docs, "wiki_leads_ppl": _wiki_ppl_docs}


def write_tasks(folder: str | os.PathLike, limit: int | None = None, tasks=TASKS) -> Path:
    """Write each task's JSONL data and YAML into ``folder`` (created); returns it. ``limit``: documents per
    task (None: all; the held-out splits are 1,275 sentences and about 500 leads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in _BUILDERS:
            raise ValueError(f"unknown local task {task!r}; available: {list(TASKS)}")
        data = folder / f"{task}.jsonl"
        tmp = data.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in _BUILDERS[task](limit):
                f.write(json.dumps(doc) + "\n")
        os.replace(tmp, data)
        (folder / f"{task}.yaml").write_text(_YAML[task].format(data=json.dumps(str(data.resolve()))))
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="local_tasks")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    print(write_tasks(args.out, args.limit))


if __name__ == "__main__":
    main()
