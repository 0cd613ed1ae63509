"""End to end on the tiny suite: result file keys, matrix shape per method, `one` restarts from the original."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import run_cli, stage_state

CONTRACT_KEYS = ["schema", "method", "method_config", "suite", "domains", "seed", "model", "matrix", "base",
                 "metrics", "probes", "stages", "provenance"]


def _run(tiny_suite: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "runs"
    result = run_cli("run", "--suite", str(tiny_suite), "--output", str(out), "--quiet", *extra)
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_naive_two_domains_writes_contract_result(tiny_suite, tmp_path):
    result = _run(tiny_suite, tmp_path, "--method", "naive")
    for key in CONTRACT_KEYS:
        assert key in result, key
    assert result["schema"] == "cpt-bench/run/v1"
    assert result["domains"] == ["cats", "dogs"]
    f1 = result["matrix"]["macro_f1"]
    # lower-triangular under the paper's protocol: after stage i, every task j <= i
    assert f1[0][0] is not None and f1[0][1] is None
    assert f1[1][0] is not None and f1[1][1] is not None
    for key in ("final_macro_f1", "final_accuracy", "forgetting_macro_f1", "forgetting_accuracy",
                "transfer_macro_f1"):
        assert isinstance(result["metrics"][key], float), key
    assert result["metrics"]["final_macro_f1"] == (f1[1][0] + f1[1][1]) / 2
    assert result["metrics"]["forgetting_macro_f1"] == f1[0][0] - f1[1][0]
    assert len(result["base"]["macro_f1"]) == 2
    assert len(result["probes"]["general"]["stages"]) == 2
    stage = result["stages"][0]
    assert stage["domain"] == "cats" and stage["steps"] == 4 and stage["tokens"] > 0
    assert {"git_commit", "versions", "started", "finished", "device", "command"} <= set(result["provenance"])


def test_reversed_order_and_eval_final(tiny_suite, tmp_path):
    result = _run(tiny_suite, tmp_path, "--method", "ncl", "--order", "dogs,cats", "--eval", "final",
                  "--set", "dap.steps=2")
    assert result["method"] == "naive" and result["domains"] == ["dogs", "cats"]
    assert result["stages"][0]["steps"] == 2
    assert [len(r) for r in result["matrix"]["macro_f1"]] == [2, 2]


def test_references_leave_undefined_metrics_null(tiny_suite, tmp_path):
    one = _run(tiny_suite, tmp_path / "one", "--method", "one")
    assert one["matrix"]["macro_f1"][1][0] is None  # the domain-2 model never saw domain 1
    assert one["metrics"]["forgetting_macro_f1"] is None
    assert isinstance(one["metrics"]["transfer_macro_f1"], float)
    joint = _run(tiny_suite, tmp_path / "joint", "--method", "joint")
    assert len(joint["matrix"]["macro_f1"]) == 1 and joint["stages"][0]["steps"] == 8
    assert joint["metrics"]["forgetting_macro_f1"] is None and joint["metrics"]["transfer_macro_f1"] is None
    base = _run(tiny_suite, tmp_path / "base", "--method", "base")
    assert base["stages"] == [] and base["matrix"]["macro_f1"] == [base["base"]["macro_f1"]]
    assert base["metrics"]["final_macro_f1"] == sum(base["base"]["macro_f1"]) / 2


def test_base_scores_are_cached_and_shared_by_methods(tiny_suite, tmp_path):
    naive = _run(tiny_suite, tmp_path / "a", "--method", "naive")
    base = _run(tiny_suite, tmp_path / "b", "--method", "base")
    assert naive["base"] == base["base"]
    cache = Path(tmp_path / "cache" / "base-scores")
    assert len(list(cache.glob("*.json"))) == 1


def test_one_starts_every_domain_from_the_original_weights(tiny_model_dir):
    """`one` reloads the original parameters before each stage, whatever the previous stage did."""
    from transformers import AutoModelForMaskedLM

    from cpt_bench.training.plugin import method_class
    from cpt_bench.training.stage import SequenceState

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    method = method_class("one")()
    method.before_sequence(SequenceState(model, None, None, ["cats", "dogs"], 0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what a previous stage's training would leave behind

    method.before_first_step(stage_state(model, name="dogs", index=1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_same_seed_same_metrics(tiny_suite, tmp_path):
    first = _run(tiny_suite, tmp_path / "a", "--method", "naive")
    second = _run(tiny_suite, tmp_path / "b", "--method", "naive")
    assert first["matrix"] == second["matrix"] and first["metrics"] == second["metrics"]


def test_command_line_finetune_setting_beats_a_tasks_own(tiny_suite):
    import yaml

    from cpt_bench.evaluation.evaluator import task_settings
    from cpt_bench.running.plan import RunRequest, plan_run

    suite = yaml.safe_load(tiny_suite.read_text())
    suite["domains"][0]["end_task"]["finetune"] = {"epochs": 5, "lr": 0.01}
    tiny_suite.write_text(yaml.safe_dump(suite, sort_keys=False))
    plan = plan_run(RunRequest(method="naive", suite=str(tiny_suite), show_progress=False))
    cats = plan.data.tasks[0]
    assert (task_settings(plan.finetune, cats).epochs, task_settings(plan.finetune, cats).lr) == (5, 0.01)
    plan = plan_run(RunRequest(method="naive", suite=str(tiny_suite), show_progress=False,
                               sets=["finetune.epochs=2"]))
    cats = plan.data.tasks[0]
    assert task_settings(plan.finetune, cats).epochs == 2  # the command line wins ...
    assert task_settings(plan.finetune, cats).lr == 0.01  # ... only for the keys it names


def test_stage_loss_curve_is_the_plain_mlm_loss_when_a_method_adds_terms(tiny_suite, tmp_path):
    out = run_cli("run", "--method", "kd", "--suite", str(tiny_suite), "--output", str(tmp_path / "runs"),
                  "--eval", "final", "--quiet")
    assert out.exit_code == 0, out.output
    second = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())["stages"][1]
    terms = second["loss_terms"]
    assert set(terms) == {"total", "mlm", "distillation"}
    assert second["loss_curve"] == terms["mlm"]
    # total = mlm + alpha * distillation, step by step (alpha = 1 by default)
    for total, mlm, kl in zip(terms["total"], terms["mlm"], terms["distillation"]):
        assert abs(total - (mlm + kl)) < 1e-4 * max(1.0, total)
    assert any(kl > 0 for kl in terms["distillation"])
