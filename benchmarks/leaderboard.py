"""The committed leaderboard of the default suite: every registered method, 2 orders x 3 seeds, `--eval full`.

    python benchmarks/leaderboard.py [--methods naive,ewc,...] [--seeds 0,1,2] [--orders leaderboard:0,leaderboard:1]
                                     [--jobs 2] [--output results/leaderboard]

Runs `cpt-bench run` once per (method, order, seed) in its own process (`--jobs` at once, one thread each),
skipping one whose result file is already in OUTPUT/runs (so an interrupted leaderboard continues), then
regenerates the table, the HTML page and the plots:

    cpt-bench report results/leaderboard/runs --output results/leaderboard/leaderboard.md
    cpt-bench report results/leaderboard/runs --format html --output results/leaderboard/leaderboard.html
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

DEFAULT_METHODS = ["base", "naive", "one", "joint", "softmask", "ewc", "kd", "derpp", "adapter", "lora", "demix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--orders", default="leaderboard:0,leaderboard:1", help="orders (NAME:K), comma-separated")
    parser.add_argument("--suite", default="synthetic")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default="results/leaderboard")
    args = parser.parse_args()
    out = Path(args.output)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    suite_orders = yaml.safe_load(Path(f"tasks/{args.suite}.yaml").read_text())["orders"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(job: tuple[str, str, str]) -> None:
        method, order, seed = job
        key, _, row = order.partition(":")
        names = "-".join(suite_orders[key][int(row)])
        if list(runs.glob(f"{args.suite}__{method}__{names}__seed{seed}__*.json")):
            print(f"{method} {order} seed {seed}: already there", flush=True)
            return
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--suite", args.suite,
                        "--order", order, "--seed", seed, "--output", str(runs), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        print(f"{method} {order} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, itertools.product(args.methods.split(","), args.orders.split(","),
                                             args.seeds.split(","))))
    report = [sys.executable, "-m", "cpt_bench", "report", str(runs)]
    subprocess.run([*report, "--output", str(out / "leaderboard.md"), "--plots", str(out / "plots")], check=True)
    subprocess.run([*report, "--format", "html", "--output", str(out / "leaderboard.html")], check=True)


if __name__ == "__main__":
    main()
