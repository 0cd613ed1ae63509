"""Compute accounting: the approximate training FLOPs of a run's DAP, every extra pass a method makes included.

Every forward of a transformer body (`model.base_model`: an encoder or a decoder stack) made while a counter is
active is counted, whoever makes it: the training step's, a teacher's, the contrastive views, importance and
Fisher passes, DEMix's expert choice. A forward of B x T positions (padding included: it is computed) through a
body of N parameters costs 2·N·B·T FLOPs, and 6·N·B·T when its output requires a gradient (forward, then
backward; Kaplan et al. 2020, Sec. 2.1). N leaves out the embedding tables (a lookup, not a product). Not counted:
the LM head (the vocabulary projection, at masked positions only for an encoder), attention's T² terms and the
optimizer; a body whose parameters are all frozen but whose output carries a gradient (an adapter's backbone)
is counted as trained, though it skips its weight gradients; DEMix counts every expert as active. The counts
are comparable between methods on one model, not a hardware measurement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def non_embedding_parameters(body: nn.Module) -> int:
    embeddings = {id(p) for m in body.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in body.parameters() if id(p) not in embeddings)


def is_transformer_body(module: nn.Module) -> bool:
    base = getattr(module, "base_model", None)
    return base is module and getattr(module, "config", None) is not None


class ComputeCounter:
    """Approximate FLOPs of the transformer-body forwards made inside `counting()` (the module docstring)."""

    def __init__(self, flops: float = 0.0):
        self.flops = flops
        self._sizes: dict[int, tuple[int, int]] = {}  # id(body) -> (parameter count, version) cache

    def _parameters(self, body: nn.Module) -> int:
        version = sum(1 for _ in body.parameters())  # a body that gains parameters (DEMix experts) is re-counted
        cached = self._sizes.get(id(body))
        if cached is None or cached[1] != version:
            cached = (non_embedding_parameters(body), version)
            self._sizes[id(body)] = cached
        return cached[0]

    def _hook(self, module: nn.Module, args, output) -> None:
        if not is_transformer_body(module):
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
        if hidden is None and hasattr(output, "__getitem__"):
            hidden = output[0]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            return
        positions = hidden.shape[0] * hidden.shape[1]
        self.flops += (6 if hidden.requires_grad else 2) * self._parameters(module) * positions

    @contextlib.contextmanager
    def counting(self) -> Iterator[ComputeCounter]:
        handle = nn.modules.module.register_module_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
