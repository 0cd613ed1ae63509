"""A run with its model: the data plan (`run_data.DataPlan`: request, settings, data) plus the LM and its tokenizer,
the head warm-up where the suite asks for one, and the checks that need the model, all before any training,
so that bad input is one line and nothing is written. A `RunPlan` is built whole by `plan_run` and never
changed after; each seed trains a copy of its model."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data.audit import warnings
from cpt_bench.data.batches import lm_blocks
from cpt_bench.evaluation.evaluator import check_end_task
from cpt_bench.models.loading import is_causal_lm, load_lm
from cpt_bench.models.units import UnitMap
from cpt_bench.running.identity import run_configuration
from cpt_bench.running.run_data import (
    DataPlan,
    RunData,
    RunRequest,
    check_request,
    plan_data,
    read_run_data,
    read_suite_data,
    request_settings,
    resolve_data_dir,
)
from cpt_bench.training.head_warmup import warm_head

__all__ = [
    "DataPlan",
    "RunBlocks",
    "RunData",
    "RunPlan",
    "RunRequest",
    "check_distributed",
    "check_request",
    "make_accelerator",
    "model_fingerprint",
    "plan_data",
    "plan_run",
    "plans_by_seed",
    "read_run_data",
    "read_suite_data",
    "request_settings",
    "resolve_data_dir",
]


class RunBlocks:
    """A run's data as its model's blocks (tokenised once each, then reused): a pure function of the data and
    the tokenizer, kept for the run's life."""

    def __init__(self, data: RunData, tokenizer, causal: bool):
        self.data, self.tokenizer, self.causal = data, tokenizer, causal
        self._made: dict[str, Any] = {}

    def blocks(self, corpus: str, seq_len: int):
        """The DAP blocks of a domain's corpus, or of the suite's general corpus ("general"); KeyError for any
        other name."""
        if corpus not in self._made:
            texts, where = self.data.corpus_texts(corpus)
            self._made[corpus] = lm_blocks(texts, self.tokenizer, seq_len, where, self.causal)
        return self._made[corpus]

    def heldout_blocks(self, corpus: str, seq_len: int, count: int):
        """The first `count` blocks of a corpus's held-out text."""
        key = f"heldout:{corpus}"
        if key not in self._made:
            texts, where = self.data.heldout[corpus]
            blocks = lm_blocks(texts, self.tokenizer, seq_len, where, self.causal)
            self._made[key] = blocks.select(range(min(count, len(blocks))))
        return self._made[key]


@dataclasses.dataclass(frozen=True)
class RunPlan(DataPlan):
    """A data plan with its model, checked: ready to run for each seed."""

    original_model: Any = None  # the LM as loaded (head warmed, if the suite asks): each seed trains a copy
    tokenizer: Any = None
    causal: bool = False  # a decoder: next-token blocks and loss
    model_fingerprint: str = ""  # of `original_model`'s weights
    head_warmup: dict[str, Any] | None = None  # what the head warm-up was, if the suite has one
    run_blocks: RunBlocks | None = dataclasses.field(default=None, repr=False, compare=False)

    def blocks(self, corpus: str, seq_len: int | None = None):
        """The DAP blocks of a corpus (at the run's `dap.seq_len` unless told)."""
        return self.run_blocks.blocks(corpus, self.dap.seq_len if seq_len is None else seq_len)

    def heldout_blocks(self, corpus: str):
        """The held-out blocks of a corpus that the perplexity matrix scores."""
        return self.run_blocks.heldout_blocks(corpus, self.dap.seq_len, self.suite.perplexity.blocks)


def plan_run(request: RunRequest, accelerator=None, loaded: dict | None = None) -> RunPlan:
    """Check every option before any work (unknown names, bad orders, bad settings are BadInput), then load
    the model and check what needs it. `accelerator`: the run's (the head warm-up trains through it; default:
    one made from the request); `loaded`: data read by earlier plans (`run_data.plan_data`)."""
    data_plan = plan_data(request, loaded)
    configuration = run_configuration(data_plan, request.seeds[0])
    model, tokenizer = load_lm(data_plan.model_name, request.trust_remote_code, data_plan.data_dir)
    causal = is_causal_lm(model)  # the objective follows the model: next-token blocks
    data = data_plan.data
    run_blocks = RunBlocks(data, tokenizer, causal)
    for corpus in list(data.heldout):  # tokenised now: a held-out file too short for one block fails early
        try:
            run_blocks.heldout_blocks(corpus, data_plan.dap.seq_len, data_plan.suite.perplexity.blocks)
        except BadInput:
            if corpus not in data.uncut:
                raise
            # a slice cut from a small corpus: better trained on than refused
            data = data.without_heldout(corpus, f"the held-out slice is shorter than one block of "
                                                f"{data_plan.dap.seq_len} tokens")
            run_blocks = RunBlocks(data, tokenizer, causal)
    fingerprint = model_fingerprint(model)  # once, not per seed: a full-weight hash
    suite = data_plan.suite
    if suite.head_warmup is not None and causal:
        raise BadInput(f"suite {suite.name!r}: head_warmup is for a masked LM whose checkpoint lacks its MLM "
                       f"head; model {data_plan.model_name!r} is a decoder")
    if suite.head_warmup is not None and accelerator is None:
        accelerator = make_accelerator(data_plan)
    warmed = warm_head(model, tokenizer, accelerator, suite.head_warmup,
                       {d: data.corpora[d][0] for d in data_plan.domains},
                       functools.partial(run_blocks.blocks, seq_len=data_plan.dap.seq_len), data_plan.dap, fingerprint,
                       f"suite {suite.name!r} with model {data_plan.model_name!r}")
    if warmed is not None:
        fingerprint = model_fingerprint(model)
    fields = {f.name: getattr(data_plan, f.name) for f in dataclasses.fields(DataPlan)}
    plan = RunPlan(**{**fields, "data": data}, original_model=model, tokenizer=tokenizer, causal=causal,
                   model_fingerprint=fingerprint, head_warmup=warmed, run_blocks=run_blocks)
    if plan.method_cls.needs_unit_map:
        UnitMap(model)  # a family without one is refused here, before any training
    check_lengths(plan)
    for task in data.tasks + data.probes:
        check_end_task(tokenizer, plan.finetune, task, model)
    for line in warnings(data.audit) + budget_warnings(plan):
        print(line, file=sys.stderr, flush=True)
    if run_configuration(plan, request.seeds[0]) != configuration:  # a sweep predicts result files without a model
        raise RuntimeError("planning changed the run's configuration after the data plan (plan_data): a sweep "
                           "would predict another result file; move that step into plan_data")
    return plan


CORPUS_PASSES_WARNING = 10  # a stage reading its corpus more often than this is memorising it


def budget_warnings(plan: RunPlan) -> list[str]:
    """A line for each domain whose DAP budget, chosen in steps, reads its corpus many times over (a budget set
    for a larger corpus): said before training, since the run itself is still valid."""
    rows = plan.dap.steps * plan.dap.batch_size * plan.dap.grad_accum
    lines = []
    for name in plan.domains:
        blocks = len(plan.blocks(name))  # tokenised now, as the run would
        if rows / blocks > CORPUS_PASSES_WARNING:
            lines.append(f"warning: a stage on {name} reads its corpus about {rows / blocks:.0f} times "
                         f"({plan.dap.steps} steps × {rows // plan.dap.steps} rows over {blocks} blocks of "
                         f"{plan.dap.seq_len} tokens): a budget set for a larger corpus? (--steps, dap.batch_size)")
    return lines


def check_lengths(plan: RunPlan) -> None:
    """dap.seq_len and every fine-tuning max_length within the model's positions: past them a model indexes out
    of its position table mid-run (or, for a short corpus, fails for a misleading reason)."""
    config = plan.original_model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= 2  # position ids start after the padding index
    lengths = {"dap.seq_len": plan.dap.seq_len, "finetune.max_length": plan.finetune.max_length}
    for task in plan.data.tasks + plan.data.probes:
        if "max_length" in task.finetune_overrides:
            lengths[f"end task {task.name}'s finetune.max_length"] = task.finetune_overrides["max_length"]
    for name, length in lengths.items():
        if length > positions:
            raise BadInput(f"{name}={length} is longer than model {plan.model_name!r} can read ({positions} "
                           f"positions)")


def plans_by_seed(request: RunRequest, accelerator=None, loaded: dict | None = None) -> Iterator[tuple[int, RunPlan]]:
    """(seed, plan) for each requested seed: one plan for all, except where the suite generates a language per
    run seed (`generator.seed: run`), which gets a plan (data and base LM) per seed. The first plan is made
    before anything runs, so bad input fails at once."""
    first = plan_run(dataclasses.replace(request, seeds=request.seeds[:1]), accelerator, loaded)
    for seed in request.seeds:
        if seed == request.seeds[0] or not first.language_follows_seed:
            yield seed, first
        else:
            yield seed, plan_run(dataclasses.replace(request, seeds=[seed]), accelerator, loaded)


def model_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_distributed(plan: RunPlan, accelerator) -> None:
    """Under FSDP (an accelerate config with `distributed_type: FSDP`) each process holds a shard of each
    parameter: a method that needs parameters whole is refused before any training (docs/sweeps.md)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not plan.method_cls.supports_fsdp:
        from cpt_bench.training.plugin import registered_methods

        ready = sorted(name for name, cls in registered_methods().items() if cls.supports_fsdp)
        raise BadInput(f"method {plan.method_cls.name} needs its parameters whole and cannot run under FSDP "
                       f"(methods that can: {', '.join(ready)}); use DDP: accelerate launch --multi_gpu")


def make_accelerator(plan: RunPlan):
    from accelerate import Accelerator

    # "auto" without a GPU is the CPU, said explicitly: accelerate joins several launched processes on the CPU
    # (gloo) only when told cpu=True, and otherwise runs each of them alone
    from cpt_bench.running.tracking import accelerator_options

    cpu = plan.request.device == "cpu" or (plan.request.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision=plan.dap.precision,
                       **accelerator_options(plan.request.report_to, plan.request.output))
