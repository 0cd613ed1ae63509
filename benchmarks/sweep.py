"""Sweep one method setting over a grid on the default suite, choosing by dev data only (the tuning protocol).

    python benchmarks/sweep.py ewc.weight 1e2,1e3,1e4,1e5 [--seeds 100,101] [--order leaderboard:0]
    python benchmarks/sweep.py derpp.alpha 0.1,0.3,1,3 --tie derpp.beta     # beta set to alpha's value

The protocol (docs/evaluation.md, "Tuning"):
- seeds disjoint from the reported ones: 100, 101 by default, and the leaderboard's seeds 0, 1, 2 are refused
  (on the default suite a seed is also a language, so the choice is made on languages never reported);
- the criterion never touches what is reported: the mean over domains of the final MLM perplexity on each
  domain's *dev* slice (`<domain>/dev.jsonl`, generated apart from the held-out text behind the reported
  perplexity matrix and from the corpus). The runs use a copy of the suite whose held-out files are the dev
  files, so their perplexity matrix is the dev one; end-task scores (`--eval final`) are recorded, not used;
- every method with a strength knob gets the same budget: one grid of about four values, and, when the best
  value lies at an edge of the grid, one more value beyond that edge (once; the grid's last ratio);
- a flat criterion does not move a default: values within TIE (1%) of the best are ties, and a tie that
  includes the method's current default keeps it (the paper's value, where the default is the paper's).

Writes OUTPUT/<setting>.md (the grid, the criterion per seed, the choice) and keeps the result files in
OUTPUT/runs. Runs `--jobs` processes at once, one thread each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPORTED_SEEDS = {0, 1, 2}
TIE = 0.01  # criteria within 1% of the best are not told apart (their spread over seeds is several times that)


def dev_suite(suite_file: Path, output: Path) -> Path:
    """A copy of the suite whose held-out corpora are the dev slices (`heldout.jsonl` -> `dev.jsonl`; or, for
    held-out text cut from the corpora, the dev slice cut before it: `perplexity.score: dev`)."""
    suite = yaml.safe_load(suite_file.read_text(encoding="utf-8"))
    swapped = 0
    for holder in [*suite["domains"], suite.get("heldout_corpora") or {}]:
        for key, value in list(holder.items()):
            if (key == "heldout" or holder is suite.get("heldout_corpora")) and isinstance(value, str) \
                    and value.endswith("heldout.jsonl"):
                holder[key] = value.removesuffix("heldout.jsonl") + "dev.jsonl"
                swapped += 1
    if (suite.get("perplexity") or {}).get("dev_texts"):
        suite["perplexity"]["score"] = "dev"
        swapped += 1
    if not swapped:
        raise SystemExit(f"{suite_file}: no held-out files to swap for dev slices")
    suite["name"] = f"{suite['name']}-dev"
    suite["description"] = f"{suite['name']}: the held-out perplexity measured on the dev slices (tuning only)"
    path = output / f"{suite['name']}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


def dev_criterion(result: dict) -> float:
    """Mean over the run's domains of the final-row MLM perplexity on their dev slices."""
    perplexity = result["perplexity"]
    final = perplexity["stages"][-1]
    return statistics.mean(final[perplexity["corpora"].index(d)] for d in result["domains"])


def current_default(setting: str) -> float:
    from cpt_bench.plugin import method_class

    method, key = setting.split(".", 1)
    return float(getattr(method_class(method).Settings(), key))


def best_value(grid: list[str], done: list[tuple[str, int, dict]]) -> str:
    return min(grid, key=lambda v: statistics.mean(dev_criterion(r) for value, _, r in done if value == v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", help="METHOD.KEY, e.g. ewc.weight")
    parser.add_argument("grid", help="comma-separated values")
    parser.add_argument("--tie", default=None, help="METHOD.KEY set to the same value at each grid point")
    parser.add_argument("--seeds", default="100,101")
    parser.add_argument("--order", default="leaderboard:0")
    parser.add_argument("--suite", default="tasks/synthetic.yaml")
    parser.add_argument("--output", default="results/sweeps")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if set(seeds) & REPORTED_SEEDS:
        raise SystemExit(f"--seeds {args.seeds}: tuning seeds must be disjoint from the reported "
                         f"{sorted(REPORTED_SEEDS)}")
    method = args.setting.split(".", 1)[0]
    output = Path(args.output)
    runs = output / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    suite = dev_suite(Path(args.suite), output)
    grid = args.grid.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(point: tuple[str, int]) -> tuple[str, int, dict]:
        value, seed = point
        sets = [f"{args.setting}={value}"] + ([f"{args.tie}={value}"] if args.tie else [])
        folder = runs / f"{args.setting}={value}" / f"seed{seed}"  # one folder a point: its file is found
        if not list(folder.glob("*.json")):  # a point run before (e.g. before the grid was extended) is kept
            subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--suite", str(suite),
                           "--seed", str(seed), "--order", args.order, "--eval", "final",
                           *itertools.chain.from_iterable(["--set", s] for s in sets),
                           "--output", str(folder), "--quiet"], check=True, stdout=subprocess.DEVNULL, env=env)
        result = json.loads(max(folder.glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
        print(f"{' '.join(sets)} seed {seed}: dev perplexity {dev_criterion(result):.3f}", flush=True)
        return value, seed, result

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(run, itertools.product(grid, seeds)))
        edge = best_value(grid, done)
        if edge in (grid[0], grid[-1]) and len(grid) >= 2:  # the optimum may lie beyond: one step further, once
            first, second = (grid[0], grid[1]) if edge == grid[0] else (grid[-1], grid[-2])
            beyond = f"{float(first) ** 2 / float(second):g}"
            grid = [beyond, *grid] if edge == grid[0] else [*grid, beyond]
            done += list(pool.map(run, itertools.product([beyond], seeds)))
    rows = []
    for value in grid:
        results = [r for v, _, r in sorted(done, key=lambda d: d[1]) if v == value]
        criteria = [dev_criterion(r) for r in results]
        rows.append((value, statistics.mean(criteria), criteria,
                     statistics.mean(r["metrics"]["final_macro_f1"] for r in results),
                     statistics.mean(r["metrics"]["forgetting_macro_f1"] for r in results)))
    best = min(rows, key=lambda r: r[1])
    default = current_default(args.setting)
    kept = [r for r in rows if r[1] <= best[1] * (1 + TIE) and float(r[0]) == default]
    best = kept[0] if kept else best
    tie = f" --tie {args.tie}" if args.tie else ""
    lines = [f"# Sweep of `{args.setting}`{f' (with `{args.tie}` tied to it)' if args.tie else ''}", "",
             f"Command: `python benchmarks/sweep.py {args.setting} {args.grid}{tie} --seeds {args.seeds} "
             f"--order {args.order}` (suite `{args.suite}`, whose held-out files were swapped for the dev slices: "
             f"`{suite.name}`). Chosen by the dev criterion only: the mean over domains of the final MLM "
             "perplexity on each domain's dev slice (lower is better), averaged over the tuning seeds, which "
             "are disjoint from the reported seeds 0, 1, 2 (on the default suite each seed is its own language). "
             "End-task test scores (`--eval final`) are shown for information and were not used. "
             f"Values within {TIE:.0%} of the best criterion are ties; a tie that includes the method's default "
             f"({default:g}) keeps it.", "",
             f"| value | dev criterion (mean) | per seed ({args.seeds}) | final MF1 (not used) | "
             "forgetting MF1 (not used) |", "|---|---|---|---|---|"]
    lines += [f"| {v} | {c:.3f}{' **(chosen)**' if v == best[0] else ''} | "
              f"{', '.join(f'{x:.3f}' for x in per_seed)} | {f:.3f} | {g:.3f} |" for v, c, per_seed, f, g in rows]
    path = output / f"{args.setting}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"chosen {args.setting}={best[0]}; wrote {path}")


if __name__ == "__main__":
    main()
