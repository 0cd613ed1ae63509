"""Two CPU processes through `accelerate launch` (gloo): the same code as one process, same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli


def launch(tiny_suite: Path, output: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU its processes join over gloo on the CPU
    # (`--cpu --num_processes 2` would start one process only)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "cpt_bench", "run", "--suite", str(tiny_suite), "--output", str(output), "--quiet", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})


def only_result(folder: Path) -> dict:
    files = sorted(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("method", ["naive", "softmask"])
def test_two_processes_complete_a_run(tiny_suite, tmp_path, method):
    done = launch(tiny_suite, tmp_path / "two", "--method", method)
    assert done.returncode == 0, done.stderr[-3000:]
    two = only_result(tmp_path / "two")  # written once, by the main process
    assert "processes=2" in two["provenance"]["device"]
    assert run_cli("run", "--suite", str(tiny_suite), "--output", str(tmp_path / "one"), "--quiet",
                   "--method", method).exit_code == 0
    one = only_result(tmp_path / "one")
    for row, scores in enumerate(two["matrix"]["macro_f1"]):  # --eval full: every learned domain scored
        assert all(score is not None for score in scores[: row + 1]), two["matrix"]
    assert all(stage["loss_last"] == stage["loss_last"] for stage in two["stages"])  # not NaN
    # the suite's batch size is the global batch: two processes train on as many tokens as one
    assert [s["tokens"] for s in two["stages"]] == [s["tokens"] for s in one["stages"]]


def test_domain_importance_of_two_processes_equals_one(tiny_suite, tmp_path):
    """Each process scores its share of the importance batches and the shares are summed across processes:
    with nearly frozen weights (learning rate 1e-8) the domain importance equals the single-process one."""
    frozen = ("--method", "softmask", "--set", "dap.lr=1e-8", "--eval", "final")
    assert run_cli("run", "--suite", str(tiny_suite), "--output", str(tmp_path / "one"), "--quiet",
                   *frozen).exit_code == 0
    done = launch(tiny_suite, tmp_path / "two", *frozen)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in only_result(tmp_path / "two")["provenance"]["device"]
    one = load_file(next((tmp_path / "one").glob("*.importance.safetensors")))
    two = load_file(next((tmp_path / "two").glob("*.importance.safetensors")))
    keys = [k for k in one if ":cats/normalised/" in k]  # the first domain's MLM importance
    assert len(keys) == 3
    for key in keys:
        assert (one[key] - two[key]).abs().max() < 1e-4, key
