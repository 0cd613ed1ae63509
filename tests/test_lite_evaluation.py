"""The pieces of a laptop-sized real-data tier: stratified subsampling of end tasks, a dev split carved out
of train, the linear-probe evaluator, and the perplexity slices cut from a corpus (never trained on)."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import yaml

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import FinetuneSettings, build
from cpt_bench.data.suite import EndTask, load_suite
from cpt_bench.data.texts import EndTaskData, EndTaskSplit, read_end_task, stratified_sample
from cpt_bench.evaluation.evaluator import check_end_task, has_encoder, linear_probe_scores

from conftest import assert_one_line_error, run_cli, write_jsonl

LABELS = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 4 + [4]  # skewed, with a class of one example


def test_stratified_sample_is_deterministic_keeps_every_class_and_follows_the_label_shares():
    rows = stratified_sample(LABELS, 20, seed=3)
    assert rows == stratified_sample(LABELS, 20, seed=3)
    assert rows != stratified_sample(LABELS, 20, seed=4)  # which examples: the seed's; how many: the shares'
    counts = collections.Counter(LABELS[i] for i in rows)
    assert len(rows) == len(set(rows)) == 20
    assert set(counts) == set(LABELS)  # the one-example class is kept
    assert counts[0] > counts[1] > counts[2] >= counts[3] >= counts[4] == 1
    assert abs(counts[0] - 20 * 50 / 100) <= 2


def test_a_sample_as_large_as_its_split_is_the_whole_split():
    assert stratified_sample(LABELS, 100, 0) == list(range(100))
    assert stratified_sample(LABELS, 5000, 0) == list(range(100))


def write_task(root, train: int, test: int, dev: int | None = None):
    def rows(n, tag):
        return [{"text": f"{tag} example {i}", "label": "yes" if i % 4 == 0 else "no"} for i in range(n)]

    write_jsonl(root / "train.jsonl", rows(train, "train"))
    write_jsonl(root / "test.jsonl", rows(test, "test"))
    if dev is not None:
        write_jsonl(root / "dev.jsonl", rows(dev, "dev"))


def end_task(**fields) -> EndTask:
    return build(EndTask, {"train": "train.jsonl", "test": "test.jsonl", "labels": ["no", "yes"], **fields}, "task")


def test_subsampling_caps_each_split_and_records_the_sizes_used(tmp_path):
    write_task(tmp_path, train=200, test=30, dev=40)
    task = end_task(dev="dev.jsonl", subsample={"train": 50, "dev": 10, "test": 1000})
    data = read_end_task("t", task, tmp_path, None)
    assert data.sizes == {"train": 50, "dev": 10, "test": 30}  # a size above its split is not an error
    assert collections.Counter(data.train.labels) == {0: 37, 1: 13} or \
        collections.Counter(data.train.labels) == {0: 38, 1: 12}
    again = read_end_task("t", task, tmp_path, None)
    assert again.train.texts == data.train.texts


def test_a_dev_split_carved_from_train_is_disjoint_from_what_is_trained(tmp_path):
    write_task(tmp_path, train=100, test=20)
    task = end_task(dev="dev.jsonl", dev_optional=True, dev_from_train=20, subsample={"train": 60})
    data = read_end_task("t", task, tmp_path, None)
    assert data.sizes == {"train": 60, "dev": 20, "test": 20}
    assert not set(data.dev.texts) & set(data.train.texts)
    assert set(data.dev.labels) == {0, 1}
    assert data.dev_split == "20 of 100 train examples (at most 20 and 0.2 of train)"


def test_a_train_split_smaller_than_the_dev_slice_keeps_most_of_its_examples(tmp_path):
    """das6's camera has 286 train examples and das6-lite asks for 300 dev examples from train: the dev split
    is at most a fifth of train (said in the result file), not an error."""
    write_task(tmp_path, train=286, test=20)
    data = read_end_task("t", end_task(dev="dev.jsonl", dev_optional=True, dev_from_train=300), tmp_path, None)
    assert data.sizes == {"train": 229, "dev": 57, "test": 20}
    assert not set(data.dev.texts) & set(data.train.texts) and set(data.dev.labels) == {0, 1}
    assert data.dev_split == "57 of 286 train examples (at most 300 and 0.2 of train)"


def test_a_class_seen_once_in_train_keeps_its_example_and_a_tiny_train_split_gets_no_dev(tmp_path):
    rows = [{"text": f"t{i}", "label": "no"} for i in range(30)] + [{"text": "only yes", "label": "yes"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:4])
    data = read_end_task("t", end_task(dev_from_train=300), tmp_path, None)
    assert "only yes" in data.train.texts and data.sizes["dev"] == 6
    write_jsonl(tmp_path / "train.jsonl", rows[:4])
    tiny = read_end_task("t", end_task(dev_from_train=300), tmp_path, None)
    assert tiny.dev is None and tiny.sizes["train"] == 4 and tiny.dev_split.startswith("none: 4 train examples")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("subsample", {"valid": 3}, "unknown split 'valid'"),
    ("subsample", {"train": 0}, "subsample.train: expected a positive integer"),
    ("dev_from_train", -1, "dev_from_train: must be non-negative"),
    ("dev_from_train_fraction", 0.9, "dev_from_train_fraction: must be in"),
    ("dev_from_train_fraction", 0, "dev_from_train_fraction: must be in"),
])
def test_bad_sampling_settings_are_one_line(field, value, message):
    with pytest.raises(BadInput, match=message):
        end_task(**{field: value})


def probe_task(labels=("a", "b")) -> EndTaskData:
    split = EndTaskSplit([], None, [], "fixture")
    return EndTaskData("fixture", list(labels), split, split, None, "macro", {}, evaluator="probe")


def test_the_linear_probe_scores_a_linearly_separable_fixture_perfectly():
    generator = torch.Generator().manual_seed(0)

    def split(n):
        labels = [i % 2 for i in range(n)]
        x = torch.randn(n, 8, generator=generator)
        side = torch.tensor(labels, dtype=torch.float) * 2 - 1
        x[:, 0] = side * (2 + torch.rand(n, generator=generator))  # one feature separates the classes by a margin
        return x, labels

    (train_x, train_y), (test_x, test_y) = split(80), split(40)
    scores = linear_probe_scores({"train": train_x, "test": test_x}, {"train": train_y, "test": test_y},
                                 probe_task(), 0)
    assert scores["macro_f1"] == 1.0 and scores["accuracy"] == 1.0


def test_the_probe_on_constant_features_scores_the_majority_rate():
    features = {"train": torch.ones(30, 4), "dev": torch.ones(10, 4), "test": torch.ones(20, 4)}
    labels = {"train": [0] * 20 + [1] * 10, "dev": [0] * 7 + [1] * 3, "test": [0] * 15 + [1] * 5}
    scores = linear_probe_scores(features, labels, probe_task(), 0)
    assert scores["accuracy"] == 0.75  # the majority class, predicted for every example
    assert scores["macro_f1"] == pytest.approx(2 * 0.75 / 1.75 / 2)  # F1 of the majority class, 0 for the other


def test_the_probe_refuses_a_model_without_an_encoder_before_any_training():
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    decoder = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, bos_token_id=0,
                                         eos_token_id=0))
    encoder = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=64))
    assert has_encoder(encoder) and not has_encoder(decoder)
    with pytest.raises(BadInput, match="evaluator 'probe' needs a model with an encoder"):
        check_end_task(None, FinetuneSettings(), probe_task(), decoder)


def test_a_probe_run_end_to_end_records_its_evaluator_and_split_sizes(tiny_suite, tmp_path):
    config = yaml.safe_load(tiny_suite.read_text())
    for domain in config["domains"]:
        domain["end_task"].update(evaluator="probe", subsample={"train": 10})
    tiny_suite.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    [path] = out.glob("*.json")
    run = json.loads(path.read_text())
    cats = run["settings"]["end_tasks"]["cats"]
    assert "linear probe" in cats["evaluator"] and "not the paper's protocol" in cats["evaluator"]
    assert cats["examples"] == {"train": 10, "dev": 8, "test": 12}
    assert run["settings"]["end_tasks"]["general"]["examples"] == {"train": 24, "dev": 8, "test": 12}
    assert all(0.0 <= score <= 1.0 for row in run["matrix"]["macro_f1"] for score in row if score is not None)


def test_a_missing_split_stops_the_run_with_one_line_before_training(tiny_suite, tmp_path):
    (tiny_suite.parent / "data" / "dogs" / "test.jsonl").unlink()
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out))
    assert_one_line_error(result, "missing data file", "dogs", "test.jsonl")
    assert not out.exists() or not list(out.glob("*.json"))


def corpus_suite(tiny_suite, dev_texts: int, score: str = "heldout"):
    """The tiny suite with long corpora cut into DAP text, a dev slice and held-out text (with duplicates)."""
    data = tiny_suite.parent / "data"
    for domain in ("cats", "dogs"):
        texts = [f"{domain} line {i % 70} says hello" for i in range(120)]  # lines 70.. repeat 0..49
        write_jsonl(data / domain / "unlabeled.jsonl", [{"text": t} for t in texts])
    config = yaml.safe_load(tiny_suite.read_text())
    config["perplexity"] = {"blocks": 2, "heldout_texts": 10, "dev_texts": dev_texts, "score": score}
    tiny_suite.write_text(yaml.safe_dump(config))
    return tiny_suite


@pytest.mark.parametrize("score", ["heldout", "dev"])
def test_perplexity_text_never_appears_in_the_dap_stream(tiny_suite, score):
    from cpt_bench.running.plan import RunRequest, plan_data

    plan = plan_data(RunRequest("naive", str(corpus_suite(tiny_suite, 10, score))))
    for domain in ("cats", "dogs"):
        trained = list(plan.data.corpora[domain][0])
        scored, where = plan.data.heldout[domain]
        texts = [f"{domain} line {i % 70} says hello" for i in range(120)]
        heldout, dev = set(texts[110:]), set(texts[100:110])
        assert set(scored) == (dev if score == "dev" else heldout), where
        assert not set(trained) & (heldout | dev)  # duplicates of scored lines earlier in the corpus dropped too
        assert len(trained) == 100 - 20


def test_scoring_a_dev_slice_needs_one():
    with pytest.raises(BadInput, match="'dev' needs a dev slice"):
        build(type(load_suite("das6").perplexity), {"score": "dev"}, "perplexity")


def warmup_suite(tiny_suite, **settings):
    config = yaml.safe_load(tiny_suite.read_text())
    config["head_warmup"] = {"steps": 30, "batch_size": 4, "lr": 1e-2, **settings}
    tiny_suite.write_text(yaml.safe_dump(config))
    return tiny_suite


def test_the_head_warmup_trains_the_head_alone_and_lowers_the_mlm_loss(tiny_suite, tiny_model_dir):
    from transformers import AutoModelForMaskedLM

    from cpt_bench.data.batches import masked_sample
    from cpt_bench.models.loading import lm_loss
    from cpt_bench.running.plan import RunRequest, plan_run
    from cpt_bench.training.head_warmup import head_parameters

    plan = plan_run(RunRequest("naive", str(warmup_suite(tiny_suite)), show_progress=False))
    warmed, original = plan.original_model, AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    before, after = original.state_dict(), warmed.state_dict()
    head = set(head_parameters(warmed))
    assert head and all(not name.startswith("bert.") for name in head)
    body = [name for name in before if name.startswith("bert.")] + ["cls.predictions.decoder.weight"]
    for name in body:  # the encoder, and the decoder matrix tied to its word embeddings, do not move
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[name], after[name]) for name in head)
    batches = masked_sample(plan.blocks("cats", 16), plan.tokenizer, 8, 0.3, 2, torch.Generator().manual_seed(5))
    original.eval(), warmed.eval()
    with torch.no_grad():
        assert sum(float(lm_loss(warmed, b)) for b in batches) < sum(float(lm_loss(original, b)) for b in batches)
    assert plan.head_warmup["steps"] == 30 and plan.head_warmup["domains"] == ["cats", "dogs"]
    # a second plan reads the same head from the cache, whatever the domain order
    again = plan_run(RunRequest("naive", str(tiny_suite), order=["dogs", "cats"], show_progress=False))
    assert all(torch.equal(after[name], again.original_model.state_dict()[name]) for name in head)
    assert again.model_fingerprint == plan.model_fingerprint


def test_the_head_warmup_trains_the_same_head_on_a_fresh_cache(tiny_suite, tmp_path, monkeypatch):
    from cpt_bench.running.plan import RunRequest, plan_run

    suite = str(warmup_suite(tiny_suite, steps=10))
    first = plan_run(RunRequest("naive", suite, show_progress=False))
    torch.manual_seed(123)  # whatever state the global generator is in
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "another-cache"))
    second = plan_run(RunRequest("naive", suite, show_progress=False))
    assert second.model_fingerprint == first.model_fingerprint


def test_a_run_with_a_head_warmup_records_it(tiny_suite, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", "--method", "base", "--suite", str(warmup_suite(tiny_suite, steps=5)),
                     "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    [path] = out.glob("*.json")
    warmup = json.loads(path.read_text())["settings"]["head_warmup"]
    assert warmup["steps"] == 5 and warmup["final_loss"] > 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "head_warmup: steps and batch_size must be positive"),
    ({"lr": -1.0}, "head_warmup.lr: must be positive"),
])
def test_bad_head_warmup_settings_are_one_line(tiny_suite, tmp_path, settings, message):
    result = run_cli("run", "--method", "base", "--suite", str(warmup_suite(tiny_suite, **settings)),
                     "--output", str(tmp_path / "out"))
    assert_one_line_error(result, message)
