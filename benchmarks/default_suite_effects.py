"""Measure what the embedded default suite shows, against the thresholds it is built to meet.

Reads result files of the default suite made at both leaderboard orders and several seeds (e.g. the
leaderboard's, `results/leaderboard/runs`, or a development folder) and writes the effects table:

    python benchmarks/default_suite_effects.py RUNS_DIR [--seeds 0,1,2] [--output results/default-suite]
    python benchmarks/default_suite_effects.py RUNS_DIR --time-naive   # also times default naive runs

Every effect is computed per matched run (order, seed) and summarised over the runs; "the suite ranks" uses the
exact sign-flip test of `cpt_bench.report.stats` on runs matched by (order, seed), like `cpt-bench report`.
`--time-naive` times `cpt-bench run --method naive` (defaults, base model cached) for each seed as a user
runs it, one at a time, and the base model build of a fresh suite seed (`--build-seed`, default 999, a seed no
development looked at).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpt_bench.report.stats import sign_flip_test
from cpt_bench.report.table import general_retention, perplexity_forgetting

BASELINES = {"one", "joint", "base"}  # not methods to rank
CHANCE = 1.0 / 3  # three balanced classes


def load(runs: Path, seeds: set[int]) -> dict[str, dict[tuple, dict]]:
    """method -> {(order, seed): result} for default-configuration runs of the default suite."""
    by_method: dict[str, dict[tuple, dict]] = {}
    for path in sorted(runs.glob("synthetic__*.json")):
        result = json.loads(path.read_text())
        if result["seed"] in seeds and _is_default_configuration(result):
            by_method.setdefault(result["method"], {})[(tuple(result["domains"]), result["seed"])] = result
    return by_method


def _is_default_configuration(result: dict) -> bool:
    """The method's default settings (an ablation or a sweep point is another configuration)."""
    from cpt_bench.running.results import method_configuration
    from cpt_bench.training.plugin import METHODS, load_plugins

    load_plugins()
    cls = METHODS.get(result["method"])
    return cls is not None and method_configuration(result) == dataclasses.asdict(cls.Settings())


def mean_cell(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread} (n = {len(values)})"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def effects(runs: dict[str, dict[tuple, dict]]) -> list[tuple[str, str, str, str, bool]]:
    """(effect, definition, measured, required, met) for every threshold measurable from result files."""
    keys = sorted(runs["naive"])
    rows = []

    def add(effect: str, definition: str, values: list[float], required: str, met: bool):
        rows.append((effect, definition, mean_cell(values), required, met))

    def diagonal(result: dict) -> dict[str, float]:
        matrix = result["matrix"]["macro_f1"]
        return {d: matrix[j][j] for j, d in enumerate(result["domains"])}

    def base_scores(result: dict) -> dict[str, float]:
        return dict(zip(result["domains"], result["base"]["macro_f1"]))

    ones = [runs["one"][k] for k in keys if k in runs["one"]]
    domains = sorted(ones[0]["domains"])
    helps = [statistics.mean(diagonal(r)[d] - base_scores(r)[d] for d in domains) for r in ones]
    add("DAP helps", "mean over domains of one's diagonal − base (macro-F1)", helps, "≥ 0.30",
        statistics.mean(helps) >= 0.30)
    for d in domains:
        values = [diagonal(r)[d] - base_scores(r)[d] for r in ones]
        add(f"… on {d}", "the same difference", values, "≥ 0.10", statistics.mean(values) >= 0.10)
    one_diagonal = [statistics.mean(diagonal(r).values()) for r in ones]
    add("not saturated", "mean of one's diagonal", one_diagonal, "≤ 0.95", statistics.mean(one_diagonal) <= 0.95)
    base_mean = [statistics.mean(r["base"]["macro_f1"]) for r in runs["naive"].values()]
    add("not saturated", "base mean macro-F1 (chance 0.333)", base_mean, f"≥ {CHANCE + 0.05:.3f}",
        statistics.mean(base_mean) >= CHANCE + 0.05)
    forgets = [runs["naive"][k]["metrics"]["forgetting_macro_f1"] for k in keys]
    add("naive forgets, partly", "naive's forgetting_macro_f1", forgets, "0.15 – 0.85",
        0.15 <= statistics.mean(forgets) <= 0.85)
    naive_transfer = statistics.mean(runs["naive"][k]["metrics"]["transfer_macro_f1"] for k in keys)
    for frozen in ("adapter", "lora"):
        if frozen in runs:
            values = [r["metrics"]["transfer_macro_f1"] for r in runs[frozen].values()]
            add(f"frozen-embedding methods learn: {frozen}", f"transfer_macro_f1 (naive's: {naive_transfer:.3f})",
                values, f"≥ {0.5 * naive_transfer:.3f}", statistics.mean(values) >= 0.5 * naive_transfer)
    general = [-general_retention(runs["naive"][k]) for k in keys]
    add("naive hurts general knowledge", "general probe: base − after the last stage", general, "≥ 0.05",
        statistics.mean(general) >= 0.05)
    if set(runs) - BASELINES - {"naive"}:  # methods to rank (a run of the baselines alone has none)
        rows.append(ranking(runs, keys))
    finals = [runs["naive"][k]["metrics"]["final_macro_f1"] for k in keys]
    rows.append(("stable", "std of naive's final macro-F1 over the runs", f"{statistics.stdev(finals):.3f} "
                 f"(n = {len(finals)})", "≤ 0.08", statistics.stdev(finals) <= 0.08))
    return rows


def ranking(runs: dict[str, dict[tuple, dict]], keys: list[tuple]) -> tuple[str, str, str, str, bool]:
    """How many methods differ from naive (exact paired sign-flip p < 0.05) in final MF1 or ppl forgetting;
    every method's smallest p is listed, since n matched runs cannot reach below 2 / 2^n."""
    significant, smallest = [], []
    for method, results in sorted(runs.items()):
        if method in BASELINES | {"naive"}:
            continue
        tests = []
        for column, value in (("final MF1", lambda r: r["metrics"]["final_macro_f1"]),
                              ("ppl forgetting", perplexity_forgetting)):
            pairs = [(value(results[k]), value(runs["naive"][k])) for k in keys if k in results]
            differences = [a - b for a, b in pairs if a is not None and b is not None]
            if len(differences) >= 2:
                tests.append((sign_flip_test(differences), column))
        if tests:
            test, column = min(tests, key=lambda t: t[0].p)
            smallest.append(f"{method} {column} p = {test.p:.3f} (n = {test.pairs})")
            if test.significant:
                significant.append(method)
    return ("the suite ranks", "methods (not one/joint/base) whose final MF1 or ppl forgetting differs from "
            "naive's, exact paired p < 0.05", f"{len(significant)}: {'; '.join(smallest)}", "≥ 3",
            len(significant) >= 3)


def timings(seeds: set[int], build_seed: int) -> list[tuple[str, str, str, str, bool]]:
    cli = [sys.executable, "-m", "cpt_bench"]
    with tempfile.TemporaryDirectory() as scratch:
        seconds = [timed([*cli, "run", "--method", "naive", "--seed", str(s), "--output", scratch, "--quiet"])
                   for s in sorted(seeds)]
    build = timed([sys.executable, "-c", "from cpt_bench.data.suite import load_suite; "
                   "from cpt_bench.running.synthetic import materialise, build_base_model; "
                   "build_base_model(materialise(load_suite("
                   f"'synthetic').generator, {build_seed}))"])
    return [("fast", "`cpt-bench run --method naive` (defaults, base model cached)",
             f"{statistics.mean(seconds):.0f} s (runs: {', '.join(f'{s:.0f}' for s in seconds)})", "≤ 180 s",
             max(seconds) <= 180),
            ("fast", f"base model build of a fresh suite seed ({build_seed})", f"{build:.0f} s", "≤ 120 s",
             build <= 120)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="folder of result files (both leaderboard orders, several seeds)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default="results/default-suite")
    parser.add_argument("--time-naive", action="store_true", help="also time default naive runs and a build")
    parser.add_argument("--build-seed", type=int, default=999)
    parser.add_argument("--note", default="", help="a paragraph put under the header (e.g. which seeds and why)")
    args = parser.parse_args()
    seeds = {int(s) for s in args.seeds.split(",")}
    runs = load(Path(args.runs), seeds)
    for needed in ("base", "one", "naive"):
        if needed not in runs:
            raise SystemExit(f"no default {needed} runs of seeds {sorted(seeds)} in {args.runs}")
    rows = effects(runs) + (timings(seeds, args.build_seed) if args.time_naive else [])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    lines = ["# What the default suite shows", "",
             f"Measured by `python benchmarks/default_suite_effects.py {args.runs} --seeds {args.seeds}"
             f"{' --time-naive' if args.time_naive else ''}` on {machine}: runs matched by (order, seed), "
             f"{len(runs['naive'])} of them; mean ± sample std over runs.", "",
             *([args.note, ""] if args.note else []),
             "| effect | definition | measured | required | met |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {'yes' if e else 'NO'} |" for a, b, c, d, e in rows]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "effects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
