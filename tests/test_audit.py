"""Contamination audit (cpt_bench/data/audit.py, `cpt-bench audit`, `--set data.decontaminate=true`): 13-gram overlap
and exact duplicates between every DAP corpus and every end-task split."""

from __future__ import annotations

import json

import pytest

from cpt_bench.data.audit import audit, decontaminate

from conftest import assert_one_line_error, run_cli, write_jsonl

TEST_SENTENCE = "the waiter brought the soup late but the pasta was warm and the wine was excellent tonight"
# 12 of its tokens in a row, no more: below the 13-gram
TWELVE = "brought the soup late but the pasta was warm and the wine"


def test_a_corpus_holding_a_test_sentence_is_flagged_and_twelve_shared_tokens_are_not():
    corpus = [f"we came in . {TEST_SENTENCE} . we left", f"and so {TWELVE} , nothing else", "unrelated text"]
    rows = audit({"food": corpus}, {("food", "test"): [TEST_SENTENCE, "another test text", "x " + TWELVE]})
    (row,) = rows
    assert (row.texts, row.overlapping, row.exact_duplicates) == (3, 1, 0)
    assert audit({"food": [f"and so {TWELVE} , nothing else"]}, {("food", "test"): [TEST_SENTENCE]})[0].overlapping == 0


def test_case_and_white_space_do_not_hide_a_copy_and_exact_duplicates_are_counted():
    corpus = ["The   Soup was COLD .", TEST_SENTENCE.upper()]
    (row,) = audit({"food": corpus}, {("food", "train"): ["the soup was cold .", TEST_SENTENCE, "warm bread"]})
    assert row.overlapping == 1  # the long sentence (a short one has no 13-gram)
    assert row.exact_duplicates == 2  # both copies, after lower-casing and white-space folding


def test_decontamination_removes_exactly_the_overlapping_texts():
    corpus = [f"we came in . {TEST_SENTENCE}", f"and so {TWELVE} , nothing else", "unrelated text", "warm bread"]
    kept, dropped = decontaminate(corpus, [TEST_SENTENCE, "warm bread"])
    # a short exact duplicate ("warm bread") has no 13-gram: the audit counts it, decontamination keeps it
    assert dropped == 1 and list(kept) == [f"and so {TWELVE} , nothing else", "unrelated text", "warm bread"]


def _contaminate(tiny_suite) -> None:
    """Put a long test sentence of `cats` into the cats corpus (2 of 13 test texts are long ones)."""
    data = tiny_suite.parent / "data" / "cats"
    tests = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    tests += [{"text": TEST_SENTENCE.replace("waiter", "cats"), "label": "pos"}]
    write_jsonl(data / "test.jsonl", tests)
    corpus = [json.loads(line) for line in (data / "unlabeled.jsonl").read_text().splitlines()]
    # first: the corpus's last texts become its held-out slice, never trained on (so not audited)
    write_jsonl(data / "unlabeled.jsonl", [{"text": "so " + TEST_SENTENCE.replace("waiter", "cats")}, *corpus])


def test_the_audit_command_prints_every_pair_and_warns_on_a_contaminated_test_split(tiny_suite):
    _contaminate(tiny_suite)
    out = run_cli("audit", "--suite", str(tiny_suite))
    assert out.exit_code == 0, out.output
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ")][1:]
    assert len(rows) == 2 * 3 * 3  # 2 corpora x 3 end tasks (cats, dogs, the general probe) x 3 splits
    flagged = [row[:3] + row[4:5] for row in rows if row[4] != "0"]
    assert flagged == [["cats", "cats", "test", "1"]]
    assert "warning: 1 of 13 test texts of end task cats" in out.stderr


def test_a_run_records_the_audit_and_decontamination_drops_the_text(tiny_suite, tmp_path):
    _contaminate(tiny_suite)
    plain = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "plain"),
                    "--quiet", "--eval", "final")
    assert plain.exit_code == 0, plain.output
    assert "warning: 1 of 13 test texts of end task cats" in plain.stderr
    (path,) = (tmp_path / "plain").glob("*.json")
    contamination = json.loads(path.read_text())["provenance"]["contamination"]
    assert contamination["ngram"] == 13 and "decontaminated" not in contamination
    flagged = [r for r in contamination["overlap"] if r["overlapping"]]
    assert [(r["corpus"], r["task"], r["split"]) for r in flagged] == [("cats", "cats", "test")]

    clean = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "clean"),
                    "--quiet", "--eval", "final", "--set", "data.decontaminate=true")
    assert clean.exit_code == 0, clean.output
    (path,) = (tmp_path / "clean").glob("*.json")
    result = json.loads(path.read_text())
    assert result["provenance"]["contamination"]["decontaminated"] == {"cats": 1, "dogs": 0}
    assert result["settings"]["data"] == {"decontaminate": True}


def test_auditing_a_suite_whose_corpus_is_missing_is_bad_input(tiny_suite):
    (tiny_suite.parent / "data" / "dogs" / "unlabeled.jsonl").unlink()
    assert_one_line_error(run_cli("audit", "--suite", str(tiny_suite)), "dogs", "unlabeled.jsonl")


def test_an_unknown_data_setting_is_bad_input(tiny_suite, tmp_path):
    out = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path),
                  "--set", "data.scrub=true")
    assert_one_line_error(out, "data.scrub")
    assert not list(tmp_path.glob("*.json"))


def test_the_audit_is_cached_per_content(tmp_path, monkeypatch):
    from cpt_bench.data import audit as audit_module

    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path))
    corpora, splits = {"food": [f"so {TEST_SENTENCE}"]}, {("food", "test"): [TEST_SENTENCE]}
    first = audit_module.cached_audit(corpora, splits)
    monkeypatch.setattr(audit_module, "audit", lambda *args: pytest.fail("audited again"))
    assert audit_module.cached_audit(corpora, splits) == first and first[0].overlapping == 1
    with pytest.raises(pytest.fail.Exception):  # other content: audited anew
        audit_module.cached_audit(corpora, {("food", "test"): [TEST_SENTENCE, "more"]})
