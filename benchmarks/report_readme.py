"""The generated blocks of the README and docs/benchmarks.md: the results table (the README's only one), the
benchmark, recovery-study and big-models lists, the recovery tables, the cost tables. Each block sits between two
markers; a missing marker raises (GENERATED_BLOCKS lists them). Only result files marked current reach these
documents."""

from __future__ import annotations

import report_big_models
import report_distill
import report_front
from report_common import HERE, load, memory_keys, on_gpu, replace_block, with_rewrites_words
from report_cost import element_breakdown_rows, masked_blocks_rows, memory_profile_rows
from report_peers import granularity_of, peers_verdicts, table_of, tag_words
from stats import mean_of, summary


def readme_summary() -> list[str]:
    """docs/benchmarks.md's bullets against other pruners, on criteria and on step cost, computed from the result
    files like RESULTS.md."""
    return peers_summary() + step_cost_summary()


def peers_summary() -> list[str]:
    """The bullets against other pruners and of the criterion study."""
    out = []
    for file_name, data in load("peers_*.json").items():
        if file_name.endswith("_distill"):
            continue  # the recovery study has its own lines (report_distill)
        rows = data["rows"]
        task = data["settings"]["task"]
        granularity = granularity_of(data)
        table = table_of(data, file_name)
        if not table["current"]:
            continue  # the README speaks of the current defaults; RESULTS.md keeps the rest
        metric = table["metric"]
        sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}, reverse=True)
        seeds = sorted({r["seed"] for r in rows})
        name = (
            (
                "SmolLM2-135M, held-out perplexity"
                if task == "smollm2"
                else f"MiniLM on Rotten Tomatoes, {data['settings']['max_train_samples']:,d} training sentences, accuracy"
            )
            + ("" if granularity == "structured" else f", {granularity}")
            + tag_words(file_name, data)
        )
        dense = mean_of([r for r in rows if r["method"] == "dense-lora"], metric)
        out.append(
            f"- **Against other pruners** ({name}, seeds {seeds}, {rows[0]['train_tokens']:,d} training tokens"
            + (f"; dense LoRA {dense:.4g}" if dense is not None else "")
            + "):"
        )
        out += [f"    - {v}" for v in peers_verdicts(rows, table, sparsities)]  # nested in Python-Markdown too
    for name, data in load("criteria_*.json").items():
        if not table_of(data, name)["current"]:
            continue
        summary = data["summary"]
        cells = []
        for p in sorted({v.split("%")[0] for v in summary if "%" in v}, key=float, reverse=True):
            at = {v.split(" ", 1)[1]: e["mean"] for v, e in summary.items() if v.startswith(f"{p}% ")}
            cells.append(f"{p}%: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(at.items(), key=lambda kv: kv[1])))
        out.append(
            f"- **Criterion study** (SmolLM2-135M, {data['settings']['train_tokens']:,d} training tokens, seeds "
            f"{data['settings']['seeds']}; held-out perplexity, lower is better): " + "; ".join(cells) + "."
        )
    return out


def step_cost_summary() -> list[str]:
    """One bullet per current step-cost file: each configuration's step time and peak memory against plain LoRA."""
    out = []
    for name, data in load("step_cost_*.json").items():
        if not table_of(data, name)["current"]:
            continue
        s = data["settings"]
        rows = {r["config"]: r for r in data["rows"]}
        label, _, vs_lora, _ = memory_keys(data)

        parts = [
            f"{c} {r['time_vs_lora']:.2f}x time{with_rewrites_words(r)} / {r[vs_lora]:.2f}x {label}"
            for c, r in rows.items()
            if c != "lora" and "time_vs_lora" in r
        ]
        where = f", {data['machine']['cuda']}, {s.get('dtype')}" if on_gpu(data) else ""
        where += f", {s['autocast']} autocast" if s.get("autocast") else ""
        where += f", {s['quantization']} base (vs QLoRA)" if s.get("quantization", "none") != "none" else ""
        where += f", {s['note']}" if s.get("note") else ""
        if parts:
            out.append(
                f"- **Step cost vs plain LoRA** ({s['model']}, {s['batch']} x {s['seq']} tokens{where}, "
                f"{data['machine']['date'][:10]}, peft_loraprune {data['machine'].get('peft_loraprune')}): "
                + "; ".join(parts)
                + "."
            )
    return out


def cost_lines() -> list[str]:
    cost = []
    for name, data in load("memory_profile_*.json").items():
        if not table_of(data, name)["current"]:
            continue
        s = data["settings"]
        cost += [
            f"Measured with `benchmarks/memory_profile.py` ({s['model']}, batch {s['batch']} x {s['seq']} tokens, "
            f"{data['machine']['date'][:10]}, peft_loraprune {data['machine'].get('peft_loraprune')}"
            + (f"; {data['label']}" if data.get("label") else "")
            + "):",
            "",
            *memory_profile_rows(data),
            "",
        ]
    for pattern, rows_of in (
        ("masked_blocks_*.json", masked_blocks_rows),
        ("element_step_breakdown_*.json", element_breakdown_rows),
    ):
        for name, data in load(pattern).items():
            if table_of(data, name)["current"]:
                cost += [*rows_of(data), ""]
    return cost


def results_table() -> list[str]:
    """The README's one table: SmolLM2 held-out perplexity, the package default against dense LoRA and the peers,
    structured at 20% and 50% and unstructured at 50% (means over seeds, from the current peers files); then the
    same runs given the quickstart's recipe (``report_distill.RECIPE``), from the recovery study's files."""
    columns = [("peers_smollm2", 0.2, "structured 20%"), ("peers_smollm2", 0.5, "structured 50%")]
    columns += [("peers_smollm2_unstructured", 0.5, "unstructured 50%")]
    files = load("peers_smollm2*.json")
    methods, cells, recipe_runs = [], {}, []
    for name, sparsity, label in columns:
        data = files.get(name)
        if data is None or not table_of(data, name)["current"]:
            continue
        table = table_of(data, name)
        rows = data["rows"]
        study = files.get(f"{name}_distill")
        wanted = ["dense-lora", table["default_method"], *table["peers"]]
        for m, recipe in [(m, False) for m in wanted] + [(m, True) for m in wanted]:
            runs, study_runs = rows, (study or {"rows": []})["rows"]
            if m == "dense-lora":  # no pruning: the structured files' runs, in every column
                runs = files.get("peers_smollm2", data)["rows"]
                study_runs = files.get("peers_smollm2_distill", {"rows": []})["rows"]
            source = study_runs if recipe else runs
            method = f"{m}+{report_distill.RECIPE}" if recipe else m
            at = [
                r
                for r in source
                if r["method"] == method and r["sparsity"] == (0.0 if m == "dense-lora" else sparsity)
            ]
            value = summary(r["perplexity"] for r in at)
            if value is None:
                continue
            recipe_runs += at if recipe else []
            key = ("LoRAPrune" if m == table["default_method"] else m) + (" + recipe" if recipe else "")
            if key not in methods:
                methods.append(key)
            cells[key, label] = f"{value.mean:.2f}" + (f" ± {value.std:.2f}" if value.n > 1 else "") + f" ({value.n})"
    labels = [label for _, _, label in columns]
    if not cells:
        return []
    methods.sort(key=lambda m: m.endswith(" + recipe"))  # the defaults' rows first
    machine_line = next(iter(files.values()))["machine"]
    settings = files["peers_smollm2"]["settings"] if "peers_smollm2" in files else {}
    out = [
        "| SmolLM2-135M, Wikipedia leads: held-out perplexity (mean ± std, seeds) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(cells.get((m, label), "-") for label in labels) + " |")
    tokens = next(iter(files.values()))["rows"][0]["train_tokens"]
    rank = f"LoRA rank {settings['r']}, " if settings.get("r") else ""
    recipe = ""
    if recipe_runs:
        studied = {r["learning_rate"] for r in recipe_runs if "learning_rate" in r}
        ranks = {r["r"] for r in recipe_runs if "r" in r}
        recipe = (
            " *+ recipe*: the quickstart's "
            + ", ".join(
                [f"rank {x}" for x in sorted(ranks)]
                + ["trained norms"]
                + [f"learning rate {x:g}" for x in sorted(studied)]
            )
            + f" (the recovery study, peft_loraprune {_study_version(files)})."
        )
    out += [
        "",
        f"{tokens:,d} training tokens per run, {rank}bfloat16 autocast, "
        f"{machine_line['cpu_count']} CPUs, peft_loraprune {machine_line.get('peft_loraprune')} "
        f"({machine_line['date'][:10]}); lower is better. Peers prune one-shot, then get the same LoRA training."
        + recipe,
    ]
    return out


def _study_version(files) -> str:
    """The package version of the recovery study's runs (its result file's machine line)."""
    return next((d["machine"].get("peft_loraprune") for n, d in files.items() if n.endswith("_distill")), "?")


# every generated block: (document, marker name, what renders it); both markers must be present
# (the README keeps one table; every finding, its caveats and the other tables are on docs/benchmarks.md)
GENERATED_BLOCKS = (
    ("README.md", "results", results_table),
    ("docs/benchmarks.md", "results", results_table),
    ("docs/benchmarks.md", "benchmarks", peers_summary),
    ("docs/benchmarks.md", "step-cost", step_cost_summary),
    ("docs/benchmarks.md", "distillation", report_distill.readme_lines),
    ("docs/benchmarks.md", "recovery", report_distill.recovery_lines),
    ("docs/benchmarks.md", "big-models", report_big_models.readme_lines),
    ("docs/benchmarks.md", "cost", cost_lines),
    ("docs/benchmarks.md", "front", report_front.benchmark_lines),
    ("README.md", "front-plot", report_front.readme_lines),
    ("docs/how-to/speed.md", "front", report_front.page_lines),
)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start (generated by benchmarks/report.py) -->", f"<!-- {name}:end -->"


def rendered(root=HERE.parent) -> dict:
    """Every document with generated blocks, as it should read: {path: text}. A missing marker raises."""
    texts = {}
    for document, name, render in GENERATED_BLOCKS:
        path = root / document
        text = texts.get(path, path.read_text())
        texts[path] = replace_block(text, *markers(name), render())
    return texts


def update_documents(root=HERE.parent) -> None:
    """Regenerate every block of GENERATED_BLOCKS in place; every marker is checked before anything is written."""
    for path, text in rendered(root).items():
        if path.read_text() != text:
            path.write_text(text)
