"""`cpt-bench run --report-to`: accelerate's trackers, read back from what they wrote."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli


def test_tensorboard_logs_steps_stage_scores_and_the_final_matrix(tiny_suite, tmp_path):
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    suite = yaml.safe_load(tiny_suite.read_text())
    tiny_suite.write_text(yaml.safe_dump({**suite, "perplexity": {"heldout_texts": 10}}))  # a perplexity matrix
    out = tmp_path / "runs"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                     "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.json")
    run = json.loads(path.read_text())
    logs = out / "trackers" / path.stem
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    steps = sum(stage["steps"] for stage in run["stages"])  # 2 stages of 4 steps
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [loss for stage in run["stages"] for loss in stage["loss_curve"]], abs=1e-5)  # rounded in the file
    assert {"train/lr", "train/tokens_per_second"} <= scalars
    # after each stage, at the stage's last global step: the tasks evaluated, the probe, every perplexity
    assert [e.step for e in events.Scalars("eval/cats/macro_f1")] == [4, 8]
    assert [e.value for e in events.Scalars("eval/dogs/macro_f1")] == pytest.approx([run["matrix"]["macro_f1"][1][1]])
    assert [e.step for e in events.Scalars("probe/general/macro_f1")] == [4, 8]
    assert run["perplexity"]["corpora"] == ["cats", "dogs"]
    assert [e.value for e in events.Scalars("perplexity/dogs")] == pytest.approx(
        [row[1] for row in run["perplexity"]["stages"]], abs=1e-4)
    assert events.Scalars("final/final_macro_f1")[0].value == pytest.approx(run["metrics"]["final_macro_f1"])
    assert events.Scalars("matrix/after_dogs/cats")[0].value == pytest.approx(run["matrix"]["macro_f1"][1][0])
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith("matrix/macro_f1")]
    assert texts, events.Tags()
    table = events.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "| after \\ task | cats | dogs |" in table and f"{run['matrix']['macro_f1'][1][0]:.3f}" in table


def test_an_unknown_or_missing_tracker_is_a_one_line_error(tiny_suite, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    assert_one_line_error(run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out),
                                  "--report-to", "comet"), "--report-to must be one of none, tensorboard")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert_one_line_error(run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out),
                                  "--report-to", "wandb"), "'wandb' is not installed", "cpt-bench[wandb]")
    assert not out.exists() or not list(out.glob("*.json"))
