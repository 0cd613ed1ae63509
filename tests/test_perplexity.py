"""The MLM perplexity matrix: held-out text never trained on, one row per stage, a real signal."""

from __future__ import annotations

import json
import math

import yaml

from conftest import run_cli


def _with_heldout(tiny_suite, heldout_texts: int = 16, blocks: int = 8):
    data = yaml.safe_load(tiny_suite.read_text())
    data["perplexity"] = {"heldout_texts": heldout_texts, "blocks": blocks}
    tiny_suite.write_text(yaml.safe_dump(data, sort_keys=False))


def test_result_has_a_perplexity_row_per_stage(tiny_suite, tmp_path):
    _with_heldout(tiny_suite)
    out = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "runs"),
                  "--quiet")
    assert out.exit_code == 0, out.output
    result = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    perplexity = result["perplexity"]
    assert perplexity["corpora"] == ["cats", "dogs"]
    assert len(perplexity["base"]) == 2 and len(perplexity["stages"]) == 2
    assert all(1.0 < value < 1e6 and math.isfinite(value) for row in [perplexity["base"], *perplexity["stages"]]
               for value in row)


def test_heldout_texts_are_cut_from_the_corpus(tiny_suite):
    from cpt_bench.running.plan import RunData, RunRequest, plan_run

    _with_heldout(tiny_suite, heldout_texts=16)
    plan = plan_run(RunRequest(method="naive", suite=str(tiny_suite), show_progress=False))
    data: RunData = plan.data
    for domain in ("cats", "dogs"):
        trained = list(data.corpora[domain][0])
        heldout, _ = data.heldout[domain]
        corpus = [row["text"] for row in map(json.loads, (tiny_suite.parent / "data" / domain / "unlabeled.jsonl")
                                             .read_text().splitlines())]
        assert heldout == corpus[-16:]
        assert trained == [text for text in corpus[:-16] if text not in heldout]  # a repeated line is not trained
        assert not set(heldout) & set(trained)


def test_perplexity_is_deterministic_and_falls_when_the_text_is_learned(tiny_model_dir):
    import copy

    import torch
    from accelerate import Accelerator

    from cpt_bench.common.settings import DapSettings
    from cpt_bench.data.batches import mlm_blocks
    from cpt_bench.evaluation.perplexity import heldout_scores
    from cpt_bench.models.loading import load_lm
    from cpt_bench.training.plugin import Method
    from cpt_bench.training.stage import Stage
    from cpt_bench.training.trainer import DapTrainer

    model, tokenizer = load_lm(str(tiny_model_dir))
    texts = [f"the cats was {w} and {w} ." for w in ["purr", "nap", "soft", "calm"] * 20]
    blocks = mlm_blocks(texts, tokenizer, 16, "test corpus")
    accelerator = Accelerator(cpu=True)
    before = heldout_scores(model, blocks, tokenizer, accelerator, 8, 0.15)[0]
    assert before == heldout_scores(model, blocks, tokenizer, accelerator, 8, 0.15)[0]  # same masks
    trained = copy.deepcopy(model)
    settings = DapSettings(steps=40, batch_size=8, seq_len=16, lr=5e-3)
    torch.manual_seed(0)
    DapTrainer(accelerator, tokenizer, settings, Method(), seed=0, show_progress=False).train_stage(
        trained, blocks, Stage("cats", ["cats"]), 0)
    after = heldout_scores(trained, blocks, tokenizer, accelerator, 8, 0.15)[0]
    assert after < 0.5 * before, (before, after)
