"""Resume: a run interrupted anywhere (between DAP and evaluation, mid-fine-tune, SIGKILL, SIGTERM; mid-stage for
every method: test_method_contract.py) and run again ends with the same result as an uninterrupted run (CPU,
fixed seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpt_bench.training.checkpoint import load_state, save_state

from conftest import run_cli
from interruptions import (
    Crash,
    assert_same_result,
    crash_at_batch,
    crash_at_finetune,
    crash_then_resume,
    only_result,
    run_tiny,
)


@pytest.mark.parametrize("method, crash", [("naive", "after_first_dap"), ("naive", "mid_finetune"),
                                           ("naive", "second_row"), ("softmask", "after_first_dap"),
                                           ("demix", "mid_finetune")])
def test_crash_between_training_and_evaluation_then_resume(method, crash, tiny_suite, tmp_path, monkeypatch,
                                                           reference_runs):
    reference = reference_runs(method)
    out = tmp_path / "crashed"
    # after_first_dap: stage 1 trained and checkpointed, nothing evaluated; mid_finetune: first end task scored
    # (kept in row-measurements.json), probe not yet; otherwise inside the second row
    number = {"after_first_dap": 1, "mid_finetune": 2}.get(crash, 5)
    resumed = crash_then_resume(tiny_suite, out, method, monkeypatch, lambda: crash_at_finetune(monkeypatch, number))
    assert_same_result(resumed, reference)


def test_fresh_ignores_the_checkpoints(tiny_suite, tmp_path, monkeypatch, reference_runs):
    reference = reference_runs("naive")
    out = tmp_path / "crashed"
    crash_at_batch(monkeypatch, 6)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    assert list((out / ".work").glob("*/ckpt-*"))
    monkeypatch.undo()
    result = run_tiny(tiny_suite, out, "naive", "--fresh")
    assert result.exit_code == 0 and "resuming" not in result.output
    assert_same_result(only_result(out), reference)


def test_the_two_newest_checkpoints_are_kept(tiny_suite, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    crash_at_batch(monkeypatch, 9)  # in step 3 of the second stage (see above)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    (work,) = [p for p in (out / ".work").iterdir() if p.is_dir()]
    # the newest, and the one a damaged newest falls back to (test_fault_injection.py)
    assert sorted(p.name for p in work.glob("ckpt-*")) == ["ckpt-0-4", "ckpt-1-2"]


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    state = {"model": {"w": torch.randn(3, 2), "tied": None}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                                                                         "param_groups": [{"params": [0],
                                                                                           "betas": (0.9, 0.99)}]},
             "history": [("general", {"head": torch.ones(2, 4)})], "note": "x", "n": 3, "f": 0.5}
    weight = torch.randn(4, 4)
    state["model"]["tied"] = weight
    state["model"]["tied_again"] = weight  # shared storage (tied embeddings) saves too
    save_state(state, tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*.pt")) and not list((tmp_path / "ckpt").glob("*.pkl"))
    loaded = load_state(tmp_path / "ckpt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["model"]["tied_again"], weight)
    assert loaded["optimizer"]["state"][0]["step"].item() == 3.0  # int keys stay ints
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    name, tensors = loaded["history"][0]
    assert name == "general" and torch.equal(tensors["head"], torch.ones(2, 4))
    assert (loaded["note"], loaded["n"], loaded["f"]) == ("x", 3, 0.5)


# ---------------------------------------------------------------- real signals, real processes

def _cli(tiny_suite, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cpt_bench", "run", "--method", "softmask", "--suite", str(tiny_suite),
            "--output", str(out), "--quiet", "--checkpoint-every", "1", "--steps", "12", *extra]


def _wait_for_checkpoint(process, out: Path, pattern: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / ".work").glob(f"*/{pattern}")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how, where", [("SIGKILL", "ckpt-1-*"), ("SIGTERM", "ckpt-1-*"),
                                        ("SIGKILL", "row-measurements.json"), ("SIGTERM", "row-measurements.json")])
def test_killed_process_resumes_to_the_same_result(how, where, tiny_suite, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "uninterrupted" not in _UNINTERRUPTED:  # the same command for every case (the suite's place does not count)
        reference_out = tmp_path / "reference"
        subprocess.run(_cli(tiny_suite, reference_out), check=True, env=env, capture_output=True)
        _UNINTERRUPTED["uninterrupted"] = only_result(reference_out)
    out = tmp_path / "killed"
    process = subprocess.Popen(_cli(tiny_suite, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    # inside the second stage, or among the first row's fine-tunes (mid-evaluation: one scored, the next running)
    _wait_for_checkpoint(process, out, where)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    assert not list(out.glob("*.json"))
    if how == "SIGTERM":  # finishes its step, saves, says how to resume
        assert process.returncode == 130, stderr
        assert "Run the same command again to resume" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    resumed = subprocess.run(_cli(tiny_suite, out), check=False, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_same_result(only_result(out), _UNINTERRUPTED["uninterrupted"])


_UNINTERRUPTED: dict[str, dict] = {}  # the uninterrupted run's result, made by the first case that needs it


# ---------------------------------------------------------------- never publish a broken number

def test_non_finite_loss_stops_with_domain_and_step_and_keeps_the_checkpoint(tiny_suite, tmp_path, monkeypatch):
    from cpt_bench.training import trainer

    original, calls = trainer.LMObjective.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls[0] == 6 else loss  # step 2 of the second stage

    monkeypatch.setattr(trainer.LMObjective, "forward", forward)
    out = tmp_path / "runs"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                     "--checkpoint-every", "1")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "non-finite loss in stage 'dogs' at step 2" in lines[0]
    assert not list(out.glob("*.json"))
    assert sorted(p.name for p in out.glob(".work/*/ckpt-*")) == ["ckpt-0-4", "ckpt-1-1"]  # the last good step


def test_a_stage_that_never_moves_the_weights_is_an_error(tiny_suite, tmp_path, monkeypatch):
    # what a run whose every step is skipped looks like (the public code's fp16 runs on NaN)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    out = tmp_path / "runs"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out), "--quiet")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "stage 'cats': none of the" in lines[0] and "changed in 4 steps" in lines[0]
    assert not list(out.glob("*.json"))
