"""DEMix domain experts (Gururangan, Lewis, Holtzman, Smith, Zettlemoyer, NAACL 2022, "DEMix Layers:
Disentangling Domains for Modular Language Modeling").

Every layer's feed-forward block (FFN input and output dense) becomes a set of experts, one per domain;
attention, embeddings, LayerNorms and the MLM head are shared. DAP of domain j routes every token to expert j
alone (DEMix's training routes by domain label). By default only that expert trains and everything shared is
frozen: DEMix adds a domain by training its new expert with the rest of the model fixed (DEMix-DAPT), which is
what lets it "add experts to incorporate new domains without forgetting older ones" (the paper's abstract).
`shared_parameters=train` trains the shared parameters too (then older domains forget through them).
A new domain's expert starts as a copy of the existing expert with the lowest MLM loss on a sample of the new
domain (DEMix's adaptation to a new domain). The original FFN stays as a frozen expert named "original": it is
the first domain's only candidate and a candidate later on. Earlier experts' weights never change afterwards;
their outputs do when the shared parameters train (measured: `expert_loss_on_own_domain` in the summary).

End task of domain j (DEMix's inference with a cached prior): the FFN output is sum_k w_k expert_k(h) with
fixed weights w_k = mean over sample texts x of P(k | x), P(k | x) proportional to P(x | k) under a uniform
prior, log P(x | k) the strided masked-LM pseudo-log-likelihood of x under expert k (every token masked once,
in groups of every `posterior_mask_every`-th token). `inference=own` uses expert j alone. The general probe
routes to the original expert.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.common.rng import derive_seed
from cpt_bench.data.batches import masked_sample
from cpt_bench.models.loading import is_causal_lm, lm_body, lm_head, lm_loss
from cpt_bench.models.units import UnitMap, projection_features
from cpt_bench.training.plugin import Method, MethodSettings, register
from cpt_bench.training.stage import SequenceState

ORIGINAL = "original"


@dataclasses.dataclass
class DemixSettings(MethodSettings):
    shared_parameters: Literal["train", "freeze"] = "freeze"  # attention, embeddings, LayerNorms, MLM head
    inference: Literal["posterior", "own"] = "posterior"  # end-task mixture: domain posterior or own expert
    init_batches: int = 4  # batches of the new domain on which the candidate experts' MLM losses are compared
    posterior_samples: int = 100  # end-task texts the cached domain posterior is estimated on
    posterior_mask_every: int = 7  # pseudo-log-likelihood masks every n-th token per pass (~15% for 7)
    posterior_max_length: int = 128  # tokens of a text the posterior reads

    def check(self, where: str) -> None:
        for key in ("init_batches", "posterior_samples", "posterior_mask_every", "posterior_max_length"):
            if getattr(self, key) <= 0:
                raise BadInput(f"{where}.{key}: must be positive, got {getattr(self, key)}")


class Routing:
    """Which experts one layer's FFN runs, with their weights: [(expert index, weight)]."""

    def __init__(self) -> None:
        self.mixture: list[tuple[int, float]] = [(0, 1.0)]


class ExpertInput(nn.Module):
    """The FFN's input dense, one copy per expert. The activation after it is element-wise, so the selected
    experts' hidden units are computed side by side (concatenated) and ExpertOutput weights each part."""

    def __init__(self, original: nn.Linear, routing: Routing):
        super().__init__()
        self.experts = nn.ModuleList([original])
        self.routing = routing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mixture = self.routing.mixture
        if len(mixture) == 1:
            return self.experts[mixture[0][0]](hidden)
        return torch.cat([self.experts[k](hidden) for k, _ in mixture], dim=-1)


class ExpertOutput(nn.Module):
    """The FFN's output dense, one copy per expert: sum_k w_k expert_k(units_k)."""

    def __init__(self, original: nn.Linear, routing: Routing):
        super().__init__()
        self.experts = nn.ModuleList([original])
        self.routing = routing

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        mixture = self.routing.mixture
        if len(mixture) == 1:
            index, weight = mixture[0]
            out = self.experts[index](units)
            return out if weight == 1.0 else out * weight
        parts = units.split(projection_features(self.experts[0])[0], dim=-1)
        return sum(weight * self.experts[index](part) for (index, weight), part in zip(mixture, parts))


def install_experts(model: nn.Module) -> None:
    """Replace every layer's FFN dense layers (found through the unit map) by expert wrappers holding them as
    expert 0; the model stays the same transformers class."""
    names = {id(module): name for name, module in model.named_modules()}
    for layer in UnitMap(model).layers:
        routing = Routing()
        # SwiGLU's gate and up projections are each an expert input: the experts' units line up in both
        wrapped = [(old, ExpertInput) for old in layer.sites["intermediate_dense"]]
        for old, wrapper in [*wrapped, (layer.output_dense, ExpertOutput)]:
            parent, _, attribute = names[id(old)].rpartition(".")
            setattr(model.get_submodule(parent), attribute, wrapper(old, routing))


def expert_ffns(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """Each layer's expert wrappers, in layer order: its input wrapper(s) (two for SwiGLU's gate and up
    projections), then its output wrapper; a layer's wrappers share one Routing."""
    layers: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, ExpertInput | ExpertOutput):
            layers.setdefault(id(module.routing), []).append(module)
    return [tuple(sorted(sides, key=lambda m: isinstance(m, ExpertOutput))) for sides in layers.values()]


def side_names(sides: tuple[nn.Module, ...]) -> list[str]:
    """Checkpoint names of a layer's wrappers: input (input1, ... for more), output."""
    return ["input", *(f"input{i}" for i in range(1, len(sides) - 1)), "output"]


def expert_parameters(model: nn.Module, index: int) -> list[nn.Parameter]:
    return [p for pair in expert_ffns(model) for side in pair for p in side.experts[index].parameters()]


def set_mixture(model: nn.Module, mixture: list[tuple[int, float]]) -> None:
    for sides in expert_ffns(model):
        sides[0].routing.mixture = list(mixture)


@contextlib.contextmanager
def routed(model: nn.Module, mixture: list[tuple[int, float]]) -> Iterator[None]:
    """Route every layer to `mixture` inside the block, then restore."""
    ffns = expert_ffns(model)
    previous = [pair[0].routing.mixture for pair in ffns]
    set_mixture(model, mixture)
    try:
        yield
    finally:
        for sides, mixture_before in zip(ffns, previous):
            sides[0].routing.mixture = mixture_before


@torch.no_grad()
def pseudo_log_likelihood(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          maskable: torch.Tensor, mask_token_id: int, every: int) -> torch.Tensor:
    """Per row: sum over maskable tokens of log p(token | text with its group masked); pass r masks the
    tokens at positions = r (mod `every`), so each token is predicted exactly once in `every` passes."""
    total = torch.zeros(len(input_ids), device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    for offset in range(every):
        chosen = maskable & (positions % every == offset)
        if not chosen.any():
            continue
        hidden = lm_body(model)(input_ids=input_ids.masked_fill(chosen, mask_token_id),
                                attention_mask=attention_mask)[0]
        log_probs = lm_head(model)(hidden[chosen]).float().log_softmax(-1)
        token_ll = log_probs.gather(-1, input_ids[chosen][:, None]).squeeze(-1)
        total.index_add_(0, chosen.nonzero()[:, 0], token_ll)
    return total


@torch.no_grad()
def causal_log_likelihood(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row: the exact log-likelihood of a decoder, sum over real tokens after the first of
    log p(token | the tokens before it) (DEMix's own, Gururangan et al. 2022, Sec. 4)."""
    hidden = lm_body(model)(input_ids=input_ids, attention_mask=attention_mask)[0]
    log_probs = lm_head(model)(hidden[:, :-1]).float().log_softmax(-1)
    token_ll = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_ll * attention_mask[:, 1:]).sum(-1)


@register
class Demix(Method):
    name = "demix"
    needs_unit_map = True
    description = ("DEMix: one FFN expert per domain, shared rest; a new expert copies the best existing "
                   "one; domain-posterior mixture for end tasks (Gururangan et al. 2022)")
    Settings = DemixSettings

    def __init__(self, settings: DemixSettings | None = None):
        super().__init__(settings)
        self.expert_names: list[str] = [ORIGINAL]
        self.inits: list[dict[str, Any]] = []  # per new expert: the candidates' losses and the one copied
        self.mixtures: list[dict[str, Any]] = []  # per end-task evaluation: the mixture weights used
        self.expert_losses: dict[str, list[float]] = {}  # expert -> MLM loss on its sample per stage
        self.samples: dict[str, list[dict[str, torch.Tensor]]] = {}  # domain -> masked batches (CPU)
        self.task_texts: list[list[str]] = []  # domain i's end-task training texts
        self._model: nn.Module | None = None
        self._new_expert: int | None = None
        self._stage_name = ""
        self._task_mixtures: dict[int, list[tuple[int, float]]] = {}  # domain -> mixture in the current stage

    # ---- events
    def before_sequence(self, sequence: SequenceState) -> None:
        self.accelerator, self.tokenizer, self.domains, self.seed = \
            sequence.accelerator, sequence.tokenizer, sequence.domains, sequence.seed
        self.task_texts = [list(texts) for texts in sequence.end_task_texts]
        self._model = sequence.model
        install_experts(sequence.model)

    def before_stage(self, stage) -> None:
        model = stage.model
        self._stage_name = stage.name
        self._task_mixtures = {}  # the experts change: estimate every task's posterior anew
        if stage.name in self.expert_names:  # a domain seen before trains its own expert further
            index, self._new_expert = self.expert_names.index(stage.name), None
        else:
            for pair in expert_ffns(model):
                for side in pair:
                    side.experts.append(copy.deepcopy(side.experts[0]))  # placeholder until before_first_step
            self.expert_names.append(stage.name)
            index = self._new_expert = len(self.expert_names) - 1
        set_mixture(model, [(index, 1.0)])
        trained = {id(p) for p in expert_parameters(model, index)}
        in_experts = {id(p) for k in range(len(self.expert_names)) for p in expert_parameters(model, k)}
        shared = self.settings.shared_parameters == "train"
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trained or (shared and id(parameter) not in in_experts))

    def before_first_step(self, stage) -> None:
        if stage.resumed:  # the sample and the new expert's initialisation are in the checkpoint already
            return
        sample = self._sample(stage)
        self.samples[stage.name] = sample
        if self._new_expert is None:
            return
        new = self._new_expert
        candidates = [k for k in range(len(self.expert_names)) if k != new]
        losses = torch.stack([self._expert_loss(stage.model, sample, k) for k in candidates])
        # the mean over processes (each scored its own sample) is the same everywhere: all copy one expert
        losses = stage.accelerator.reduce(losses.to(stage.accelerator.device), reduction="mean").cpu()
        best = candidates[int(losses.argmin())]
        with torch.no_grad():  # in place: the optimizer already holds the new expert's parameters
            for pair in expert_ffns(stage.model):
                for side in pair:
                    sources = side.experts[best].parameters()
                    for target, source in zip(side.experts[new].parameters(), sources):
                        target.copy_(source)
        self.inits.append({"expert": self.expert_names[new], "copied_from": self.expert_names[best],
                           "candidate_losses": {self.expert_names[k]: round(float(v), 5)
                                                for k, v in zip(candidates, losses)}})
        self._new_expert = None

    def after_stage(self, stage) -> None:
        # training the shared parameters moves earlier experts' outputs although their weights stay: record
        # each domain expert's MLM loss on its own domain's sample after every stage
        names = [n for n in self.expert_names if n in self.samples]
        losses = torch.stack([self._expert_loss(stage.model, self.samples[n], self.expert_names.index(n))
                              for n in names])
        losses = stage.accelerator.reduce(losses.to(stage.accelerator.device), reduction="mean").cpu()
        for name, loss in zip(names, losses):
            self.expert_losses.setdefault(name, []).append(round(float(loss), 5))
        # DEMix's cached prior: each learned domain's end-task mixture, estimated once per stage, here rather than
        # when a task is evaluated, so that a run resumed between two evaluations still records every mixture
        for domain_index, domain in enumerate(self.domains):
            if domain in self.expert_names:
                self._estimate_mixture(stage.model, domain_index)

    def _estimate_mixture(self, model: nn.Module, domain_index: int) -> None:
        domain = self.domains[domain_index]
        if self.settings.inference == "own":
            weights = torch.zeros(len(self.expert_names))
            weights[self.expert_names.index(domain)] = 1.0
        else:
            weights = self.domain_posterior(model, self.task_texts[domain_index], domain_index)
        mixture = [(k, float(w)) for k, w in enumerate(weights) if w > 0]
        self._task_mixtures[domain_index] = mixture
        self.mixtures.append({"after": self._stage_name, "task": domain,
                              "weights": {self.expert_names[k]: round(w, 5) for k, w in mixture}})

    def end_task_model(self, model: nn.Module, domain_index: int) -> nn.Module:
        """A copy routed to the task's mixture; fine-tuning trains the shared parameters and the experts in
        the mixture (with fixed weights), like fine-tuning the whole DEMix model."""
        if domain_index not in self._task_mixtures:  # a domain not learned at the last after_stage
            self._estimate_mixture(model, domain_index)
        return self._routed_copy(copy.deepcopy(model), self._task_mixtures[domain_index])

    def probe_model(self, model: nn.Module) -> nn.Module:
        """General knowledge through the original (frozen) expert: what the shared parameters' drift did."""
        return self._routed_copy(copy.deepcopy(model), [(0, 1.0)])

    def overhead(self, model: nn.Module) -> dict[str, int]:
        ffns = expert_ffns(model)
        one_ffn = sum(p.numel() for pair in ffns for side in pair for p in side.experts[0].parameters())
        sample_numbers = sum(t.numel() for batches in self.samples.values() for b in batches
                             for t in b.values())
        return {"extra_parameters": (len(self.expert_names) - 1) * one_ffn, "extra_optimizer_state": 0,
                "buffers": sample_numbers}

    # ---- posterior (DEMix's cached prior)
    def domain_posterior(self, lm: nn.Module, texts: list[str], domain_index: int) -> torch.Tensor:
        """w_k = mean over sampled texts x of softmax_k(log P(x | k)) (uniform prior); log P(x | k) is, with every
        layer routed to expert k alone, the strided pseudo-log-likelihood of x (an encoder) or its exact
        log-likelihood (a decoder)."""
        s = self.settings
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "demix-posterior", domain_index))
        chosen = torch.randperm(len(texts), generator=generator)[: s.posterior_samples].tolist()
        encoded = self.tokenizer([texts[i] for i in chosen], truncation=True,
                                 max_length=s.posterior_max_length, padding="longest", return_tensors="pt",
                                 return_special_tokens_mask=True)
        device = self.accelerator.device
        was_training = lm.training
        lm.eval()
        log_likelihoods = torch.zeros(len(self.expert_names), len(chosen), device=device)
        for start in range(0, len(chosen), 32):
            rows = slice(start, start + 32)
            ids = encoded["input_ids"][rows].to(device)
            mask = encoded["attention_mask"][rows].to(device)
            maskable = mask.bool() & ~encoded["special_tokens_mask"][rows].to(device).bool()
            for k in range(len(self.expert_names)):
                with routed(lm, [(k, 1.0)]), self.accelerator.autocast():
                    log_likelihoods[k, rows] = causal_log_likelihood(lm, ids, mask) if is_causal_lm(lm) else \
                        pseudo_log_likelihood(lm, ids, mask, maskable, self.tokenizer.mask_token_id,
                                              s.posterior_mask_every)
        lm.train(was_training)
        posterior = log_likelihoods.softmax(dim=0).mean(dim=1)
        return self.accelerator.reduce(posterior, reduction="mean").cpu()

    # ---- helpers
    def _routed_copy(self, lm: nn.Module, mixture: list[tuple[int, float]]) -> nn.Module:
        set_mixture(lm, mixture)
        mixed = {id(p) for k, _ in mixture for p in expert_parameters(lm, k)}
        in_experts = {id(p) for k in range(len(self.expert_names)) for p in expert_parameters(lm, k)}
        for parameter in lm.parameters():
            parameter.requires_grad_(id(parameter) in mixed or id(parameter) not in in_experts)
        return lm

    def _sample(self, stage) -> list[dict[str, torch.Tensor]]:
        """`init_batches` masked batches of the stage's blocks (this process's own draw), kept on the CPU."""
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, "demix-sample", stage.index, stage.accelerator.process_index))
        return masked_sample(stage.blocks, stage.tokenizer, stage.settings.batch_size,
                             stage.settings.mlm_probability, self.settings.init_batches, generator)

    @torch.no_grad()
    def _expert_loss(self, model: nn.Module, sample: list[dict[str, torch.Tensor]],
                     index: int) -> torch.Tensor:
        """Mean MLM loss over the sample's batches with every layer routed to expert `index` (no dropout)."""
        was_training = model.training
        model.eval()
        device = self.accelerator.device
        losses = []
        with routed(model, [(index, 1.0)]):
            for batch in sample:
                with self.accelerator.autocast():
                    losses.append(lm_loss(model, {k: v.to(device) for k, v in batch.items()}).float())
        model.train(was_training)
        return torch.stack(losses).mean()

    # ---- results and checkpoints
    def summary(self) -> dict[str, Any]:
        return {"experts": list(self.expert_names), "inits": self.inits, "mixtures": self.mixtures,
                "expert_loss_on_own_domain": self.expert_losses}

    def state_dict(self) -> dict[str, Any]:
        experts = {}
        if self._model is not None:
            for layer, sides in enumerate(expert_ffns(self._model)):
                for side_name, side in zip(side_names(sides), sides):
                    for k, expert in enumerate(side.experts):
                        for key, tensor in expert.state_dict().items():
                            experts[f"{layer}.{side_name}.{k}.{key}"] = tensor.detach().cpu().clone()
        return {"expert_names": list(self.expert_names), "experts": experts,
                "inits": copy.deepcopy(self.inits), "mixtures": copy.deepcopy(self.mixtures),
                "expert_losses": copy.deepcopy(self.expert_losses),
                "samples": {n: [dict(b) for b in batches] for n, batches in self.samples.items()},
                "task_mixtures": copy.deepcopy(self._task_mixtures), "stage_name": self._stage_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.expert_names = list(state["expert_names"])
        self.inits, self.mixtures = copy.deepcopy(state["inits"]), copy.deepcopy(state["mixtures"])
        self.expert_losses = copy.deepcopy(state["expert_losses"])
        self._task_mixtures = copy.deepcopy(state["task_mixtures"])
        self._stage_name = state["stage_name"]
        self.samples = {n: [dict(b) for b in batches] for n, batches in state["samples"].items()}
        with torch.no_grad():
            for layer, sides in enumerate(expert_ffns(self._model)):
                for side_name, side in zip(side_names(sides), sides):
                    while len(side.experts) < len(self.expert_names):
                        side.experts.append(copy.deepcopy(side.experts[0]))
                    for k, expert in enumerate(side.experts):
                        for key, tensor in expert.state_dict().items():
                            tensor.copy_(state["experts"][f"{layer}.{side_name}.{k}.{key}"])
