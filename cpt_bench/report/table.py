"""The table of `cpt-bench report`, independent of its format: result files read and grouped into rows (one per
method and configuration), mean ± std and a 95% confidence interval over seeds and domain orders, the best value
per column, and a paired sign-flip test against `naive` over matched (order, seed) runs. Every writer
(markdown, LaTeX, HTML, plots) renders what this module builds."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cpt_bench.evaluation.metrics as metric_table
from cpt_bench.common.errors import BadInput
from cpt_bench.evaluation.metrics import (  # noqa: F401 - the per-run values, re-exported for scripts that import them here
    KNOWLEDGE_TRANSFER_KEY,
    compute_tflops,
    domain_finals,
    general_retention,
    knowledge_transfer,
    perplexity_forgetting,
    wall_seconds,
)
from cpt_bench.report.stats import SIGNIFICANCE_LEVEL, PairedComparison, Summary, sign_flip_test, summarise_values
from cpt_bench.running.results import SCHEMA, checked_result, configuration_settings, is_result, method_configuration

REFERENCE_METHOD = "naive"  # significance markers compare every method with naive continual DAP


# ---------------------------------------------------------------- reading


def candidate_files(paths: list[str]) -> list[tuple[Path, bool]]:
    """Every file a report reads, and whether it was named on the command line (it must then be a result file)
    or found in a folder (its `*.json` files; hidden ones, temp files and `.work` checkpoints, are passed over)."""
    files: list[tuple[Path, bool]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend((p, False) for p in sorted(path.rglob("*.json"))
                         if not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append((path, True))
        else:
            raise BadInput(f"no such result file or folder: {raw}")
    return files


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    """The result files among `paths`, each read once and checked against the JSON Schema, each run counted
    once. A file found in a folder that is not a sound result file (a report written into it, a damaged or
    hand-edited result) is skipped and named on stderr, one line each; a named one that is not is an error."""
    results, files, skipped = [], [], []
    for file, named in candidate_files(paths):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            if not named:
                skipped.append(file)
                continue
            raise BadInput(f"{file}: not a readable result file ({str(error).splitlines()[0][:120]})") from None
        if not named and not is_result(data):
            skipped.append(file)
            continue
        try:
            results.append(checked_result(data))
            files.append(file)
        except ValueError as error:
            why = f"{file}: not a sound result file ({str(error).splitlines()[0][:160]})"
            if named:
                raise BadInput(why) from None
            print(f"skipped {why}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not {SCHEMA} result files: "
              f"{', '.join(str(p) for p in skipped)}", file=sys.stderr)
    results = without_duplicate_runs(results, files)
    if not results:
        raise BadInput(f"no result files found in {', '.join(paths)}")
    return results


MEASURED = ("matrix", "base", "metrics", "probes", "perplexity", "stages")  # what a copy may have changed


def run_identity(result: dict[str, Any]) -> str:
    """What makes two result files the same run: suite, model, method, every setting, order and seed. Two
    files of one identity are one run counted twice (a copy), never two runs: they would halve every interval."""
    return json.dumps([result["suite"], result["model"], result["method"], _flat_config(result),
                       list(result["domains"]), result["seed"]], sort_keys=True)


def without_duplicate_runs(results: list[dict[str, Any]], files: list[Path]) -> list[dict[str, Any]]:
    """The results with each run identity once (the first file, in path order); each duplicate said on stderr,
    with whether its measurements differ from the kept file's."""
    kept: dict[str, tuple[dict[str, Any], Path]] = {}
    for result, file in zip(results, files):
        identity = run_identity(result)
        if identity not in kept:
            kept[identity] = (result, file)
            continue
        first, first_file = kept[identity]
        differing = [key for key in MEASURED if first.get(key) != result.get(key)]
        how = f"its {', '.join(differing)} differ" if differing else "the same measurements"
        print(f"duplicate run: {file} is the same run as {first_file} ({result['method']}, "
              f"{','.join(map(str, result['domains']))}, seed {result['seed']}, same settings; {how}): "
              f"counted once, from {first_file.name}", file=sys.stderr)
    return [result for result, _ in kept.values()]


# ---------------------------------------------------------------- columns


@dataclasses.dataclass
class Column:
    label: str
    value: Callable[[dict[str, Any]], float | None]
    higher_is_better: bool | None = True  # None: not ranked
    digits: int = 3


def summary_columns() -> list[Column]:
    """The report's metric columns: the run-metric table's (cpt_bench/evaluation/metrics), in its order."""
    return [Column(m.label, m.value, m.higher_is_better, m.digits) for m in metric_table.RUN_METRICS if m.in_report]


def compared_columns() -> dict[str, bool]:
    """Columns tested against naive, by label (True: higher is better)."""
    return {m.label: bool(m.higher_is_better) for m in metric_table.RUN_METRICS if m.in_report and m.versus_naive}


# ---------------------------------------------------------------- grouping


def _flat_config(result: dict[str, Any]) -> dict[str, str]:
    """Every setting of a run as `block.key` -> JSON value (the method's block is named after the method)."""
    blocks = {result["method"]: method_configuration(result), **configuration_settings(result)}
    flat = {}
    for block, values in blocks.items():
        if isinstance(values, dict):
            flat.update({f"{block}.{k}": json.dumps(v, sort_keys=True) for k, v in values.items()})
        else:
            flat[block] = json.dumps(values, sort_keys=True)
    return flat


def config_label(results: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The settings in which this run differs from the usual (most common) value among the runs of the
    same (suite, method, model), e.g. `softmask.contrastive=false`; empty for the usual setup."""
    same = [r for r in results if (r["suite"], r["method"], r["model"]) ==
            (result["suite"], result["method"], result["model"])]
    flats = [_flat_config(r) for r in same]
    mine = _flat_config(result)
    differences = []
    for key in sorted(set().union(*flats)):
        values = [f.get(key) for f in flats]
        if len(set(values)) < 2:
            continue
        usual = max(sorted(set(values), key=str), key=values.count)  # the most common value: not shown
        if mine.get(key) != usual:
            differences.append(f"{key}={mine[key]}" if key in mine else f"{key} unset")
    return ", ".join(differences).replace('"', "")


@dataclasses.dataclass
class Group:
    """The runs of one (suite, model, method, configuration[, order]): one row of a table."""

    suite: str
    model: str
    method: str
    config: str
    order: str  # the order when the group has one, else "N orders"
    runs: list[dict[str, Any]]
    values: dict[str, Summary] = dataclasses.field(default_factory=dict)
    versus_naive: dict[str, PairedComparison] = dataclasses.field(default_factory=dict)

    @property
    def seeds(self) -> str:
        return ",".join(str(s) for s in sorted({r["seed"] for r in self.runs}))

    @property
    def key(self) -> tuple:
        return (self.suite, self.model, self.method, self.config, self.order)

    @property
    def title(self) -> str:
        title = f"{self.method} on {self.suite}"
        return f"{title} [{self.config}]" if self.config else title


def group_runs(results: list[dict[str, Any]], by_order: bool = False) -> list[Group]:
    """Rows of the table. Runs that differ in model or any setting are never averaged together; different
    domain orders are (paper tables average over orders) unless `by_order`."""
    one_runs = {(r["suite"], r["model"], r["seed"], tuple(sorted(r["domains"]))): r
                for r in results if r["method"] == "one" and not config_label(results, r)}
    for r in results:
        r[KNOWLEDGE_TRANSFER_KEY] = knowledge_transfer(r, one_runs)
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        order = ",".join(map(str, r["domains"])) if by_order else ""
        buckets.setdefault((r["suite"], r["model"], r["method"], config_label(results, r), order), []).append(r)
    groups = []
    for (suite, model, method, config, _), runs in sorted(buckets.items()):
        orders = sorted({",".join(map(str, r["domains"])) for r in runs})
        group = Group(suite, model, method, config, orders[0] if len(orders) == 1 else f"{len(orders)} orders",
                      runs)
        columns = summary_columns() + [Column(d, lambda r, d=d: domain_finals(r).get(d)) for d in domain_names([group])]
        group.values = {c.label: summarise_values([c.value(r) for r in runs]) for c in columns}
        groups.append(group)
    _compare_with_naive(groups)
    return groups


def domain_names(groups: list[Group]) -> list[str]:
    names: list[str] = []
    for group in groups:
        for r in group.runs:
            names.extend(d for d in r["domains"] if d not in names)
    return names


def _compare_with_naive(groups: list[Group]) -> None:
    """Sign-flip test of (method - naive) over runs matched by (order, seed), same suite and model."""
    for group in groups:
        if group.method == REFERENCE_METHOD and not group.config:
            continue
        reference = next((g for g in groups if (g.suite, g.model, g.method, g.config) ==
                          (group.suite, group.model, REFERENCE_METHOD, "") and
                          (g.order == group.order or "orders" in g.order or "orders" in group.order)), None)
        if reference is None:
            continue
        theirs = {(tuple(r["domains"]), r["seed"]): r for r in reference.runs}
        columns = {c.label: c for c in summary_columns()}
        for label in compared_columns():
            column = columns[label]
            differences = []
            for r in group.runs:
                other = theirs.get((tuple(r["domains"]), r["seed"]))
                mine_value, their_value = column.value(r), other and column.value(other)
                if mine_value is not None and their_value is not None:
                    differences.append(mine_value - their_value)
            if differences:
                group.versus_naive[label] = sign_flip_test(differences)


# ---------------------------------------------------------------- tables


def marker(group: Group, label: str) -> str:
    """▲ better than naive, ▼ worse, where the paired sign-flip test gives p < 0.05 (never with < 6 pairs)."""
    comparison = group.versus_naive.get(label)
    if comparison is None or not comparison.significant:
        return ""
    better = (comparison.mean_difference > 0) == compared_columns()[label]
    return " ▲" if better else " ▼"


def best_groups(groups: list[Group], column: Column) -> set[tuple]:
    """Keys of the rows holding the best mean of a ranked column (ties all marked); none for a single row."""
    if column.higher_is_better is None:
        return set()
    keys: set[tuple] = set()
    comparable: dict[tuple, list[Group]] = {}  # rows of one suite, model (and order, when split by order)
    for g in groups:
        comparable.setdefault((g.suite, g.model, g.order if "orders" not in g.order else ""), []).append(g)
    for members in comparable.values():
        means = {g.key: g.values[column.label].mean for g in members
                 if column.label in g.values and g.values[column.label].mean is not None}
        if len(means) < 2:
            continue
        best = max(means.values()) if column.higher_is_better else min(means.values())
        keys |= {k for k, v in means.items() if round(v, column.digits) == round(best, column.digits)}
    return keys


def format_cell(summary: Summary, digits: int = 3) -> str:
    if summary.mean is None:
        return "—"
    if summary.std is None:
        return f"{summary.mean:.{digits}f}"
    return f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"


@dataclasses.dataclass
class Table:
    """A rendered-format-neutral table: header, rows of cells, and which cells are best."""

    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    groups: list[Group]


def build_table(groups: list[Group]) -> Table:
    domains = domain_names(groups)
    identity = ["method", "suite", "order", "seeds"]
    if len({(g.suite, g.method, g.order, g.model) for g in groups}) < len({g.key for g in groups}) or \
            any(g.config for g in groups):
        identity.insert(1, "config")
    if len({g.model for g in groups}) > 1:
        identity.insert(3, "model")
    compared = compared_columns()
    columns = [Column(d, lambda r: None) for d in domains if len(domains) > 1] + summary_columns()
    shown = [c for c in columns if any(g.values.get(c.label, Summary(None, None, None, None, 0)).mean is not None
                                       for g in groups) or c.label in compared or c.label in
             ("final MF1", "final Acc", "transfer MF1", "general Δ")]
    best = {c.label: best_groups(groups, c) for c in shown}
    header = identity + [c.label for c in shown]
    rows, bold = [], []
    for g in groups:
        cells = [{"method": g.method, "suite": g.suite, "order": g.order, "seeds": g.seeds, "model": g.model,
                  "config": g.config}[k] for k in identity]
        flags = [False] * len(identity)
        for c in shown:
            summary = g.values.get(c.label, Summary(None, None, None, None, 0))
            cells.append(format_cell(summary, c.digits) + (marker(g, c.label) if c.label in compared else ""))
            flags.append(g.key in best[c.label])
        rows.append(cells)
        bold.append(flags)
    return Table(header, rows, bold, groups)


LEGEND = ("mean ± sample std over runs (seeds × orders); bold: best in column; ▲/▼: better/worse than naive "
          f"with p < {SIGNIFICANCE_LEVEL} in a two-sided sign-flip permutation test over runs matched by order and "
          "seed (exact up to 16 pairs; fewer than 6 pairs cannot reach p < 0.05, so they get no marker; every "
          "comparison's mean difference, 95% t-interval, p and n are listed under the table); domain columns: final "
          "macro-F1; KT vs one: mean_j A[T-1][j] − ONE[j][j]; general Δ: general probe after the last stage "
          "minus before DAP; ppl forgetting: mean rise of a learned domain's held-out MLM perplexity; "
          "overhead M: extra numbers kept by the method, millions; TFLOPs: approximate DAP compute, every extra "
          "pass included (6·N per trained position, 2·N per forward-only one).")

COMPARISON_HEADER = ["method", "config", "order", "column", "Δ vs naive", "95% CI", "p", "n"]


def comparison_rows(groups: list[Group]) -> list[list[str]]:
    """One row per (row of the table, compared column): the paired comparison with naive, as text."""
    rows, digits_of = [], {col.label: col.digits for col in summary_columns()}
    for g in groups:
        for label, c in g.versus_naive.items():
            digits = digits_of[label]
            interval = "—" if c.ci_low is None else f"[{c.ci_low:+.{digits}f}, {c.ci_high:+.{digits}f}]"
            rows.append([g.method, g.config, g.order, label, f"{c.mean_difference:+.{digits}f}", interval,
                         f"{c.p:.3g}" + ("" if c.exact else " (sampled)"), str(c.pairs)])
    return rows


def records(groups: list[Group]) -> list[dict[str, Any]]:
    """Machine-readable rows: identity, then mean/std/ci/n of every column, and the comparison with naive."""
    out = []
    for g in groups:
        record: dict[str, Any] = {"suite": g.suite, "method": g.method, "order": g.order, "model": g.model,
                                  "config": g.config, "seeds": g.seeds, "runs": len(g.runs)}
        for label, summary in g.values.items():
            record[f"{label} mean"] = summary.mean
            record[f"{label} std"] = summary.std
            record[f"{label} ci95"] = None if summary.ci_low is None else [summary.ci_low, summary.ci_high]
            record[f"{label} n"] = summary.n
        for label, comparison in g.versus_naive.items():
            record[f"{label} vs naive"] = {**dataclasses.asdict(comparison), "significant": comparison.significant}
        out.append(record)
    return out
