"""The shared DAP trainer: one loop for every method, which acts only through the plugin events."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cpt_bench.checkpoint import StopRequested, rng_state, set_rng_state
from cpt_bench.data import MaskingCollator
from cpt_bench.errors import BadInput, TrainingFailed
from cpt_bench.models import encoder, mlm_loss_and_hidden
from cpt_bench.plugin import Method, Stage
from cpt_bench.settings import DapSettings


class MaskedLMObjective(nn.Module):
    """Wraps the LM so that the masked-LM loss is its forward: what accelerate/DDP wrap and call.

    With `return_hidden` the forward returns (loss, last hidden states), for a method that reuses the pass."""

    def __init__(self, model: nn.Module, compile_encoder: bool = False, vocab_pad_multiple: int = 0):
        super().__init__()
        self.model = model
        self.vocab_pad_multiple = vocab_pad_multiple
        # a compiled view of the same encoder, kept out of the module tree (no second copy of the parameters in
        # named_parameters or state_dict); the LM itself stays plain for fine-tuning and the methods' own passes
        object.__setattr__(self, "compiled_encoder", torch.compile(encoder(model)) if compile_encoder else None)

    def forward(self, input_ids, attention_mask, labels, return_hidden: bool = False):
        loss, hidden = mlm_loss_and_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                        "labels": labels}, body=self.compiled_encoder,
                                           vocab_pad=self.vocab_pad_multiple)
        return (loss, hidden) if return_hidden else loss


@dataclasses.dataclass
class StageState:
    """What the method events see during a stage."""

    stage: Stage
    stage_index: int
    model: nn.Module  # the plain LM (not wrapped)
    objective: nn.Module  # the prepared masked-LM objective (call it for the MLM loss)
    optimizer: torch.optim.Optimizer
    accelerator: Any
    settings: DapSettings
    tokenizer: Any
    blocks: Any  # the stage's MLM blocks (a datasets.Dataset)
    seed: int
    step: int = 0  # optimizer steps done
    resumed: bool = False  # True: the stage continues from a mid-stage checkpoint (before_domain ran before it)
    terms: dict[str, Any] = dataclasses.field(default_factory=dict)  # this step's named loss terms (on the device)

    def log_term(self, name: str, value: torch.Tensor) -> None:
        """Record a named term of this micro-batch's loss (a method that adds terms logs its plain "mlm" part,
        so the stage's loss curve stays comparable across methods). Summed on the device: the trainer reads all
        of a step's numbers in one transfer."""
        self.terms[name] = self.terms.get(name, 0.0) + value.detach().float() / self.settings.grad_accum


@dataclasses.dataclass
class StageRecord:
    domain: str
    steps: int
    tokens: int
    seconds: float
    loss_first: float  # of the masked-LM loss (the total loss for a method that logs no "mlm" term)
    loss_last: float
    loss_curve: list[float]
    loss_terms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # total and every logged term
    skipped_steps: int = 0  # optimizer steps that fp16 loss scaling skipped (non-finite gradients)


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live in a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0


def per_process_batch_size(batch_size: int, num_processes: int) -> int:
    if batch_size % num_processes:
        raise BadInput(f"dap.batch_size {batch_size} is the global batch and must be divisible by the "
                       f"{num_processes} processes")
    return batch_size // num_processes


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(parameters: list[nn.Parameter], named: dict[int, str], lr: float, weight_decay: float):
    """AdamW without weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for p in parameters:
        name = named.get(id(p), "")
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel: one pass per parameter group instead of ~8 operators per tensor (on 2 CPU cores 0.5 vs
    # 2.9 ms per step on the default model); it rounds differently from the per-tensor path in the last bits
    fused = bool(parameters) and parameters[0].device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


@dataclasses.dataclass
class Checkpointing:
    """How a stage saves itself: every `every` optimizer steps (0: never mid-stage) and when `stop` says a
    signal arrived, `save(step, state)` gets the stage's full training state; `resume` is such a state."""

    save: Callable[[int, dict[str, Any]], None]
    every: int = 0
    stop: Any = None  # a checkpoint.StopSignal (or anything with `.requested`)
    resume: dict[str, Any] | None = None


class DapTrainer:
    def __init__(self, accelerator, tokenizer, settings: DapSettings, method: Method, seed: int,
                 show_progress: bool = True):
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.settings = settings
        self.method = method
        self.seed = seed
        self.show_progress = show_progress and accelerator.is_local_main_process

    def train_stage(self, model: nn.Module, blocks, stage: Stage, stage_index: int,
                    checkpointing: Checkpointing | None = None) -> StageRecord:
        s = self.settings
        accelerator = self.accelerator
        total_steps = s.steps * stage.steps_scale
        generator = torch.Generator().manual_seed(self.seed * 1000 + stage_index)
        # the suite's batch size is the global batch: n processes take batch_size / n rows each per step
        batch_size = per_process_batch_size(s.batch_size, accelerator.num_processes)
        loader = DataLoader(blocks.with_format("torch"), batch_size=batch_size, shuffle=True,
                            drop_last=len(blocks) >= s.batch_size, generator=generator,
                            collate_fn=MaskingCollator(self.tokenizer, s.mlm_probability, generator))
        self.method.prepare_stage(model, stage, stage_index)
        named = {id(p): n for n, p in model.named_parameters()}
        parameters = self.method.trainable_parameters(model)
        optimizer = adamw(parameters, named, s.lr, s.weight_decay)
        scheduler = linear_schedule(optimizer, int(s.warmup * total_steps), total_steps)
        # the schedule is in optimizer steps of the global batch, the same for any number of processes: it is
        # not handed to accelerate, whose scheduler wrapper steps it once per process per step
        objective, optimizer, loader = accelerator.prepare(MaskedLMObjective(model, s.compile, s.vocab_pad_multiple),
                                                             optimizer, loader)
        state = StageState(stage, stage_index, model, objective, optimizer, accelerator, s, self.tokenizer,
                           blocks, self.seed)
        resume = checkpointing.resume if checkpointing is not None else None
        if resume is not None:  # the weights and optimizer as they were at the checkpoint's step
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            state.resumed, state.step = True, int(resume["step"])
        objective.train()
        self.method.before_domain(state)

        losses: list[float] = list(resume["losses"]) if resume else []
        term_history: dict[str, list[float]] = {k: list(v) for k, v in resume["terms"].items()} if resume else {}
        tokens = int(resume["tokens"]) if resume else 0
        first_step = int(resume["step"]) if resume else 0
        batches = _endless(loader)
        for _ in range(first_step * s.grad_accum):  # replay the data order and masking up to the checkpoint
            next(batches)
        if resume is not None:
            set_rng_state(resume["rng"])  # dropout continues as if never interrupted
        progress = tqdm(total=total_steps, initial=first_step, desc=f"DAP {stage.name}",
                        disable=not self.show_progress, dynamic_ncols=True, leave=False,
                        mininterval=progress_interval())
        started = time.perf_counter() - (float(resume["seconds"]) if resume else 0.0)
        skipped = int(resume.get("skipped", 0)) if resume else 0
        before = _fingerprints(parameters)

        def training_state(step_done: int) -> dict[str, Any]:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step_done,
                    "losses": losses, "terms": term_history, "tokens": tokens, "skipped": skipped,
                    "seconds": time.perf_counter() - started}

        batch = next(batches)
        for step in range(first_step, total_steps):
            # the step's numbers stay on the device until one read after clipping: a read waits for the device
            # to finish, so each one would leave it idle while the host prepares what comes next
            step_loss = torch.zeros((), device=accelerator.device)
            step_tokens = torch.zeros((), device=accelerator.device)
            state.terms = {}
            for _ in range(s.grad_accum):
                with accelerator.autocast():
                    loss = self.method.loss(state, batch) / s.grad_accum
                accelerator.backward(loss)
                step_loss += loss.detach().float()
                step_tokens += batch["attention_mask"].sum()
                batch = next(batches)  # masked and moved while the device still runs this backward
            if accelerator.scaler is not None:  # fp16: methods and clipping see true gradient values
                accelerator.unscale_gradients()
            self.method.after_backward(state)
            # max_norm inf: the norm without clipping (a non-finite gradient must be seen either way)
            norm = torch.nn.utils.clip_grad_norm_(parameters, s.max_grad_norm if s.max_grad_norm > 0 else math.inf)
            finite = (torch.isfinite(step_loss) & torch.isfinite(norm)).float().reshape(1)
            if accelerator.num_processes > 1:  # every process takes the same decision
                finite = accelerator.reduce(finite, reduction="mean")
            term_names = list(state.terms)
            terms = [torch.as_tensor(state.terms[n], dtype=torch.float32, device=step_loss.device) for n in term_names]
            read = torch.stack([finite[0], step_loss, step_tokens, *terms]).tolist()
            all_finite, step_loss, step_tokens = read[0] == 1.0, read[1], int(read[2])
            state.terms = dict(zip(term_names, read[3:]))
            tokens += step_tokens * accelerator.num_processes
            if not all_finite and accelerator.scaler is None:
                what = "loss" if not math.isfinite(step_loss) else "gradient"
                raise TrainingFailed(f"non-finite {what} in stage {stage.name!r} at step {step + 1} (lower dap.lr, "
                                     f"or use dap.precision=fp16 to skip such steps); the run's last checkpoint "
                                     f"is kept")
            optimizer.step()
            if accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skipped a non-finite step
                skipped += 1
            self.method.after_optimizer_step(state)
            if not accelerator.optimizer_step_was_skipped:  # no update, no schedule step (as accelerate does)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step + 1
            losses.append(step_loss)
            for name, value in {"total": step_loss, **state.terms}.items():
                term_history.setdefault(name, []).append(value)
            elapsed = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                                 refresh=False)  # redraw on tqdm's interval, not every step
            if checkpointing is not None and step + 1 < total_steps:
                stop = checkpointing.stop is not None and checkpointing.stop.requested
                if stop or (checkpointing.every and (step + 1) % checkpointing.every == 0):
                    checkpointing.save(step + 1, training_state(step + 1))
                if stop:
                    progress.close()
                    raise StopRequested(f"stopped by {checkpointing.stop.requested} in stage {stage.name!r} "
                                        f"after step {step + 1}")
        progress.close()
        seconds = time.perf_counter() - started
        if first_step < total_steps and parameters and _fingerprints(parameters) == before:
            raise TrainingFailed(f"stage {stage.name!r}: none of the {len(parameters)} parameters that method "
                                 f"{self.method.name} trains changed in {total_steps - first_step} steps (learning "
                                 f"rate too small for the weights' precision, or every step skipped)")
        self.method.after_domain(state)
        accelerator.free_memory()
        mlm = term_history.get("mlm", losses)
        if len(mlm) != len(losses):  # a method that logs "mlm" on some steps only: fall back to the total
            mlm = losses
        window = max(1, min(10, len(mlm) // 10 or 1))
        return StageRecord(domain=stage.name, steps=total_steps, tokens=tokens, seconds=round(seconds, 3),
                           loss_first=float(sum(mlm[:window]) / window),
                           loss_last=float(sum(mlm[-window:]) / window),
                           loss_curve=_curve(mlm, points=50),
                           loss_terms={name: _curve(values, points=50) for name, values in term_history.items()},
                           skipped_steps=skipped)


def _fingerprints(parameters: list[nn.Parameter]) -> list[tuple[float, float]]:
    """(sum, sum of squares) per parameter in float64: cheap, and equal before and after only if it never moved."""
    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().square().sum())) for p in parameters]


def _endless(loader):
    while True:
        yield from loader


def _curve(values: list[float], points: int) -> list[float]:
    """Mean of `values` in up to `points` consecutive windows (a compact loss curve for the result file)."""
    if not values:
        return []
    size = math.ceil(len(values) / points)
    return [round(sum(values[i: i + size]) / len(values[i: i + size]), 5) for i in range(0, len(values), size)]
