"""LoRA, one adapter per domain, on a frozen backbone (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of
Large Language Models"): the low-rank counterpart of the bottleneck-adapter baseline (same protocol,
`cpt_bench/training/adapters.py`).

A target projection W becomes W + (alpha / r) B A with A: r x d_in, B: d_out x r and B = 0 at the start
(Sec. 4.1); by default on the attention query and value projections of every layer (Sec. 7.1). Each domain
gets its own named adapter through peft's multi-adapter layers, so the model stays a plain `*ForMaskedLM`;
only the current domain's adapter is active and trained during its DAP stage and its end-task fine-tuning, and
the backbone is bitwise unchanged after any number of domains.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.models.units import UnitMap
from cpt_bench.training.adapters import DomainAdapters
from cpt_bench.training.plugin import MethodSettings, register

# target names are the unit map's (cpt_bench/models/units.py); "ffn" = both FFN projections
TARGETS = ("query", "key", "value", "attention_out", "intermediate_dense", "output_dense")
TARGET_GROUPS = {"ffn": ("intermediate_dense", "output_dense")}


@dataclasses.dataclass
class LoraSettings(MethodSettings):
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.1  # on the adapter's input (Hu et al. used 0.1 for GPT-2; peft's default is 0)
    targets: list[str] = dataclasses.field(default_factory=lambda: ["query", "value"])
    finetune_mlm_head: bool = False  # end tasks: also fine-tune the MLM head (prompt evaluator)

    def check(self, where: str) -> None:
        if self.r <= 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise BadInput(f"{where}: r and alpha must be positive and dropout in [0, 1) "
                           f"(got {self.r}, {self.alpha}, {self.dropout})")
        known = (*TARGETS, *TARGET_GROUPS)
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets:
            raise BadInput(f"{where}.targets: expected a non-empty list of {', '.join(known)}, "
                           f"got {self.targets}")


def _lora_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@register
class Lora(DomainAdapters):
    name = "lora"
    description = "a LoRA adapter per domain on a frozen backbone (Hu et al. 2022, via peft)"
    Settings = LoraSettings

    def install(self, model: nn.Module) -> None:
        # exact module names (suffixes would confuse `output.dense` with `attention.output.dense`)
        units = UnitMap(model)
        sites = sorted({s for t in self.settings.targets for s in TARGET_GROUPS.get(t, (t,))})
        names = {id(m): name for name, m in model.named_modules()}
        modules = [module for layer in units.layers for site in sites for module in layer.sites[site]]
        self.target_modules = list(dict.fromkeys(names[id(m)] for m in modules))  # GPT-2's fused Q, K, V once
        # GPT-2's Conv1D stores its weight as [input, output]: peft must be told (it corrects it with a warning)
        self.fan_in_fan_out = any(not isinstance(m, nn.Linear) for m in modules)

    def add_adapter(self, model: nn.Module, key: str) -> None:
        from peft import LoraConfig
        from peft.functional import inject_adapter_in_model

        s = self.settings
        config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                            target_modules=list(self.target_modules), fan_in_fan_out=self.fan_in_fan_out)
        with warnings.catch_warnings():
            # expected: the model already holds the previous domains' adapters
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=key)

    def activate(self, model: nn.Module, key: str | None) -> None:
        from peft.functional import set_adapter

        set_adapter(model, [key] if key is not None else [])

    def adapter_parameters(self, model: nn.Module, key: str) -> list[nn.Parameter]:
        parameters = []
        for layer in _lora_layers(model):
            for attribute in layer.adapter_layer_names:
                container = getattr(layer, attribute)
                if key in container:
                    item = container[key]
                    parameters += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return parameters

    def adapter_state(self, model: nn.Module, key: str) -> dict[str, torch.Tensor]:
        from peft.functional import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=key)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_adapter_state(self, model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> None:
        from peft.functional import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state, adapter_name=key)
        missing = [k for k in result.missing_keys if f".{key}." in k or k.endswith(f".{key}")]
        if result.unexpected_keys or missing:
            raise ValueError(f"lora: adapter {key} does not fit the model (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
