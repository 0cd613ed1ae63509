"""KD: knowledge distillation from the model as it was before the current stage (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network"; as a continual-learning baseline, LwF: Li & Hoiem, ECCV 2016).

At the start of every stage a frozen copy of the LM is the teacher: the original model for the first stage,
the previous stage's result after that. The loss is MLM + alpha * T^2 * KL(teacher || student) on the
temperature-softened MLM output distributions at the masked positions (Hinton et al. 2015, Sec. 2: the T^2
keeps the soft term's gradient scale independent of T). The teacher reads the same masked input in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpt_bench.errors import BadInput
from cpt_bench.models import encoder, mlm_head
from cpt_bench.plugin import Method, register


@dataclasses.dataclass
class KdSettings:
    alpha: float = 1.0  # weight of the distillation term (0: plain MLM, step for step the `naive` run)
    temperature: float = 2.0  # T of the softened distributions

    def check(self, where: str) -> None:
        if self.alpha < 0:
            raise BadInput(f"{where}.alpha: must be non-negative, got {self.alpha}")
        if self.temperature <= 0:
            raise BadInput(f"{where}.temperature: must be positive, got {self.temperature}")


@contextlib.contextmanager
def head_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the MLM head's outputs of the forwards run inside: through `mlm_loss` (the trainer's objective)
    these are the vocabulary logits of the masked positions, in row-major order. Lets a method read the
    student's logits from the objective's own forward, which is the one accelerate/DDP wraps."""
    outputs: list[torch.Tensor] = []
    handle = mlm_head(model).register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def masked_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLM head's logits at the masked positions of `batch` (rows of [masked positions, vocabulary])."""
    hidden = encoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return mlm_head(model)(hidden[batch["labels"] != -100])


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

    def __init__(self, settings: KdSettings | None = None):
        super().__init__(settings)
        self.teacher: nn.Module | None = None
        self.teacher_stage = -1  # the stage whose start the teacher was copied at
        self._loaded_teacher: dict[str, torch.Tensor] | None = None

    # ---- events
    def before_domain(self, stage) -> None:
        self.teacher = None  # free the previous teacher before copying the next
        teacher = copy.deepcopy(stage.model)
        if self._loaded_teacher is not None and self.teacher_stage == stage.stage_index:
            teacher.load_state_dict(self._loaded_teacher)  # resumed inside this stage: its original teacher
        self._loaded_teacher = None
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_stage = stage.stage_index

    def loss(self, stage, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with head_outputs(stage.model) as outputs:
            loss = stage.objective(**batch)
        stage.log_term("mlm", loss)
        if not outputs:  # no masked position in this micro-batch: nothing to distil
            return loss
        (student,) = outputs  # mlm_loss runs the head once, on the masked positions
        with torch.no_grad():
            teacher = masked_logits(self.teacher, batch)
        kl = distillation(student, teacher, self.settings.temperature)
        stage.log_term("distillation", kl)
        return loss + self.settings.alpha * kl

    # ---- accounting and checkpoints
    def overhead(self, model: nn.Module) -> dict[str, int]:
        copied = sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0
        return {"extra_parameters": 0, "extra_optimizer_state": 0, "buffers": copied}

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._loaded_teacher
        return {"teacher": teacher, "teacher_stage": torch.tensor(self.teacher_stage)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the module is rebuilt in `before_domain`: a copy of the LM (its architecture) with these weights
        self.teacher = None
        self._loaded_teacher = state["teacher"]
        self.teacher_stage = int(state["teacher_stage"])
