"""Choose a method setting from a tuning sweep, by dev data only (docs/evaluation.md, "Tuning").

    python benchmarks/tuning.py results/sweeps/ewc.weight.yaml [--max-parallel 2]

The grid file lists one method with one variant per grid value (a setting, or several tied to the same value,
e.g. derpp.alpha and derpp.beta), on the tuning seeds and the dev copy of the suite (`synthetic-dev.yaml`: the
held-out perplexity measured on each domain's dev slice). This runs the grid (`cpt-bench sweep`, skipping what
is done), then applies the protocol:
- the tuning seeds are disjoint from the reported ones (0, 1, 2 are refused);
- the criterion never touches what is reported: the mean over domains of the final MLM perplexity on each
  domain's dev slice; end-task scores (`eval: final`) are shown, not used;
- when the best value lies at an edge of the grid, one more value beyond that edge is added to the grid file
  (once; the grid's last ratio) and run;
- values within TIE (1%) of the best are ties, and a tie that includes the method's current default keeps it.

Writes results/sweeps/<setting>.md beside the grid file.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPORTED_SEEDS = {0, 1, 2}
TIE = 0.01  # criteria within 1% of the best are not told apart (their spread over seeds is several times that)


def dev_criterion(result: dict) -> float:
    """Mean over the run's domains of the final-row MLM perplexity on their dev slices."""
    perplexity = result["perplexity"]
    final = perplexity["stages"][-1]
    return statistics.mean(final[perplexity["corpora"].index(d)] for d in result["domains"])


def run_grid(path: Path, max_parallel: int) -> None:
    subprocess.run([sys.executable, "-m", "cpt_bench", "sweep", str(path), "--max-parallel", str(max_parallel)],
                   check=True)


def tuned_values(spec: dict) -> tuple[str, list[str], dict[str, dict]]:
    (entry,) = spec["methods"]
    variants = entry["variants"]
    keys = sorted({key for values in variants.values() for key in values})
    return entry["method"], keys, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a tuning grid file (results/sweeps/<setting>.yaml)")
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()
    path = Path(args.grid)
    spec = yaml.safe_load(path.read_text())
    if set(spec["seeds"]) & REPORTED_SEEDS:
        raise SystemExit(f"{path}: tuning seeds {spec['seeds']} must be disjoint from the reported "
                         f"{sorted(REPORTED_SEEDS)}")
    run_grid(path, args.max_parallel)
    from cpt_bench.sweeps.grid import load_grid
    from cpt_bench.training.plugin import method_class

    def table() -> list[tuple[str, float, list[float], float, float]]:
        import json

        grid = load_grid(path)
        rows = []
        for label in tuned_values(yaml.safe_load(path.read_text()))[2]:
            runs = sorted((r for r in grid.runs if r.label.startswith(f"{grid.runs[0].method}[{label}]")),
                          key=lambda r: r.seed)
            results = [json.loads(r.result.read_text()) for r in runs]
            criteria = [dev_criterion(r) for r in results]
            rows.append((label, statistics.mean(criteria), criteria,
                         statistics.mean(r["metrics"]["final_macro_f1"] for r in results),
                         statistics.mean(r["metrics"]["forgetting_macro_f1"] for r in results)))
        return rows

    rows = table()
    method, keys, variants = tuned_values(spec)
    values = [float(variants[label][keys[0]]) for label, *_ in rows]
    best = min(range(len(rows)), key=lambda i: rows[i][1])
    if best in (0, len(rows) - 1) and len(rows) >= 2 and not (spec.get("tuning") or {}).get("extended"):
        edge, inner = (values[0], values[1]) if best == 0 else (values[-1], values[-2])
        beyond = edge ** 2 / inner
        label = f"{beyond:g}"
        extended = {label: dict.fromkeys(keys, beyond)}
        spec["methods"][0]["variants"] = {**extended, **variants} if best == 0 else {**variants, **extended}
        spec["tuning"] = {"extended": label}  # noted in the grid file: the protocol extends once
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        run_grid(path, args.max_parallel)
        rows = table()
    default = float(getattr(method_class(method).Settings(), keys[0].split(".", 1)[1]))
    best_row = min(rows, key=lambda r: r[1])
    kept = [r for r in rows if r[1] <= best_row[1] * (1 + TIE) and float(variants.get(r[0], {keys[0]: r[0]})[keys[0]])
            == default]
    chosen = kept[0] if kept else best_row
    tied = f" (with {', '.join(f'`{k}`' for k in keys[1:])} tied to it)" if len(keys) > 1 else ""
    seeds = ",".join(map(str, spec["seeds"]))
    lines = [f"# Sweep of `{keys[0]}`{tied}", "",
             f"Grid file `{path}`, run by `python benchmarks/tuning.py {path}` (which runs `cpt-bench sweep` on it) "
             f"on suite `{spec['suite']}`, the default suite whose held-out files are the dev slices. Chosen by the "
             "dev criterion only: the mean over domains of the final MLM perplexity on each domain's dev slice "
             "(lower is better), averaged over the tuning seeds, which are disjoint from the reported seeds 0, 1, 2 "
             "(on the default suite each seed is its own language). End-task test scores (`eval: final`) are shown "
             f"for information and were not used. Values within {TIE:.0%} of the best criterion are ties; a tie "
             f"that includes the method's default ({default:g}) keeps it.", "",
             f"| value | dev criterion (mean) | per seed ({seeds}) | final MF1 (not used) | "
             "forgetting MF1 (not used) |", "|---|---|---|---|---|"]
    lines += [f"| {v} | {c:.3f}{' **(chosen)**' if v == chosen[0] else ''} | "
              f"{', '.join(f'{x:.3f}' for x in per_seed)} | {f:.3f} | {g:.3f} |" for v, c, per_seed, f, g in rows]
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"chosen {keys[0]}={chosen[0]}; wrote {out}")


if __name__ == "__main__":
    main()
