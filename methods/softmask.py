"""Soft-masking (DAS; Ke, Shao, Lin, Konishi, Kim, Liu, ICLR 2023, "Continual Pre-training of Language Models").

Importance of every attention head and FFN neuron is the gradient magnitude of a loss w.r.t. a virtual gate
on the unit: for the original model's general knowledge through a proxy (KL between two dropout passes of
the same input), for each learned domain through its MLM loss; normalised per layer, accumulated by max
(Sec. 3.1). A unit's training is scaled by (1 - its accumulated importance) (Sec. 3.2). A contrastive loss
contrasts the full network's representation with the importance-gated network's (previous knowledge) so the
two are integrated (Sec. 3.3). Where the public code departs from the paper we follow the paper: the proxy
runs in train mode (two passes differ), domain importance uses masked inputs, positives are two views of the
same text.

One departure is ours, not the paper's: the paper's Sec. 3.2 scales the *gradients* by (1 - importance), and
under AdamW a constant gradient scale cancels (Adam divides by the gradient's running magnitude), so a unit of
importance 0.9 still moves more than half its unmasked step. By default this implementation applies the
soft-mask to the optimizer's *update* instead (importance 1: the unit does not move); `target=gradient` is
the paper's Sec. 3.2 as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import lm_loader, process_share
from cpt_bench.models.loading import has_dropout, is_causal_lm, lm_body, lm_loss
from cpt_bench.models.units import UNIT_KINDS, UnitMap, accumulate, controlled, normalise
from cpt_bench.training.plugin import Method, MethodSettings, register
from cpt_bench.training.stage import SequenceState

FORMULATION = {
    "update": "DAS with the soft-mask applied to the optimizer update, because a constant gradient scale cancels "
              "in AdamW (this implementation's correction; the paper's Sec. 3.2 scales gradients: "
              "softmask.target=gradient)",
    "gradient": "DAS with the soft-mask applied to the gradients, the paper's Sec. 3.2 as written (under AdamW "
                "a constant gradient scale cancels; softmask.target=update masks the update instead)",
}


@dataclasses.dataclass
class SoftMaskSettings(MethodSettings):
    # what the mask scales: "update" (this implementation's correction, see the module docstring) or "gradient"
    # (the paper's Sec. 3.2 as written, and the public code)
    target: Literal["update", "gradient"] = "update"
    soft_mask: bool = True  # False: contrastive loss only (ablation)
    contrastive: bool = True  # False: no contrastive loss (ablation)
    # lambda in L = MLM + lambda * contrastive; the paper's 1. The sweep 0.1, 0.3, 1, 3 under the tuning protocol
    # was flat (criteria within 1%), so the paper's value stays: results/sweeps/softmask.contrastive_weight.md
    contrastive_weight: float = 1.0
    # "separate" (the paper's Sec. 3.3, default): two dropout views and the gated view of the unmasked text in
    # a pass of their own, gradient through all three (3 x batch rows forward and backward, 4.3x naive's step);
    # "mlm_anchor" (a faster variant of ours, 1.5x): the MLM pass's representation is the anchor, the positive
    # and gated views are targets without gradient or dropout. Runs written before the setting were "separate".
    contrastive_views: Literal["separate", "mlm_anchor"] = dataclasses.field(
        default="separate", metadata={"absent_means": "separate"})
    temperature: float = 0.05
    general_importance: bool = True  # False: domain importances only (ablation)
    random_importance: bool = False  # ablation: importances shuffled within each layer (same distribution)
    importance_batches: int = 8  # batches of a domain's blocks used to compute an importance
    other_parameters: Literal["train", "freeze"] = "train"  # embeddings, LayerNorms, LM head (paper: train)
    # how raw importance becomes [0, 1] (cpt_bench/models/units.py: normalise): the paper's |tanh|, or the controls
    normalise: Literal["tanh_abs", "tanh_pos", "budget"] = "tanh_abs"
    budget: float = 0.2  # normalise=budget: the fraction of each layer's units above 0.5, per stage
    # a control of the mask (cpt_bench/models/units.py: controlled): none, uniform (each layer's mean), inverted order;
    # it changes what scales the updates, not the contrastive loss's gated view
    control: Literal["none", "uniform", "inverted"] = "none"

    def check(self, where: str) -> None:
        if self.importance_batches <= 0 or self.temperature <= 0 or self.contrastive_weight < 0:
            raise BadInput(f"{where}: importance_batches and temperature must be positive, "
                           "contrastive_weight non-negative")
        if not 0.0 < self.budget <= 1.0:
            raise BadInput(f"{where}.budget: must be in (0, 1], got {self.budget}")


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over non-padding tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
             offset: int = 0) -> torch.Tensor:
    """InfoNCE: anchor row i against positive row offset+i; the other positive rows and all rows of
    `negatives` are negatives (Sec. 3.3, Eq. 6). Cosine similarity over `temperature`."""
    anchor, positive, negatives = (F.normalize(t.float(), dim=-1) for t in (anchor, positive, negatives))
    logits = torch.cat([anchor @ positive.T, anchor @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device) + offset)


def unmasked_ids(batch: dict[str, torch.Tensor], causal: bool = False) -> torch.Tensor:
    """The original tokens of a batch: a masked-LM batch's labels hold them at the masked positions; a causal
    LM's inputs are the text itself (its labels are the next tokens)."""
    if causal:
        return batch["input_ids"]
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


# a model without dropout of its own (many decoders) gets this much at the unit sites for the passes that need
# two views of one input to differ: the general-knowledge proxy (Sec. 3.1) and the contrastive views (Sec. 3.3)
VIEW_DROPOUT = 0.1


@register
class SoftMask(Method):
    name = "softmask"
    needs_unit_map = True
    aliases = ("das",)
    description = ("DAS (Ke et al. 2023) with the soft-mask on the optimizer update, because a constant gradient "
                   "scale cancels in AdamW (softmask.target=gradient: the paper's Sec. 3.2)")
    Settings = SoftMaskSettings

    def __init__(self, settings: SoftMaskSettings | None = None):
        super().__init__(settings)
        self.units: UnitMap | None = None
        self.accumulated: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._scales: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._before_step: list[torch.Tensor] = []
        self._unit_parameter_ids: set[int] = set()

    # ---- events
    def before_sequence(self, sequence: SequenceState) -> None:
        self.units = UnitMap(sequence.model)
        self._unit_parameter_ids = {id(p) for p, *_ in self.units.unit_parameters()}
        self._causal = is_causal_lm(sequence.model)
        self._own_dropout = has_dropout(sequence.model)
        self._seed = sequence.seed

    def before_first_step(self, stage) -> None:
        s = self.settings
        if stage.index == 0 and s.general_importance and not stage.resumed:  # else: in the restored history
            raw = self._importance(stage, general=True)
            self._record("general", raw)
        self._scales = []
        if s.soft_mask and self.accumulated is not None:
            for parameter, kind, layer, axis in self.units.unit_parameters():
                keep = 1.0 - controlled(self.accumulated[kind][layer], s.control).to(parameter.device)
                self._scales.append((parameter, self.units.parameter_scale(keep, kind, parameter, axis)))

    def loss(self, stage, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.settings
        contrast = s.contrastive and s.contrastive_weight > 0 and self.accumulated is not None
        if contrast and s.contrastive_views == "mlm_anchor":
            loss, hidden = stage.lm_loss(batch, return_hidden=True)
            contrastive = self._contrastive_on_mlm_pass(stage, batch, pooled(hidden, batch["attention_mask"]))
        else:
            loss = stage.lm_loss(batch)
            contrastive = self._contrastive(stage, batch) if contrast else None
        if contrastive is not None:
            stage.log_term("contrastive", contrastive)
            loss = loss + s.contrastive_weight * contrastive
        return loss

    def after_backward(self, stage) -> None:
        if self.settings.other_parameters == "freeze":
            for parameter in stage.model.parameters():
                if id(parameter) not in self._unit_parameter_ids:
                    parameter.grad = None  # AdamW skips parameters without a gradient (no decay either)
        if not self._scales:
            return
        if self.settings.target == "gradient":  # the public code's variant (Sec. 3.2 as written)
            for parameter, scale in self._scales:
                if parameter.grad is not None:
                    parameter.grad.mul_(scale)
        else:
            self._before_step = [parameter.detach().clone() for parameter, _ in self._scales]

    def after_optimizer_step(self, stage) -> None:
        if self.settings.target != "update" or not self._scales:
            return
        # theta <- theta_old + (1 - I) * (theta_new - theta_old): the whole optimizer update of a unit's
        # parameters (Adam step and weight decay) is scaled, so importance 1 means "does not move".
        with torch.no_grad():
            for (parameter, scale), old in zip(self._scales, self._before_step):
                parameter.copy_(old + scale * (parameter - old))
        self._before_step = []

    def after_stage(self, stage) -> None:
        raw = self._importance(stage, general=False)
        self._record(stage.name, raw)

    # ---- importance (Sec. 3.1)
    def _importance(self, stage, general: bool) -> dict[str, torch.Tensor]:
        """Mean over batches of |dL/dg| for every unit's gate; L is the KL proxy (general) or the MLM loss."""
        model, accelerator = stage.model, stage.accelerator
        generator = torch.Generator().manual_seed(self._seed * 7919 + stage.index * 2 + int(general))
        loader = lm_loader(stage.blocks, stage.tokenizer, stage.settings.batch_size,
                               stage.settings.mlm_probability, generator)
        device = accelerator.device
        gates = {k: v.requires_grad_(True) for k, v in self.units.ones(device).items()}
        totals = self.units.zeros(device)
        was_training = model.training
        # the proxy needs dropout on (two passes of one input must differ); the MLM loss is read without noise
        model.train(general)
        batches = 0
        # n processes together average over the same importance_batches batches as one
        for batch in process_share(loader, self.settings.importance_batches, accelerator):
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.units.gated(gates), self._views_differ(general), accelerator.autocast():
                if general:
                    loss = self.proxy_loss(model, unmasked_ids(batch, self._causal), batch["attention_mask"])
                else:
                    loss = lm_loss(model, batch)
            grads = torch.autograd.grad(loss, [gates[k] for k in UNIT_KINDS])
            for kind, grad in zip(UNIT_KINDS, grads):
                totals[kind] += grad.detach().abs()
            batches += 1
        model.train(was_training)
        batches = accelerator.reduce(torch.tensor(float(batches), device=device), reduction="sum")
        return {k: accelerator.reduce(v, reduction="sum") / batches.clamp_min(1.0) for k, v in totals.items()}

    def _views_differ(self, needed: bool = True):
        """Dropout at the unit sites where two passes must differ and the model has no dropout of its own."""
        return self.units.site_dropout(VIEW_DROPOUT) if needed and not self._own_dropout else contextlib.nullcontext()

    @staticmethod
    def proxy_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """General-knowledge proxy (Sec. 3.1): KL between the output representations of two dropout passes
        of the same input (the model must be in train mode, or the two passes are identical)."""
        body = lm_body(model)
        first = pooled(body(input_ids=input_ids, attention_mask=attention_mask)[0], attention_mask)
        second = pooled(body(input_ids=input_ids, attention_mask=attention_mask)[0], attention_mask)
        return F.kl_div(F.log_softmax(first.float(), -1), F.softmax(second.float(), -1), reduction="batchmean")

    def _record(self, name: str, raw: dict[str, torch.Tensor]) -> None:
        normalised = normalise(raw, self.settings.normalise, self.settings.budget)
        if self.settings.random_importance:
            generator = torch.Generator().manual_seed(self._seed * 104729 + len(self.history))
            normalised = {k: torch.stack([row[torch.randperm(len(row), generator=generator)].to(row.device)
                                          for row in v.cpu()]).to(v.device) for k, v in normalised.items()}
        self.accumulated = accumulate(self.accumulated, normalised)
        self.history.append((name, {k: v.cpu() for k, v in normalised.items()},
                             {k: v.cpu() for k, v in self.accumulated.items()}))

    # ---- contrastive knowledge integration (Sec. 3.3)
    def _contrastive(self, stage, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Two dropout views of the full network (positives) and the importance-gated network (previous
        knowledge, extra negatives) of the same unmasked input, in one forward pass of 3 x batch rows."""
        ids, mask = unmasked_ids(batch, self._causal), batch["attention_mask"]
        rows = len(ids)
        full = {k: torch.ones(2 * rows, *v.shape, device=v.device) for k, v in self.accumulated.items()}
        previous = {k: v.to(ids.device).expand(rows, *v.shape) for k, v in self.accumulated.items()}
        gates = {k: torch.cat([full[k], previous[k]]) for k in full}
        with self.units.gated(gates), self._views_differ():
            hidden = lm_body(stage.model)(input_ids=ids.repeat(3, 1), attention_mask=mask.repeat(3, 1))[0]
        views = pooled(hidden, mask.repeat(3, 1))
        return self._info_nce_across_processes(stage, views[:rows], views[rows: 2 * rows], views[2 * rows:])

    def _contrastive_on_mlm_pass(self, stage, batch: dict[str, torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
        """Sec. 3.3 at about a third of the cost: the anchor is the full network's representation from the MLM
        pass (the masked text, with dropout); the positive (the full network on the unmasked text) and the
        gated view (previous knowledge) are fixed targets from one forward without gradient or dropout (the
        masking already makes anchor and positive two views of one text). The gradient moves the full network
        toward its representation of the clean text and away from the previous knowledge's."""
        ids, mask = unmasked_ids(batch, self._causal), batch["attention_mask"]
        rows = len(ids)
        gates = {k: torch.cat([torch.ones(rows, *v.shape, device=ids.device), v.to(ids.device).expand(rows, *v.shape)])
                 for k, v in self.accumulated.items()}
        model = stage.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.units.gated(gates):
                hidden = lm_body(model)(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1))[0]
        finally:
            model.train(was_training)
        views = pooled(hidden, mask.repeat(2, 1))
        return self._info_nce_across_processes(stage, anchor, views[:rows], views[rows:])

    def _info_nce_across_processes(self, stage, anchor: torch.Tensor, positive: torch.Tensor,
                                   prior: torch.Tensor) -> torch.Tensor:
        accelerator = stage.accelerator
        offset = 0
        if accelerator.num_processes > 1:  # negatives from every process; the local rows keep their gradient
            positive = _gather_with_grad(accelerator, positive)
            prior = _gather_with_grad(accelerator, prior)
            offset = accelerator.process_index * len(anchor)
        return info_nce(anchor, positive, prior, self.settings.temperature, offset)

    def overhead(self, model) -> dict[str, int]:
        importances = sum(t.numel() for _, normalised, accumulated in self.history
                          for t in (*normalised.values(), *accumulated.values()))
        # update masking keeps a per-parameter scale and a copy of each masked parameter around the step
        masking = 2 * sum(parameter.numel() for parameter, _ in self._scales) if self.settings.target == "update" \
            else sum(parameter.numel() for parameter, _ in self._scales)
        return {"extra_parameters": 0, "extra_optimizer_state": 0, "buffers": importances + masking}

    # ---- results and checkpoints
    def summary(self) -> dict[str, Any]:
        return {"formulation": FORMULATION[self.settings.target]}

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        tensors = {}
        for index, (name, normalised, accumulated) in enumerate(self.history):
            for kind in UNIT_KINDS:
                tensors[f"{index:02d}:{name}/normalised/{kind}"] = normalised[kind].contiguous()
                tensors[f"{index:02d}:{name}/accumulated/{kind}"] = accumulated[kind].contiguous()
        return {"importance": tensors}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "accumulated": self.accumulated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]
        self.accumulated = state["accumulated"]


def _gather_with_grad(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    gathered = list(accelerator.gather(tensor.detach()).chunk(accelerator.num_processes))
    gathered[accelerator.process_index] = tensor
    return torch.cat(gathered)

