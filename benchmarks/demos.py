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
import tempfile
import time
from pathlib import Path

from common import ROOT, write_result

DEMOS = {"demo": "text_classification", "demo-lm": "causal_lm"}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", default="demo,demo-lm")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for target in args.demos.split(","):
        with tempfile.TemporaryDirectory() as d:
            result = run(target, Path(d))
        path = write_result(f"demo_{DEMOS[target]}", {"target": f"make {target}", "result": result}, args.out)
        print(f"written {path}")


if __name__ == "__main__":
    main()
