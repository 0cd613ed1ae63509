"""The head warm-up of a checkpoint that ships without its LM head (MiniLM's encoder): before anything is scored,
the head alone is trained on an equal mix of the run's DAP corpora while the encoder stays frozen.

Without it the base model's perplexity measures a random head (about 43,000 on das6-mini, worse than a uniform
guess over the vocabulary) and the first DAP stage of every method is mostly the head learning to read the
encoder, which DAP's perplexity matrix would book as domain adaptation and a later stage as "negative
forgetting". Not part of the paper's protocol (its RoBERTa ships its MLM head); a suite asks for it with
`head_warmup:`. The trained head is cached, keyed by the checkpoint, the corpora and the settings, so every
method and seed starts from the same warmed model."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from cpt_bench.common.cache import building, cache_dir, exclusive
from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DapSettings
from cpt_bench.data.batches import Interleaved
from cpt_bench.data.corpus import json_digest
from cpt_bench.data.suite import HeadWarmup
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import Stage

# part of the cache key: bump it with any change of how the head is trained
HEAD_WARMUP_VERSION = 2


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters outside the transformer body (`base_model`): the MLM head's transform and output bias. A
    decoder matrix tied to the word embeddings belongs to the body and is not among them."""
    prefix = model.base_model_prefix + "."
    return {name: p for name, p in model.named_parameters() if not name.startswith(prefix)}


class HeadOnly(Method):
    """The head warm-up as a method: the LM head's parameters trained alone (the body frozen, its dropout
    still on, as in DAP) through the shared trainer; `before_stage` freezes, `after_stage` restores."""

    name = "head-warmup"
    description = "trains the LM head alone, body frozen (the head warm-up; not a method to compare)"
    trains_lm = False  # not a DAP method: registered nowhere, run only by `warm_head`

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []
        self._trainable: dict[torch.nn.Parameter, bool] = {}

    def before_stage(self, stage) -> None:
        self._trainable = {p: p.requires_grad for p in stage.model.parameters()}
        for parameter in stage.model.parameters():
            parameter.requires_grad_(False)
        for parameter in head_parameters(stage.model).values():
            parameter.requires_grad_(True)

    def after_optimizer_step(self, stage) -> None:
        self.losses.append(stage.terms["mlm"])  # a number by now: the trainer read the step's terms

    def after_stage(self, stage) -> None:
        for parameter, was in self._trainable.items():
            parameter.requires_grad_(was)


def plain_adamw(parameters, named, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """One group, torch's default AdamW kernel: how the cached heads were trained (the fused kernel of DAP's
    `optim.adamw` rounds differently, and would change every warmed head)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def warm_head(model: torch.nn.Module, tokenizer, accelerator, settings: HeadWarmup | None, corpora: dict[str, Any],
              blocks: Callable[[str], Any], dap: DapSettings, checkpoint_fingerprint: str,
              where: str) -> dict[str, Any] | None:
    """Warm the head of `model` (whose weights hash to `checkpoint_fingerprint`) in place: trained once through
    the shared trainer, then read from the cache. `corpora`: each DAP corpus's texts by domain (the cache key);
    `blocks(domain)`: its blocks. Every process takes part (the main process decides whether the cache holds
    the head, and saves it). Returns what the result file records of it, or None when the suite asks for none."""
    if settings is None:
        return None
    head = head_parameters(model)
    if not head:
        raise BadInput(f"{where}: head_warmup: the model has no parameters outside its transformer body to warm")
    domains = sorted(corpora)  # the same warmed head whatever the order of the run's domains
    texts = json_digest([corpora[d] for d in domains])  # streamed: the digest of the texts' JSON list
    parts = [HEAD_WARMUP_VERSION, checkpoint_fingerprint, domains, texts, dap.seq_len, dap.mlm_probability,
             dataclasses.asdict(settings)]
    # trained by several processes or at a lower precision, a head rounds differently: another cache entry
    if accelerator.num_processes > 1 or accelerator.mixed_precision != "no":
        parts.append([accelerator.num_processes, accelerator.mixed_precision])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    path = cache_dir() / "heads" / key[:16]
    with contextlib.ExitStack() as held:
        cached = [(path / "COMPLETE").exists()]
        if not cached[0] and accelerator.is_main_process:
            held.enter_context(exclusive(path))  # concurrent runs train it once
            cached = [(path / "COMPLETE").exists()]  # another run may have trained it while this one waited
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            cached = broadcast_object_list(cached)
        if not cached[0]:
            from accelerate.utils import DistributedType

            if accelerator.distributed_type == DistributedType.FSDP:  # sharding would take the model apart
                raise BadInput(f"{where}: head_warmup cannot train under FSDP; run once without it (the warmed "
                               f"head is cached, and an FSDP run then reads it)")
            _train_head(model, tokenizer, accelerator, settings, domains, blocks, dap, path)
    accelerator.wait_for_everyone()
    from safetensors.torch import load_file

    trained = load_file(str(path / "head.safetensors"))
    with torch.no_grad():
        for name, parameter in head.items():
            parameter.copy_(trained[name])
    record = json.loads((path / "COMPLETE").read_text())
    return {**dataclasses.asdict(settings), "domains": domains, "final_loss": record["final_loss"]}


def _train_head(model, tokenizer, accelerator, settings: HeadWarmup, domains: list[str], blocks, dap: DapSettings,
                path) -> None:
    from safetensors.torch import save_file

    from cpt_bench.training.trainer import DapTrainer

    if accelerator.is_main_process:
        print(f"warming the LM head ({settings.steps} steps, body frozen, on {', '.join(domains)}; once, cached in "
              f"{path.parent})", file=sys.stderr, flush=True)
    # a constant rate, no decay, no clipping, one micro-batch: the head warm-up's recipe, not DAP's
    recipe = dataclasses.replace(dap, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                 weight_decay=0.0, warmup=0.0, schedule="constant", max_grad_norm=0.0, grad_accum=1,
                                 optimizer_state="reset", compile=False)
    method = HeadOnly()
    trainer = DapTrainer(accelerator, tokenizer, recipe, method, seed=settings.seed, show_progress=False,
                         build_optimizer=plain_adamw)
    stage = Stage("head-warmup", domains, data_seed=settings.seed)
    # dropout draws from the global generator: seeded here (and put back after), so every machine trains the
    # same head
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        trainer.train_stage(model, Interleaved([blocks(d) for d in domains]), stage, 0)
    tail = method.losses[-max(1, len(method.losses) // 10):]
    final_loss = sum(tail) / len(tail)
    if not math.isfinite(final_loss):
        raise BadInput(f"head_warmup: the loss diverged (lr {settings.lr}); lower head_warmup.lr")
    if accelerator.is_main_process:
        with building(path) as tmp:
            save_file({name: p.detach().cpu().contiguous() for name, p in head_parameters(model).items()},
                      str(tmp / "head.safetensors"))
            (tmp / "COMPLETE").write_text(json.dumps({"final_loss": round(final_loss, 4), "steps": settings.steps}))
