"""The head warm-up of a checkpoint that ships without its LM head (MiniLM's encoder): before anything is scored,
the head alone is trained on an equal mix of the run's DAP corpora while the encoder stays frozen.

Without it the base model's perplexity measures a random head (about 43,000 on das6-mini, worse than a uniform
guess over the vocabulary) and the first DAP stage of every method is mostly the head learning to read the
encoder, which DAP's perplexity matrix would book as domain adaptation and a later stage as "negative
forgetting". Not part of the paper's protocol (its RoBERTa ships its MLM head); a suite asks for it with
`head_warmup:`. The trained head is cached, keyed by the checkpoint, the corpora and the settings, so every
method and seed starts from the same warmed model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from typing import Any

import torch

from cpt_bench.common.cache import building, cache_dir, exclusive
from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import endless, lm_loader
from cpt_bench.models.loading import lm_loss

# part of the cache key: bump it with any change of how the head is trained
HEAD_WARMUP_VERSION = 2


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters outside the transformer body (`base_model`): the MLM head's transform and output bias. A
    decoder matrix tied to the word embeddings belongs to the body and is not among them."""
    prefix = model.base_model_prefix + "."
    return {name: p for name, p in model.named_parameters() if not name.startswith(prefix)}


def warm_head(plan, checkpoint_fingerprint: str) -> dict[str, Any] | None:
    """Warm the head of `plan.original_model` (whose weights hash to `checkpoint_fingerprint`) in place: trained
    once, then read from the cache. Returns what the result file records of it, or None when the suite asks
    for no warm-up."""
    settings = plan.suite.head_warmup
    if settings is None:
        return None
    model = plan.original_model
    if plan.data.causal:
        raise BadInput(f"suite {plan.suite.name!r}: head_warmup is for a masked LM whose checkpoint lacks its MLM "
                       f"head; model {plan.model_name!r} is a decoder")
    head = head_parameters(model)
    if not head:
        raise BadInput(f"suite {plan.suite.name!r}: head_warmup: model {plan.model_name!r} has no parameters "
                       "outside its transformer body to warm")
    domains = sorted(plan.domains)  # the same warmed head whatever the order of the run's domains
    corpora = hashlib.sha256(json.dumps([plan.data.corpora[d][0] for d in domains]).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([HEAD_WARMUP_VERSION, checkpoint_fingerprint, domains, corpora, plan.dap.seq_len,
                                     plan.dap.mlm_probability, dataclasses.asdict(settings)]).encode()).hexdigest()
    path = cache_dir() / "heads" / key[:16]
    if not (path / "COMPLETE").exists():
        with exclusive(path):
            if not (path / "COMPLETE").exists():  # another process may have trained it while this one waited
                _train_head(plan, model, head, domains, settings, path)
    from safetensors.torch import load_file

    trained = load_file(str(path / "head.safetensors"))
    with torch.no_grad():
        for name, parameter in head.items():
            parameter.copy_(trained[name])
    record = json.loads((path / "COMPLETE").read_text())
    return {**dataclasses.asdict(settings), "domains": domains, "final_loss": record["final_loss"]}


def _train_head(plan, model, head: dict[str, torch.nn.Parameter], domains: list[str], settings, path) -> None:
    from safetensors.torch import save_file

    print(f"warming the MLM head of {plan.model_name!r} ({settings.steps} steps, encoder frozen, on "
          f"{', '.join(domains)}; once, cached in {path.parent})", file=sys.stderr, flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() and plan.request.device != "cpu" else "cpu")
    trainable = {p: p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in head.values():
        parameter.requires_grad_(True)
    model.to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    loaders = [iter(endless(lm_loader(plan.data.blocks(d, plan.dap.seq_len), plan.tokenizer,
                                           settings.batch_size, plan.dap.mlm_probability, generator)))
               for d in domains]
    optimizer = torch.optim.AdamW(list(head.values()), lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    # dropout draws from the global generator: seeded here, so every machine trains the same head
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(settings.seed)
        try:
            for step in range(settings.steps):
                batch = {k: v.to(device) for k, v in next(loaders[step % len(loaders)]).items()}
                loss = lm_loss(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        finally:
            for parameter, was in trainable.items():
                parameter.requires_grad_(was)
            model.cpu()
    tail = losses[-max(1, len(losses) // 10):]
    final_loss = sum(tail) / len(tail)
    if not math.isfinite(final_loss):
        raise BadInput(f"head_warmup: the loss diverged (lr {settings.lr}); lower head_warmup.lr")
    with building(path) as tmp:
        save_file({name: p.detach().cpu().contiguous() for name, p in head.items()}, str(tmp / "head.safetensors"))
        (tmp / "COMPLETE").write_text(json.dumps({"final_loss": round(final_loss, 4), "steps": settings.steps}))
