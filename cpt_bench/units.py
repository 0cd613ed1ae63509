"""Units of a transformer encoder (attention heads, FFN intermediate and output neurons), virtual gates on
them through module hooks, and the parameter slices that produce each unit (Ke et al. 2023, Sec. 3.1).

Works on stock `transformers` models through a small per-architecture map of where the units live; a model
without a map is a one-line BadInput.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from cpt_bench.errors import BadInput

UNIT_KINDS = ("head", "intermediate", "output")

# model_type -> attribute paths inside one encoder layer (BERT and RoBERTa families share the layout)
_BERT_LAYOUT = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_out": "attention.output.dense", "intermediate": "intermediate",
    "intermediate_dense": "intermediate.dense", "output_dense": "output.dense",
}
UNIT_MAPS = {"bert": _BERT_LAYOUT, "roberta": _BERT_LAYOUT, "xlm-roberta": _BERT_LAYOUT,
             "camembert": _BERT_LAYOUT, "electra": _BERT_LAYOUT}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclasses.dataclass
class LayerUnits:
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_out: nn.Linear
    intermediate: nn.Module
    intermediate_dense: nn.Linear
    output_dense: nn.Linear


class UnitMap:
    """Where the units of a supported model live, and how many there are."""

    def __init__(self, model: nn.Module):
        config = model.config
        layout = UNIT_MAPS.get(getattr(config, "model_type", ""))
        layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
        if layout is None or layers is None:
            raise BadInput(f"model type {getattr(config, 'model_type', type(model).__name__)!r} has no unit map "
                           f"(where its attention heads and FFN neurons are), which this method needs "
                           f"(unit maps: {', '.join(sorted(UNIT_MAPS))})")
        self.layers = [LayerUnits(**{k: _get(layer, path) for k, path in layout.items()}) for layer in layers]
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.sizes = {"head": self.num_heads, "intermediate": config.intermediate_size,
                      "output": config.hidden_size}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def ones(self, device=None) -> dict[str, torch.Tensor]:
        """Importance-shaped tensors of ones: {kind: [layers, units]}."""
        return {k: torch.ones(self.num_layers, n, device=device) for k, n in self.sizes.items()}

    def zeros(self, device=None) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(self.num_layers, n, device=device) for k, n in self.sizes.items()}

    @contextlib.contextmanager
    def gated(self, gates: dict[str, torch.Tensor]) -> Iterator[None]:
        """Multiply every unit's output by its gate while in the block.

        `gates[kind]` is [layers, units] (one gate for the batch) or [batch, layers, units] (a gate per row,
        so differently gated views of a batch share one forward pass).
        """
        handles = []

        def per_row(gate: torch.Tensor, layer: int) -> torch.Tensor:
            g = gate[layer] if gate.dim() == 2 else gate[:, layer]
            return g if gate.dim() == 2 else g[:, None, :]  # [units] or [batch, 1, units]

        for index, layer in enumerate(self.layers):
            def head_gate(module, args, index=index):
                (context, *rest) = args
                g = per_row(gates["head"], index)
                shape = context.shape
                heads = context.view(*shape[:-1], self.num_heads, self.head_dim)
                return (heads * g[..., None].to(heads.dtype)).view(shape), *rest

            def unit_gate(kind, index=index):
                def hook(module, args, output):
                    return output * per_row(gates[kind], index).to(output.dtype)
                return hook

            handles.append(layer.attention_out.register_forward_pre_hook(head_gate))
            handles.append(layer.intermediate.register_forward_hook(unit_gate("intermediate")))
            handles.append(layer.output_dense.register_forward_hook(unit_gate("output")))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def unit_parameters(self) -> list[tuple[nn.Parameter, str, int, int]]:
        """(parameter, unit kind, layer, axis along which units index it): the parameters that produce units.

        A head's rows of Q, K, V (and bias entries) and its columns of the attention output projection; an
        intermediate neuron's row and bias of the FFN input; an output neuron's row and bias of the FFN output.
        """
        out = []
        for index, layer in enumerate(self.layers):
            for linear in (layer.query, layer.key, layer.value):
                out += [(linear.weight, "head", index, 0), (linear.bias, "head", index, 0)]
            out.append((layer.attention_out.weight, "head", index, 1))
            out += [(layer.intermediate_dense.weight, "intermediate", index, 0),
                    (layer.intermediate_dense.bias, "intermediate", index, 0),
                    (layer.output_dense.weight, "output", index, 0),
                    (layer.output_dense.bias, "output", index, 0)]
        return [entry for entry in out if entry[0] is not None]

    def parameter_scale(self, values: torch.Tensor, kind: str, parameter: torch.Tensor, axis: int) -> torch.Tensor:
        """Broadcast per-unit `values` [units] of one layer to a parameter's shape along `axis`."""
        if kind == "head":
            values = values.repeat_interleave(self.head_dim)
        shape = [1] * parameter.dim()
        shape[axis] = -1
        return values.view(shape).to(parameter.dtype)


NORMALISATIONS = ("tanh_abs", "tanh_pos", "budget")
BUDGET_SLOPE = 4.0  # `budget`: the sigmoid's slope per standard deviation of the layer's importances


def normalise(importance: dict[str, torch.Tensor], how: str = "tanh_abs", budget: float = 0.2
              ) -> dict[str, torch.Tensor]:
    """Per layer and unit kind, raw importance z-standardised and mapped into [0, 1]; a constant layer becomes
    all zeros. `tanh_abs`: |tanh(z)| (the paper, Sec. 3.1; a unit far *below* its layer's mean counts as
    important too); `tanh_pos`: tanh(max(z, 0)) (one-sided); `budget`: sigmoid(4 (z - z_q)) around a threshold z_q
    between the layer's k-th and (k+1)-th largest z, k = round(budget x units), so that a fraction `budget` of
    each layer's units is above 0.5 however skewed the importances are (|tanh| leaves most units above 0.5
    after a few stages of accumulation)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r} (known: {', '.join(NORMALISATIONS)})")
    out = {}
    for kind, values in importance.items():
        mean = values.mean(dim=-1, keepdim=True)
        std = values.std(dim=-1, keepdim=True)
        standardised = torch.where(std > 0, (values - mean) / std.clamp_min(1e-12), torch.zeros_like(values))
        if how == "tanh_abs":
            out[kind] = torch.tanh(standardised).abs()
        elif how == "tanh_pos":
            out[kind] = torch.tanh(standardised.clamp_min(0.0))
        else:
            sigmoid = torch.sigmoid(BUDGET_SLOPE * (standardised - _budget_threshold(standardised, budget)))
            out[kind] = torch.where(std > 0, sigmoid, torch.zeros_like(sigmoid))
    return out


def _budget_threshold(standardised: torch.Tensor, budget: float) -> torch.Tensor:
    """Per layer, midway between the k-th and the (k+1)-th largest value, k = round(budget x units): exactly k
    units lie above it (ties aside)."""
    units = standardised.shape[-1]
    k = round(budget * units)
    ordered = standardised.sort(dim=-1).values
    if k >= units:
        return ordered[..., :1] - 1.0
    if k == 0:
        return ordered[..., -1:] + 1.0
    return (ordered[..., units - k - 1: units - k] + ordered[..., units - k: units - k + 1]) / 2


CONTROLS = ("none", "uniform", "inverted")


def controlled(importance: torch.Tensor, control: str) -> torch.Tensor:
    """A control of what soft-masking does with one layer's importances [units]: `none` keeps them; `uniform`
    gives every unit the layer's mean (the same masking amount, no unit singled out: is the mask only a smaller
    learning rate?); `inverted` reverses their order within the layer (the least important unit gets the
    largest value: the same values, the wrong units)."""
    if control == "none":
        return importance
    if control == "uniform":
        return importance.mean().expand_as(importance)
    if control == "inverted":
        order = importance.argsort()
        inverted = torch.empty_like(importance)
        inverted[order] = importance[order].flip(0)
        return inverted
    raise ValueError(f"unknown control {control!r} (known: {', '.join(CONTROLS)})")


def accumulate(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise max of accumulated and new importance (Sec. 3.1)."""
    if previous is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: torch.maximum(previous[k], new[k]) for k in new}
