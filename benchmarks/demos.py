"""Run the README's demos exactly as the Makefile does and keep what they printed as result files.

The README's tables for ``make demo`` (MiniLM on Rotten Tomatoes) and ``make demo-lm`` (SmolLM2 on Wikipedia
leads) are rendered by ``report.py`` from ``benchmarks/results/demo_*.json``, which this script writes (the demo's
own ``results.json`` plus wall time and peak memory of the whole run).

    python benchmarks/demos.py --demos demo,demo-lm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_result

DEMOS = {"demo": "text_classification", "demo-lm": "causal_lm"}
DEMO_METRIC = {"demo": ("test_accuracy", "higher"), "demo-lm": ("perplexity", "lower")}


def run(target: str, out: Path) -> dict:
    start = time.time()
    done = subprocess.run(
        ["make", "-s", target, f"OUT={out}", f"PYTHON={os.environ.get('PYTHON', 'python3')}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"make {target} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        **json.loads((out / DEMOS[target] / "results.json").read_text()),
        "wall_seconds": seconds,
        "peak_rss_mib_children": peak,
    }


def command_line_walkthrough(out: Path, work: Path, limit: int) -> list[dict]:
    """The README's "Evaluate" commands on the 50% adapter of ``make demo-lm``: what each printed."""
    adapter = out / "causal_lm" / "sparsity_0.5" / "adapter"
    cli = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "peft-loraprune")
    tasks = work / "local_tasks"
    steps = [
        [sys.executable, str(ROOT / "examples" / "local_tasks.py"), "--out", str(tasks)],
        [cli, "report", str(adapter), "--summary_only"],
        [cli, "export", str(adapter), "--out", str(work / "pruned"), "--dtype", "bfloat16"],
        [
            cli,
            "eval",
            str(work / "pruned"),
            "--tasks",
            "rt_sentiment,wiki_continuation",
            "--include_path",
            str(tasks),
            "--limit",
            str(limit),
            "--card",
        ],
    ]
    shown = []
    for cmd in steps:
        start = time.time()
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
        if done.returncode != 0:
            raise SystemExit(f"{cmd} failed:\n{done.stderr[-4000:]}")
        shown.append(
            {
                "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
                "stdout": done.stdout,
                "seconds": time.time() - start,
            }
        )
    return shown


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", default="demo,demo-lm")
    parser.add_argument("--out", default=None)
    parser.add_argument("--eval_limit", type=int, default=200, help="documents per task in the CLI walkthrough")
    args = parser.parse_args()
    for target in args.demos.split(","):
        with tempfile.TemporaryDirectory() as d:
            result = run(target, Path(d))
            if target == "demo-lm":
                result["command_line"] = command_line_walkthrough(Path(d), Path(d) / "cli", args.eval_limit)
        path = write_result(
            f"demo_{DEMOS[target]}",
            {"target": f"make {target}", "result": result},
            args.out,
            table=table(*DEMO_METRIC[target]),
        )
        print(f"written {path}")


if __name__ == "__main__":
    main()
