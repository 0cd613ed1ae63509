"""Two CPU processes through `accelerate launch` (gloo): the same code as one process, same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from safetensors.torch import load_file


def launch(tiny_suite: Path, output: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU its processes join over gloo on the CPU
    # (`--cpu --num_processes 2` would start one process only)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "cpt_bench", "run", "--suite", str(tiny_suite), "--output", str(output), "--quiet", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ},
                          check=False)


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


LR_PROBE = '''
import json, sys
from accelerate import Accelerator
from transformers import AutoModelForMaskedLM, AutoTokenizer
from cpt_bench.data import mlm_blocks
from cpt_bench.plugin import Method, SequenceState, Stage
from cpt_bench.settings import DapSettings
from cpt_bench.trainer import DapTrainer

model_dir, out = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForMaskedLM.from_pretrained(model_dir)
blocks = mlm_blocks([f"the cats was {w} ." for w in ("purr", "nap", "soft", "calm")] * 8, tokenizer, 16, "cats")
accelerator = Accelerator(cpu=True)

class LearningRates(Method):
    rates = []
    def after_optimizer_step(self, stage):  # the rate this step was taken with
        self.rates.append(stage.optimizer.param_groups[0]["lr"])

method = LearningRates()
method.on_sequence_start(SequenceState(model, tokenizer, accelerator, ["cats"], 0))
settings = DapSettings(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup=0.5)
DapTrainer(accelerator, tokenizer, settings, method, seed=0, show_progress=False).train_stage(
    model, blocks, Stage("cats", ["cats"]), 0)
if accelerator.is_main_process:
    json.dump({"processes": accelerator.num_processes, "rates": method.rates}, open(out, "w"))
'''


def test_learning_rate_schedule_does_not_depend_on_the_process_count(tiny_model_dir, tmp_path, monkeypatch):
    """The schedule is in optimizer steps of the global batch: with two processes step k still takes the
    rate of step k (accelerate's own scheduler wrapper would advance it once per process)."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "lr_probe.py"
    script.write_text(LR_PROBE)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), str(tiny_model_dir), str(tmp_path / "rates.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ},
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads((tmp_path / "rates.json").read_text())
    assert measured["processes"] == 2
    warmup = [1e-3 * k / 3 for k in (1, 2, 3)]  # 3 warm-up steps, then linear decay to 0 after 6
    decay = [1e-3 * (6 - k) / 3 for k in (3, 4, 5)]
    assert measured["rates"] == pytest.approx(warmup + decay)
