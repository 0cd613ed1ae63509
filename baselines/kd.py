"""KD: knowledge distillation from the model as it was before the current stage (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network"; as a continual-learning baseline, LwF: Li & Hoiem, ECCV 2016).

A frozen copy of the LM is the teacher: the original model for the first stage, the previous stage's result
after that. The loss is MLM + alpha * T^2 * KL(teacher || student) on the temperature-softened MLM output
distributions at the masked positions (Hinton et al. 2015, Sec. 2: the T^2 keeps the soft term's gradient scale
independent of T). The teacher reads the same masked input in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from cpt_bench.common.errors import BadInput
from cpt_bench.models.loading import head_outputs, masked_logits
from cpt_bench.training.plugin import Method, MethodSettings, register


@dataclasses.dataclass
class KdSettings(MethodSettings):
    # weight of the distillation term (0: plain MLM, step for step the `naive` run). 1 = the best of the grid
    # 0.3, 1, 3, 10 under the tuning protocol (dev slices, seeds 100 and 101): results/sweeps/kd.alpha.md
    alpha: float = 1.0
    temperature: float = 2.0  # T of the softened distributions

    def check(self, where: str) -> None:
        if self.alpha < 0 or self.temperature <= 0:
            raise BadInput(f"{where}: alpha must be non-negative and temperature positive, got {self.alpha} "
                           f"and {self.temperature}")


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over positions (Hinton et al. 2015)."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=-1),
                    F.log_softmax(teacher.float() / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2


@register
class Kd(Method):
    name = "kd"
    aliases = ("distillation",)
    description = "distillation from the frozen pre-stage model on masked-position MLM outputs (Hinton 2015)"
    Settings = KdSettings

    def before_sequence(self, sequence) -> None:
        self.teacher = copy.deepcopy(sequence.model).eval().requires_grad_(False)  # stage 1's: the original LM

    def after_stage(self, stage) -> None:
        self.teacher.load_state_dict(stage.model.state_dict())  # the next stage's teacher: this stage's result

    def loss(self, stage, batch):
        with head_outputs(stage.model) as outputs:  # the student's masked-position logits, from the MLM pass
            loss = stage.lm_loss(batch)
        if not outputs:  # no masked position in this micro-batch: nothing to distil
            return loss
        with torch.no_grad():
            teacher = masked_logits(self.teacher, batch)
        kl = distillation(outputs[0], teacher, self.settings.temperature)
        stage.log_term("distillation", kl)
        return loss + self.settings.alpha * kl

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state) -> None:
        self.teacher.load_state_dict(state["teacher"])
