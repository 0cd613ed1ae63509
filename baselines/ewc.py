"""EWC: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), in its online form (Schwarz et al., ICML
2018, "Progress & Compress", Sec. 2.2).

After each domain a diagonal Fisher is estimated from squared gradients of the MLM loss on a sample of that
domain; training on later domains adds lambda * sum_i F_i (theta_i - theta*_i)^2 to the MLM loss, with theta*
the weights at the end of the previous domain. Online accumulation: F <- gamma * F_old + F_new, so one Fisher
and one anchor are kept however many domains were learned (gamma = 1: the summed Fisher of Huszar 2018).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import endless, lm_loader, process_share
from cpt_bench.models.loading import lm_loss
from cpt_bench.training.plugin import Method, MethodSettings, register


@dataclasses.dataclass
class EwcSettings(MethodSettings):
    # lambda. The Fisher here is the mean of squared gradients of a *mean-reduced* batch loss, ~1e-6..1e-9 per
    # weight on the default suite, so lambda must be large for the penalty to matter. 1e6 = the best of the grid
    # 1e2..1e5 and its one extension under the tuning protocol (dev slices, seeds 100 and 101), still at the
    # grid's edge: results/sweeps/ewc.weight.md
    weight: float = 1.0e6
    decay: float = 1.0  # gamma of online EWC: F <- gamma * F_old + F_new (1 = no decay)
    fisher_batches: int = 16  # batches (of dap.batch_size blocks) of a domain sampled for its Fisher

    def check(self, where: str) -> None:
        if self.weight < 0:
            raise BadInput(f"{where}.weight: must be non-negative, got {self.weight}")
        if not 0.0 <= self.decay <= 1.0:
            raise BadInput(f"{where}.decay: must be in [0, 1], got {self.decay}")
        if self.fisher_batches <= 0:
            raise BadInput(f"{where}.fisher_batches: must be positive, got {self.fisher_batches}")


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters EWC protects: every trainable one, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], accelerator,
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over `batches` of the squared gradient of each batch's MLM loss (the empirical Fisher's diagonal,
    one gradient per batch), and the number of batches; the model is read in eval mode (no dropout noise)."""
    parameters = trained_parameters(model)
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training = model.training
    model.eval()
    count = 0
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = lm_loss(model, batch)
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for name, grad in zip(parameters, grads):
            if grad is not None:  # None: not in the MLM loss's graph, so zero Fisher
                totals[name] += grad.detach().float().pow(2)
        count += 1
    model.train(was_training)
    return totals, count


@register
class Ewc(Method):
    name = "ewc"
    description = "online EWC: diagonal-Fisher penalty towards the last domain's weights (Kirkpatrick 2017)"
    Settings = EwcSettings

    def __init__(self, settings: EwcSettings | None = None):
        super().__init__(settings)
        self.fisher: dict[str, torch.Tensor] | None = None  # accumulated F, float32
        self.anchor: dict[str, torch.Tensor] | None = None  # theta*: the weights when the last domain ended
        self.domains_learned = 0

    # ---- events
    def loss(self, stage, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = stage.lm_loss(batch)
        if self.fisher is None or self.settings.weight == 0:
            return loss
        penalty = self.penalty(stage.model)
        stage.log_term("ewc_penalty", penalty)
        return loss + self.settings.weight * penalty

    def after_stage(self, stage) -> None:
        fresh = self.domain_fisher(stage)
        old, decay = self.fisher or {}, self.settings.decay
        # Schwarz et al. 2018, Sec. 2.2: F* <- gamma F* + F_new; the anchor moves to the newest weights
        self.fisher = {name: decay * f.to(fresh[name].device) + fresh[name] if name in fresh else decay * f
                       for name, f in old.items()}
        self.fisher.update({name: f for name, f in fresh.items() if name not in old})
        weights = dict(stage.model.named_parameters())
        self.anchor = {name: weights[name].detach().clone() for name in self.fisher}
        self.domains_learned += 1

    # ---- the penalty and the Fisher
    def penalty(self, model: nn.Module) -> torch.Tensor:
        """sum_i F_i (theta_i - theta*_i)^2 over the protected parameters (Kirkpatrick et al. 2017, Eq. 3,
        with its 1/2 folded into lambda)."""
        total = None
        for name, p in trained_parameters(model).items():
            if name not in self.fisher:  # a parameter trainable only from this stage on: nothing to protect
                continue
            fisher, anchor = self._on(name, p.device)
            term = (fisher * (p.float() - anchor).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(model.parameters()).device)
        return total

    def _on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Fisher and anchor of a parameter on its device (they arrive on the CPU from `load_state_dict`)."""
        if self.fisher[name].device != device:
            self.fisher[name] = self.fisher[name].to(device)
            self.anchor[name] = self.anchor[name].to(device)
        return self.fisher[name], self.anchor[name]

    def domain_fisher(self, stage) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the domain just learned: the mean over `fisher_batches` masked batches of
        its blocks of the squared batch-loss gradient. Every process draws the same batches and computes its
        share (batch i on process i mod n); the sums are reduced: n processes give one process's estimate."""
        accelerator, dap = stage.accelerator, stage.settings
        generator = torch.Generator().manual_seed(stage.seed * 7907 + stage.index)
        loader = lm_loader(stage.blocks, stage.tokenizer, dap.batch_size, dap.mlm_probability, generator)
        # a small domain is cycled, as the trainer does
        share = process_share(endless(loader), self.settings.fisher_batches, accelerator)
        totals, count = diagonal_fisher(stage.model, share, accelerator)
        count = accelerator.reduce(torch.tensor(float(count), device=accelerator.device), reduction="sum")
        return {name: accelerator.reduce(t, reduction="sum") / count for name, t in totals.items()}

    # ---- checkpoints (the default overhead counts Fisher and anchor)
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor, "domains_learned": self.domains_learned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = state["fisher"]
        self.anchor = state["anchor"]
        self.domains_learned = int(state["domains_learned"])

