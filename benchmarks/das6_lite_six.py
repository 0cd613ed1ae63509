"""das6-lite over all six das6 domains (issue 34): does the evaluator still learn on every domain, and does a naive
run over six domains fit a laptop?

    python benchmarks/das6_lite_six.py BASE_RESULT NAIVE_RESULT --data-dir DIR [--output FILE]

BASE_RESULT and NAIVE_RESULT are result files of `cpt-bench run --method base|naive --suite das6-lite --data-dir
DIR --order paper:K` (naive with `--eval full`). Writes a markdown table: per domain the base probe's macro-F1
against its test split's majority label (required: majority + 0.10), the split sizes and dev split the run used,
naive's final and own-stage scores; then naive's wall time (required: ≤ 45 minutes on 2 cores) and stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from das6_lite import majority_macro_f1

from cpt_bench.report.table import perplexity_forgetting

LAPTOP_MINUTES = 45


def table(base: dict, naive: dict, data_dir: Path) -> list[str]:
    domains = naive["domains"]
    majority = majority_macro_f1(data_dir, domains)
    base_f1 = dict(zip(base["domains"], base["base"]["macro_f1"]))
    tasks = naive["settings"]["end_tasks"]
    matrix = naive["matrix"]["macro_f1"]
    lines = ["| domain | train / dev / test used | dev split | majority MF1 | base probe MF1 | required | met | "
             "naive: own stage | naive: final |", "|---|---|---|---|---|---|---|---|---|"]
    for j, name in enumerate(domains):
        sizes = tasks[name]["examples"]
        learned = base_f1[name] >= majority[name] + 0.10
        lines.append(f"| {name} | {sizes['train']} / {sizes.get('dev', 0)} / {sizes['test']} | "
                     f"{tasks[name].get('dev_split', '')} | {majority[name]:.3f} | {base_f1[name]:.3f} | "
                     f"≥ {majority[name] + 0.10:.3f} | {'yes' if learned else 'NO'} | {matrix[j][j]:.3f} | "
                     f"{matrix[-1][j]:.3f} |")
    minutes = naive["wall_seconds"] / 60
    forgetting = perplexity_forgetting(naive)
    lines += ["", f"naive over six domains, `--eval full` ({len(domains) * (len(domains) + 1) // 2} end-task "
              f"evaluations): **{minutes:.1f} min** wall (required ≤ {LAPTOP_MINUTES}: "
              f"{'yes' if minutes <= LAPTOP_MINUTES else 'NO'}), device `{naive['provenance']['device']}`; "
              f"DAP {sum(s['seconds'] for s in naive['stages']) / 60:.1f} min of it; final macro-F1 "
              f"{naive['metrics']['final_macro_f1']:.3f}, forgetting {naive['metrics']['forgetting_macro_f1']:.3f}, "
              f"perplexity forgetting {forgetting:.2f}; held-out text per corpus: "
              + "; ".join(f"{c}: {n}" for c, n in naive["perplexity"].get("heldout", {}).items()) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("naive", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    base, naive = (json.loads(p.read_text()) for p in (args.base, args.naive))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    lines = [f"`python benchmarks/das6_lite_six.py {args.base.name} {args.naive.name} --data-dir {args.data_dir}` "
             f"on {machine}, order {','.join(naive['domains'])}, seed {naive['seed']}.", "", *table(base, naive,
                                                                                                  args.data_dir)]
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
