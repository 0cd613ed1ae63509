"""The embedded default suite: deterministic generator, the held-out-word property, the base model, a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_bench.synthetic import BaseModelRecipe, SyntheticParams, build_base_model, build_languages, generate

from conftest import run_cli


def _class_words(text: str, marker: str | None) -> set[str]:
    return set(text.split()) - {"in", marker}


def test_generator_is_deterministic_in_its_seed():
    params = SyntheticParams()
    first = json.dumps(generate(0, params), sort_keys=True)
    assert first == json.dumps(generate(0, params), sort_keys=True)
    assert first != json.dumps(generate(1, params), sort_keys=True)


def test_test_items_use_no_word_of_their_training_split():
    params = SyntheticParams()
    files = generate(0, params)
    languages = build_languages(0, params)
    for name, lang in languages.items():
        train_words = set().union(*(_class_words(r["text"], lang.marker) for r in files[f"{name}/train.jsonl"]))
        test_words = set().union(*(_class_words(r["text"], lang.marker) for r in files[f"{name}/test.jsonl"]))
        assert train_words and test_words
        assert not train_words & test_words, name
        verbalizer = set().union(*files[f"{name}/verbalizer.json"].values())
        assert not verbalizer & test_words, name


def test_domain_test_labels_contradict_the_general_partition():
    """A domain's tested words are the ones it moved: the base LM's (general) class is always the wrong answer."""
    languages = build_languages(0, SyntheticParams())
    general_class = {w: c for c, words in enumerate(languages["general"].classes) for w in words}
    files = generate(0, SyntheticParams())
    for name in ("alpha", "beta", "gamma", "delta"):
        for row in files[f"{name}/test.jsonl"]:
            label = int(row["label"].removeprefix("class"))
            for word in _class_words(row["text"], languages[name].marker):
                assert general_class[word] != label


def test_shared_group_transfers_and_other_domains_conflict():
    languages = build_languages(0, SyntheticParams())
    assert languages["alpha"].classes == languages["beta"].classes  # the shared group: transfer
    alpha_moved = {w for ws in languages["alpha"].moved for w in ws}
    for other in ("gamma", "delta"):
        moved = {w for ws in languages[other].moved for w in ws}
        assert moved and not moved & alpha_moved
        # the other domain shows alpha's moved words in their general class: training on it undoes alpha
        for cls, words in enumerate(languages[other].classes):
            assert set(words) & alpha_moved <= set(languages["general"].classes[cls])


def test_bad_generator_params_are_bad_input():
    from cpt_bench.errors import BadInput
    from cpt_bench.settings import build

    with pytest.raises(BadInput, match="class_words"):
        build(SyntheticParams, {"class_words": 61}, "params")


def test_base_model_build_is_reproducible_bit_for_bit(tmp_path, monkeypatch):
    recipe = BaseModelRecipe(pretrain_steps=3)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "a"))
    first = build_base_model(recipe=recipe)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "b"))
    second = build_base_model(recipe=recipe)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_default_base_model_loads_offline():
    from cpt_bench.models import load_masked_lm

    model, tokenizer = load_masked_lm("synthetic-base")
    assert model.config.num_hidden_layers == BaseModelRecipe().layers
    assert tokenizer.mask_token == "[MASK]"


def test_short_default_run_reports_the_general_probe(tmp_path):
    out = tmp_path / "runs"
    result = run_cli("run", "--method", "naive", "--steps", "3", "--eval", "final", "--limit", "60",
                     "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(next(Path(out).glob("*.json")).read_text())
    general = data["probes"]["general"]
    assert len(general["stages"]) == len(data["domains"]) == 4
    assert 0.0 <= general["base"] <= 1.0
    report = run_cli("report", str(out))
    assert report.exit_code == 0 and "general Δ" in report.output
