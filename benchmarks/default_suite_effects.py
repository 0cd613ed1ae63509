"""Measure what the embedded default suite shows (issue: "the default suite must be diagnostic").

Runs `cpt-bench run` for naive, one and base over seeds 0, 1, 2 (one process per (method, seed), so the
wall time of a default naive run is measured as a user sees it), then writes the effects table:

    python benchmarks/default_suite_effects.py [--output results/default-suite]
    python benchmarks/default_suite_effects.py --from-runs results/leaderboard/runs   # no new runs

With `--from-runs DIR` it reads the base, naive and one result files of seeds 0, 1, 2 already in DIR (e.g.
the leaderboard's) and takes the wall time from their `wall_seconds`.

Effects (CONTRACT.md names): DAP helps = mean_j one.A[j][j] - base[j] (macro-F1), and per domain; naive
forgets = metrics.forgetting_macro_f1 of naive; naive hurts general knowledge = probes.general.base - last
stage; stable = std over seeds of naive's final macro-F1; fast = wall time of a default naive run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (0, 1, 2)
REQUIRED = {"DAP helps (mean)": 0.15, "DAP helps (each domain)": 0.05, "naive forgets": 0.08,
            "naive hurts general knowledge": 0.05}


def run(method: str, seed: int, runs: Path) -> tuple[dict, float]:
    before = set(runs.glob("*.json"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cpt_bench", "run", "--method", method, "--seed", str(seed),
                    "--output", str(runs), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    new = sorted(set(runs.glob("*.json")) - before) or sorted(
        runs.glob(f"synthetic__{method}__*__seed{seed}__*.json"), key=os.path.getmtime)[-1:]
    return json.loads(new[-1].read_text()), seconds


def existing(method: str, seed: int, runs: Path) -> tuple[dict, float]:
    found = sorted(runs.glob(f"synthetic__{method}__*__seed{seed}__*.json"), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no {method} seed {seed} result file in {runs}")
    result = json.loads(found[-1].read_text())
    return result, float(result["wall_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="results/default-suite")
    parser.add_argument("--from-runs", default=None, help="read existing result files instead of running")
    args = parser.parse_args()
    out = Path(args.output)
    runs = Path(args.from_runs) if args.from_runs else out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not args.from_runs:  # build the cached base model outside the timed runs (a first run pays it once)
        subprocess.run([sys.executable, "-c",
                        "from cpt_bench.synthetic import build_base_model; build_base_model()"], check=True)
    results: dict[str, dict[int, dict]] = {"naive": {}, "one": {}, "base": {}}
    naive_seconds = []
    for seed in SEEDS:
        for method in ("base", "naive", "one"):
            result, seconds = existing(method, seed, runs) if args.from_runs else run(method, seed, runs)
            results[method][seed] = result
            if method == "naive":
                naive_seconds.append(seconds)
            print(f"{method} seed {seed}: final {result['metrics']['final_macro_f1']:.3f} ({seconds:.0f} s)",
                  flush=True)

    domains = results["naive"][0]["domains"]
    per_domain = {d: [results["one"][s]["matrix"]["macro_f1"][j][j] - results["one"][s]["base"]["macro_f1"][j]
                      for s in SEEDS] for j, d in enumerate(domains)}
    helps = [statistics.mean(per_domain[d][i] for d in domains) for i in range(len(SEEDS))]
    forgets = [results["naive"][s]["metrics"]["forgetting_macro_f1"] for s in SEEDS]
    general = [results["naive"][s]["probes"]["general"]["base"] - results["naive"][s]["probes"]["general"]["stages"][-1]
               for s in SEEDS]
    finals = [results["naive"][s]["metrics"]["final_macro_f1"] for s in SEEDS]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} (seeds: {', '.join(f'{v:.3f}' for v in values)})"

    rows = [
        ("DAP helps (mean)", "mean_j one.A[j][j] − base[j], macro-F1", cell(helps), "≥ 0.15",
         min(helps) >= 0.15),
        *[(f"DAP helps: {d}", "one.A[j][j] − base[j]", cell(per_domain[d]), "≥ 0.05", min(per_domain[d]) >= 0.05)
          for d in domains],
        ("naive forgets", "naive metrics.forgetting_macro_f1", cell(forgets), "≥ 0.08", min(forgets) >= 0.08),
        ("naive hurts general knowledge", "probes.general: base − after last stage", cell(general), "≥ 0.05",
         min(general) >= 0.05),
        ("stable", "std over seeds of naive final macro-F1", f"{statistics.stdev(finals):.4f}", "≤ 0.03",
         statistics.stdev(finals) <= 0.03),
        ("fast", "wall time of `cpt-bench run --method naive` (base model cached)",
         f"{statistics.mean(naive_seconds):.0f} s (runs: {', '.join(f'{s:.0f}' for s in naive_seconds)})",
         "≤ 180 s", max(naive_seconds) <= 180),
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    from_runs = f" --from-runs {runs}" if args.from_runs else ""
    lines = ["# What the default suite shows", "",
             (f"Measured by `python benchmarks/default_suite_effects.py{from_runs}` "
             f"on {machine}; result files in `{runs}`."), "",
             "| effect | definition | measured (mean over seeds 0, 1, 2) | required | met |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {'yes' if e else 'NO'} |" for a, b, c, d, e in rows]
    (out / "effects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
