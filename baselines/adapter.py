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
from typing import Literal

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.models.units import UnitMap, projection_features
from cpt_bench.training.adapters import DomainAdapters
from cpt_bench.training.plugin import MethodSettings, register

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "swish": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"both": ("attention_out", "output_dense"), "ffn": ("output_dense",),
              "attention": ("attention_out",)}


@dataclasses.dataclass
class AdapterSettings(MethodSettings):
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
                (projection,) = layer.sites[site]
                model.set_submodule(names[id(projection)], AdaptedProjection(projection))

    def add_adapter(self, model: nn.Module, key: str) -> None:
        s = self.settings
        for _, wrapper in adapted_projections(model):
            weight = wrapper.projection.weight
            _, hidden = projection_features(wrapper.projection)
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
