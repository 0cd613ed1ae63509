"""Held-out perplexity and bits per byte: after every stage, for every domain (and extra held-out corpora), a
forgetting and transfer signal that needs no fine-tuning (Gururangan et al. 2020 report it for DAPT).

Definitions (the same code for both kinds of LM; only which positions are scored differs):
- scored tokens: an encoder's masked positions (BERT masking of the held-out blocks, drawn from a fixed seed so
  every stage scores the same ones), or every next token of a decoder's packed blocks;
- perplexity = exp(total cross-entropy in nats / number of scored tokens): per token of the model's own
  tokenizer, so it compares models only when they share a tokenizer;
- bits per byte = total cross-entropy / (ln 2 × UTF-8 bytes of the scored tokens' text), the text of each run
  of consecutive scored tokens decoded together: comparable across tokenizers. For a decoder this is the
  usual bits per byte of the held-out text; for an encoder, of its masked tokens only."""

from __future__ import annotations

import math

import torch
from torch import nn

from cpt_bench.data.batches import lm_loader
from cpt_bench.models.loading import lm_loss

MASKING_SEED = 20230501  # every stage scores the same masked positions, so rows of the matrix compare


def scored_bytes(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """UTF-8 bytes of the text of a batch's scored tokens (their labels), each run of consecutive scored
    positions in a row decoded as one piece."""
    total = 0
    for row in labels.tolist():
        run: list[int] = []
        for token in [*row, -100]:
            if token != -100:
                run.append(token)
            elif run:
                total += len(tokenizer.decode(run, clean_up_tokenization_spaces=False).encode("utf-8"))
                run = []
    return total


@torch.no_grad()
def heldout_scores(lm: nn.Module, blocks, tokenizer, accelerator, batch_size: int,
                   mlm_probability: float) -> tuple[float, float]:
    """(perplexity, bits per byte) of `blocks` (module docstring), dropout off."""
    generator = torch.Generator().manual_seed(MASKING_SEED)
    loader = lm_loader(blocks, tokenizer, batch_size, mlm_probability, generator, shuffle=False)
    was_training = lm.training
    lm.eval()
    total_loss, total_tokens, total_bytes = 0.0, 0, 0
    for batch in loader:
        total_bytes += scored_bytes(tokenizer, batch["input_ids"], batch["labels"])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        scored = int((batch["labels"] != -100).sum())
        if scored == 0:
            continue
        with accelerator.autocast():
            loss = lm_loss(lm, batch)
        total_loss += float(loss) * scored
        total_tokens += scored
    lm.train(was_training)
    if not total_tokens:
        return float("nan"), float("nan")
    return math.exp(total_loss / total_tokens), total_loss / (math.log(2) * max(total_bytes, 1))

