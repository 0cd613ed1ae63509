"""The das6-lite thresholds (issue 20), measured from result files of `--suite das6-lite`:

    python benchmarks/das6_lite.py RUNS_DIR --data-dir ../shared/data/das6-mini [--seeds 0,1,2]
                                   [--timing naive=SECONDS,softmask=SECONDS] [--output results/das6-lite]

Reads the default-configuration runs of `base`, `one` and `naive` (and `softmask`, if there) and writes
OUTPUT/thresholds.md: the base probe against the majority label of each (subsampled) test split, `one`'s
perplexity on its own domain after its stage against the base model's, naive's perplexity forgetting per seed,
and one − base per domain with a 95% t-interval over seeds. Wall times are the `wall_seconds` of the result
files unless `--timing` gives times measured apart (a run alone on the machine).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import statistics
from pathlib import Path

from cpt_bench.data.suite import load_suite
from cpt_bench.data.texts import read_end_task
from cpt_bench.evaluation.evaluator import score
from cpt_bench.report.stats import summarise_values
from cpt_bench.report.table import perplexity_forgetting
from cpt_bench.running.results import method_configuration
from cpt_bench.training.plugin import METHODS, load_plugins

SUITE = "das6-lite"


def load(runs: Path, seeds: set[int]) -> dict[str, dict[int, dict]]:
    """method -> seed -> result, for default-configuration runs of the suite."""
    load_plugins()
    found: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for path in sorted(runs.glob(f"{SUITE}__*.json")):
        result = json.loads(path.read_text())
        cls = METHODS.get(result["method"])
        if cls and result["seed"] in seeds and method_configuration(result) == dataclasses.asdict(cls.Settings()):
            found[result["method"]][result["seed"]] = result
    return found


def majority_macro_f1(data_dir: Path, domains: list[str]) -> dict[str, float]:
    """Each task's macro-F1 of always predicting its test split's most frequent label (as the suite samples it)."""
    suite = load_suite(SUITE)
    scores = {}
    for name in domains:
        test = read_end_task(name, suite.domain(name).end_task, data_dir, None).test.labels
        majority = collections.Counter(test).most_common(1)[0][0]
        scores[name] = score([majority] * len(test), test, len(suite.domain(name).end_task.labels))["macro_f1"]
    return scores


def cell(values: list[float], digits: int = 3) -> str:
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def rows(runs: dict[str, dict[int, dict]], majority: dict[str, float], timing: dict[str, float]) -> list[tuple]:
    base, one, naive = runs["base"], runs["one"], runs["naive"]
    seeds = sorted(set(base) & set(one) & set(naive))
    out = []
    for d, floor in majority.items():
        values = [dict(zip(base[s]["domains"], base[s]["base"]["macro_f1"]))[d] for s in seeds]
        out.append((f"the evaluator learns: {d}", f"base probe macro-F1 (majority label: {floor:.3f})",
                    cell(values), f"≥ {floor + 0.10:.3f}", statistics.mean(values) >= floor + 0.10))
    for d in majority:
        ratios = []
        for s in seeds:
            block = one[s]["perplexity"]
            column, row = block["corpora"].index(d), one[s]["matrix_rows"].index(d)
            ratios.append(block["stages"][row][column] / block["base"][column])
        out.append((f"DAP adapts: {d}", "one's held-out perplexity after its stage / base's", cell(ratios),
                    "≤ 0.85", max(ratios) <= 0.85))
    forgetting = [perplexity_forgetting(naive[s]) for s in seeds]
    out.append(("forgetting is visible", "naive's perplexity forgetting, per seed",
                ", ".join(f"{v:.2f}" for v in forgetting), "> 0 on every seed", min(forgetting) > 0))
    for d in majority:
        differences = []
        for s in seeds:
            row = one[s]["matrix_rows"].index(d)
            column = one[s]["domains"].index(d)
            differences.append(one[s]["matrix"]["macro_f1"][row][column] -
                               dict(zip(one[s]["domains"], one[s]["base"]["macro_f1"]))[d])
        summary = summarise_values(differences)
        interval = f" [{summary.ci_low:+.3f}, {summary.ci_high:+.3f}]" if summary.n > 1 else ""
        out.append((f"DAP's end-task effect: {d}", "one − base, macro-F1 (mean, 95% t-interval over seeds)",
                    f"{summary.mean:+.3f}{interval}", "reported, any sign", True))
    walls = {m: timing.get(m) or statistics.mean(r["wall_seconds"] for r in runs[m].values())
             for m in ("naive", "softmask") if m in runs or m in timing}
    if "naive" in walls:
        out.append(("laptop time", "naive, 3 domains, `--eval full`, models cached", f"{walls['naive'] / 60:.1f} min",
                    "≤ 20 min", walls["naive"] <= 20 * 60))
    if "softmask" in walls and "naive" in walls:
        ratio = walls["softmask"] / walls["naive"]
        out.append(("laptop time", "softmask / naive wall time", f"{ratio:.2f}×", "≤ 2.5×", ratio <= 2.5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--timing", default="", help="METHOD=SECONDS,...: wall times measured apart")
    parser.add_argument("--output", default="results/das6-lite")
    args = parser.parse_args()
    runs = load(Path(args.runs), {int(s) for s in args.seeds.split(",")})
    for needed in ("base", "one", "naive"):
        if needed not in runs:
            raise SystemExit(f"no default {needed} runs of {SUITE} in {args.runs}")
    domains = next(iter(runs["naive"].values()))["domains"]
    timing = {k: float(v) for k, _, v in (item.partition("=") for item in args.timing.split(",") if item)}
    table = rows(runs, majority_macro_f1(Path(args.data_dir), domains), timing)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    lines = ["# das6-lite: the thresholds", "",
             f"`python benchmarks/das6_lite.py {args.runs} --data-dir {args.data_dir} --seeds {args.seeds}"
             f"{' --timing ' + args.timing if args.timing else ''}` on {machine}; mean ± sample std over seeds.", "",
             "| what | definition | measured | required | met |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {'yes' if e else 'NO'} |" for a, b, c, d, e in table]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thresholds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
