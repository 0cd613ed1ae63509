"""One benchmark run (one seed of a plan): DAP stage by stage, the end tasks evaluated after each, checkpoints
in between, and the result file at the end."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from cpt_bench.common.atomic import write_json_atomic
from cpt_bench.common.cache import cache_dir
from cpt_bench.common.errors import BadInput
from cpt_bench.common.rng import derive_seed, process_rng_state, set_process_rng_state
from cpt_bench.common.settings import as_dict
from cpt_bench.data.shards import JoinedBlocks
from cpt_bench.evaluation.evaluator import EndTaskEvaluator
from cpt_bench.evaluation.metrics import MATRICES
from cpt_bench.evaluation.perplexity import heldout_scores
from cpt_bench.models.compute import ComputeCounter
from cpt_bench.running.identity import run_configuration, run_key  # noqa: F401 - run_configuration re-exported
from cpt_bench.running.plan import RunPlan
from cpt_bench.running.results import (
    RunIdentity,
    RunMeasurements,
    build_result,
    command_line,
    git_commit,
    versions,
    write_artifacts,
)
from cpt_bench.running.tracking import RunTracker
from cpt_bench.training.checkpoint import DamagedState, MidStage, Resumed, StageEnd, StopRequested, StopSignal, WorkDir
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import Checkpointing, DapTrainer

EVALUATOR_NAMES = {"head": "fine-tune a classification head on the first token",
                   "prompt": "prompt-based fine-tuning of the whole LM (verbalizer words at the mask)",
                   "probe": "linear probe on the frozen encoder's mean-pooled features (not the paper's protocol)"}


@dataclasses.dataclass
class RunOutput:
    path: Path  # the result file (written by the main process)
    result: dict[str, Any]


def execute(plan: RunPlan, seed: int, accelerator, stop_signal: StopSignal | None = None) -> RunOutput:
    """Run one seed of a plan, resuming from its work directory if it has one; the result file is written and
    the work directory removed when it ends."""
    return SeedRun(plan, seed, accelerator, stop_signal).execute()


class SeedRun:
    """One seed of a plan: prepare, start or resume, then for each stage train, evaluate its row, checkpoint;
    then the result."""

    def __init__(self, plan: RunPlan, seed: int, accelerator, stop_signal: StopSignal | None = None):
        self.plan, self.seed, self.accelerator = plan, seed, accelerator
        self.stop = stop_signal or StopSignal()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.method = plan.method_cls(plan.method_settings)
        self.stages = self.method.plan_stages(plan.domains) if self.method.trains_lm else []
        for stage in self.stages:
            unknown = [c for c in stage.corpora if c not in plan.domains]
            if unknown:
                raise ValueError(f"method {self.method.name} planned a stage on unknown corpus {unknown[0]!r}")
        self.key = run_key(plan, seed)
        self.path = self.key.result_path
        # several processes: each reads the checkpoints, the main process alone writes them
        self.work = WorkDir(Path(plan.request.output) / ".work" / self.path.stem, enabled=plan.request.resume,
                            writer=accelerator.is_main_process)
        self.measured: RunMeasurements | None = None
        self.segment_started = 0.0  # perf_counter when this process took the run over

    def execute(self) -> RunOutput:
        checkpoint = self.prepare()
        self.start_or_resume(checkpoint)
        for index, stage in enumerate(self.stages):
            if index < self.measured.rows_done:
                continue  # trained and evaluated before an interruption
            if index >= len(self.measured.stage_records):  # else: trained before an interruption
                resume = checkpoint.saved.training if checkpoint and isinstance(checkpoint.saved, MidStage) else None
                self.train(index, stage, resume)
                checkpoint = None
            self.evaluate_row(index, stage)
            if index < len(self.stages) - 1:  # the row is complete: the next stage starts from here
                self.save_checkpoint(index)
        result = self.result()
        self.tracker.finish(result)
        self.publish(result)
        return RunOutput(self.path, result)

    def publish(self, result: dict[str, Any]) -> None:
        """The method's tensors, then the result file (a result file marks a complete run), then the checkpoints
        removed: the main process's job, the others wait for it."""
        if self.accelerator.is_main_process:
            result["artifacts"] = write_artifacts(self.path, self.method.artifacts())
            write_json_atomic(self.path, result)
            self.work.clear()

    def configuration(self) -> dict[str, Any]:
        return self.key.configuration

    # ---- prepare, start or resume
    def prepare(self) -> Resumed | None:
        """The LM on the device, the evaluator, the original model's scores; returns the newest checkpoint."""
        plan = self.plan
        self.model = copy.deepcopy(plan.original_model).to(self.accelerator.device)
        self.evaluator = EndTaskEvaluator(self.accelerator, plan.tokenizer, plan.finetune, plan.request.show_progress,
                                          causal=plan.causal)
        self.evaluator.stop = self.stop
        self.take_lock()  # first: --fresh must not delete what a running identical run is writing
        if plan.request.fresh:
            if self.work.writer:
                self.work.clear(release_lock=False)
            self.accelerator.wait_for_everyone()  # no process reads what the main process is deleting
        self.work.claim()
        try:
            checkpoint = self.work.latest()  # the newest sound checkpoint, or None
        except DamagedState as error:
            raise BadInput(f"{error}; run with --fresh to start over") from None
        except Exception as error:  # noqa: BLE001 - any damage or format change of the saved files
            raise BadInput(f"cannot read the checkpoint in {self.work.path} ({type(error).__name__}: {error}); "
                           f"run with --fresh to start over") from None
        self.base_scores = cached_base_scores(plan, self.model, self.evaluator, self.seed)
        set_seed(self.seed)
        return checkpoint

    def take_lock(self) -> None:
        """Refuse to run what an identical run, started into the same output folder, is running now (both would
        compute the whole run, and one could resume from the other's live checkpoint)."""
        holder = self.work.lock() if self.work.enabled and self.work.writer else None
        if self.accelerator.num_processes > 1:  # every process refuses together
            held = torch.tensor([1.0 if holder else 0.0], device=self.accelerator.device)
            if self.accelerator.reduce(held, reduction="sum").item() > 0:
                holder = holder or "the main process's lock"
        if holder:
            raise BadInput(f"the same run is already running into {self.plan.request.output} ({holder}; lock "
                           f"{self.work.lock_file}): wait for it to finish, or give another --output")

    def start_or_resume(self, checkpoint: Resumed | None) -> None:
        """Fresh measurements (and the original model's perplexities), or the checkpoint's; then the method's
        `before_sequence`, and on resume its state and the LM's weights (plugin.py, "Resume")."""
        plan, data = self.plan, self.plan.data
        if checkpoint is None:
            corpora = perplexity_corpora(plan)
            base = [self.perplexity(self.model, c) for c in corpora]
            self.measured = RunMeasurements(
                matrices={metric: [] for metric in MATRICES},
                probes={p.name: {"base": self.base_scores[p.name]["macro_f1"], "stages": []} for p in data.probes},
                perplexity={"corpora": corpora, "blocks": plan.suite.perplexity.blocks,
                            "heldout": {name: data.heldout_notes.get(name, "file") for name in corpora}
                            | {name: note for name, note in data.heldout_notes.items() if name not in corpora},
                            "objective": "causal" if plan.causal else "masked",
                            "base": [ppl for ppl, _ in base], "stages": [],
                            "bits_per_byte": {"base": [bpb for _, bpb in base], "stages": []}},
                stage_records=[], finetune_seconds={"matrix": [], "probes": {p.name: [] for p in data.probes}},
                learned=[], started=self.started.isoformat(), git_commit=git_commit())
        else:
            self.measured = RunMeasurements(**checkpoint.saved.run)
            self.started = datetime.datetime.fromisoformat(self.measured.started)
            print(f"resuming {self.path.name} from stage {checkpoint.stage + 1} step {checkpoint.step} "
                  f"({self.work.path})", file=sys.stderr, flush=True)
        self.segment_started = time.perf_counter()
        self.compute = ComputeCounter(self.measured.flops)  # counts DAP's passes, not the evaluations'
        self.trainer = DapTrainer(self.accelerator, plan.tokenizer, plan.dap, self.method, self.seed,
                                  plan.request.show_progress)
        self.tracker = RunTracker(self.accelerator, self.path.stem, self.configuration(),
                                  [plan.dap.steps * stage.steps_scale for stage in self.stages])
        self.trainer.on_step = self.tracker.step
        with self.compute.counting():
            self.method.before_sequence(SequenceState(self.model, plan.tokenizer, self.accelerator, plan.domains,
                                                      self.seed, [task.train.texts for task in data.tasks],
                                                      plan.blocks))
        if checkpoint is None:
            return
        try:
            self.method.load_state_dict(checkpoint.saved.method)
        except Exception as error:  # noqa: BLE001 - a checkpoint of another version of the method
            raise BadInput(f"the checkpoint in {self.work.path} does not fit method {self.method.name} "
                           f"({type(error).__name__}: {error}); run with --fresh to start over") from None
        if isinstance(checkpoint.saved, StageEnd):  # a mid-stage checkpoint's weights are the trainer's to restore
            self.model.load_state_dict(checkpoint.saved.model)
            set_process_rng_state(checkpoint.saved.rng, self.accelerator)
            self.trainer.load_state_dict(checkpoint.saved.trainer)

    # ---- one stage: train, evaluate, checkpoint
    def train(self, index: int, stage: Stage, resume: dict[str, Any] | None) -> None:
        plan = self.plan
        checkpointing = Checkpointing(functools.partial(self.save_mid_stage_checkpoint, index),
                                      plan.request.checkpoint_every if self.work.enabled else 0, self.stop, resume)
        with self.compute.counting():
            record = self.trainer.train_stage(self.model, stage_blocks(plan, stage.corpora),
                                              stage, index, checkpointing)
        entry = dataclasses.asdict(record)
        if plan.dap.optimizer_state == "carry":  # whether the stage started from the previous stage's moments
            entry["optimizer_state"] = "carried" if self.trainer.carried_into_stage else "reset"
        self.measured.stage_records.append(entry)
        self.measured.learned = sorted({*self.measured.learned, *self.trained_by(stage)})
        self.save_checkpoint(index)

    def evaluate_row(self, index: int, stage: Stage) -> None:
        """Row `index` of the matrix: the end tasks the schedule (and the method) asks for, the probes, the
        held-out perplexities. Each measurement is kept in row-measurements.json as it finishes."""
        plan = self.plan
        last = index == len(self.stages) - 1
        scheduled = self.measured.learned if plan.request.eval == "full" or last else sorted(self.trained_by(stage))
        measure = RowMeasurements(self.work, index, stage.name, self.stop, self.accelerator)
        scores: list[dict[str, Any] | None] = [None] * len(plan.domains)
        for domain in self.method.end_tasks_to_evaluate(index, list(scheduled)):
            scores[domain] = measure(f"task:{plan.data.tasks[domain].name}",
                                     functools.partial(self.end_task_scores, domain))
        probes = {probe.name: measure(f"probe:{probe.name}", functools.partial(self.probe_scores, probe))
                  for probe in plan.data.probes}
        perplexities = measure("perplexity", self.perplexity_row)
        self.measured.add_row(scores, probes, perplexities)
        logged = {f"eval/{plan.data.tasks[j].name}/macro_f1": s["macro_f1"] for j, s in enumerate(scores) if s}
        logged |= {f"probe/{name}/macro_f1": probe["macro_f1"] for name, probe in probes.items()}
        logged |= {f"perplexity/{corpus}": ppl
                   for corpus, (ppl, _) in zip(self.measured.perplexity["corpora"], perplexities)}
        self.tracker.stage(index, logged)

    def end_task_scores(self, domain: int) -> dict[str, Any]:
        task = self.plan.data.tasks[domain]
        return self.evaluator.evaluate(self.method.end_task_model(self.model, domain), task,
                                       finetune_seed(self.seed, task.name))

    def probe_scores(self, probe) -> dict[str, Any]:
        return self.evaluator.evaluate(self.method.probe_model(self.model), probe, finetune_seed(self.seed, probe.name))

    def perplexity_row(self) -> list[tuple[float, float]]:
        """Every held-out corpus's (perplexity, bits per byte): a learned domain's with the LM the method
        fine-tunes for it, any other corpus's with the method's general LM."""
        domains, learned = self.plan.domains, self.measured.learned
        return [self.perplexity(self.method.end_task_model(self.model, domains.index(corpus))
                                if corpus in domains and domains.index(corpus) in learned
                                else self.method.probe_model(self.model), corpus)
                for corpus in self.measured.perplexity["corpora"]]

    def save_mid_stage_checkpoint(self, index: int, step: int, training: dict[str, Any]) -> None:
        self.work.save_checkpoint(index, step, MidStage(self.measured_state(), self.method.state_dict(), training))

    def save_checkpoint(self, index: int) -> None:
        self.work.save_checkpoint(index, self.measured.stage_records[-1]["steps"], StageEnd(
            self.measured_state(), self.method.state_dict(), self.model.state_dict(),
            process_rng_state(self.accelerator), self.trainer.state_dict()))

    def measured_state(self) -> dict[str, Any]:
        """The measurements as a checkpoint keeps them (the wall time so far included)."""
        return dataclasses.asdict(dataclasses.replace(self.measured, wall_before=self.wall_seconds(),
                                                      flops=self.compute.flops))

    def trained_by(self, stage: Stage) -> set[int]:
        return {self.plan.domains.index(c) for c in stage.corpora}

    def perplexity(self, lm: torch.nn.Module, corpus: str) -> tuple[float, float]:
        plan = self.plan
        blocks = plan.heldout_blocks(corpus)
        perplexity, bits_per_byte = heldout_scores(lm, blocks, plan.tokenizer, self.accelerator,
                                                   plan.dap.batch_size, plan.dap.mlm_probability)
        return round(perplexity, 5), round(bits_per_byte, 5)

    def wall_seconds(self) -> float:
        return self.measured.wall_before + time.perf_counter() - self.segment_started

    # ---- the result
    def result(self) -> dict[str, Any]:
        plan, method = self.plan, self.method
        square = bool(self.stages) and method.trains_lm and \
            [s.corpora for s in self.stages] == [[d] for d in plan.domains]
        identity = RunIdentity(method.name, as_dict(plan.method_settings), plan.suite.name, plan.domains,
                               self.seed, plan.model_name)
        details = {
            "wall_seconds": round(self.wall_seconds(), 3),
            "overhead": method.overhead(self.model),
            "method_summary": method.summary(),
            "settings": {"dap": as_dict(plan.dap), "finetune": as_dict(plan.finetune),
                         "data": as_dict(plan.data_settings), "eval": plan.request.eval, "limit": plan.request.limit,
                         "end_tasks": {t.name: {"evaluator": EVALUATOR_NAMES[t.evaluator],
                                                "finetune_overrides": t.finetune_overrides, "examples": t.sizes,
                                                "dev_split": t.dev_split}
                                       for t in plan.data.tasks + plan.data.probes}},
        }
        if plan.head_warmup is not None:
            details["settings"]["head_warmup"] = plan.head_warmup
        finished = datetime.datetime.now(datetime.timezone.utc)
        provenance = {"git_commit": self.measured.git_commit, "versions": versions(),
                      "started": self.started.isoformat(), "finished": finished.isoformat(),
                      "device": describe_device(self.accelerator), "command": command_line(),
                      "config_hash": self.key.config_hash, "contamination": plan.data.contamination()}
        if plan.generates_data:
            # which generated language and base LM (both from the suite seed; "run": the run's seed)
            provenance["generated_data"] = {"generator": plan.suite.generator.name, "folder": plan.data_dir.name,
                                            "suite_seed": plan.suite.generator.seed_for(self.seed)}
        if git_commit() != self.measured.git_commit:  # the tree changed while the run ran, or between crash and resume
            provenance["git_commit_at_finish"] = git_commit()
        self.measured.flops = self.compute.flops
        return build_result(identity, self.measured, {t.name: self.base_scores[t.name] for t in plan.data.tasks},
                            [s.name for s in self.stages], square, self.evaluator.truncated, details, provenance)


class RowMeasurements:
    """The measurements of one row of the matrix, each replayed from row-measurements.json if an interrupted process
    made it already (with the random state after it), else made and saved there."""

    def __init__(self, work: WorkDir, row: int, stage_name: str, stop: StopSignal, accelerator=None):
        self.work, self.row, self.stage_name, self.stop = work, row, stage_name, stop
        self.accelerator = accelerator
        measured = work.load_measurements()
        self.done = dict(measured["evaluations"]) if measured and measured.get("row") == row else {}

    def __call__(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self.done:
            set_process_rng_state(self.done[key]["rng"], self.accelerator)
            return self.done[key]["value"]
        if self.stop.requested:
            raise StopRequested(f"stopped by {self.stop.requested} while evaluating after stage {self.stage_name!r}")
        value = compute()
        self.done[key] = {"value": value, "rng": process_rng_state(self.accelerator, as_json=True)}
        self.work.save_measurements({"row": self.row, "evaluations": self.done})
        return value


def perplexity_corpora(plan: RunPlan) -> list[str]:
    """The held-out corpora of the perplexity matrix: the run's domains in order, then the suite's extra ones."""
    heldout = plan.data.heldout
    return [c for c in plan.domains if c in heldout] + [c for c in heldout if c not in plan.domains]


def stage_blocks(plan: RunPlan, corpora: list[str]):
    parts = [plan.blocks(c) for c in corpora]
    return parts[0] if len(parts) == 1 else JoinedBlocks(parts)


def finetune_seed(run_seed: int, task_name: str) -> int:
    # the same seed for a task after every stage: differences between rows come from the LM, not the head
    return derive_seed(run_seed, "finetune", task_name)


def cached_base_scores(plan: RunPlan, model, evaluator: EndTaskEvaluator, seed: int) -> dict[str, dict[str, Any]]:
    """End-task and probe scores of the original model by task name, cached per (suite data, model, seed,
    settings)."""
    data = plan.data
    key_parts = {"data": data.fingerprint, "model": plan.model_fingerprint, "seed": seed,
                 "finetune": as_dict(plan.finetune), "max_length": plan.finetune.max_length,
                 "device": evaluator.accelerator.device.type}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "base-scores" / f"{key}.json"
    cached: dict[str, Any] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    scores = cached.get("scores", {})
    missing = [t for t in data.tasks + data.probes if t.name not in scores]
    for task in missing:
        scores[task.name] = evaluator.evaluate(model, task, finetune_seed(seed, task.name))
    if missing and evaluator.accelerator.is_main_process:
        write_json_atomic(path, {"key": key_parts, "scores": scores})
    return {t.name: scores[t.name] for t in data.tasks + data.probes}


def describe_device(accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{name}; processes={accelerator.num_processes}; precision={accelerator.mixed_precision}"
