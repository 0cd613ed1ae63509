"""The run metrics: one table (`RUN_METRICS`) of every number a run is judged by, each with its name (the key in a
result file's `metrics` block, in `tolerances.yaml` and in `--format json`), its report label, how it is
computed from a result file, its direction and its digits. The result file (`results.build_result`), the report
(`report/table.py`) and the regression gate (`check.py`) all read this table, so a metric added here is written,
shown and gateable at once (docs/evaluation.md, "Adding a metric"). The end-task scorer that evaluate loads by
path lives beside it, in `classification/`."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

Matrix = list[list[float | None]]

# the end-task score matrices of a result file (`matrix`), in the order their metrics are written
MATRICES = ("macro_f1", "accuracy")


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


# ---------------------------------------------------------------- statistics of one score matrix (paper §4.1)


def final_scores(matrix: Matrix) -> list[float | None]:
    """Per column, the score after the latest stage that evaluated it (the last row for continual methods)."""
    if not matrix:
        return []
    latest: list[float | None] = [None] * len(matrix[0])
    for row in matrix:
        for j, value in enumerate(row):
            if value is not None:
                latest[j] = value
    return latest


def final_performance(matrix: Matrix, base: list[float], square: bool) -> float | None:
    """Mean over domains of the final score (None while any domain has none)."""
    finals = final_scores(matrix)
    return _mean(finals) if finals and all(v is not None for v in finals) else None


def forgetting(matrix: Matrix, base: list[float], square: bool) -> float | None:
    """mean_{j<T-1} A[j][j] - A[T-1][j]: what a domain lost after it was learned (square runs only)."""
    if not square or len(matrix) < 2:
        return None
    pairs = [(matrix[j][j], matrix[-1][j]) for j in range(len(matrix) - 1)]
    if not all(a is not None and b is not None for a, b in pairs):
        return None
    return _mean([a - b for a, b in pairs])


def transfer(matrix: Matrix, base: list[float], square: bool) -> float | None:
    """mean_j A[j][j] - base[j]: what DAP on a domain gave its end task (square runs only)."""
    if not square or not matrix:
        return None
    diagonal = [matrix[j][j] for j in range(len(matrix))]
    if not all(v is not None for v in diagonal):
        return None
    return _mean([d - b for d, b in zip(diagonal, base)])


def run_metrics(matrix: Matrix, base: list[float], square: bool) -> dict[str, float | None]:
    """Final score, forgetting and transfer of one metric's matrix (rows = stages, columns = domains).

    `square`: stage i trained domain i, so A[j][j] is "just after learning j" (continual methods, `one`).
    Metrics that a matrix cannot define are None (null), never 0."""
    return {"final": final_performance(matrix, base, square), "forgetting": forgetting(matrix, base, square),
            "transfer": transfer(matrix, base, square)}


# ---------------------------------------------------------------- values read from a whole result file


def general_retention(result: dict[str, Any]) -> float | None:
    """Probe score after the last stage minus before any DAP (negative = general knowledge lost)."""
    probe = result.get("probes", {}).get("general")
    if not probe or not probe.get("stages"):
        return None
    return probe["stages"][-1] - probe["base"]


def wall_seconds(result: dict[str, Any]) -> float | None:
    """Wall time of the run (training, fine-tuning, evaluation), from the result file."""
    if "wall_seconds" in result:
        return result["wall_seconds"]
    provenance = result.get("provenance", {})
    try:
        started = datetime.datetime.fromisoformat(provenance["started"])
        finished = datetime.datetime.fromisoformat(provenance["finished"])
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


def domain_finals(result: dict[str, Any], metric: str = "macro_f1") -> dict[str, float | None]:
    """Each domain's final end-task score (its latest evaluated row), by domain name."""
    matrix = result.get("matrix", {}).get(metric)
    if not matrix:
        return {}
    return dict(zip(result["domains"], final_scores(matrix)))


def perplexity_forgetting(result: dict[str, Any]) -> float | None:
    """Mean over j < T-1 of P[T-1][j] - P[j][j]: how much a domain's held-out LM perplexity rose after it was
    learned (positive = forgetting). Needs a continual square run (stage i = domain i); like the end-task
    forgetting, it is undefined (None) for a run whose forgetting is null, such as `one`."""
    if (result.get("metrics") or {}).get("forgetting_macro_f1") is None:
        return None
    block = result.get("perplexity") or {}
    stages, corpora, domains = block.get("stages") or [], block.get("corpora") or [], result["domains"]
    if len(stages) != len(domains) or len(domains) < 2 or result.get("matrix_rows", domains) != domains:
        return None
    columns = {c: i for i, c in enumerate(corpora)}
    if not all(d in columns for d in domains[:-1]):
        return None
    rises = [stages[-1][columns[d]] - stages[j][columns[d]] for j, d in enumerate(domains[:-1])]
    return sum(rises) / len(rises)


def knowledge_transfer(result: dict[str, Any], one_runs: dict[tuple, dict[str, Any]]) -> float | None:
    """Mean over j of A[T-1][j] - ONE[j][j]: the continual model against one model per domain, when a `one`
    run of the same suite, model, seed and domains exists (the report pairs them: `KNOWLEDGE_TRANSFER_KEY`)."""
    one = one_runs.get((result["suite"], result["model"], result["seed"], tuple(sorted(result["domains"]))))
    if one is None or result["method"] == "one":
        return None
    mine, theirs = domain_finals(result), domain_finals(one)
    differences = [mine[d] - theirs[d] for d in result["domains"]
                   if mine.get(d) is not None and theirs.get(d) is not None]
    return sum(differences) / len(differences) if len(differences) == len(result["domains"]) else None


KNOWLEDGE_TRANSFER_KEY = "_knowledge_transfer"  # set on each result by the report, which sees the `one` runs


def overhead_millions(result: dict[str, Any]) -> float | None:
    overhead = result.get("overhead")
    return sum(overhead.values()) / 1e6 if overhead else None


def compute_tflops(result: dict[str, Any]) -> float | None:
    """The run's approximate DAP FLOPs, every extra pass included (cpt_bench/models/compute.py), in 10^12."""
    flops = (result.get("compute") or {}).get("flops")
    return None if flops is None else flops / 1e12


# ---------------------------------------------------------------- the table


Statistic = Callable[[Matrix, list[float], bool], float | None]


@dataclasses.dataclass(frozen=True)
class RunMetric:
    """One number a run is judged by.

    `compute` reads a result file; a metric with `matrix` and `statistic` is instead computed from that score
    matrix when the run ends and written into the result's `metrics` block, from where `compute` reads it.
    `higher_is_better`: the direction the report's bold and the gate use (None: not ranked, not gateable).
    `versus_naive`: the report tests it against naive (paired sign-flip test, one line each under the table).
    `in_report`: a column of the report's table (False: in the result file and the gate only)."""

    name: str
    label: str
    compute: Callable[[dict[str, Any]], float | None] | None = None
    higher_is_better: bool | None = True
    digits: int = 3
    matrix: str | None = None
    statistic: Statistic | None = None
    versus_naive: bool = False
    in_report: bool = True

    def value(self, result: dict[str, Any]) -> float | None:
        if self.compute is not None:
            return self.compute(result)
        return (result.get("metrics") or {}).get(self.name)

    @property
    def stored(self) -> bool:
        """Written into the result file's `metrics` block when the run ends (CONTRACT.md)."""
        return self.matrix is not None


def _matrix_metric(statistic_name: str, statistic: Statistic, matrix: str, label: str, **options: Any) -> RunMetric:
    return RunMetric(f"{statistic_name}_{matrix}", label, matrix=matrix, statistic=statistic, **options)


# Report columns in this order; within each matrix, the stored metrics are written into result files in this
# order too (macro-F1's first, then accuracy's).
RUN_METRICS: list[RunMetric] = [
    _matrix_metric("final", final_performance, "macro_f1", "final MF1", versus_naive=True),
    _matrix_metric("final", final_performance, "accuracy", "final Acc"),
    _matrix_metric("forgetting", forgetting, "macro_f1", "forgetting MF1", higher_is_better=False,
                   versus_naive=True),
    _matrix_metric("transfer", transfer, "macro_f1", "transfer MF1"),
    RunMetric("knowledge_transfer", "KT vs one", lambda r: r.get(KNOWLEDGE_TRANSFER_KEY)),
    RunMetric("general_retention", "general Δ", general_retention),
    # held-out LM perplexity moves smoothly with the weights: the least noisy of the compared columns
    RunMetric("ppl_forgetting", "ppl forgetting", perplexity_forgetting, higher_is_better=False, digits=2,
              versus_naive=True),
    RunMetric("wall_seconds", "wall s", wall_seconds, higher_is_better=False, digits=0),
    RunMetric("overhead_millions", "overhead M", overhead_millions, higher_is_better=False, digits=2),
    RunMetric("compute_tflops", "TFLOPs", compute_tflops, higher_is_better=False, digits=1),
    _matrix_metric("forgetting", forgetting, "accuracy", "forgetting Acc", higher_is_better=False, in_report=False),
    _matrix_metric("transfer", transfer, "accuracy", "transfer Acc", in_report=False),
]


def run_metric(name: str) -> RunMetric:
    """The metric of that name (KeyError naming the known ones otherwise)."""
    for metric in RUN_METRICS:
        if metric.name == name:
            return metric
    raise KeyError(f"unknown metric {name!r} (known: {', '.join(m.name for m in RUN_METRICS)})")


def stored_metrics() -> list[RunMetric]:
    """The metrics of a result file's `metrics` block, in the order they are written (matrix by matrix)."""
    stored = [m for m in RUN_METRICS if m.stored]
    order = [*MATRICES, *sorted({m.matrix for m in stored} - set(MATRICES))]
    return sorted(stored, key=lambda m: order.index(m.matrix))


def metrics_block(matrices: dict[str, Matrix], base: dict[str, list[float]], square: bool) -> dict[str, float | None]:
    """A result file's `metrics`: every stored metric of its score matrices."""
    return {m.name: m.statistic(matrices[m.matrix], base[m.matrix], square) for m in stored_metrics()}


def gateable_metrics() -> dict[str, RunMetric]:
    """The metrics `cpt-bench check` can gate (those with a direction), by name."""
    return {m.name: m for m in RUN_METRICS if m.higher_is_better is not None}
