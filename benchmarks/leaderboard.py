"""The committed leaderboard of the default suite: every registered method, 2 orders x 3 seeds, `--eval full`.

    python benchmarks/leaderboard.py [--methods naive,ewc,...] [--seeds 0,1,2] [--orders leaderboard:0,leaderboard:1]
                                     [--jobs 2] [--output results/leaderboard] [--suite S] [--data-dir D]
                                     [--model M]

Runs `cpt-bench run` once per (method, order, seed) in its own process (`--jobs` at once, one thread each),
skipping one whose result file is already in OUTPUT/runs (so an interrupted leaderboard continues), then
regenerates the table, the HTML page and the plots:

    cpt-bench report results/leaderboard/runs --output results/leaderboard/leaderboard.md
    cpt-bench report results/leaderboard/runs --format html --output results/leaderboard/leaderboard.html

A method may carry settings, `METHOD@KEY=VALUE;KEY=VALUE`, which is how the soft-masking controls are made
under the same protocol (their table is compared with the leaderboard's own `naive` and `softmask` runs):

    python benchmarks/leaderboard.py --output results/softmask --table table.md --no-html \\
        --methods 'softmask@softmask.control=uniform,softmask@softmask.control=inverted' \\
        --compare-with results/leaderboard/runs/synthetic__naive__* results/leaderboard/runs/synthetic__softmask__*
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from cpt_bench.plugin import method_class
from cpt_bench.settings import DAP_SETTINGS_ADDED_LATER, DapSettings

DEFAULT_METHODS = ["base", "naive", "one", "joint", "softmask", "ewc", "kd", "derpp", "adapter", "lora", "demix"]


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`softmask@softmask.budget=0.1;softmask.normalise=budget` -> ("softmask", {"softmask.budget": "0.1", ...})."""
    method, _, settings = text.partition("@")
    pairs = [item.partition("=") for item in settings.split(";") if item]
    return method, {key: value for key, _, value in pairs}


def has_settings(result_file: Path, method: str, settings: dict[str, str]) -> bool:
    """Whether a result file was made with these settings (the method's own, or `dap.KEY` ones) and the
    method's and the DAP's defaults otherwise."""
    from cpt_bench.results import configuration_settings

    result = json.loads(result_file.read_text())
    config = result.get("method_config") or {}
    wanted = dataclasses.asdict(method_class(method).Settings())
    wanted |= {key.removeprefix(f"{method}."): yaml.safe_load(value) for key, value in settings.items()
               if not key.startswith("dap.")}
    dap, defaults = configuration_settings(result).get("dap") or {}, dataclasses.asdict(DapSettings())
    wanted_dap = {key: defaults[key] for key in DAP_SETTINGS_ADDED_LATER}
    wanted_dap |= {key.removeprefix("dap."): yaml.safe_load(value) for key, value in settings.items()
                   if key.startswith("dap.")}
    return all(config.get(key) == value for key, value in wanted.items()) and \
        all(dap.get(key) == value for key, value in wanted_dap.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated METHOD or METHOD@KEY=VALUE;KEY=VALUE")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--orders", default="leaderboard:0,leaderboard:1", help="orders (NAME:K), comma-separated")
    parser.add_argument("--suite", default="synthetic")
    parser.add_argument("--model", help="another model than the suite's (e.g. synthetic-gpt); use its own --output")
    parser.add_argument("--data-dir", help="the suite's data folder (a suite that reads its data from disk)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default="results/leaderboard")
    parser.add_argument("--table", default="leaderboard.md", help="the Markdown table's file name in OUTPUT")
    parser.add_argument("--no-html", action="store_true", help="write only the Markdown table and its plots")
    parser.add_argument("--compare-with", nargs="*", default=[], help="more result files for the report")
    args = parser.parse_args()
    out = Path(args.output)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    suite_orders = yaml.safe_load(Path(f"tasks/{args.suite}.yaml").read_text())["orders"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    variants = [parse_variant(text) for text in args.methods.split(",")]

    def run(job: tuple[tuple[str, dict[str, str]], str, str]) -> None:
        (method, settings), order, seed = job
        key, _, row = order.partition(":")
        names = "-".join(suite_orders[key][int(row)])
        label = " ".join([method, *(f"{k}={v}" for k, v in settings.items()), order, f"seed {seed}"])
        made = runs.glob(f"{args.suite}__{method}__{names}__seed{seed}__*.json")
        if any(has_settings(path, method, settings) for path in made):
            print(f"{label}: already there", flush=True)
            return
        started = time.perf_counter()
        overrides = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
        overrides += ["--model", args.model] if args.model else []
        overrides += ["--data-dir", args.data_dir] if args.data_dir else []
        subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--suite", args.suite,
                        "--order", order, "--seed", seed, *overrides, "--output", str(runs), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, itertools.product(variants, args.orders.split(","), args.seeds.split(","))))
    report = [sys.executable, "-m", "cpt_bench", "report", str(runs), *args.compare_with]
    subprocess.run([*report, "--output", str(out / args.table), "--plots", str(out / "plots")], check=True)
    if not args.no_html:
        subprocess.run([*report, "--format", "html", "--output", str(out / "leaderboard.html")], check=True)


if __name__ == "__main__":
    main()
