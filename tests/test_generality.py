"""Defaults that must hold on data of other sizes and shapes than the suites were tuned on (tiny corpora, a class
missing, very long texts, a corpus smaller than one batch), and option values that cannot work, refused in one
line before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli, write_jsonl
from interruptions import only_result, run_tiny


def _edit_suite(suite: Path, **top) -> None:
    config = yaml.safe_load(suite.read_text())
    config.update(top)
    suite.write_text(yaml.safe_dump(config, sort_keys=False))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_corpus_smaller_than_four_held_out_slices_gives_a_quarter_of_itself(tiny_suite, tmp_path):
    """The default held-out slice is 200 texts; the tiny corpora have 80: 20 are held out (it used to be none,
    without a word, and the perplexity matrix lost the domain)."""
    out = tmp_path / "runs"
    assert run_tiny(tiny_suite, out, "naive").exit_code == 0
    perplexity = only_result(out)["perplexity"]
    assert perplexity["corpora"][:2] == ["cats", "dogs"]
    assert perplexity["heldout"]["cats"] == "last 20 of 80 texts"


def test_a_tiny_corpus_and_a_corpus_smaller_than_one_batch_still_run(tiny_suite, tmp_path):
    data = tiny_suite.parent / "data"
    write_jsonl(data / "cats" / "unlabeled.jsonl", [{"text": "the cats was purr and calm ."}] * 3)  # < 1 batch
    out = tmp_path / "runs"
    result = run_tiny(tiny_suite, out, "naive")
    assert result.exit_code == 0, result.output
    perplexity = only_result(out)["perplexity"]
    assert perplexity["heldout"]["cats"] == "none: 3 texts are too few to hold any out"
    assert "cats" not in perplexity["corpora"]


def test_a_corpus_shorter_than_one_block_is_one_line(tiny_suite, tmp_path):
    write_jsonl(tiny_suite.parent / "data" / "cats" / "unlabeled.jsonl", [{"text": "purr"}])
    out = tmp_path / "runs"
    assert_one_line_error(run_tiny(tiny_suite, out, "naive"), "cats/unlabeled.jsonl",
                          "shorter than one block of 16 tokens")
    assert not out.exists() or not list(out.glob("*.json"))


def test_a_corpus_of_one_text_repeated_is_trained_on_whole_with_no_held_out_text(tiny_suite, tmp_path):
    write_jsonl(tiny_suite.parent / "data" / "cats" / "unlabeled.jsonl", [{"text": "the cats was purr ."}] * 40)
    out = tmp_path / "runs"
    assert run_tiny(tiny_suite, out, "naive").exit_code == 0
    note = only_result(out)["perplexity"]["heldout"]["cats"]
    assert note == "none: every text before the held-out slice is also in it (the corpus repeats 1 distinct texts)"


@pytest.mark.parametrize("evaluator", ["head", "probe"])
def test_a_class_missing_from_train_is_scored_over_the_full_label_set(evaluator, tiny_suite, tmp_path):
    train = tiny_suite.parent / "data" / "cats" / "train.jsonl"
    write_jsonl(train, [row for row in _rows(train) if row["label"] == "pos"])
    config = yaml.safe_load(tiny_suite.read_text())
    for domain in config["domains"]:
        domain["end_task"]["evaluator"] = evaluator
    tiny_suite.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "runs"
    result = run_tiny(tiny_suite, out, "naive")
    assert result.exit_code == 0, result.output
    cats = only_result(out)["matrix"]["macro_f1"][0][0]
    assert cats is not None and cats <= 0.5  # one class predicted: macro-F1 over both classes is at most half


def test_very_long_texts_are_truncated_counted_and_trained_on(tiny_suite, tmp_path):
    data = tiny_suite.parent / "data"
    long = " ".join(["the cats was purr and nap ."] * 20_000)  # 140,000 words in one line
    write_jsonl(data / "cats" / "unlabeled.jsonl", [{"text": long}] * 2 + _rows(data / "cats" / "unlabeled.jsonl"))
    train = _rows(data / "cats" / "train.jsonl")
    train[0]["text"] = long
    write_jsonl(data / "cats" / "train.jsonl", train)
    out = tmp_path / "runs"
    result = run_tiny(tiny_suite, out, "naive")
    assert result.exit_code == 0, result.output
    assert "1 of 24 examples are longer than 16 tokens and were truncated" in result.output


@pytest.mark.parametrize("options, fragment", [
    (["--seed", "-1"], "--seed -1: must be in 0..4294967295"),
    (["--seed", str(2 ** 32)], "must be in 0..4294967295"),
    (["--set", "dap.lr=.nan"], "dap.lr: expected a finite number"),
    (["--set", "dap.lr=.inf"], "dap.lr: expected a finite number"),
    (["--set", "finetune.lr=.inf"], "finetune.lr: expected a finite number"),
    (["--set", "dap.weight_decay=-1"], "dap.weight_decay: must be 0 or positive"),
    (["--set", "dap.max_grad_norm=-1"], "dap.max_grad_norm: must be 0 or positive"),
    (["--set", "finetune.weight_decay=-0.5"], "finetune.weight_decay: must be 0 or positive"),
    (["--set", "dap.seq_len=1000"], "dap.seq_len=1000 is longer than model"),
    (["--set", "finetune.max_length=65"], "finetune.max_length=65 is longer than model"),
    (["--steps", "0"], "dap.steps: must be positive"),
    (["--limit", "0"], "--limit must be positive"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 or positive"),
    (["--eval", "some"], "--eval must be 'full' or 'final'"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--report-to", "nowhere"], "nowhere"),
])
def test_run_option_values_that_cannot_work_are_refused_before_any_training(options, fragment, tiny_suite,
                                                                            tmp_path):
    out = tmp_path / "runs"
    assert_one_line_error(run_tiny(tiny_suite, out, "naive", *options), fragment)
    assert not list(out.glob("*.json")) and not list(out.glob(".work/*/ckpt-*"))


def test_a_task_whose_own_max_length_exceeds_the_model_is_refused(tiny_suite, tmp_path):
    config = yaml.safe_load(tiny_suite.read_text())
    config["domains"][1]["end_task"]["finetune"] = {"max_length": 100}
    tiny_suite.write_text(yaml.safe_dump(config, sort_keys=False))
    assert_one_line_error(run_tiny(tiny_suite, tmp_path / "runs", "naive"), "end task dogs", "max_length=100")


@pytest.mark.parametrize("field, value, fragment", [
    ("heldout_texts", -1, "must be non-negative"),
    ("blocks", -3, "must be non-negative"),
])
def test_bad_perplexity_settings_are_one_line(field, value, fragment, tiny_suite, tmp_path):
    _edit_suite(tiny_suite, perplexity={field: value})
    assert_one_line_error(run_tiny(tiny_suite, tmp_path / "runs", "naive"), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["report", "{runs}", "--format", "xml"], "--format 'xml' is not supported"),
    (["report", "{missing}"], "no such result file or folder"),
    (["check", "{runs}", "--reference", "{missing}"], "no such directory"),
    (["sweep", "{missing}"], "no such file"),
    (["sweep", "{grid}", "--max-parallel", "0"], "--max-parallel must be at least 1"),
    (["sweep", "{grid}", "--executor", "cloud"], "--executor must be one of local, slurm"),
    (["sweep", "status"], "give the grid file"),
])
def test_report_check_and_sweep_option_values_that_cannot_work_are_one_line(args, fragment, tiny_suite, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"suite": str(tiny_suite), "methods": ["naive"], "output": str(tmp_path / "g")}))
    (tmp_path / "runs").mkdir()
    names = {"runs": str(tmp_path / "runs"), "missing": str(tmp_path / "missing"), "grid": str(grid)}
    assert_one_line_error(run_cli(*[arg.format(**names) for arg in args]), fragment)


def test_check_tolerances_that_cannot_work_are_one_line(tiny_suite, tmp_path, reference_runs):
    reference_runs("naive")
    runs = tmp_path / "reference-naive"
    for text, fragment in (("final_macro_f1: [", "not readable YAML"),
                           ("final_macro_f1: -0.1", "must be a non-negative number"),
                           ("no_such_metric: 0.1", "unknown metric 'no_such_metric'")):
        (runs / "tolerances.yaml").write_text(text + "\n")
        assert_one_line_error(run_cli("check", str(runs), "--reference", str(runs)), fragment)


@pytest.mark.parametrize("line, fragment", [
    ("checkpoint_every: -1", "--checkpoint-every must be 0 or positive"),
    ("checkpoint_every: often", "checkpoint_every must be an integer"),
    ("report_to: nowhere", "--report-to must be one of"),
    ("seeds: [0, -1]", "--seed -1: must be in"),  # not only the first run's options are checked
    ("steps: 1.5", "steps must be an integer"),
    ("eval: some", "--eval must be 'full' or 'final'"),
    ("set: {dap.lr: .inf}", "dap.lr: expected"),
])
def test_grid_values_that_cannot_work_are_one_line_before_any_run(line, fragment, tiny_suite, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"suite: {tiny_suite}\nmethods: [naive]\noutput: {tmp_path / 'g'}\n{line}\n")
    for args in (["sweep", str(grid), "--dry-run"], ["sweep", str(grid)]):
        assert_one_line_error(run_cli(*args), fragment)
    assert not list((tmp_path / "g").glob("**/*.json"))


def test_a_step_budget_that_reads_a_tiny_corpus_many_times_over_is_said_before_training(tiny_suite, tmp_path):
    write_jsonl(tiny_suite.parent / "data" / "cats" / "unlabeled.jsonl",
                [{"text": "the cats was purr and calm and soft ."}] * 3)
    result = run_tiny(tiny_suite, tmp_path / "runs", "naive", "--steps", "20")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "reads its corpus" in line]
    assert line.startswith("warning: a stage on cats reads its corpus about 40 times")
    assert "dogs" not in line  # dogs' 60 texts are read about once in 20 steps
