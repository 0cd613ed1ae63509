"""What the method events see: the plan of a stage, the run's sequence of domains, and a stage in progress."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cpt_bench.common.settings import DapSettings


@dataclasses.dataclass
class Stage:
    """The plan of one DAP stage: a name (the domain, usually) and the corpora it trains on."""

    name: str
    corpora: list[str]
    steps_scale: int = 1  # multiplies the suite's steps per domain (a joint stage trains on T corpora)
    # seeds the stage's data order and masks; None: derived from the run's seed and the stage's position
    data_seed: int | None = None


@dataclasses.dataclass
class SequenceState:
    """What a method sees when the sequence of stages starts (`Method.before_sequence`)."""

    model: nn.Module  # the original LM (on a resumed run too: the checkpoint's weights are loaded after)
    tokenizer: Any
    accelerator: Any
    domains: list[str]  # in training order; domain i's end task is column i of the score matrix
    seed: int
    end_task_texts: list[list[str]] = dataclasses.field(default_factory=list)  # domain i's training texts (raw)
    # the DAP blocks of a corpus by name: any domain of the run, or "general" where the suite names a
    # general_corpus (KeyError otherwise); what a replay method draws from
    corpus_blocks: Callable[[str], Any] | None = None


@dataclasses.dataclass
class StageState:
    """A stage in progress, as the trainer hands it to every stage event."""

    plan: Stage
    index: int  # the stage's position in the run (0 = first)
    model: nn.Module  # the plain LM (not wrapped)
    objective: nn.Module | None  # the prepared masked-LM objective (call `lm_loss`); None before `before_stage`
    optimizer: torch.optim.Optimizer | None  # None in `before_stage`, which runs before it is built
    accelerator: Any
    settings: DapSettings
    tokenizer: Any
    blocks: Any  # the stage's LM blocks (data.shards.TokenBlocks: len, [i] -> tensors, select)
    seed: int
    step: int = 0  # optimizer steps done
    resumed: bool = False  # the stage re-entered from a checkpoint inside it (see cpt_bench.training.plugin, "Resume")
    terms: dict[str, Any] = dataclasses.field(default_factory=dict)  # this step's named loss terms (on the device)

    @property
    def name(self) -> str:
        return self.plan.name

    def lm_loss(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """The LM loss (masked for an encoder, next-token for a decoder) of a micro-batch of this stage's data,
        logged as the term "mlm" (the stage's loss curve; the name result files have always had); with
        `return_hidden`, (loss, last hidden states) for a method that reuses the pass. Call it once per
        micro-batch: it is the forward that accelerate/DDP wraps."""
        out = self.objective(**batch, return_hidden=return_hidden)
        self.log_term("mlm", out[0] if return_hidden else out)
        return out

    def mlm_loss(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """The encoder-era name of `lm_loss` (one release)."""
        warnings.warn("StageState.mlm_loss is now lm_loss; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return self.lm_loss(batch, return_hidden)

    def log_term(self, name: str, value: torch.Tensor) -> None:
        """Record a named term of this micro-batch's loss (the result file keeps its curve under
        `stages[].loss_terms`). Summed on the device: the trainer reads a step's numbers in one transfer."""
        self.terms[name] = self.terms.get(name, 0.0) + value.detach().float() / self.settings.grad_accum
