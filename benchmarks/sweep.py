"""Sweep one method setting over a grid on the default suite and pick the value by dev data only.

    python benchmarks/sweep.py ewc.weight 1e2,1e3,1e4,1e5 [--seed 0] [--output results/sweeps]

Selection criterion (never the end-task test sets): the mean over domains of the final held-out MLM
perplexity (`perplexity.stages[-1]`, held-out text of every domain, never trained on): a setting that protects
old domains without blocking the new one lowers it. Runs use `--eval final` (the end-task scores are not
used for the choice; they are recorded for information). Writes OUTPUT/<setting>.md with the grid, the
criterion and the choice, and keeps the result files in OUTPUT/runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def dev_criterion(result: dict) -> float:
    perplexity = result["perplexity"]
    domains = [result["domains"].index(c) for c in perplexity["corpora"] if c in result["domains"]]
    if not domains:
        raise SystemExit("the suite records no held-out perplexity: nothing to select on")
    final = perplexity["stages"][-1]
    return sum(final[perplexity["corpora"].index(result["domains"][j])] for j in domains) / len(domains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", help="METHOD.KEY, e.g. ewc.weight")
    parser.add_argument("grid", help="comma-separated values")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--suite", default="synthetic")
    parser.add_argument("--output", default="results/sweeps")
    args = parser.parse_args()
    method = args.setting.split(".", 1)[0]
    runs = Path(args.output) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for value in args.grid.split(","):
        before = set(runs.glob("*.json"))
        subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--suite", args.suite,
                        "--seed", args.seed, "--eval", "final", "--set", f"{args.setting}={value}",
                        "--output", str(runs), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        new = sorted(set(runs.glob("*.json")) - before)
        if not new:  # the same configuration ran before: its file was rewritten in place
            new = [max(runs.glob(f"{args.suite}__{method}__*__seed{args.seed}__*.json"),
                       key=lambda p: p.stat().st_mtime)]
        result = json.loads(new[-1].read_text())
        rows.append((value, dev_criterion(result), result["metrics"]["final_macro_f1"],
                     result["metrics"]["forgetting_macro_f1"], new[-1].name))
        print(f"{args.setting}={value}: dev perplexity {rows[-1][1]:.3f}", flush=True)
    best = min(rows, key=lambda r: r[1])
    lines = [f"# Sweep of `{args.setting}` on suite `{args.suite}` (seed {args.seed})", "",
             (f"Command: `python benchmarks/sweep.py {args.setting} {args.grid} --seed {args.seed}`. "
             "Chosen by the dev criterion only: mean over domains of the final held-out MLM perplexity "
             "(lower is better); end-task test scores (`--eval final`) are shown for information and were not "
             "used."), "",
             "| value | dev: mean final held-out perplexity | final MF1 (test, not used) | forgetting MF1 | result |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {c:.3f}{' (chosen)' if (v, c) == best[:2] else ''} | {f:.3f} | "
              f"{'—' if g is None else f'{g:.3f}'} | `{n}` |" for v, c, f, g, n in rows]
    path = Path(args.output) / f"{args.setting}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"chosen {args.setting}={best[0]}; wrote {path}")


if __name__ == "__main__":
    main()
