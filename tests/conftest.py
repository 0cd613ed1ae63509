"""Shared fixtures: a tiny word-level BERT and a tiny two-domain suite written to a temp folder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "cats": (["purr", "nap", "soft", "calm"], ["hiss", "scratch", "bite", "claw"]),
    "dogs": (["wag", "fetch", "loyal", "happy"], ["growl", "bark", "snap", "howl"]),
    "general": (["good", "nice", "fine", "great"], ["bad", "awful", "poor", "grim"]),
}
FILLER = ["the", "a", "was", "is", "and", "very", "it", "."]


def _sentences(domain: str, count: int, rng: random.Random) -> list[dict]:
    good, bad = WORDS[domain]
    rows = []
    for i in range(count):
        label, words = ("pos", good) if i % 2 == 0 else ("neg", bad)
        rows.append({"text": f"the {domain} was {rng.choice(words)} and {rng.choice(words)} .", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    from cpt_bench.running.synthetic import build_tokenizer

    vocabulary = sorted({w for pair in WORDS.values() for group in pair for w in group}
                        | set(FILLER) | set(WORDS))
    tokenizer = build_tokenizer(vocabulary, 64)
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-model")
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model's parts, for tests that drive a method's events directly: its tokenizer, `model()` (a fresh
    copy, loaded after seeding 0), `blocks(texts, name)` (16-token MLM blocks) and `batch(blocks, seed, rows)`
    (the first rows, masked at 30%); the cache in a temp folder."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from cpt_bench.data.batches import MaskingCollator, mlm_blocks

    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def model():
        torch.manual_seed(0)
        return AutoModelForMaskedLM.from_pretrained(tiny_model_dir)

    def blocks(texts: list[str], name: str):
        return mlm_blocks(texts, tokenizer, 16, name)

    def batch(rows_of, seed: int = 1, rows: int = 4):
        collate = MaskingCollator(tokenizer, 0.3, torch.Generator().manual_seed(seed))
        return collate([rows_of[i] for i in range(rows)])

    return SimpleNamespace(tokenizer=tokenizer, model=model, blocks=blocks, batch=batch)


def stage_state(model, blocks=None, *, name: str = "cats", index: int = 0, tokenizer=None, accelerator=None,
                settings=None, seed: int = 0, resumed: bool = False):
    """A real `StageState` for driving a method's stage events by hand (no trainer): stage `index` on domain
    `name`, the masked-LM objective of `model`, no optimizer, a CPU accelerator unless one is given."""
    from accelerate import Accelerator

    from cpt_bench.common.settings import DapSettings
    from cpt_bench.training.stage import Stage, StageState
    from cpt_bench.training.trainer import LMObjective

    return StageState(Stage(name, [name]), index, model, LMObjective(model), None,
                      accelerator or Accelerator(cpu=True), settings or DapSettings(batch_size=4, seq_len=16),
                      tokenizer, blocks, seed, resumed=resumed)


def tiny_suite_data(root: Path) -> None:
    rng = random.Random(0)
    for domain in WORDS:
        write_jsonl(root / domain / "unlabeled.jsonl", [{"text": r["text"]} for r in _sentences(domain, 80, rng)])
        write_jsonl(root / domain / "train.jsonl", _sentences(domain, 24, rng))
        write_jsonl(root / domain / "dev.jsonl", _sentences(domain, 8, rng))
        write_jsonl(root / domain / "test.jsonl", _sentences(domain, 12, rng))


def tiny_suite_config(model_dir: Path) -> dict:
    def task(domain: str) -> dict:
        return {"train": f"{domain}/train.jsonl", "dev": f"{domain}/dev.jsonl", "test": f"{domain}/test.jsonl",
                "labels": ["neg", "pos"]}

    return {
        "name": "tiny",
        "description": "two tiny domains for tests",
        "model": str(model_dir),
        "data_dir": "data",
        "domains": [{"name": d, "corpus": f"{d}/unlabeled.jsonl", "end_task": task(d)} for d in ("cats", "dogs")],
        "probes": [{"name": "general", "end_task": task("general")}],
        "dap": {"steps": 4, "batch_size": 4, "seq_len": 16, "lr": 1e-3},
        "finetune": {"epochs": 1, "batch_size": 8, "max_length": 16},
    }


@pytest.fixture
def tiny_suite(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """Path to a valid tiny suite YAML (data beside it); tests edit the YAML or data to break it."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    tiny_suite_data(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite_config(tiny_model_dir), sort_keys=False))
    return path


def run_cli(*args: str):
    """Invoke the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cpt_bench.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, a single `error: ...` line naming the problem, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def reference_runs(tiny_suite, tmp_path):
    """Uninterrupted result per method (computed once per test)."""
    from interruptions import only_result, run_tiny

    cache = {}

    def get(method: str) -> dict:
        if method not in cache:
            out = tmp_path / f"reference-{method}"
            result = run_tiny(tiny_suite, out, method)
            assert result.exit_code == 0, result.output
            cache[method] = only_result(out)
            assert not (out / ".work").exists() or not any((out / ".work").iterdir())  # removed when done
        return cache[method]

    return get
