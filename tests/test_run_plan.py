"""A run's data plan (no model) and run plan (with it): built whole, never changed after; what audit and sweep
read without a model; the head warm-up as a stage of a head-only method in the shared trainer; interleaved
stage data."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import yaml

CATS = ["the cats was purr and nap .", "a cats is soft and warm .", "my cats will nap all day ."]
DOGS = ["the dogs was bark and run .", "a dogs is loud and fast .", "my dogs will run all day ."]


def test_both_plans_are_built_whole_and_cannot_be_changed(tiny_suite):
    from cpt_bench.running.identity import run_key
    from cpt_bench.running.plan import RunRequest, plan_data, plan_run

    request = RunRequest("naive", str(tiny_suite), show_progress=False)
    data_plan, plan = plan_data(request), plan_run(request)
    assert data_plan.data.tasks and not hasattr(data_plan, "original_model")  # the data, and no model
    for frozen, field in ((data_plan, "dap"), (plan, "tokenizer"), (plan.data, "tasks")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, field, None)
    assert run_key(data_plan, 0) == run_key(plan, 0)  # the sweep's identity (no model) is the run's
    assert plan.blocks("cats") is plan.blocks("cats")  # tokenised once per plan


def test_audit_reads_a_suites_data_without_a_method_or_a_model(tiny_suite, monkeypatch):
    import cpt_bench.running.plan as planning
    from cpt_bench.running.run_data import read_suite_data

    def no_model(*args, **kwargs):
        raise AssertionError("the audit loaded a model")

    monkeypatch.setattr(planning, "load_lm", no_model)
    data = read_suite_data(str(tiny_suite), None, None, None)
    assert {task.name for task in data.tasks} == {"cats", "dogs"} and data.audit


def test_a_held_out_slice_too_short_to_score_is_trained_on_in_a_new_data_object(tiny_suite):
    from cpt_bench.running.plan import RunRequest, plan_data

    config = yaml.safe_load(tiny_suite.read_text())
    config["perplexity"] = {"heldout_texts": 16, "blocks": 8}  # a slice cut from each corpus
    tiny_suite.write_text(yaml.safe_dump(config, sort_keys=False))
    data = plan_data(RunRequest("naive", str(tiny_suite))).data
    name = "cats"
    assert name in data.uncut
    whole = data.without_heldout(name, "too short")
    assert list(whole.corpora[name][0]) == list(data.uncut[name]) and name not in whole.heldout
    assert name in data.heldout and list(data.corpora[name][0]) != list(data.uncut[name])  # the original as it was
    assert whole.heldout_notes[name] == "none: too short"


def test_interleaved_blocks_alternate_and_processes_share_out_each_global_batch(tiny_lm):
    from cpt_bench.data.batches import Interleaved

    cats, dogs = tiny_lm.blocks(CATS * 6, "cats"), tiny_lm.blocks(DOGS * 6, "dogs")
    cat_id = tiny_lm.tokenizer.convert_tokens_to_ids("cats")
    mixed = Interleaved([cats, dogs])

    def draw(process_index=0, processes=1, count=6, rows=4):
        stream = mixed.batches(tiny_lm.tokenizer, rows, 0.0, torch.Generator().manual_seed(3), process_index,
                               processes)
        return [next(stream) for _ in range(count)]

    alone = draw()
    assert [bool((b["input_ids"] == cat_id).any()) for b in alone] == [True, False] * 3  # cats, dogs, cats...
    assert len(cats) >= 8 and len(dogs) >= 8  # two whole batches each: no short last batch below
    shares = [draw(k, 2, count=4, rows=2) for k in range(2)]  # 2 processes of 2 rows: the 4-row global batches
    for step, batch in enumerate(alone[:4]):
        joined = torch.cat([shares[0][step]["input_ids"], shares[1][step]["input_ids"]])
        assert torch.equal(joined, batch["input_ids"])


def test_the_head_warmup_is_a_stage_of_a_head_only_method_in_the_shared_trainer(tiny_suite, monkeypatch):
    from cpt_bench.running.plan import RunRequest, plan_run
    from cpt_bench.training import trainer as shared

    config = yaml.safe_load(tiny_suite.read_text())
    config["head_warmup"] = {"steps": 6, "batch_size": 4, "lr": 1e-2}
    tiny_suite.write_text(yaml.safe_dump(config))
    stages, real = [], shared.DapTrainer.train_stage

    def recording(self, model, blocks, stage, stage_index, checkpointing=None):
        record = real(self, model, blocks, stage, stage_index, checkpointing)
        stages.append(SimpleNamespace(method=self.method, stage=stage, record=record,
                                      after={name for name, p in model.named_parameters() if p.requires_grad}))
        return record

    monkeypatch.setattr(shared.DapTrainer, "train_stage", recording)
    plan = plan_run(RunRequest("naive", str(tiny_suite), show_progress=False))
    (warmup,) = stages
    assert warmup.method.name == "head-warmup" and warmup.stage.corpora == ["cats", "dogs"]
    assert warmup.record.steps == 6 and len(warmup.method.losses) == 6
    assert warmup.after == {name for name, p in plan.original_model.named_parameters()}  # all trainable again
    assert plan.head_warmup["final_loss"] == pytest.approx(warmup.method.losses[-1], abs=1e-4)
    stages.clear()
    plan_run(RunRequest("naive", str(tiny_suite), show_progress=False))
    assert stages == []  # the second plan reads the cached head: no training at all
