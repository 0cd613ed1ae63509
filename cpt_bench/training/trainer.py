"""The shared DAP trainer: one loop for every method, which acts only through the plugin events."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cpt_bench.common.errors import BadInput, TrainingFailed
from cpt_bench.common.progress import progress_bar
from cpt_bench.common.rng import process_rng_state, set_process_rng_state
from cpt_bench.common.settings import DapSettings
from cpt_bench.data.batches import endless, stage_loader
from cpt_bench.models.loading import lm_body, lm_loss_and_hidden
from cpt_bench.training.checkpoint import StopRequested
from cpt_bench.training.optim import adamw, stage_schedule
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import Stage, StageState


class LMObjective(nn.Module):
    """Wraps the LM so that the masked-LM loss is its forward: what accelerate/DDP wrap and call.

    With `return_hidden` the forward returns (loss, last hidden states), for a method that reuses the pass."""

    def __init__(self, model: nn.Module, compile_encoder: bool = False, vocab_pad_multiple: int = 0):
        super().__init__()
        self.model = model
        self.vocab_pad_multiple = vocab_pad_multiple
        # a compiled view of the same encoder, kept out of the module tree (no second copy of the parameters in
        # named_parameters or state_dict); the LM itself stays plain for fine-tuning and the methods' own passes
        object.__setattr__(self, "compiled_encoder", torch.compile(lm_body(model)) if compile_encoder else None)

    def forward(self, input_ids, attention_mask, labels, return_hidden: bool = False):
        loss, hidden = lm_loss_and_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                        "labels": labels}, body=self.compiled_encoder,
                                           vocab_pad=self.vocab_pad_multiple)
        return (loss, hidden) if return_hidden else loss


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


@dataclasses.dataclass
class StageLog:
    """What a stage has done so far; a mid-stage checkpoint keeps it (with the weights and optimizer)."""

    losses: list[float] = dataclasses.field(default_factory=list)  # total loss per optimizer step
    terms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # total and each term, per step
    tokens: int = 0
    skipped: int = 0
    seconds: float = 0.0  # spent in the stage before this process took it over


@dataclasses.dataclass
class Checkpointing:
    """How a stage saves itself: every `every` optimizer steps (0: never mid-stage) and when `stop` says a
    signal arrived, `save(step, state)` gets the stage's full training state; `resume` is such a state."""

    save: Callable[[int, dict[str, Any]], None]
    every: int = 0
    stop: Any = None  # a checkpoint.StopSignal (or anything with `.requested`)
    resume: dict[str, Any] | None = None


def per_process_batch_size(batch_size: int, num_processes: int) -> int:
    if batch_size % num_processes:
        raise BadInput(f"dap.batch_size {batch_size} is the global batch and must be divisible by the "
                       f"{num_processes} processes")
    return batch_size // num_processes


class DapTrainer:
    def __init__(self, accelerator, tokenizer, settings: DapSettings, method: Method, seed: int,
                 show_progress: bool = True, build_optimizer: Callable[..., torch.optim.Optimizer] = adamw):
        self.accelerator = accelerator
        # (parameters, names by id, lr, weight decay) -> the stage's optimizer: optim.adamw for DAP
        self.build_optimizer = build_optimizer
        self.tokenizer = tokenizer
        self.settings = settings
        self.method = method
        self.seed = seed
        self.show_progress = show_progress and accelerator.is_local_main_process
        # dap.optimizer_state=carry: the optimizer's state at the end of the last stage (saved in stage-end
        # checkpoints), and whether the stage just trained started from it
        self.carried_optimizer: dict[str, Any] | None = None
        self.carried_into_stage = False
        # called after every optimizer step with (stage index, steps done in the stage, {loss, lr, tokens/s, ...}):
        # the experiment tracker's feed (tracking.RunTracker.step)
        self.on_step: Callable[[int, int, dict[str, float]], None] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What the trainer carries from one stage to the next (a stage-end checkpoint keeps it)."""
        return {} if self.carried_optimizer is None else {"carried_optimizer": self.carried_optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried_optimizer = state.get("carried_optimizer")

    def train_stage(self, model: nn.Module, blocks, stage: Stage, stage_index: int,
                    checkpointing: Checkpointing | None = None) -> StageRecord:
        """One DAP stage: the method's events around `steps × steps_scale` optimizer steps on `blocks`."""
        s = self.settings
        total_steps = s.steps * stage.steps_scale
        resume = checkpointing.resume if checkpointing is not None else None
        state, scheduler, loader, parameters = self._start(model, blocks, stage, stage_index, total_steps)
        log = self._restore(state, scheduler, resume)
        state.objective.train()
        self.method.before_first_step(state)
        batches = endless(loader)
        for _ in range(state.step * s.grad_accum):  # replay the data order and masking up to the checkpoint
            next(batches)
        if resume is not None:
            set_process_rng_state(resume["rng"], self.accelerator)  # dropout continues as if never interrupted
        bar = progress_bar(total_steps, f"DAP {stage.name}", self.show_progress, initial=state.step)
        started = time.perf_counter() - log.seconds
        first_step, before = state.step, _fingerprints(parameters)
        batch = next(batches)
        for step in range(first_step, total_steps):
            batch = self._optimizer_step(state, parameters, scheduler, batches, batch, log)
            bar.update(1)
            tokens_per_second = log.tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}", tok_s=f"{tokens_per_second:.0f}",
                            refresh=False)  # redraw on tqdm's interval, not every step
            if self.on_step is not None:
                terms = {f"loss_{name}": values[-1] for name, values in log.terms.items() if values}
                self.on_step(stage_index, step + 1, {"loss": log.losses[-1], "lr": scheduler.get_last_lr()[0],
                                                     "tokens_per_second": tokens_per_second, **terms})
            if checkpointing is not None and step + 1 < total_steps:
                self._maybe_checkpoint(checkpointing, state, scheduler, log, started, bar)
        bar.close()
        seconds = time.perf_counter() - started
        if first_step < total_steps and parameters and _fingerprints(parameters) == before:
            raise TrainingFailed(f"stage {stage.name!r}: none of the {len(parameters)} parameters that method "
                                 f"{self.method.name} trains changed in {total_steps - first_step} steps (learning "
                                 f"rate too small for the weights' precision, or every step skipped)")
        self.method.after_stage(state)
        if s.optimizer_state == "carry":
            self.carried_optimizer = state.optimizer.state_dict()
        self.accelerator.free_memory()
        return _record(stage.name, total_steps, log, seconds)

    def _start(self, model: nn.Module, blocks, stage: Stage, stage_index: int, total_steps: int):
        """The stage's loader, the method's `before_stage`, optimizer and schedule, all prepared."""
        s, accelerator = self.settings, self.accelerator
        generator = torch.Generator().manual_seed(
            self.seed * 1000 + stage_index if stage.data_seed is None else stage.data_seed)
        # the suite's batch size is the global batch: n processes take batch_size / n rows each per step
        loader = stage_loader(blocks, self.tokenizer, per_process_batch_size(s.batch_size, accelerator.num_processes),
                              s.mlm_probability, generator, accelerator)
        state = StageState(stage, stage_index, model, None, None, accelerator, s, self.tokenizer, blocks, self.seed)
        self.method.before_stage(state)
        named = {id(p): n for n, p in model.named_parameters()}
        parameters = self.method.trainable_parameters(model)
        optimizer = self.build_optimizer(parameters, named, s.lr, s.weight_decay)
        self.carried_into_stage = s.optimizer_state == "carry" and carry_moments(optimizer, self.carried_optimizer)
        warmup_steps = int(s.warmup * total_steps) if s.rewarm or stage_index == 0 else 0
        scheduler = stage_schedule(optimizer, s.schedule, warmup_steps, total_steps, s.final_lr_fraction,
                                   s.decay_fraction)
        # the schedule is in optimizer steps of the global batch, the same for any number of processes: it is
        # not handed to accelerate, whose scheduler wrapper steps it once per process per step
        state.objective, state.optimizer, loader = accelerator.prepare(
            LMObjective(model, s.compile, s.vocab_pad_multiple), optimizer, loader)
        return state, scheduler, loader, parameters

    def _restore(self, state: StageState, scheduler, resume: dict[str, Any] | None) -> StageLog:
        """Weights, optimizer, schedule and log as they were at a mid-stage checkpoint (or a fresh start)."""
        if resume is None:
            return StageLog()
        state.model.load_state_dict(resume["model"])
        state.optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state.resumed, state.step = True, int(resume["step"])
        self.carried_into_stage = bool(resume.get("carried_into_stage", False))
        return StageLog(list(resume["losses"]), {k: list(v) for k, v in resume["terms"].items()},
                             int(resume["tokens"]), int(resume.get("skipped", 0)), float(resume["seconds"]))

    def _optimizer_step(self, state: StageState, parameters: list[nn.Parameter], scheduler,
                        batches: Iterator[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor],
                        log: StageLog) -> dict[str, torch.Tensor]:
        """`grad_accum` micro-batches, the method's events, one optimizer step; returns the next batch."""
        s, accelerator = self.settings, self.accelerator
        # the step's numbers stay on the device until one read after clipping: a read waits for the device to
        # finish, so each one would leave it idle while the host prepares what comes next
        step_loss = torch.zeros((), device=accelerator.device)
        step_tokens = torch.zeros((), device=accelerator.device)
        state.terms = {}
        for micro in range(s.grad_accum):
            # several processes average their gradients once, after the step's last micro-batch
            last = micro == s.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(state.objective):
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
        finite, step_loss, step_tokens = self._read_step(state, step_loss, step_tokens, norm)
        log.tokens += step_tokens * accelerator.num_processes
        if not finite and accelerator.scaler is None:
            what = "loss" if not math.isfinite(step_loss) else "gradient"
            raise TrainingFailed(f"non-finite {what} in stage {state.name!r} at step {state.step + 1} (lower dap.lr, "
                                 f"or use dap.precision=fp16 to skip such steps); the run's last checkpoint is kept")
        state.optimizer.step()
        if accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skipped a non-finite step
            log.skipped += 1
        self.method.after_optimizer_step(state)
        if not accelerator.optimizer_step_was_skipped:  # no update, no schedule step (as accelerate does)
            scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        log.losses.append(step_loss)
        for name, value in {"total": step_loss, **state.terms}.items():
            log.terms.setdefault(name, []).append(value)
        return batch

    def _read_step(self, state: StageState, step_loss: torch.Tensor, step_tokens: torch.Tensor,
                   norm: torch.Tensor) -> tuple[bool, float, int]:
        """One transfer from the device: whether every process's loss and gradient are finite, the loss, the
        tokens, and the logged terms (which replace `state.terms` as numbers)."""
        finite = (torch.isfinite(step_loss) & torch.isfinite(norm)).float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process takes the same decision
            finite = self.accelerator.reduce(finite, reduction="mean")
        names = list(state.terms)
        terms = [torch.as_tensor(state.terms[n], dtype=torch.float32, device=step_loss.device) for n in names]
        read = torch.stack([finite[0], step_loss, step_tokens, *terms]).tolist()
        state.terms = dict(zip(names, read[3:]))
        return read[0] == 1.0, read[1], int(read[2])

    def _maybe_checkpoint(self, checkpointing: Checkpointing, state: StageState, scheduler,
                          log: StageLog, started: float, bar) -> None:
        """Save every `checkpointing.every` steps, and at once when a stop was requested (then stop)."""
        stop = checkpointing.stop is not None and checkpointing.stop.requested
        if stop or (checkpointing.every and state.step % checkpointing.every == 0):
            checkpointing.save(state.step, {
                "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": process_rng_state(self.accelerator), "step": state.step,
                "losses": log.losses, "terms": log.terms, "tokens": log.tokens,
                "skipped": log.skipped, "seconds": time.perf_counter() - started,
                "carried_into_stage": self.carried_into_stage})
        if stop:
            bar.close()
            raise StopRequested(f"stopped by {checkpointing.stop.requested} in stage {state.name!r} "
                                f"after step {state.step}")


def carry_moments(optimizer: torch.optim.Optimizer, carried: dict[str, Any] | None) -> bool:
    """Load the previous stage's AdamW moments (and step counts) into a new stage's optimizer, keeping its own
    hyperparameters; only when it trains parameters of the same shapes in the same groups. Whether it did."""
    if carried is None:
        return False
    fresh = optimizer.state_dict()
    groups, old_groups = fresh["param_groups"], carried["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in old_groups]:
        return False
    shapes = [p.shape for g in optimizer.param_groups for p in g["params"]]
    old_ids = [i for g in old_groups for i in g["params"]]
    moments = [carried["state"].get(i, {}).get("exp_avg") for i in old_ids]
    if any(m is not None and m.shape != shape for m, shape in zip(moments, shapes)):
        return False
    new_ids = [i for g in groups for i in g["params"]]
    state = {new: carried["state"][old] for new, old in zip(new_ids, old_ids) if old in carried["state"]}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True


def _record(name: str, steps: int, log: StageLog, seconds: float) -> StageRecord:
    losses = log.losses
    mlm = log.terms.get("mlm", losses)
    if len(mlm) != len(losses):  # a method that logs "mlm" on some steps only: fall back to the total
        mlm = losses
    window = max(1, min(10, len(mlm) // 10 or 1))
    return StageRecord(domain=name, steps=steps, tokens=log.tokens, seconds=round(seconds, 3),
                       loss_first=float(sum(mlm[:window]) / window), loss_last=float(sum(mlm[-window:]) / window),
                       loss_curve=_curve(mlm, points=50),
                       loss_terms={n: _curve(values, points=50) for n, values in log.terms.items()},
                       skipped_steps=log.skipped)


def _fingerprints(parameters: list[nn.Parameter]) -> list[tuple[float, float]]:
    """(sum, sum of squares) per parameter in float64: cheap, and equal before and after only if it never moved."""
    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().square().sum())) for p in parameters]


def _curve(values: list[float], points: int) -> list[float]:
    """Mean of `values` in up to `points` consecutive windows (a compact loss curve for the result file)."""
    if not values:
        return []
    size = math.ceil(len(values) / points)
    return [round(sum(values[i: i + size]) / len(values[i: i + size]), 5) for i in range(0, len(values), size)]


class MaskedLMObjective(LMObjective):
    """The encoder-era name of `LMObjective` (one release)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("MaskedLMObjective is now LMObjective; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
