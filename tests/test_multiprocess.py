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
from cpt_bench.data.batches import mlm_blocks
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.common.settings import DapSettings
from cpt_bench.training.trainer import DapTrainer

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
method.before_sequence(SequenceState(model, tokenizer, accelerator, ["cats"], 0))
settings = DapSettings(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup=0.5)
DapTrainer(accelerator, tokenizer, settings, method, seed=0, show_progress=False).train_stage(
    model, blocks, Stage("cats", ["cats"]), 0)
if accelerator.is_main_process:
    json.dump({"processes": accelerator.num_processes, "rates": method.rates}, open(out, "w"))
'''


def run_probe(source: str, model_dir: Path, folder: Path) -> dict:
    """Run a probe script (arguments: the model folder, an output file) in two processes; what it wrote."""
    script, out = folder / "probe.py", folder / "probe.json"
    script.write_text(source)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), str(model_dir), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_learning_rate_schedule_does_not_depend_on_the_process_count(tiny_model_dir, tmp_path, monkeypatch):
    """The schedule is in optimizer steps of the global batch: with two processes step k still takes the
    rate of step k (accelerate's own scheduler wrapper would advance it once per process)."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    measured = run_probe(LR_PROBE, tiny_model_dir, tmp_path)
    assert measured["processes"] == 2
    warmup = [1e-3 * k / 3 for k in (1, 2, 3)]  # 3 warm-up steps, then linear decay to 0 after 6
    decay = [1e-3 * (6 - k) / 3 for k in (3, 4, 5)]
    assert measured["rates"] == pytest.approx(warmup + decay)


REDUCTION_PROBE = '''
import contextlib, json, sys
import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import AutoModelForMaskedLM, AutoTokenizer
from cpt_bench.data.batches import mlm_blocks
from cpt_bench.training.plugin import Method
from cpt_bench.common.settings import DapSettings
from cpt_bench.training.stage import Stage
from cpt_bench.training.trainer import DapTrainer

model_dir, out = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
blocks = mlm_blocks([f"the cats was {w} ." for w in ("purr", "nap", "soft", "calm")] * 8, tokenizer, 16, "cats")
accelerator = Accelerator(cpu=True)

class CountReductions(Method):
    reductions = 0
    def before_first_step(self, stage):  # DDP's communication hook: called once per gradient bucket reduced
        def hook(state, bucket):
            self.reductions += 1
            return allreduce_hook(None, bucket)
        stage.objective.register_comm_hook(None, hook)

def train(grad_accum, reduce_every_micro_batch=False):
    if reduce_every_micro_batch:  # what the trainer did before it used no_sync
        accelerator.no_sync = lambda model: contextlib.nullcontext()
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    method = CountReductions()
    settings = DapSettings(steps=4, batch_size=4, seq_len=16, lr=1e-3, grad_accum=grad_accum)
    record = DapTrainer(accelerator, tokenizer, settings, method, seed=0, show_progress=False).train_stage(
        model, blocks, Stage("cats", ["cats"]), 0)
    vars(accelerator).pop("no_sync", None)
    return {"losses": record.loss_terms["total"], "reductions": method.reductions}

runs = {"one": train(1), "accumulated": train(2), "reduced_every_micro_batch": train(2, True)}
if accelerator.is_main_process:
    json.dump({"processes": accelerator.num_processes, **runs}, open(out, "w"))
'''


def test_accumulated_micro_batches_reduce_gradients_once_per_step(tiny_model_dir, tmp_path, monkeypatch):
    """With gradient accumulation, processes average gradients once per optimizer step (accelerate's no_sync on
    the step's other micro-batches), not after every micro-batch; the losses are those of reducing every time."""
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    measured = run_probe(REDUCTION_PROBE, tiny_model_dir, tmp_path)
    assert measured["processes"] == 2
    one, accumulated, every = (measured[k] for k in ("one", "accumulated", "reduced_every_micro_batch"))
    assert one["reductions"] > 0 and accumulated["reductions"] == one["reductions"]
    assert every["reductions"] == 2 * one["reductions"]
    assert accumulated["losses"] == pytest.approx(every["losses"], rel=1e-5)


def launch_in_background(tiny_suite: Path, output: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "cpt_bench", "run", "--suite", str(tiny_suite), "--output", str(output), "--quiet", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_two_process_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(tiny_suite, tmp_path):
    """Multi-process runs are checkpointed like single-process ones: SIGTERM to the launcher (as `scancel` or a
    preemption gives) makes both processes stop at the same step and the main one save; the same command then
    resumes and ends with the uninterrupted two-process run's result (each process's random state restored)."""
    import signal
    import time

    from interruptions import assert_same_result

    args = ("--method", "softmask", "--steps", "40", "--checkpoint-every", "3")
    reference = launch_in_background(tiny_suite, tmp_path / "reference", *args)
    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-3000:]
    out = tmp_path / "stopped"
    process = launch_in_background(tiny_suite, out, *args)
    deadline = time.monotonic() + 300
    while not list((out / ".work").glob("*/ckpt-1-*/state.json")):  # inside the second stage
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "checkpoint saved" in stderr, stderr[-3000:]
    assert not list(out.glob("*.json"))
    resumed = launch(tiny_suite, out, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert_same_result(only_result(out), only_result(tmp_path / "reference"))
    assert "processes=2" in only_result(out)["provenance"]["device"]


def test_methods_that_need_whole_parameters_are_refused_under_fsdp(tiny_suite):
    """FSDP shards every parameter across processes: soft-masking's per-unit slices (and any method not marked
    `supports_fsdp`) cannot work there, and say so in one line before training; naive can."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cpt_bench.common.errors import BadInput
    from cpt_bench.running.plan import RunRequest, check_distributed, plan_data

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    softmask = plan_data(RunRequest(method="softmask", suite=str(tiny_suite)))
    with pytest.raises(BadInput, match="method softmask needs its parameters whole and cannot run under FSDP"):
        check_distributed(softmask, fsdp)
    check_distributed(softmask, ddp)
    check_distributed(plan_data(RunRequest(method="naive", suite=str(tiny_suite))), fsdp)
