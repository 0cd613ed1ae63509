"""MLM perplexity on held-out text: after every stage, for every domain (and extra held-out corpora), a
forgetting and transfer signal that needs no fine-tuning (Gururangan et al. 2020 report it for DAPT)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cpt_bench.batches import masked_loader
from cpt_bench.models import mlm_loss

MASKING_SEED = 20230501  # every stage scores the same masked positions, so rows of the matrix compare


@torch.no_grad()
def masked_lm_perplexity(lm: nn.Module, blocks, tokenizer, accelerator, batch_size: int,
                         mlm_probability: float) -> float:
    """exp(mean cross-entropy over the masked tokens of `blocks`), dropout off, masks drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(MASKING_SEED)
    loader = masked_loader(blocks, tokenizer, batch_size, mlm_probability, generator, shuffle=False)
    was_training = lm.training
    lm.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        masked = int((batch["labels"] != -100).sum())
        if masked == 0:
            continue
        with accelerator.autocast():
            loss = mlm_loss(lm, batch)
        total_loss += float(loss) * masked
        total_tokens += masked
    lm.train(was_training)
    return math.exp(total_loss / total_tokens) if total_tokens else float("nan")
