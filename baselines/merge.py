"""Model merging after every stage: the stage's weights are pulled back toward a reference, the original model
or the weights the stage started from (Wortsman et al. 2022, WiSE-FT, Eq. 1, for `linear`; Yadav et al. 2023,
TIES-Merging, Sec. 3, for `ties`). With the task vector tau = theta - theta_ref:

- linear: theta <- theta_ref + alpha * tau (alpha = 1 is naive, alpha = 0 undoes the stage);
- ties:   theta <- theta_ref + alpha * trim(tau), where trim keeps the `density` fraction of each tensor's entries
          of largest magnitude. TIES's sign election and disjoint mean act across several task vectors; with
          the one vector of a stage they change nothing, so trimming is what remains.

The next stage trains from the merged weights, and the end tasks after a stage are fine-tuned from them."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.training.plugin import Method, MethodSettings, register


@dataclasses.dataclass
class MergeSettings(MethodSettings):
    alpha: float = 0.5  # the weight of the stage's task vector
    reference: Literal["original", "previous"] = "original"  # the original LM, or the weights before the stage
    kind: Literal["linear", "ties"] = "linear"
    density: float = 0.2  # ties: the fraction of each task vector's entries kept (largest magnitude)

    def check(self, where: str) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise BadInput(f"{where}.alpha: must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.density <= 1.0:
            raise BadInput(f"{where}.density: must be in (0, 1], got {self.density}")


@register
class Merge(Method):
    name = "merge"
    description = "naive DAP, then after every stage the weights merged back toward the original model (or the " \
                  "stage's start): linear interpolation or TIES trimming of the task vector"
    Settings = MergeSettings

    def before_sequence(self, sequence):
        self.reference = snapshot(sequence.model)

    def before_stage(self, stage):
        if self.settings.reference == "previous" and not stage.resumed:
            self.reference = snapshot(stage.model)

    def after_stage(self, stage):
        if self.settings.kind == "linear" and self.settings.alpha == 1.0:
            # the whole task vector kept: the stage's weights as they are (theta_ref + (theta - theta_ref) is
            # theta only up to rounding, so computing it would make alpha = 1 differ from naive in the last bits)
            return
        with torch.no_grad():
            for name, parameter in stage.model.named_parameters():
                if name in self.reference:
                    task_vector = parameter - self.reference[name]
                    if self.settings.kind == "ties":
                        task_vector = trimmed(task_vector, self.settings.density)
                    parameter.copy_(self.reference[name] + self.settings.alpha * task_vector)

    def state_dict(self):
        return {"reference": self.reference}

    def load_state_dict(self, state):
        self.reference = dict(state["reference"])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.is_floating_point()}


def trimmed(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """The task vector with all but its `density` fraction of largest-magnitude entries set to 0 (TIES, step 1)."""
    keep = max(1, round(density * task_vector.numel()))
    if keep >= task_vector.numel():
        return task_vector
    threshold = task_vector.abs().flatten().kthvalue(task_vector.numel() - keep + 1).values
    return torch.where(task_vector.abs() >= threshold, task_vector, torch.zeros_like(task_vector))
