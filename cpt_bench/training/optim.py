"""The optimizer and learning-rate schedule shared by DAP and end-task fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw(parameters: list[nn.Parameter], named: dict[int, str], lr: float, weight_decay: float):
    """AdamW without weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for p in parameters:
        name = named.get(id(p), "")
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel: one pass per parameter group instead of ~8 operators per tensor (on 2 CPU cores 0.5 vs
    # 2.9 ms per step on the default model); it rounds differently from the per-tensor path in the last bits
    fused = bool(parameters) and parameters[0].device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at `total_steps` (in optimizer steps)."""
    return stage_schedule(optimizer, "linear", warmup_steps, total_steps)


def lr_factor(kind: str, step: int, warmup: int, total: int, final: float = 0.0, decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (0-based) of a stage of `total` steps, as a fraction of the peak:
    a linear warm-up (step + 1) / W over the first W = `warmup` steps, then, with t = step - W, D = total - W and
    f = `final`:

    - linear:   f + (1 - f) (D - t) / D, reaching f at the end of the stage;
    - cosine:   f + (1 - f) (1 + cos(pi t / D)) / 2;
    - constant: 1 (no decay; an "infinite" schedule without its cooldown);
    - wsd:      1 (stable) until the last ceil(`decay_fraction` x total) steps, then linear to f over them
                (warm-up, stable, decay: Hu et al. 2024, MiniCPM, Sec. 4);
    - rsqrt:    max(f, sqrt(W / (step + 1))) (inverse square root after the warm-up; Vaswani et al. 2017, Sec. 5.3).
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    span = max(1, total - warmup)
    if kind == "linear":
        remaining = max(0.0, (total - step) / span)
        return remaining if final == 0.0 else final + (1.0 - final) * remaining  # f = 0: the earlier arithmetic
    if kind == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, math.ceil(decay_fraction * total))
        start = total - decay_steps
        return 1.0 if step < start else final + (1.0 - final) * max(0.0, (total - step) / decay_steps)
    if kind == "rsqrt":
        return max(final, math.sqrt(max(1, warmup) / (step + 1)))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def stage_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int, final: float = 0.0,
                   decay_fraction: float = 0.2):
    """`lr_factor` as a torch scheduler (in optimizer steps)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(kind, step, warmup_steps, total_steps, final, decay_fraction))
