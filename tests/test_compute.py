"""Compute accounting: 2·N FLOPs per position of a forward, 6·N with its backward, every pass counted (a
teacher's too), evaluations not, and the counts survive an interruption."""

from __future__ import annotations

import pytest
import torch

from cpt_bench.models.compute import ComputeCounter, non_embedding_parameters

from conftest import run_cli
from interruptions import Crash, crash_at_batch, only_result, run_tiny


def test_a_forward_costs_two_flops_per_parameter_and_position_and_six_with_its_backward(tiny_lm):
    model = tiny_lm.model()
    body = model.base_model
    parameters = non_embedding_parameters(body)
    embeddings = sum(p.numel() for m in body.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert parameters == sum(p.numel() for p in body.parameters()) - embeddings
    ids = torch.randint(5, 20, (3, 7))
    counter = ComputeCounter()
    with counter.counting(), torch.no_grad():
        model(input_ids=ids)
    assert counter.flops == 2 * parameters * 3 * 7
    with counter.counting():
        model(input_ids=ids).logits.sum().backward()
    assert counter.flops == 2 * parameters * 21 + 6 * parameters * 21
    model(input_ids=ids)  # outside `counting`: not counted
    assert counter.flops == 8 * parameters * 21


def run_result(tiny_suite, out, method, *options):
    result = run_tiny(tiny_suite, out, method, *options)
    assert result.exit_code == 0, result.output
    return only_result(out)


def test_a_naive_run_counts_its_training_steps_and_nothing_of_its_evaluations(tiny_suite, tmp_path, tiny_lm):
    naive = run_result(tiny_suite, tmp_path / "naive", "naive")
    parameters = non_embedding_parameters(tiny_lm.model().base_model)
    steps = sum(s["steps"] for s in naive["stages"])
    assert naive["compute"]["tokens"] == sum(s["tokens"] for s in naive["stages"]) > 0
    assert naive["compute"]["flops"] == steps * 6 * parameters * 4 * 16  # batch 4 x 16-token blocks a step
    assert run_result(tiny_suite, tmp_path / "base", "base")["compute"] == {"tokens": 0, "flops": 0.0}


def test_a_teachers_forwards_are_counted(tiny_suite, tmp_path):
    naive = run_result(tiny_suite, tmp_path / "naive", "naive")["compute"]
    kd = run_result(tiny_suite, tmp_path / "kd", "kd")["compute"]
    assert kd["tokens"] == naive["tokens"]
    assert kd["flops"] == pytest.approx(naive["flops"] * 8 / 6)  # a 2·N teacher forward beside each 6·N step
    table = run_cli("report", str(tmp_path / "naive"), str(tmp_path / "kd"), "--plots", str(tmp_path / "plots"))
    assert table.exit_code == 0, table.output
    assert "TFLOPs" in table.output
    assert (tmp_path / "plots" / "tiny__forgetting_vs_compute.png").stat().st_size > 0


def test_the_counts_survive_an_interruption(tiny_suite, tmp_path, monkeypatch):
    reference = run_result(tiny_suite, tmp_path / "reference", "naive")["compute"]
    crash_at_batch(monkeypatch, 7)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, tmp_path / "crashed", "naive")
    monkeypatch.undo()
    assert run_result(tiny_suite, tmp_path / "crashed", "naive")["compute"] == reference
