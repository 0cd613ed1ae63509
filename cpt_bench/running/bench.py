"""`cpt-bench bench`: side-by-side speed of a DAP step, measured in one run.

Kinds of step on the same model, batch, sequence length and data (the first domain's MLM blocks of a suite):
`transformers.Trainer` with `DataCollatorForLanguageModeling` (full-vocabulary logits), our shared trainer
running `naive`, our trainer running `softmask`, and any variants asked for (`METHOD:block.key=value,...`). Our
trainer's kinds are timed in a later stage: a one-step stage on the suite's second domain comes first, so that
soft-masking has an accumulated importance (masked updates, the contrastive loss) and any other method what it
carries between domains. Each
measurement runs in a fresh process (so its peak memory is its own), the kinds alternate, and each is repeated;
medians of the per-step times after a warm-up are compared. The importance pass after a softmask stage is timed
too and expressed as a fraction of a stage of the suite's default length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cpt_bench.running.plan import RunRequest, make_accelerator, plan_run
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import DapTrainer

KINDS = ("hf_trainer", "naive", "softmask")
WARMUP_STEPS = 3


@dataclasses.dataclass
class BenchRequest:
    suite: str = "synthetic"
    data_dir: str | None = None
    order: list[str] | None = None  # the first domain's blocks are used
    model: str | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    steps: int = 20
    repeats: int = 3
    device: str = "auto"
    sets: list[str] = dataclasses.field(default_factory=list)  # for every kind (e.g. dap.precision=bf16)
    variants: list[str] = dataclasses.field(default_factory=list)  # extra kinds, "METHOD:block.key=value,..."
    profile: bool = False  # run the timed steps under torch.profiler: where the time goes (slows the steps)

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*KINDS, *self.variants)


def split_kind(kind: str) -> tuple[str, list[str]]:
    """A kind's method and its own settings: "softmask:softmask.contrastive=false" -> ("softmask", [...])."""
    method, _, sets = kind.partition(":")
    return method, [item for item in sets.split(",") if item]


def plan_for(request: BenchRequest, kind: str):
    method, own_sets = split_kind(kind)
    # a measured step is one batch (a suite's accumulation, e.g. das6's 4, would multiply our step only);
    # `--set dap.grad_accum=N` measures N batches per step for every kind, the Trainer included
    sets = ["dap.grad_accum=1"]
    sets += [f"dap.batch_size={request.batch_size}"] if request.batch_size else []
    sets += [f"dap.seq_len={request.seq_len}"] if request.seq_len else []
    return plan_run(RunRequest(method="naive" if method == "hf_trainer" else method, suite=request.suite,
                               data_dir=request.data_dir, order=request.order, model=request.model,
                               sets=[*sets, *request.sets, *own_sets], device=request.device, show_progress=False))


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(kind: str, request: BenchRequest) -> dict[str, Any]:
    """One measurement in this process: per-step seconds, tokens per step, peak memory."""
    import copy

    import torch

    plan = plan_for(request, kind)
    accelerator = make_accelerator(plan)
    domain = plan.domains[0]
    blocks = plan.blocks(domain)
    settings = dataclasses.replace(plan.dap, steps=request.steps + WARMUP_STEPS)
    model = copy.deepcopy(plan.original_model).to(accelerator.device)
    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    stamps: list[float] = []
    extra: dict[str, Any] = {}
    if split_kind(kind)[0] == "hf_trainer":
        with _profiled(request.profile, accelerator.device, extra):
            stamps = _hf_trainer_steps(model, plan.tokenizer, blocks, settings, accelerator.device,
                                       causal=plan.causal)
    else:
        method = plan.method_cls(plan.method_settings)
        original_step = method.after_optimizer_step

        def timed_step(stage, original_step=original_step):
            original_step(stage)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        method.after_optimizer_step = timed_step
        # the events around a stage, timed on their own (soft-masking: the importance passes): what the trainer
        # does after the last step besides (freeing memory, the no-update check) is not theirs
        event_seconds: dict[str, float] = {}

        def timed_event(name, event):
            def timed(stage):
                started = time.perf_counter()
                event(stage)
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                event_seconds[f"{name}_{stage.index}"] = time.perf_counter() - started
            return timed

        method.before_first_step = timed_event("before_first_step", method.before_first_step)
        method.after_stage = timed_event("after_stage", method.after_stage)
        method.before_sequence(SequenceState(model, plan.tokenizer, accelerator, plan.domains, 0,
                                             [task.train.texts for task in plan.data.tasks]))
        # a one-step stage on another domain first, so that the timed stage is a later one: what a method
        # carries from one domain to the next (soft-masking's importance and contrast, EWC's penalty, a replay
        # buffer, a teacher) runs as it does from the second domain of a sequence on
        earlier = plan.domains[1] if len(plan.domains) > 1 else domain
        DapTrainer(accelerator, plan.tokenizer, dataclasses.replace(settings, steps=1), method, seed=0,
                   show_progress=False).train_stage(model, plan.blocks(earlier, settings.seq_len),
                                                    Stage(earlier, [earlier]), stage_index=0)
        stamps.clear()
        trainer = DapTrainer(accelerator, plan.tokenizer, settings, method, seed=0, show_progress=False)
        with _profiled(request.profile, accelerator.device, extra):
            trainer.train_stage(model, blocks, Stage(domain, [domain]), stage_index=1)
        # soft-masking: after_stage is the domain's importance pass (once per stage), the first stage's
        # before_first_step the general-knowledge one (once per run)
        extra["after_stage_seconds"] = event_seconds["after_stage_1"]
        extra["first_before_first_step_seconds"] = event_seconds["before_first_step_0"]
        extra["suite_steps"] = plan.dap.steps
    step_seconds = [b - a for a, b in zip(stamps[WARMUP_STEPS - 1:], stamps[WARMUP_STEPS:])]
    return {"kind": kind, "step_seconds": step_seconds, "tokens_per_step": tokens_per_step,
            "peak_memory_mb": _peak_memory_mb(accelerator.device), "model": plan.model_name,
            "batch_size": settings.batch_size, "seq_len": settings.seq_len, "grad_accum": settings.grad_accum,
            "device": str(accelerator.device), "precision": plan.dap.precision, **extra}


@contextlib.contextmanager
def _profiled(enabled: bool, device, extra: dict[str, Any]):
    """torch.profiler around the block: the top operators by device (or CPU) time into extra["profile"], and
    the device's kernel seconds in the block into extra["device_kernel_seconds"]."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        yield
    averages = profiler.key_averages()
    cuda = device.type == "cuda"
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    extra["profile"] = averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)
    if cuda:  # also what the host spends its time on while the device may wait
        extra["profile"] += "\n" + averages.table(sort_by="self_cpu_time_total", row_limit=15,
                                                  max_name_column_width=70)
        extra["device_kernel_seconds"] = sum(e.self_device_time_total for e in averages
                                             if e.device_type.name == "CUDA") / 1e6
    # the matrix products are the work every implementation of the same model must do: what is left to win
    # lies outside them
    own_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    extra["matmul_seconds"] = sum(own_time(e) for e in averages if e.key in MATMUL_OPERATORS) / 1e6
    extra["profiled_seconds"] = sum(own_time(e) for e in averages
                                    if (e.device_type.name == "CUDA") == cuda) / 1e6


MATMUL_OPERATORS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profile_report(request: BenchRequest, kinds: list[str]) -> tuple[str, dict[str, Any]]:
    """Each kind's steps under torch.profiler, in a process of its own: markdown with the median step, the
    time in matrix products per step and the top operators (by device time on a GPU, else CPU time), and the
    same numbers by kind."""
    request = dataclasses.replace(request, repeats=1, profile=True)
    steps = request.steps + WARMUP_STEPS  # the profile spans the warm-up steps too
    sections, numbers = [], {}
    for kind in kinds:
        measured = _measure_in_process(kind, request)
        numbers[kind] = {"median_step_ms": statistics.median(measured["step_seconds"]) * 1000,
                         "profiled_ms_per_step": measured["profiled_seconds"] / steps * 1000,
                         "matmul_ms_per_step": measured["matmul_seconds"] / steps * 1000,
                         "profile": measured["profile"]}
        where = "GPU kernels" if measured.get("device_kernel_seconds") is not None else "CPU operators"
        per_step = f"{where}: {numbers[kind]['profiled_ms_per_step']:.1f} ms per step, of which matrix products " \
                   f"{numbers[kind]['matmul_ms_per_step']:.1f} ms (all of the profiled block / {steps} steps)"
        sections.append(f"## {kind}\n\nmedian step {numbers[kind]['median_step_ms']:.1f} ms under the profiler; "
                        f"{per_step}\n\n```\n{measured['profile']}\n```\n")
    return "\n".join(sections), numbers


def _measure_in_process(kind: str, request: BenchRequest) -> dict[str, Any]:
    """`measure` in a fresh process (its own peak memory, no state left by an earlier kind)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        command = [sys.executable, "-m", "cpt_bench.running.bench", kind, str(out),
                   json.dumps(dataclasses.asdict(request))]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench {kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _hf_trainer_steps(model, tokenizer, blocks, settings, device, causal: bool = False) -> list[float]:
    """Per-step end times of `transformers.Trainer` on the same blocks (its own collator and loss: masked LM,
    or for a decoder `DataCollatorForLanguageModeling(mlm=False)`, which shifts inside the model)."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=settings.batch_size, max_steps=settings.steps,
            gradient_accumulation_steps=settings.grad_accum,
            learning_rate=settings.lr, warmup_steps=int(settings.warmup * settings.steps),
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm, logging_steps=10 ** 9, save_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=device.type == "cpu", bf16=settings.precision == "bf16",
            fp16=settings.precision == "fp16", dataloader_num_workers=0, seed=0,
            torch_compile=settings.compile)
        if causal:  # the Trainer's collator makes its own labels from the inputs
            blocks = _InputsOnly(blocks)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=not causal, mlm_probability=0.15)
        trainer = Trainer(model=model, args=arguments, train_dataset=blocks, data_collator=collator,
                          callbacks=[StepClock()])
        trainer.train()
    return stamps


class _InputsOnly:
    """A decoder's blocks without their labels (a map-style dataset for `transformers.Trainer`)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index]["input_ids"]}


def run_bench(request: BenchRequest, echo=print) -> dict[str, Any]:
    """Alternate the kinds, each in a fresh process, `repeats` times; medians and ratios."""
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in request.kinds}
    for repeat in range(request.repeats):
        for kind in request.kinds:
            samples[kind].append(_measure_in_process(kind, request))
            median = statistics.median(samples[kind][-1]["step_seconds"])
            echo(f"repeat {repeat + 1}/{request.repeats} {kind} {median * 1000:.1f} ms/step")
    step = {k: statistics.median(statistics.median(s["step_seconds"]) for s in v) for k, v in samples.items()}
    memory = {k: statistics.median(s["peak_memory_mb"] for s in v) for k, v in samples.items()}
    first = samples["naive"][0]
    importance = statistics.median(s["after_stage_seconds"] for s in samples["softmask"])
    general_importance = statistics.median(s["first_before_first_step_seconds"] for s in samples["softmask"])
    stage_seconds = samples["softmask"][0]["suite_steps"] * step["softmask"]
    return {
        "hf_trainer_speedup": step["hf_trainer"] / step["naive"],
        "softmask_step_ratio": step["softmask"] / step["naive"],
        "step_ratio_to_naive": {k: v / step["naive"] for k, v in step.items()},
        "importance_fraction": importance / stage_seconds,
        "machine": machine_description(first["device"]),
        "model": first["model"], "suite": request.suite, "batch_size": first["batch_size"],
        "seq_len": first["seq_len"], "grad_accum": first["grad_accum"], "precision": first["precision"],
        "settings": request.sets,
        "kinds": list(request.kinds), "repeats": request.repeats,
        "steps_per_measurement": request.steps,
        "step_ms": {k: v * 1000 for k, v in step.items()},
        "tokens_per_second": {k: first["tokens_per_step"] / v for k, v in step.items()},
        "peak_memory_mb": memory,
        "importance_seconds": importance,  # the domain's importance pass, after every stage
        # the general-knowledge importance (the KL proxy's two dropout passes), once per run before the first stage
        "general_importance_seconds": general_importance,
        "general_importance_fraction": general_importance / stage_seconds,
        "stage_steps": samples["softmask"][0]["suite_steps"],
    }


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)} ({platform.machine()}, {os.cpu_count()} CPU cores)"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} (CPU)"


def table(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = [[k, f"{result['step_ms'][k]:.1f}", f"{result['step_ratio_to_naive'][k]:.2f}",
             f"{result['tokens_per_second'][k]:.0f}", f"{result['peak_memory_mb'][k]:.0f}"] for k in result["kinds"]]
    accumulation = f" x {result['grad_accum']} accumulated" if result.get("grad_accum", 1) > 1 else ""
    precision = "fp32" if result["precision"] == "no" else f"{result['precision']} autocast"
    head = (f"{result['machine']}; model {result['model']}, batch {result['batch_size']} x {result['seq_len']} "
            f"tokens{accumulation}, {precision}; medians of {result['repeats']} alternating repeats x "
            f"{result['steps_per_measurement']} steps" +
            (f"; settings {' '.join(result['settings'])}" if result["settings"] else "") + "\n")
    body = tabulate(rows, headers=["step", "ms/step", "x naive", "tokens/s", "peak memory MB"], tablefmt="github")
    tail = (f"\nour naive vs transformers.Trainer: {result['hf_trainer_speedup']:.2f}x tokens/s"
            f"\nsoftmask / naive step time: {result['softmask_step_ratio']:.2f}"
            f"\nimportance pass: {result['importance_seconds']:.2f} s = {result['importance_fraction']:.1%} of a "
            f"{result['stage_steps']}-step softmask stage" +
            (f"\ngeneral-knowledge importance (once per run, before the first stage): "
             f"{result['general_importance_seconds']:.2f} s = {result['general_importance_fraction']:.1%} of a stage"
             if "general_importance_seconds" in result else ""))
    return head + body + tail


def _worker() -> None:
    kind, out, request = sys.argv[1], Path(sys.argv[2]), BenchRequest(**json.loads(sys.argv[3]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    out.write_text(json.dumps(measure(kind, request)))


if __name__ == "__main__":
    _worker()
