"""The run-metric table is the one home of a metric: an entry added to it is a report column, a gateable name in
`tolerances.yaml`, and (for a statistic of the score matrix) a key of a new result's `metrics` block."""

from __future__ import annotations

import json

import pytest
from test_report import markdown_rows, result, write

import cpt_bench.evaluation.metrics as metrics

from conftest import run_cli


@pytest.fixture
def added_metric(monkeypatch):
    """A metric read from a result file: the general probe's score after the last stage (higher is better)."""
    entry = metrics.RunMetric("general_last", "general last", lambda r: r["probes"]["general"]["stages"][-1],
                              digits=2)
    monkeypatch.setattr(metrics, "RUN_METRICS", [*metrics.RUN_METRICS, entry])
    return entry


def test_an_added_metric_is_a_report_column(added_metric, tmp_path):
    runs = tmp_path / "runs"
    write(runs, "a.json", result(method="naive", seed=0, probe_stages=(0.7, 0.5)))
    write(runs, "b.json", result(method="naive", seed=1, probe_stages=(0.7, 0.6)))
    write(runs, "c.json", result(method="ewc", seed=0, probe_stages=(0.7, 0.75)))
    out = run_cli("report", str(runs))
    assert out.exit_code == 0, out.output
    rows = {row["method"]: row for row in markdown_rows(out.output)}
    assert rows["naive"]["general last"] == "0.55 ± 0.07"
    assert rows["ewc"]["general last"] == "0.75" and "**0.75**" in out.output  # the higher is best: bold
    records = json.loads(run_cli("report", str(runs), "--format", "json").output)
    assert {r["method"]: r["general last mean"] for r in records} == pytest.approx({"naive": 0.55, "ewc": 0.75})


def test_an_added_metric_can_be_gated(added_metric, tmp_path):
    reference, runs = tmp_path / "reference", tmp_path / "runs"
    write(reference, "naive.json", result(method="naive", probe_stages=(0.75, 0.7)))
    (reference / "tolerances.yaml").write_text("general_last: 0.05\n")
    write(runs, "naive.json", result(method="naive", probe_stages=(0.75, 0.6)))  # 0.1 lower, tolerance 0.05
    out = run_cli("check", str(runs), "--reference", str(reference))
    assert out.exit_code == 1, out.output
    assert "1 regression(s): naive/general_last" in out.output


def test_a_metric_outside_the_table_is_refused_by_the_gate(tmp_path):
    reference = tmp_path / "reference"
    write(reference, "naive.json", result(method="naive"))
    (reference / "tolerances.yaml").write_text("general_last: 0.05\n")
    out = run_cli("check", str(reference), "--reference", str(reference))
    assert out.exit_code == 2 and "unknown metric 'general_last'" in out.output


def test_an_added_matrix_statistic_is_written_into_the_metrics_block(monkeypatch):
    worst = metrics._matrix_metric("worst", lambda matrix, base, square: min(metrics.final_scores(matrix)),
                                   "macro_f1", "worst MF1")
    monkeypatch.setattr(metrics, "RUN_METRICS", [*metrics.RUN_METRICS, worst])
    matrices = {"macro_f1": [[0.6, None], [0.5, 0.8]], "accuracy": [[0.7, None], [0.6, 0.9]]}
    block = metrics.metrics_block(matrices, {"macro_f1": [0.4, 0.4], "accuracy": [0.5, 0.5]}, square=True)
    assert block["worst_macro_f1"] == 0.5
    assert block["forgetting_macro_f1"] == pytest.approx(0.1) and block["transfer_accuracy"] == pytest.approx(0.3)
    # the contract's keys in the order result files have always had them
    assert [key for key in block if key != "worst_macro_f1"] == [
        "final_macro_f1", "forgetting_macro_f1", "transfer_macro_f1", "final_accuracy", "forgetting_accuracy",
        "transfer_accuracy"]
    assert metrics.run_metric("worst_macro_f1").value({"metrics": block}) == 0.5
