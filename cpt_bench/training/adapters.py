"""The protocol of per-domain adapter methods (bottleneck adapters, LoRA): one adapter per domain on a frozen
backbone, shared by every kind of adapter; a kind says only how an adapter is put into the model."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.models.loading import lm_head
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import SequenceState, StageState


def adapter_key(domain: str) -> str:
    """A module-dict key for a domain's adapter (the prefix keeps a domain named e.g. 'training' off nn.Module
    attributes)."""
    return "domain_" + re.sub(r"\W", "_", domain)


class DomainAdapters(Method):
    """One adapter per domain on a frozen backbone.

    The whole backbone (embeddings, LayerNorms and the MLM head included) stays frozen. DAP of domain j trains
    only domain j's adapter. End task j is fine-tuned with domain j's adapter active and trainable and
    everything else frozen (a head evaluator adds its fresh head; `finetune_mlm_head=true` also trains the MLM
    head a prompt evaluator scores with). Probes see the backbone with no adapter, trainable as in `naive`:
    general knowledge lives in the backbone, which no stage changes. The settings need `finetune_mlm_head`.
    """

    needs_unit_map = True  # adapters sit at the layers' projections, found through the unit map

    def __init__(self, settings: Any = None):
        super().__init__(settings)
        self.domains: list[str] = []  # the run's domains, in order
        self.adapted: list[str] = []  # domains that have an adapter, in the order they got it
        self.model: nn.Module | None = None

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
    def before_sequence(self, sequence: SequenceState) -> None:
        self.domains = list(sequence.domains)
        keys = [adapter_key(d) for d in self.domains]
        if len(set(keys)) != len(keys):
            raise BadInput(f"{self.name}: domain names {self.domains} collide as adapter names")
        self.model = sequence.model
        self.install(sequence.model)

    def before_stage(self, stage: StageState) -> None:
        if len(stage.plan.corpora) != 1:
            raise ValueError(f"{self.name}: a stage trains one domain's adapter, got corpora {stage.plan.corpora}")
        domain = stage.plan.corpora[0]
        self._ensure_adapter(stage.model, domain)
        key = adapter_key(domain)
        self._route(stage.model, key, self.adapter_parameters(stage.model, key))

    def end_task_model(self, model: nn.Module, domain_index: int) -> nn.Module:
        domain = self.domains[domain_index]
        if domain not in self.adapted:
            raise ValueError(f"{self.name}: end task of domain {domain!r} asked for, but the domain has no "
                             f"adapter yet (its DAP stage has not run; adapters exist for {self.adapted})")
        key = adapter_key(domain)
        trainable = self.adapter_parameters(model, key)
        if self.settings.finetune_mlm_head:
            trainable += list(lm_head(model).parameters())  # tied decoder weights: the word embeddings too
        self._route(model, key, trainable)
        return model  # the evaluator fine-tunes a copy: this model's adapters and backbone stay as they are

    def probe_model(self, model: nn.Module) -> nn.Module:
        self.activate(model, None)
        adapters = {id(p) for d in self.adapted for p in self.adapter_parameters(model, adapter_key(d))}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) not in adapters)
        return model

    def overhead(self, model: nn.Module) -> dict[str, int]:
        extra = sum(p.numel() for d in self.adapted for p in self.adapter_parameters(model, adapter_key(d)))
        return {"extra_parameters": extra, "extra_optimizer_state": 0, "buffers": 0}

    def _ensure_adapter(self, model: nn.Module, domain: str) -> None:
        if domain not in self.adapted:
            self.add_adapter(model, adapter_key(domain))
            self.adapted.append(domain)

    def _route(self, model: nn.Module, key: str, trainable: list[nn.Parameter]) -> None:
        self.activate(model, key)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)

    # ---- checkpoints: every adapter's weights, by domain
    def state_dict(self) -> dict[str, Any]:
        return {"domains": list(self.adapted),
                "adapters": {d: self.adapter_state(self.model, adapter_key(d)) for d in self.adapted}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for domain in state["domains"]:
            self._ensure_adapter(self.model, domain)
            self.load_adapter_state(self.model, adapter_key(domain), state["adapters"][domain])
        self.activate(self.model, None)
