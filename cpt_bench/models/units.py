"""Units of a transformer (attention heads, FFN intermediate and output neurons), virtual gates on them through
module hooks, and the parameter slices that produce each unit (Ke et al. 2023, Sec. 3.1).

Works on stock `transformers` models through a small per-family layout of where the units live; a model
without one is a one-line BadInput. Families and what a unit owns (the slices whose update its soft-mask
scales; `parameter_scale`):

- BERT, RoBERTa, ELECTRA (encoders): a head owns its rows of Q, K, V (and bias entries) and its columns of the
  attention output projection; an intermediate neuron its row and bias entry of the FFN input projection; an
  output neuron its row and bias entry of the FFN output projection.
- GPT-2: the same, through its fused `c_attn` (one Conv1D for Q, K and V, weights stored transposed: a head
  owns its columns in each third) and Conv1D FFN (`c_fc`, `c_proj`: neurons are columns).
- GPT-NeoX / Pythia: a fused `query_key_value` whose rows are grouped per head (Q, K, V of head 0, then of
  head 1, ...): a head owns its block of 3 × head-size rows.
- Llama, Mistral, Qwen2, SmolLM (separate q/k/v/o projections, SwiGLU MLP): a head is a *query* head and owns
  its rows of `q_proj` and columns of `o_proj`. With grouped-query attention a key/value head serves a group of
  query heads, so its rows of `k_proj` and `v_proj` are owned by the whole group: their update is scaled by
  the group's smallest keep-fraction (the most important head of the group protects them). An intermediate
  neuron owns its rows of `gate_proj` and `up_proj` (its activation is their product); an output neuron its
  row of `down_proj` (as BERT's output neurons own theirs).

Gates act on every family alike: a head's slice of the attention output projection's input, an intermediate
neuron's entry of the FFN output projection's input, an output neuron's entry of that projection's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cpt_bench.common.errors import BadInput

UNIT_KINDS = ("head", "intermediate", "output")

Expand = Callable[[torch.Tensor], torch.Tensor]  # per-unit values [units] -> per-index values along one axis


@dataclasses.dataclass
class LayerUnits:
    """One layer's unit sites. `sites` names the projections the adapter methods act on (LoRA targets,
    adapter placements, DEMix experts): query, key, value, attention_out, intermediate_dense (one module, or
    SwiGLU's gate and up projections), output_dense; `owned` lists (parameter, kind, axis, expand)."""

    attention_out: nn.Module  # its input is the merged heads
    output_dense: nn.Module  # the FFN output projection: input = intermediate neurons, output = output neurons
    sites: dict[str, list[nn.Module]]
    owned: list[tuple[nn.Parameter, str, int, Expand]]


def projection_features(module: nn.Module) -> tuple[int, int]:
    """(input, output) features of a projection: a Linear, or GPT-2's Conv1D (weight stored as [input, output])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    rows, columns = module.weight.shape
    return rows, columns


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _repeat(size: int) -> Expand:
    return lambda values: values.repeat_interleave(size)


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


def _with_bias(module: nn.Module, kind: str, axis: int, expand: Expand) -> list:
    entries = [(module.weight, kind, axis, expand)]
    if getattr(module, "bias", None) is not None:
        entries.append((module.bias, kind, 0, expand))
    return entries


def _bert_layer(layer: nn.Module, head_dim: int, _config) -> LayerUnits:
    query, key, value = (_get(layer, f"attention.self.{n}") for n in ("query", "key", "value"))
    attention_out, intermediate, output = (_get(layer, n) for n in
                                           ("attention.output.dense", "intermediate.dense", "output.dense"))
    heads = _repeat(head_dim)
    owned = [e for m in (query, key, value) for e in _with_bias(m, "head", 0, heads)]
    owned += [(attention_out.weight, "head", 1, heads)]
    owned += _with_bias(intermediate, "intermediate", 0, _identity) + _with_bias(output, "output", 0, _identity)
    return LayerUnits(attention_out, output, {"query": [query], "key": [key], "value": [value],
                                              "attention_out": [attention_out], "intermediate_dense": [intermediate],
                                              "output_dense": [output]}, owned)


def _gpt2_layer(layer: nn.Module, head_dim: int, _config) -> LayerUnits:
    qkv, attention_out, fc, proj = layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc, layer.mlp.c_proj

    def thirds(values: torch.Tensor) -> torch.Tensor:  # Q, K and V side by side in c_attn's output
        return values.repeat_interleave(head_dim).repeat(3)

    owned = [(qkv.weight, "head", 1, thirds), (qkv.bias, "head", 0, thirds),
             (attention_out.weight, "head", 0, _repeat(head_dim)),
             (fc.weight, "intermediate", 1, _identity), (fc.bias, "intermediate", 0, _identity),
             (proj.weight, "output", 1, _identity), (proj.bias, "output", 0, _identity)]
    return LayerUnits(attention_out, proj, {"query": [qkv], "key": [qkv], "value": [qkv],
                                            "attention_out": [attention_out], "intermediate_dense": [fc],
                                            "output_dense": [proj]}, owned)


def _neox_layer(layer: nn.Module, head_dim: int, _config) -> LayerUnits:
    qkv, attention_out = layer.attention.query_key_value, layer.attention.dense
    up, down = layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h
    owned = [*_with_bias(qkv, "head", 0, _repeat(3 * head_dim)), (attention_out.weight, "head", 1, _repeat(head_dim))]
    owned += _with_bias(up, "intermediate", 0, _identity) + _with_bias(down, "output", 0, _identity)
    return LayerUnits(attention_out, down, {"query": [qkv], "key": [qkv], "value": [qkv],
                                            "attention_out": [attention_out], "intermediate_dense": [up],
                                            "output_dense": [down]}, owned)


def _llama_layer(layer: nn.Module, head_dim: int, config) -> LayerUnits:
    attention, mlp = layer.self_attn, layer.mlp
    group = config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)

    def shared(values: torch.Tensor) -> torch.Tensor:  # a key/value head: the smallest keep of its query heads
        return values.view(-1, group).amin(-1).repeat_interleave(head_dim)

    owned = _with_bias(attention.q_proj, "head", 0, _repeat(head_dim))
    owned += _with_bias(attention.k_proj, "head", 0, shared) + _with_bias(attention.v_proj, "head", 0, shared)
    owned += [(attention.o_proj.weight, "head", 1, _repeat(head_dim))]
    owned += _with_bias(mlp.gate_proj, "intermediate", 0, _identity)
    owned += _with_bias(mlp.up_proj, "intermediate", 0, _identity)
    owned += _with_bias(mlp.down_proj, "output", 0, _identity)
    return LayerUnits(attention.o_proj, mlp.down_proj,
                      {"query": [attention.q_proj], "key": [attention.k_proj], "value": [attention.v_proj],
                       "attention_out": [attention.o_proj], "intermediate_dense": [mlp.gate_proj, mlp.up_proj],
                       "output_dense": [mlp.down_proj]}, owned)


# model_type -> (path from the model's body to its list of layers, the layer's layout)
UNIT_MAPS: dict[str, tuple[str, Callable[..., LayerUnits]]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), ("encoder.layer", _bert_layer)),
    "gpt2": ("h", _gpt2_layer),
    "gpt_neox": ("layers", _neox_layer),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), ("layers", _llama_layer)),
}


class UnitMap:
    """Where the units of a supported model live, and how many there are."""

    def __init__(self, model: nn.Module):
        config = model.config
        model_type = getattr(config, "model_type", "")
        entry = UNIT_MAPS.get(model_type)
        try:
            layers = _get(model.base_model, entry[0]) if entry else None
        except AttributeError:
            layers = None
        if entry is None or layers is None:
            raise BadInput(f"model type {model_type or type(model).__name__!r} has no unit map (where its attention "
                           f"heads and FFN neurons are), which this method needs "
                           f"(unit maps: {', '.join(sorted(UNIT_MAPS))})")
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = [entry[1](layer, self.head_dim, config) for layer in layers]
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or \
            4 * config.hidden_size
        self.sizes = {"head": self.num_heads, "intermediate": intermediate, "output": config.hidden_size}
        self._expand = {id(parameter): expand for layer in self.layers for parameter, _, _, expand in layer.owned}

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

            def intermediate_gate(module, args, index=index):
                (units, *rest) = args
                return units * per_row(gates["intermediate"], index).to(units.dtype), *rest

            def output_gate(module, args, output, index=index):
                return output * per_row(gates["output"], index).to(output.dtype)

            handles.append(layer.attention_out.register_forward_pre_hook(head_gate))
            handles.append(layer.output_dense.register_forward_pre_hook(intermediate_gate))
            handles.append(layer.output_dense.register_forward_hook(output_gate))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def site_dropout(self, probability: float) -> Iterator[None]:
        """Dropout on the merged heads and the intermediate neurons (the inputs of the attention output and FFN
        output projections) while in the block: noise for a model that ships without dropout."""
        def drop(module, args):
            (hidden, *rest) = args
            return nn.functional.dropout(hidden, probability, training=True), *rest

        handles = [site.register_forward_pre_hook(drop) for layer in self.layers
                   for site in (layer.attention_out, layer.output_dense)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def unit_parameters(self) -> list[tuple[nn.Parameter, str, int, int]]:
        """(parameter, unit kind, layer, axis along which units index it): the parameters that produce units
        (what each unit owns: the module docstring)."""
        return [(parameter, kind, index, axis) for index, layer in enumerate(self.layers)
                for parameter, kind, axis, _ in layer.owned]

    def parameter_scale(self, values: torch.Tensor, kind: str, parameter: torch.Tensor, axis: int) -> torch.Tensor:
        """Broadcast per-unit `values` [units] of one layer to a parameter's shape along `axis`."""
        values = self._expand[id(parameter)](values)
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
