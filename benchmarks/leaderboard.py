"""The committed leaderboard of the default suite: every registered method, seeds 0, 1, 2, `--eval full`.

    python benchmarks/leaderboard.py [--methods naive,ewc,...] [--seeds 0,1,2] [--output results/leaderboard]

Runs `cpt-bench run` once per (method, seed) in its own process (wall time as a user sees it), skipping a
(method, seed) whose result file is already in OUTPUT/runs (so an interrupted leaderboard continues), then
regenerates the table, the HTML page and the plots:

    cpt-bench report results/leaderboard/runs --output results/leaderboard/leaderboard.md
    cpt-bench report results/leaderboard/runs --format html --output results/leaderboard/leaderboard.html
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_METHODS = ["base", "naive", "one", "joint", "softmask", "ewc", "kd", "derpp", "adapter", "lora", "demix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--suite", default="synthetic")
    parser.add_argument("--output", default="results/leaderboard")
    args = parser.parse_args()
    out = Path(args.output)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        for seed in args.seeds.split(","):
            if list(runs.glob(f"{args.suite}__{method}__*__seed{seed}__*.json")):
                print(f"{method} seed {seed}: already there", flush=True)
                continue
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--suite", args.suite,
                            "--seed", seed, "--output", str(runs), "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
            print(f"{method} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    report = [sys.executable, "-m", "cpt_bench", "report", str(runs)]
    subprocess.run([*report, "--output", str(out / "leaderboard.md"), "--plots", str(out / "plots")], check=True)
    subprocess.run([*report, "--format", "html", "--output", str(out / "leaderboard.html")], check=True)


if __name__ == "__main__":
    main()
