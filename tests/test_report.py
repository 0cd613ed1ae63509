"""`cpt-bench report`: mean ± std over seeds per (suite, method, order), formats, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from conftest import run_cli

SCHEMA = "cpt-bench/run/v1"


def result(method="naive", suite="tiny", domains=("cats", "dogs"), seed=0, final_f1=0.5, final_acc=0.6,
           forgetting=0.1, transfer=0.05, probe_base=0.8, probe_stages=(0.75, 0.7), model="tiny-bert",
           settings=None) -> dict:
    return {
        "model": model,
        "settings": settings or {"dap": {"steps": 4}},
        "schema": SCHEMA,
        "method": method,
        "suite": suite,
        "domains": list(domains),
        "seed": seed,
        "metrics": {
            "final_macro_f1": final_f1, "final_accuracy": final_acc,
            "forgetting_macro_f1": forgetting, "forgetting_accuracy": forgetting,
            "transfer_macro_f1": transfer, "transfer_accuracy": transfer,
        },
        "probes": {"general": {"base": probe_base, "stages": list(probe_stages)}},
        # the rest of what the JSON Schema requires, measuring nothing a test here reads
        "method_config": {},
        "matrix": {metric: [[value if j <= i else None for j in range(len(domains))] for i in range(len(domains))]
                   for metric, value in (("macro_f1", final_f1), ("accuracy", final_acc))},
        "base": {"macro_f1": [0.5] * len(domains), "accuracy": [0.5] * len(domains)},
        "stages": [],
        "provenance": {"git_commit": "0" * 40, "versions": {}, "started": "2026-01-01T00:00:00+00:00",
                       "finished": "2026-01-01T00:01:00+00:00", "device": "cpu", "command": "cpt-bench run"},
    }


def write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def markdown_rows(text: str) -> list[dict[str, str]]:
    """Parse the first pipe table of `text` into {column: cell} per row."""
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("|"):
            lines.append(line)
        elif lines:
            break  # the main table ends; a second one (the paired comparisons) follows the legend
    assert len(lines) >= 2, text

    def cells(line):  # best-in-column cells are bold: compare their text
        return [c.strip().removeprefix("**").removesuffix("**") for c in line.strip().strip("|").split("|")]

    header = cells(lines[0])
    assert set(lines[1].replace("|", "").replace(":", "").replace("-", "").strip()) == set(), lines[1]
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def find_row(rows, **match) -> dict[str, str]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two seeds of naive on tiny (cats,dogs); seed 1 written first to check seed ordering."""
    folder = tmp_path / "runs"
    write(folder, "a_seed1.json", result(seed=1, final_f1=0.7, final_acc=0.8, forgetting=0.2, transfer=0.1,
                                         probe_stages=(0.7, 0.6)))
    write(folder, "b_seed0.json", result(seed=0, final_f1=0.5, final_acc=0.6, forgetting=0.1, transfer=0.05,
                                         probe_stages=(0.75, 0.7)))
    return folder


def _ok(*args) -> str:
    out = run_cli("report", *args)
    assert out.exit_code == 0, out.output
    assert "Traceback" not in out.output
    return out.output


def test_markdown_mean_and_sample_std_over_seeds(runs):
    rows = markdown_rows(_ok(str(runs)))
    assert len(rows) == 1
    row = find_row(rows, method="naive", suite="tiny", order="cats,dogs")
    assert row["seeds"] == "0,1"
    assert row["final MF1"] == "0.600 ± 0.141"  # std with ddof=1: 0.1414, not 0.1
    assert row["final Acc"] == "0.700 ± 0.141"
    assert row["forgetting MF1"] == "0.150 ± 0.071"
    assert row["transfer MF1"] == "0.075 ± 0.035"
    # general probe: last stage minus base = -0.1 and -0.2
    assert row["general Δ"] == "-0.150 ± 0.071"


def test_report_function_matches_cli(runs):
    from cpt_bench.report.formats import report

    assert report([str(runs)]).strip() == _ok(str(runs)).strip()


def test_files_and_folders_can_be_mixed(runs, tmp_path):
    extra = write(tmp_path / "elsewhere", "seed2.json", result(seed=2, final_f1=0.6))
    row = find_row(markdown_rows(_ok(str(runs), str(extra))), method="naive")
    assert row["seeds"] == "0,1,2"
    assert row["final MF1"] == "0.600 ± 0.100"


def test_unfinished_runs_work_folders_are_not_read(runs):
    work = runs / ".work" / "synthetic__naive__x__seed5__abc" / "ckpt-0-10"
    work.mkdir(parents=True)
    (work / "state.json").write_text('{"__dict__": []}')
    assert _ok(str(runs)) == _ok(str(runs))  # no error about the checkpoint's JSON
    row = find_row(markdown_rows(_ok(str(runs))), method="naive")
    assert "5" not in row["seeds"]


def test_seeds_sort_numerically(tmp_path):
    folder = tmp_path / "runs"
    for seed in (10, 2, 1):
        write(folder, f"s{seed}.json", result(seed=seed))
    assert find_row(markdown_rows(_ok(str(folder))), method="naive")["seeds"] == "1,2,10"


def test_other_order_method_or_suite_is_a_separate_row(runs):
    write(runs, "reversed.json", result(domains=("dogs", "cats"), seed=0, final_f1=0.4))
    write(runs, "other_method.json", result(method="ewc", seed=0, final_f1=0.9))
    write(runs, "other_suite.json", result(suite="big", seed=0, final_f1=0.3))
    rows = markdown_rows(_ok(str(runs), "--by-order"))
    assert len(rows) == 4
    assert find_row(rows, method="naive", suite="tiny", order="cats,dogs")["final MF1"] == "0.600 ± 0.141"
    reversed_row = find_row(rows, method="naive", suite="tiny", order="dogs,cats")
    assert reversed_row["seeds"] == "0"
    assert reversed_row["final MF1"] == "0.400"  # one seed: no ± part
    assert find_row(rows, method="ewc")["final MF1"] == "0.900"
    assert find_row(rows, suite="big")["final MF1"] == "0.300"


def test_null_metrics_render_as_dash(runs):
    # the `one` reference: forgetting undefined (null); a method without DAP has no probe stages
    for seed in (0, 1):
        write(runs, f"one_{seed}.json", result(method="one", seed=seed, forgetting=None, final_f1=0.55,
                                                probe_stages=()))
    rows = markdown_rows(_ok(str(runs)))
    one = find_row(rows, method="one")
    assert one["forgetting MF1"] == "—"
    assert one["general Δ"] == "—"
    assert one["final MF1"] == "0.550 ± 0.000"
    assert one["transfer MF1"] == "0.050 ± 0.000"
    naive = find_row(rows, method="naive")
    assert naive["forgetting MF1"] == "0.150 ± 0.071"


def test_single_seed_cells_keep_three_decimals(tmp_path):
    # every cell of a column without "±" must still read "0.500", not a re-parsed number "0.5"
    folder = tmp_path / "runs"
    write(folder, "r.json", result(seed=0, final_f1=0.5, final_acc=0.25, forgetting=0.1, transfer=0.0,
                                   probe_stages=(0.9, 0.7)))
    text = _ok(str(folder))
    row = find_row(markdown_rows(text), method="naive")
    assert row["seeds"] == "0"
    assert row["final MF1"] == "0.500"
    assert row["final Acc"] == "0.250"
    assert row["forgetting MF1"] == "0.100"
    assert row["transfer MF1"] == "0.000"
    assert row["general Δ"] == "-0.100"


def test_metric_null_in_some_seeds_averages_the_others(runs):
    write(runs, "c_seed2.json", result(seed=2, forgetting=None))
    row = find_row(markdown_rows(_ok(str(runs))), method="naive")
    assert row["seeds"] == "0,1,2"
    assert row["forgetting MF1"] == "0.150 ± 0.071"  # the null seed is left out, not counted as 0


def test_all_metrics_null_does_not_crash(tmp_path):
    folder = tmp_path / "runs"
    write(folder, "r.json", result(final_f1=None, final_acc=None, forgetting=None, transfer=None,
                                   probe_stages=()))
    row = find_row(markdown_rows(_ok(str(folder))), method="naive")
    for column in ("final MF1", "final Acc", "forgetting MF1", "transfer MF1", "general Δ"):
        assert row[column] == "—", column


def test_json_format(runs):
    write(runs, "one.json", result(method="one", forgetting=None))
    records = json.loads(_ok(str(runs), "--format", "json"))
    assert isinstance(records, list) and len(records) == 2
    naive = next(r for r in records if r["method"] == "naive")
    assert naive["suite"] == "tiny" and naive["order"] == "cats,dogs" and naive["seeds"] == "0,1"
    assert naive["final MF1 mean"] == pytest.approx(0.6)
    assert naive["final MF1 std"] == pytest.approx(math.sqrt(0.02))
    one = next(r for r in records if r["method"] == "one")
    assert one["forgetting MF1 mean"] is None
    assert one["final MF1 std"] is None


def test_csv_format(runs):
    write(runs, "ewc.json", result(method="ewc", seed=3, final_f1=0.9))
    records = list(csv.DictReader(io.StringIO(_ok(str(runs), "--format", "csv"))))
    assert len(records) == 2
    naive = next(r for r in records if r["method"] == "naive")
    assert naive["seeds"] == "0,1" and naive["order"] == "cats,dogs"
    assert float(naive["final MF1 mean"]) == pytest.approx(0.6)
    assert float(naive["final MF1 std"]) == pytest.approx(math.sqrt(0.02))
    assert float(next(r for r in records if r["method"] == "ewc")["final MF1 mean"]) == pytest.approx(0.9)


def test_output_file(runs, tmp_path):
    target = tmp_path / "out" / "table.md"
    printed = _ok(str(runs), "--output", str(target))
    assert str(target) in printed
    assert "0.600 ± 0.141" not in printed  # the table goes to the file, not the terminal
    text = target.read_text(encoding="utf-8")
    assert find_row(markdown_rows(text), method="naive")["final MF1"] == "0.600 ± 0.141"


def test_output_file_json(runs, tmp_path):
    target = tmp_path / "table.json"
    _ok(str(runs), "--format", "json", "--output", str(target))
    assert json.loads(target.read_text(encoding="utf-8"))[0]["seeds"] == "0,1"


# ---------------------------------------------------------------- bad input


def _bad(*args, fragment: str | None = None) -> str:
    out = run_cli("report", *args)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.output
    if fragment:
        assert fragment in lines[0], lines[0]
    return lines[0]


NOT_RESULTS = [
    json.dumps({"hello": "world"}),  # JSON, not a result
    json.dumps({**result(), "schema": "cpt-bench/run/v0"}),  # another schema
    json.dumps([result()]),  # not an object
    "{not json",  # malformed
]


@pytest.mark.parametrize("content", NOT_RESULTS)
def test_a_folder_skips_what_is_not_a_result_file_and_names_it(runs, content):
    before = _ok(str(runs))
    write(runs, "zz_other.json", content)
    out = run_cli("report", str(runs))
    assert out.exit_code == 0, out.output
    skipped = [line for line in out.stderr.splitlines() if "zz_other.json" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 1 file"), out.stderr
    assert out.stdout.split("\n\n")[0] == before.split("\n\n")[0]  # the same table


@pytest.mark.parametrize("content", NOT_RESULTS)
def test_a_named_file_that_is_not_a_result_is_bad_input(runs, content):
    write(runs, "zz_other.json", content)
    _bad(str(runs / "zz_other.json"), fragment="zz_other.json")


def test_a_report_written_into_the_runs_folder_does_not_break_the_next_report(runs):
    for fmt in ("json", "csv", "markdown"):
        _ok(str(runs), "--format", fmt, "--output", str(runs / f"report.{fmt}"))
    out = run_cli("report", str(runs))
    assert out.exit_code == 0 and "report.json" in out.stderr, out.output


def test_a_broken_result_file_is_skipped_in_one_line_in_a_folder_and_bad_input_when_named(runs):
    broken = result()
    del broken["method"]  # says it is a result file, but is not a sound one
    write(runs, "zz_broken.json", json.dumps(broken))
    out = run_cli("report", str(runs))
    assert out.exit_code == 0, out.output
    (line,) = [line for line in out.stderr.splitlines() if "zz_broken.json" in line]
    assert line.startswith("skipped") and "'method' is a required property" in line
    assert "naive" in out.stdout  # the sound files are still reported
    _bad(str(runs / "zz_broken.json"), fragment="zz_broken.json")


def test_missing_path(tmp_path):
    _bad(str(tmp_path / "nope"), fragment="nope")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _bad(str(tmp_path / "empty"))


def test_unknown_format(runs):
    _bad(str(runs), "--format", "xml", fragment="xml")


def test_runs_with_different_settings_are_not_averaged_together(tmp_path):
    runs = tmp_path / "runs"
    write(runs, "a0.json", result(seed=0, final_f1=0.5))
    write(runs, "a1.json", result(seed=1, final_f1=0.7))
    write(runs, "b0.json", result(seed=0, final_f1=0.2, settings={"dap": {"steps": 99}}))
    out = run_cli("report", str(runs))
    assert out.exit_code == 0, out.output
    table = markdown_rows(out.output)
    assert len(table) == 2 and "config" in table[0]
    assert sorted(r["final MF1"] for r in table) == ["0.200", "0.600 ± 0.141"]


def test_result_file_missing_a_contract_key_is_bad_input(tmp_path):
    broken = result()
    del broken["metrics"]
    write(tmp_path / "runs", "a.json", broken)
    out = run_cli("report", str(tmp_path / "runs"))
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "metrics" in out.output


def test_measured_truncation_counts_in_settings_do_not_split_a_configuration(tmp_path):
    from cpt_bench.report.check import configuration_key

    def settings(truncated):
        task = {"evaluator": "head", "finetune_overrides": {}}
        return {"dap": {"steps": 4}, "end_tasks": {"cats": {**task, **truncated}}}

    runs = tmp_path / "runs"
    older = result(seed=0, final_f1=0.5, settings=settings({"truncated_examples": {"test": 1}}))
    newer = result(seed=1, final_f1=0.7, settings=settings({}))
    write(runs, "a0.json", older)
    write(runs, "a1.json", newer)
    rows = markdown_rows(_ok(str(runs)))
    assert len(rows) == 1 and rows[0]["seeds"] == "0,1"
    assert configuration_key(older) == configuration_key(newer)


def test_a_setting_added_later_reads_as_what_older_runs_did(tmp_path):
    """A result file written before a setting existed groups with new runs that use the behaviour it ran
    with (a default for `dap.compile`; `softmask.contrastive_views` changed default when added: older runs
    were "separate"), in report and in the regression gate alike."""
    from cpt_bench.report.check import configuration_key

    runs = tmp_path / "runs"
    older = result(seed=0, settings={"dap": {"steps": 4}})
    newer = result(seed=1, settings={"dap": {"steps": 4, "compile": False}})
    write(runs, "a0.json", older)
    write(runs, "a1.json", newer)
    assert configuration_key(older) == configuration_key(newer)
    assert markdown_rows(_ok(str(runs)))[0]["seeds"] == "0,1"

    old_softmask = {**result(method="softmask", seed=0), "method_config": {"contrastive": True}}
    separate = {**result(method="softmask", seed=1), "method_config": {"contrastive": True,
                                                                        "contrastive_views": "separate"}}
    anchored = {**result(method="softmask", seed=2), "method_config": {"contrastive": True,
                                                                        "contrastive_views": "mlm_anchor"}}
    assert configuration_key(old_softmask) == configuration_key(separate) != configuration_key(anchored)
