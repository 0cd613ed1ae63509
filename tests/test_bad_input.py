"""Bad input: a one-line error naming the problem, exit code 2, no traceback, no result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli


def _expect_bad_input(tmp_path: Path, args: list[str], *fragments: str) -> str:
    out = tmp_path / "runs"
    result = run_cli(*args, "--output", str(out), "--quiet") if args[0] == "run" else run_cli(*args)
    line = assert_one_line_error(result, *fragments)
    assert not out.exists() or not list(out.glob("*.json")), "a result file was written"
    return line


def _edit_suite(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_unknown_method(tiny_suite, tmp_path):
    _expect_bad_input(tmp_path, ["run", "--method", "nope", "--suite", str(tiny_suite)], "unknown method", "nope")


def test_unknown_suite(tmp_path):
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", "nosuchsuite"], "unknown suite",
                      "nosuchsuite")


@pytest.mark.parametrize("order, fragment", [("cats,birds", "birds"), ("cats,cats", "twice")])
def test_bad_order(tiny_suite, tmp_path, order, fragment):
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite), "--order", order],
                      fragment)


def test_missing_data_file(tiny_suite, tmp_path):
    (tmp_path / "data" / "dogs" / "test.jsonl").unlink()
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "missing data file",
                      "dogs/test.jsonl")


def test_label_outside_label_set(tiny_suite, tmp_path):
    train = tmp_path / "data" / "cats" / "train.jsonl"
    train.write_text(train.read_text() + json.dumps({"text": "the cats was purr .", "label": "meh"}) + "\n")
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "'meh'",
                      "cats/train.jsonl line 25", "label set")


def test_empty_corpus(tiny_suite, tmp_path):
    (tmp_path / "data" / "cats" / "unlabeled.jsonl").write_text("\n")
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "empty corpus",
                      "cats/unlabeled.jsonl")


def test_model_path_that_does_not_load(tiny_suite, tmp_path):
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite), "--model",
                                 str(tmp_path / "no-weights")], "no weights")
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite), "--model",
                                 "no-such-org/no-such-model"], "no-such-org/no-such-model")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndomains: [a, b\n")
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(bad)], "malformed YAML", "line")


def test_suite_field_with_wrong_type(tiny_suite, tmp_path):
    _edit_suite(tiny_suite, lambda d: d["dap"].update(steps="many"))
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "dap.steps",
                      "expected int")


def test_domain_listed_twice(tiny_suite, tmp_path):
    _edit_suite(tiny_suite, lambda d: d["domains"].append(dict(d["domains"][0])))
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "'cats'", "twice")


@pytest.mark.parametrize("option, fragment", [("dap.nosuch=1", "unknown key"), ("dap.steps=abc", "expected int"),
                                              ("dap.lr=fast", "expected float"), ("dap.lr=1e-4x", "expected float"),
                                              ("other.lr=1", "unknown settings block"), ("nodot=1", "BLOCK.KEY")])
def test_bad_set_option(tiny_suite, tmp_path, option, fragment):
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite), "--set", option],
                      fragment)


def test_float_settings_accept_exponent_notation():
    """YAML 1.1 reads `1e-4` as a string; a float setting takes it as the number users mean."""
    from cpt_bench.common.settings import DapSettings, build, override

    assert override(DapSettings(), "lr", "1e-4", "dap").lr == 1e-4
    assert build(DapSettings, {"lr": "3E-5", "warmup": ".1"}, "suite dap").lr == 3e-5


def test_missing_data_dir(tiny_suite, tmp_path):
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite), "--data-dir",
                                 str(tmp_path / "nowhere")], "--data-dir", "nowhere")


def test_unknown_list_target(tmp_path):
    _expect_bad_input(tmp_path, ["list", "widgets"], "widgets")


def test_hub_dataset_offline(tiny_suite, tmp_path):
    _edit_suite(tiny_suite, lambda d: d["domains"][0].update(corpus={"hub": "no-such-org/no-such-corpus"}))
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)],
                      "no-such-org/no-such-corpus", "offline")


def test_prompt_task_with_a_verbalizer_word_the_model_lacks(tiny_suite, tmp_path):
    def edit(data):
        data["domains"][0]["end_task"].update(evaluator="prompt", prompt={
            "template": "{text} {mask} .", "verbalizer": {"neg": ["hiss"], "pos": ["zzzunknown"]}})
    _edit_suite(tiny_suite, edit)
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "zzzunknown",
                      "single token")


def test_a_broken_plugin_file_does_not_take_other_methods_down(tmp_path, monkeypatch):
    import cpt_bench.baselines
    from cpt_bench.common.errors import BadInput
    from cpt_bench.training import plugin

    (tmp_path / "halfwritten.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.setattr(cpt_bench.baselines, "__path__", [*cpt_bench.baselines.__path__, str(tmp_path)])
    monkeypatch.setattr(plugin, "BROKEN_PLUGINS", {})
    assert plugin.method_class("naive").name == "naive"
    with pytest.raises(BadInput, match=r"method 'halfwritten' failed to load: .*ModuleNotFoundError"):
        plugin.method_class("halfwritten")
    with pytest.raises(BadInput, match=r"failed to load: cpt_bench\.baselines\.halfwritten"):
        plugin.method_class("nosuchmethod")
    listed = run_cli("list", "methods")
    assert listed.exit_code == 0 and "naive" in listed.output and "halfwritten" in listed.output


def test_data_file_that_is_not_utf8(tiny_suite, tmp_path):
    (tmp_path / "data" / "dogs" / "train.jsonl").write_bytes(b'{"text": "caf\xe9 dogs", "label": "pos"}\n')
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "dogs/train.jsonl",
                      "UTF-8")


def test_malformed_json_line_names_file_and_line(tiny_suite, tmp_path):
    train = tmp_path / "data" / "cats" / "train.jsonl"
    train.write_text(train.read_text() + '{"text": "the cats", "label": \n')
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "cats/train.jsonl",
                      "line 25")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tiny_suite, tmp_path):
    train = tmp_path / "data" / "cats" / "train.jsonl"
    train.write_text("\n\n" + train.read_text().replace("\n", "\n\n", 3)
                     + json.dumps({"text": "the cats was purr .", "label": "meh"}) + "\n")
    # 24 rows + 2 leading blank lines + 3 inner blank lines: the bad row is line 30 of the file
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(tiny_suite)], "'meh'",
                      "cats/train.jsonl line 30")


def test_texts_longer_than_max_length_are_truncated_counted_and_reported(tiny_suite, tmp_path):
    test = tmp_path / "data" / "cats" / "test.jsonl"
    long_text = "the cats was " + " and ".join(["purr"] * 40) + " ."  # > 16 tokens (finetune.max_length)
    test.write_text(test.read_text() + json.dumps({"text": long_text, "label": "pos"}) + "\n")
    out = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "runs"),
                  "--eval", "final", "--quiet")
    assert out.exit_code == 0, out.output
    assert "end task cats test: 1 of 13 examples are longer than 16 tokens" in out.output
    result = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert result["truncated_examples"]["cats"]["test"] == 1
    assert result["truncated_examples"]["dogs"]["test"] == 0


def test_a_checkpoints_own_code_never_runs_without_the_flag(tiny_model_dir, tmp_path):
    import shutil

    from cpt_bench.common.errors import BadInput
    from cpt_bench.models.loading import load_lm

    model_dir = tmp_path / "with-code"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "code-ran"
    (model_dir / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertForMaskedLM as CustomForMaskedLM\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForMaskedLM": "modeling_custom.CustomForMaskedLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    try:
        model, _ = load_lm(str(model_dir))
        assert type(model).__module__.startswith("transformers.")  # the library's own class
    except BadInput:
        pass  # refused: just as good
    assert not marker.exists(), "the checkpoint's code ran without --trust-remote-code"



@pytest.mark.parametrize("edit, fragment", [
    (lambda g: g.update(seed="sometimes"), "generator.seed"),
    (lambda g: g.update(base_model={"layers": "two"}), "base_model.layers"),
    (lambda g: g["params"].update(moved_families_per_class=9), "moved_families_per_class"),
])
def test_bad_generator_block(tmp_path, edit, fragment):
    """A generated suite's seed, base-model recipe and language shape are checked before any work."""
    path = tmp_path / "generated.yaml"
    path.write_text((Path(__file__).parent.parent / "tasks" / "synthetic.yaml").read_text())
    _edit_suite(path, lambda data: edit(data["generator"]))
    _expect_bad_input(tmp_path, ["run", "--method", "naive", "--suite", str(path)], fragment)
