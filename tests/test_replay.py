"""Data replay at a compute-equivalent ratio: ratio 0 is naive, replayed rows come only from earlier domains
(or the general corpus), the replayed share of the tokens is what was asked, and a run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState

from conftest import assert_one_line_error, stage_state
from interruptions import Crash, assert_same_result, crash_at_batch, only_result, run_tiny

CATS = ["the cats was purr and nap ."] * 30
DOGS = ["a dogs is loyal and bark ."] * 30


def recording(state):
    """Make the stage's objective record every batch it is given (and return a zero loss)."""
    seen = []
    state.objective = lambda return_hidden=False, **batch: seen.append(batch) or torch.tensor(0.0)
    return seen


def original_rows(batch) -> list[list[int]]:
    """Each row's tokens before masking (a masked position's label is its original token)."""
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    return [row[mask.bool()].tolist() for row, mask in zip(ids, batch["attention_mask"])]


@pytest.mark.parametrize("sources", ["earlier", "general", "both"])
def test_replayed_rows_come_only_from_earlier_domains_or_the_general_corpus(tiny_lm, sources):
    corpora = {"cats": tiny_lm.blocks(CATS, "cats"), "dogs": tiny_lm.blocks(DOGS, "dogs"),
               "general": tiny_lm.blocks(["the general was good and fine ."] * 30, "general")}
    allowed = {"earlier": ["cats"], "general": ["general"], "both": ["cats", "general"]}[sources]
    allowed_rows = [block["input_ids"] for name in allowed for block in corpora[name]]
    method = method_class("replay")(method_class("replay").Settings(ratio=0.5, sources=sources))
    model = tiny_lm.model()
    method.before_sequence(SequenceState(model, tiny_lm.tokenizer, None, ["cats", "dogs"], 0,
                                         corpus_blocks=corpora.__getitem__))
    for index, name in enumerate(["cats", "dogs"]):
        state = stage_state(model, corpora[name], name=name, index=index, tokenizer=tiny_lm.tokenizer)
        method.before_stage(state)
        seen = recording(state)
        batch = tiny_lm.batch(corpora[name], seed=index, rows=4)
        method.loss(state, batch)
        rows = original_rows(seen[0])
        assert rows[:2] == original_rows(batch)[:2]  # the stage's own rows, kept
        if index == 0 and sources == "earlier":
            assert rows == original_rows(batch)  # nothing earlier to replay in the first stage
        else:
            assert all(row in allowed_rows for row in rows[2:]), (name, sources)
        method.after_stage(state)
    replayed = method.summary()["replayed_tokens"]
    assert set().union(*replayed) <= set(allowed)
    assert replayed[1] and sum(replayed[1].values()) == 2 * len(corpora["cats"][0]["input_ids"])


def test_ratio_zero_is_naive_step_for_step(tiny_suite, tmp_path):
    naive = run_tiny(tiny_suite, tmp_path / "naive", "naive")
    replay = run_tiny(tiny_suite, tmp_path / "replay", "replay", "--set", "replay.ratio=0")
    assert naive.exit_code == replay.exit_code == 0, (naive.output, replay.output)
    got, want = only_result(tmp_path / "replay"), only_result(tmp_path / "naive")
    assert [s["loss_curve"] for s in got["stages"]] == [s["loss_curve"] for s in want["stages"]]
    assert [s["tokens"] for s in got["stages"]] == [s["tokens"] for s in want["stages"]]
    assert got["matrix"] == want["matrix"] and got["perplexity"] == want["perplexity"]


def test_a_replay_run_trains_naives_tokens_and_resumes_to_the_same_result(tiny_suite, tmp_path, monkeypatch):
    settings = ("--set", "replay.ratio=0.5")
    assert run_tiny(tiny_suite, tmp_path / "reference", "replay", *settings).exit_code == 0
    assert run_tiny(tiny_suite, tmp_path / "naive", "naive").exit_code == 0
    reference, naive = only_result(tmp_path / "reference"), only_result(tmp_path / "naive")
    assert [s["tokens"] for s in reference["stages"]] == [s["tokens"] for s in naive["stages"]]
    replayed = reference["method_summary"]["replayed_tokens"]
    assert replayed[0] == {} and sum(replayed[1].values()) > 0  # stage 1 has nothing earlier to replay
    crash_at_batch(monkeypatch, 7)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, tmp_path / "crashed", "replay", *settings)
    monkeypatch.undo()
    assert run_tiny(tiny_suite, tmp_path / "crashed", "replay", *settings).exit_code == 0
    resumed = only_result(tmp_path / "crashed")
    assert_same_result(resumed, reference)
    assert resumed["method_summary"] == reference["method_summary"]


def test_replay_from_the_default_suites_general_corpus_needs_no_held_out_text():
    from cpt_bench.data.suite import load_suite

    suite = load_suite("synthetic")
    assert suite.general_corpus == "general/unlabeled.jsonl"
    assert suite.general_corpus not in suite.heldout_corpora.values()


@pytest.mark.parametrize(("options", "message"), [
    (["--set", "replay.ratio=1"], "replay.ratio: must be in [0, 1)"),
    (["--set", "replay.ratio=-0.1"], "replay.ratio: must be in [0, 1)"),
    (["--set", "replay.sources=general", "--set", "replay.ratio=0.5"], "the suite names no general_corpus"),
])
def test_bad_replay_settings_are_one_line_and_write_nothing(tiny_suite, tmp_path, options, message):
    out = tmp_path / "out"
    result = run_tiny(tiny_suite, out, "replay", *options)
    assert_one_line_error(result, message)
    assert not out.exists() or not list(out.glob("*.json"))


def test_the_general_source_reads_the_suites_general_corpus(tiny_suite, tmp_path):
    config = yaml.safe_load(tiny_suite.read_text())
    config["general_corpus"] = "general/unlabeled.jsonl"
    general = tiny_suite.parent / "data" / "general" / "unlabeled.jsonl"
    general.write_text("\n".join(json.dumps({"text": "the general was good and fine ."}) for _ in range(40)))
    tiny_suite.write_text(yaml.safe_dump(config))
    result = run_tiny(tiny_suite, tmp_path / "out", "replay", "--set", "replay.sources=general",
                      "--set", "replay.ratio=0.5")
    assert result.exit_code == 0, result.output
    replayed = only_result(tmp_path / "out")["method_summary"]["replayed_tokens"]
    assert all(set(stage) == {"general"} for stage in replayed)
