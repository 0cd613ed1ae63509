"""`cpt-bench importance RESULT`: per-layer tables and a PNG from a hand-written importance artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_report import result as complete_result

from conftest import assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEM = "synthetic__softmask__alpha-beta__seed0__abc123"

# 2 layers x 4 heads, chosen so the numbers can be checked by hand.
HEADS = {
    "general": [[0.9, 0.8, 0.1, 0.2], [0.6, 0.1, 0.1, 0.1]],  # above 0.5: (0,0) (0,1) (1,0)
    "alpha": [[0.9, 0.1, 0.7, 0.0], [0.1, 0.1, 0.1, 0.1]],    # above 0.5: (0,0) (0,2)
    "beta": [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],     # none
}
INTERMEDIATE = {"general": [[0.9] * 8] * 2, "alpha": [[0.9] * 4 + [0.1] * 4] * 2, "beta": [[0.0] * 8] * 2}
OUTPUT = {stage: [[0.2] * 6] * 2 for stage in HEADS}  # nothing above 0.5 anywhere: overlaps undefined


def _tensors() -> dict[str, torch.Tensor]:
    tensors, accumulated = {}, None
    for index, stage in enumerate(HEADS):
        normalised = {"head": torch.tensor(HEADS[stage]), "intermediate": torch.tensor(INTERMEDIATE[stage]),
                      "output": torch.tensor(OUTPUT[stage])}
        accumulated = normalised if accumulated is None else {
            k: torch.maximum(accumulated[k], v) for k, v in normalised.items()}
        for kind, values in normalised.items():
            tensors[f"{index:02d}:{stage}/normalised/{kind}"] = values.clone()
            tensors[f"{index:02d}:{stage}/accumulated/{kind}"] = accumulated[kind].clone()
    return tensors


def _write_result(folder: Path, artifacts: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{STEM}.json"
    if artifacts is None:
        artifacts = {"importance": f"{STEM}.importance.safetensors"}
        save_file(_tensors() if tensors is None else tensors, folder / artifacts["importance"])
    result = {**complete_result(method="softmask", suite="synthetic", domains=("alpha", "beta"), seed=0,
                                model="synthetic-base"), "artifacts": artifacts}
    path.write_text(json.dumps(result))
    return path


def _rows(output: str, title: str) -> dict[str, list[str]]:
    """The data rows of the table under the line starting with `title`, keyed by their first cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rule = next(i for i in range(start, len(lines)) if lines[i].startswith("---"))
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[" ".join(cells[:2]) if not cells[0].isdigit() else cells[0]] = cells
    return rows


def test_summary_tables_and_png(tmp_path):
    path = _write_result(tmp_path / "runs")
    result = run_cli("importance", str(path))
    assert result.exit_code == 0, result.output

    heads = _rows(result.output, "head units")
    # layer 0: general mean 0.5, 2/4 above; alpha mean 0.425, 2/4 above; beta 0;
    # accumulated [.9 .8 .7 .2]: 3/4 above
    assert heads["0"] == ["0", "0.500", "0.500", "0.425", "0.500", "0.000", "0.000", "0.750"]
    assert heads["1"] == ["1", "0.225", "0.250", "0.100", "0.000", "0.000", "0.000", "0.250"]
    assert _rows(result.output, "intermediate units")["0"][1:5] == ["0.900", "1.000", "0.500", "0.500"]

    overlaps = _rows(result.output, "overlap between stages")
    # heads: general {(0,0),(0,1),(1,0)} vs alpha {(0,0),(0,2)}: 1 shared of 4; intermediate: 8 of 16
    assert overlaps["general alpha"] == ["general", "alpha", "0.250", "0.500", "n/a"]
    assert overlaps["general beta"] == ["general", "beta", "0.000", "0.000", "n/a"]
    assert overlaps["alpha beta"] == ["alpha", "beta", "0.000", "0.000", "n/a"]

    png = path.with_name(f"{STEM}.importance.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert result.output.rstrip().splitlines()[-1] == f"heatmap PNG: {png}"


def test_output_option_and_functions(tmp_path):
    from cpt_bench.report.importance import accumulated_above, load_importances, stage_overlaps

    path = _write_result(tmp_path / "runs")
    target = tmp_path / "figures" / "heads.png"
    result = run_cli("importance", str(path), "--output", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert not path.with_name(f"{STEM}.importance.png").exists()

    run = load_importances(path)
    assert [s.name for s in run.stages] == ["general", "alpha", "beta"]
    assert run.num_layers == 2 and run.sizes == {"head": 4, "intermediate": 8, "output": 6}
    assert accumulated_above(run.stages)["head"] == [0.75, 0.25]
    assert stage_overlaps(run.stages)[0] == ("general", "alpha",
                                             {"head": 0.25, "intermediate": 0.5, "output": None})


def _expect_bad_input(args: list[str], *fragments: str) -> None:
    assert_one_line_error(run_cli("importance", *args), *fragments)


def test_missing_result(tmp_path):
    _expect_bad_input([str(tmp_path / "nope.json")], "does not exist")


@pytest.mark.parametrize("text", ["{not json", json.dumps({"schema": "other"}), json.dumps([1, 2])])
def test_not_a_result_file(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text(text)
    _expect_bad_input([str(path)], "is not a result file")


@pytest.mark.parametrize("artifacts", [{}, {"other": "x.safetensors"}])
def test_naive_result_has_no_importance(tmp_path, artifacts):
    path = _write_result(tmp_path, artifacts=artifacts)
    _expect_bad_input([str(path)], "has no importance artifact", "only soft-masking runs")


def test_result_without_artifacts_key(tmp_path):
    path = _write_result(tmp_path, artifacts={})
    data = json.loads(path.read_text())
    del data["artifacts"]
    path.write_text(json.dumps(data))
    _expect_bad_input([str(path)], "has no importance artifact")


def test_artifact_outside_the_folder(tmp_path):
    path = _write_result(tmp_path, artifacts={"importance": "../elsewhere.safetensors"})
    _expect_bad_input([str(path)], "must be a file name")


def test_missing_artifact(tmp_path):
    path = _write_result(tmp_path)
    path.with_name(f"{STEM}.importance.safetensors").unlink()
    _expect_bad_input([str(path)], "does not exist", ".importance.safetensors")


def test_unreadable_artifact(tmp_path):
    path = _write_result(tmp_path)
    path.with_name(f"{STEM}.importance.safetensors").write_bytes(b"not safetensors at all")
    _expect_bad_input([str(path)], "not readable safetensors")


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.update({"general/normalised/head": torch.zeros(2, 4)}), "is not 'INDEX:STAGE"),
    (lambda t: t.update({"00:general/raw/head": torch.zeros(2, 4)}), "is not 'INDEX:STAGE"),
    (lambda t: t.pop("01:alpha/accumulated/output"), "lacks accumulated/output"),
    (lambda t: t.update({"01:gamma/normalised/head": torch.zeros(2, 4)}), "names two stages"),
    (lambda t: t.update({"05:gamma/normalised/head": torch.zeros(2, 4)}), "are not 0..3"),
    (lambda t: t.update({"01:alpha/normalised/head": torch.zeros(3, 4)}), "has shape [3, 4]"),
    (lambda t: t.update({"01:alpha/normalised/head": torch.full((2, 4), 2.0)}), "outside [0, 1]"),
    (lambda t: t.clear(), "holds no tensors"),
])
def test_malformed_tensors(tmp_path, edit, fragment):
    tensors = _tensors()
    edit(tensors)
    path = _write_result(tmp_path, tensors=tensors)
    _expect_bad_input([str(path)], fragment)
