"""Paired comparisons of soft-masking's controls with the default soft-masking, run for run.

    python benchmarks/softmask_controls.py results/softmask/runs results/leaderboard/runs [--output FILE]

`cpt-bench report` compares every row with naive; the question of the importance controls is whether they
differ from the default (the paper's |tanh| importance on the units it scores). This matches every control
run with the default softmask run of the same (order, seed) and applies the same exact sign-flip test
(`cpt_bench.report.stats`) to final macro-F1, forgetting macro-F1 and perplexity forgetting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from cpt_bench.report.stats import sign_flip_test
from cpt_bench.report.table import perplexity_forgetting
from cpt_bench.running.results import method_configuration
from cpt_bench.training.plugin import method_class

COLUMNS = {"final MF1": lambda r: r["metrics"]["final_macro_f1"],
           "forgetting MF1": lambda r: r["metrics"]["forgetting_macro_f1"],
           "ppl forgetting": perplexity_forgetting}


def softmask_runs(folder: Path) -> dict[str, dict[tuple, dict]]:
    """Label (the settings that differ from the defaults, or "default") -> {(order, seed): result}."""
    defaults = dataclasses.asdict(method_class("softmask").Settings())
    runs: dict[str, dict[tuple, dict]] = {}
    for path in sorted(folder.glob("*__softmask__*.json")):
        result = json.loads(path.read_text())
        config = method_configuration(result)
        changed = {k: v for k, v in config.items() if defaults.get(k) != v}
        label = ", ".join(f"softmask.{k}={v}" for k, v in sorted(changed.items())) or "default"
        runs.setdefault(label, {})[(tuple(result["domains"]), result["seed"])] = result
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    runs: dict[str, dict[tuple, dict]] = {}
    for folder in args.folders:
        for label, by_key in softmask_runs(folder).items():
            runs.setdefault(label, {}).update(by_key)
    default = runs.pop("default")
    lines = ["| config | column | Δ vs default softmask | 95% CI | p | n |", "|---|---|---|---|---|---|"]
    for label, by_key in sorted(runs.items()):
        keys = sorted(set(by_key) & set(default))
        for column, value in COLUMNS.items():
            comparison = sign_flip_test([value(by_key[k]) - value(default[k]) for k in keys])
            interval = "—" if comparison.ci_low is None else f"[{comparison.ci_low:+.3f}, {comparison.ci_high:+.3f}]"
            lines.append(f"| {label} | {column} | {comparison.mean_difference:+.3f} | {interval} | "
                         f"{comparison.p:.3g} | {comparison.pairs} |")
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
