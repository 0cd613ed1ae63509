"""`cpt-bench check`: the CI regression gate fails on a degraded result and passes within tolerance."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_report import result, write

from conftest import run_cli

TOLERANCES = "final_macro_f1: 0.02\nforgetting_macro_f1: 0.05\ngeneral_retention: 0.05\n"


@pytest.fixture
def reference(tmp_path) -> Path:
    folder = tmp_path / "reference"
    for method, final, forgetting in (("naive", 0.60, 0.30), ("ewc", 0.70, 0.10)):
        write(folder, f"{method}.json", result(method=method, final_f1=final, forgetting=forgetting))
    (folder / "tolerances.yaml").write_text(TOLERANCES)
    return folder


def _check(runs: Path, reference: Path):
    return run_cli("check", str(runs), "--reference", str(reference))


def test_identical_and_slightly_worse_runs_pass(reference, tmp_path):
    runs = tmp_path / "runs"
    write(runs, "naive.json", result(method="naive", final_f1=0.59, forgetting=0.33))  # within tolerance
    write(runs, "ewc.json", result(method="ewc", final_f1=0.75, forgetting=0.05))  # better
    out = _check(runs, reference)
    assert out.exit_code == 0, out.output
    assert "REGRESSION" not in out.output and "no regression (6 checks)" in out.output


def test_degraded_result_fails_and_names_method_and_metric(reference, tmp_path):
    runs = tmp_path / "runs"
    write(runs, "naive.json", result(method="naive", final_f1=0.60, forgetting=0.30))
    write(runs, "ewc.json", result(method="ewc", final_f1=0.65, forgetting=0.20, probe_stages=(0.75, 0.6)))
    out = _check(runs, reference)
    assert out.exit_code == 1, out.output
    assert "3 regression(s): ewc/final_macro_f1, ewc/forgetting_macro_f1, ewc/general_retention" in out.output
    assert all("naive" not in line for line in out.output.splitlines() if line.startswith("REGRESSION"))


def test_lost_metric_is_a_regression(reference, tmp_path):
    runs = tmp_path / "runs"
    write(runs, "naive.json", result(method="naive", forgetting=None))
    out = _check(runs, reference)
    assert out.exit_code == 1 and "naive/forgetting_macro_f1" in out.output


def test_other_configuration_is_not_compared(reference, tmp_path):
    runs = tmp_path / "runs"
    write(runs, "naive.json", result(method="naive", final_f1=0.1, settings={"dap": {"steps": 99}}))
    out = _check(runs, reference)
    assert out.exit_code == 2 and "no run matches a reference" in out.output


@pytest.mark.parametrize("content, fragment", [("final_macro_f1: -1\n", "non-negative"),
                                               ("bogus_metric: 0.1\n", "unknown metric"),
                                               ("[1, 2\n", "YAML")])
def test_bad_tolerance_file(reference, tmp_path, content, fragment):
    (reference / "tolerances.yaml").write_text(content)
    runs = tmp_path / "runs"
    write(runs, "naive.json", copy.deepcopy(result(method="naive")))
    out = _check(runs, reference)
    assert out.exit_code == 2 and fragment in out.output and "Traceback" not in out.output


def test_the_gate_covers_every_registered_method():
    """CI's regression gate runs results/reference/methods.txt: a method missing there would land unchecked."""
    from cpt_bench.training.plugin import registered_methods

    listed = (Path(__file__).parent.parent / "results" / "reference" / "methods.txt").read_text().split()
    shipped = [name for name, cls in registered_methods().items()  # not a method a test registered
               if cls.__module__.startswith(("cpt_bench.methods.", "cpt_bench.baselines."))]
    assert sorted(listed) == sorted(shipped)


def test_a_rise_in_perplexity_forgetting_is_a_regression(tmp_path):
    """Held-out perplexity is the low-noise signal: a learned domain's perplexity rising further than the
    reference's, beyond the tolerance, fails the gate; within it, passes."""
    def with_perplexity(rise: float) -> dict:
        run = result(method="naive")
        run["perplexity"] = {"corpora": ["cats", "dogs"], "blocks": 4, "base": [20.0, 20.0],
                             "stages": [[10.0, 19.0], [10.0 + rise, 9.0]]}
        return run

    folder = tmp_path / "reference"
    write(folder, "naive.json", with_perplexity(2.0))
    (folder / "tolerances.yaml").write_text("ppl_forgetting: 0.5\n")
    write(tmp_path / "ok", "naive.json", with_perplexity(2.4))
    write(tmp_path / "worse", "naive.json", with_perplexity(3.0))
    assert _check(tmp_path / "ok", folder).exit_code == 0
    out = _check(tmp_path / "worse", folder)
    assert out.exit_code == 1 and "ppl_forgetting" in out.output and "REGRESSION" in out.output
