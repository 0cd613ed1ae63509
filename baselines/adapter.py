"""Bottleneck adapters, one per domain, on a frozen backbone (Houlsby et al., ICML 2019, "Parameter-Efficient
Transfer Learning for NLP"): the adapter baseline of continual DAP.

An adapter maps h to h + W_up f(W_down h) with a bottleneck of hidden/16 (Sec. 2.1, Fig. 2). It sits right
after the attention output projection and after the FFN output projection of every layer (`placement=both`,
Houlsby), or after the FFN output only (`placement=ffn`, the single adapter of Pfeiffer et al., EACL 2021),
before dropout, the residual add and LayerNorm. Each domain gets a new adapter, initialised to the identity
(W_up = 0); its DAP stage trains that adapter alone and its end task is fine-tuned through it, so the backbone
is bitwise the original model after any number of domains and no adapter changes after its domain's stage: no
forgetting, and no transfer between domains, by construction. Houlsby et al. also train the LayerNorms; here
they stay frozen with the rest of the backbone, which is what keeps it bitwise unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import torch
from torch import nn

from cpt_bench.errors import BadInput
from cpt_bench.models import mlm_head
from cpt_bench.plugin import Method, SequenceState, Stage, register
from cpt_bench.units import UnitMap


def adapter_key(domain: str) -> str:
    """A module-dict key for a domain's adapter (the prefix keeps a domain named e.g. 'training' off nn.Module
    attributes)."""
    return "domain_" + re.sub(r"\W", "_", domain)


class DomainAdapters(Method):
    """The protocol of per-domain adapter baselines (bottleneck adapters here, LoRA in `lora.py`).

    The whole backbone (embeddings, LayerNorms and the MLM head included) stays frozen. DAP of domain j trains
    only domain j's adapter. End task j is fine-tuned with domain j's adapter active and trainable and
    everything else frozen (a head evaluator adds its fresh head; `finetune_mlm_head=true` also trains the MLM
    head a prompt evaluator scores with). Probes see the backbone with no adapter, trainable as in `naive`:
    general knowledge lives in the backbone, which no stage changes. A subclass says how an adapter is put
    into the model, activated, and which parameters are its.
    """

    def __init__(self, settings: Any = None):
        super().__init__(settings)
        self.domains: list[str] = []  # the run's domains (end-task columns), in order
        self.adapted: list[str] = []  # domains that have an adapter, in the order they got it
        self.model: nn.Module | None = None
        self._restored: dict[str, Any] | None = None

    # ---- what a kind of adapter defines
    def install(self, model: nn.Module) -> None:
        """Once per model: make it able to hold adapters (none active: it computes the original function)."""

    def add_adapter(self, model: nn.Module, key: str) -> None:
        raise NotImplementedError

    def activate(self, model: nn.Module, key: str | None) -> None:
        """Route the forward pass through adapter `key` only (None: through no adapter)."""
        raise NotImplementedError

    def adapter_parameters(self, model: nn.Module, key: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def adapter_state(self, model: nn.Module, key: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_adapter_state(self, model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ---- events
    def on_sequence_start(self, run: SequenceState) -> None:
        self.domains = list(run.domains)
        keys = [adapter_key(d) for d in self.domains]
        if len(set(keys)) != len(keys):
            raise BadInput(f"{self.name}: domain names {self.domains} collide as adapter names")
        self.model = run.model
        self.install(run.model)
        if self._restored is not None:
            self._restore(run.model, self._restored)

    def prepare_stage(self, model: nn.Module, stage: Stage, stage_index: int) -> None:
        if len(stage.corpora) != 1:
            raise ValueError(f"{self.name}: a stage trains one domain's adapter, got corpora {stage.corpora}")
        domain = stage.corpora[0]
        key = adapter_key(domain)
        if domain not in self.adapted:
            self.add_adapter(model, key)
            self.adapted.append(domain)
        self._route(model, key, self.adapter_parameters(model, key))

    def end_task_lm(self, model: nn.Module, column: int) -> nn.Module:
        domain = self.domains[column]
        if domain not in self.adapted:
            raise ValueError(f"{self.name}: end task of domain {domain!r} asked for, but the domain has no "
                             f"adapter yet (its DAP stage has not run; adapters exist for {self.adapted})")
        key = adapter_key(domain)
        trainable = self.adapter_parameters(model, key)
        if self.settings.finetune_mlm_head:
            trainable += list(mlm_head(model).parameters())  # tied decoder weights: the word embeddings too
        self._route(model, key, trainable)
        return model  # the evaluator fine-tunes a copy: this model's adapters and backbone stay as they are

    def probe_lm(self, model: nn.Module) -> nn.Module:
        self.activate(model, None)
        adapters = {id(p) for d in self.adapted for p in self.adapter_parameters(model, adapter_key(d))}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) not in adapters)
        return model

    def overhead(self, model: nn.Module) -> dict[str, int]:
        extra = sum(p.numel() for d in self.adapted for p in self.adapter_parameters(model, adapter_key(d)))
        return {"extra_parameters": extra, "extra_optimizer_state": 0, "buffers": 0}

    def _route(self, model: nn.Module, key: str, trainable: list[nn.Parameter]) -> None:
        self.activate(model, key)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)

    # ---- checkpoints: every adapter's weights, by domain
    def state_dict(self) -> dict[str, Any]:
        if self.model is None:
            return self._restored or {"domains": [], "adapters": {}}
        return {"domains": list(self.adapted),
                "adapters": {d: self.adapter_state(self.model, adapter_key(d)) for d in self.adapted}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adapters are rebuilt on the model at `on_sequence_start` (or now, if the sequence has started)."""
        self._restored = state
        if self.model is not None:
            self._restore(self.model, state)

    def _restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        for domain in state["domains"]:
            key = adapter_key(domain)
            if domain not in self.adapted:
                self.add_adapter(model, key)
                self.adapted.append(domain)
            self.load_adapter_state(model, key, state["adapters"][domain])
        self.activate(model, None)


# ---- bottleneck adapters

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "swish": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"both": ("attention_out", "output_dense"), "ffn": ("output_dense",),
              "attention": ("attention_out",)}


@dataclasses.dataclass
class AdapterSettings:
    reduction: int = 16  # bottleneck = hidden size / reduction (Houlsby's 64 for BERT-large is about 1/16)
    size: int = 0  # the bottleneck size itself; 0: from `reduction`
    placement: Literal["both", "ffn", "attention"] = "both"  # both = Houlsby; ffn = Pfeiffer-style
    activation: Literal["gelu", "relu", "swish", "tanh"] = "gelu"
    finetune_mlm_head: bool = False  # end tasks: also fine-tune the MLM head (prompt evaluator)

    def check(self, where: str) -> None:
        if self.reduction <= 0 or self.size < 0:
            raise BadInput(f"{where}: reduction must be positive and size non-negative "
                           f"(got {self.reduction}, {self.size})")


class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down h) (Houlsby et al. 2019, Fig. 2); W_up = 0 makes it the identity at the start."""

    def __init__(self, hidden_size: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


class AdaptedProjection(nn.Module):
    """A sublayer's output projection followed by the active domain's adapter (none active: the projection).

    A wrapper module rather than a forward hook, so that a deep copy of the model routes through the copy's
    adapters (a hook closure would still point at the original's).
    """

    def __init__(self, projection: nn.Module):
        super().__init__()
        self.projection = projection
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.projection(hidden)
        return hidden if self.active is None else self.adapters[self.active](hidden)


def adapted_projections(model: nn.Module) -> list[tuple[str, AdaptedProjection]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedProjection)]


@register
class Adapter(DomainAdapters):
    name = "adapter"
    description = "a bottleneck adapter per domain on a frozen backbone (Houlsby et al. 2019)"
    Settings = AdapterSettings

    def install(self, model: nn.Module) -> None:
        if adapted_projections(model):
            return
        units = UnitMap(model)  # where the sublayer outputs are; a one-line error for unsupported models
        names = {id(m): name for name, m in model.named_modules()}
        for layer in units.layers:
            for site in PLACEMENTS[self.settings.placement]:
                projection = getattr(layer, site)
                model.set_submodule(names[id(projection)], AdaptedProjection(projection))

    def add_adapter(self, model: nn.Module, key: str) -> None:
        s = self.settings
        for _, wrapper in adapted_projections(model):
            weight = wrapper.projection.weight
            hidden = weight.shape[0]
            size = s.size or max(1, hidden // s.reduction)
            adapter = BottleneckAdapter(hidden, size, s.activation)
            wrapper.adapters[key] = adapter.to(weight.device, weight.dtype)

    def activate(self, model: nn.Module, key: str | None) -> None:
        for _, wrapper in adapted_projections(model):
            wrapper.active = key

    def adapter_parameters(self, model: nn.Module, key: str) -> list[nn.Parameter]:
        return [p for _, wrapper in adapted_projections(model) for p in wrapper.adapters[key].parameters()]

    def adapter_state(self, model: nn.Module, key: str) -> dict[str, torch.Tensor]:
        return {f"{name}.{pname}": p.detach().cpu().clone()
                for name, wrapper in adapted_projections(model)
                for pname, p in wrapper.adapters[key].named_parameters()}

    def load_adapter_state(self, model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, wrapper in adapted_projections(model):
                for pname, p in wrapper.adapters[key].named_parameters():
                    p.copy_(state[f"{name}.{pname}"])
