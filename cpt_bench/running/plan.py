"""A run's plan: the request of `cpt-bench run`, validated whole (suite, order, settings, method, data and
model) before any training, so that bad input is one line and nothing is written."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DataSettings, override, parse_set_options
from cpt_bench.data.audit import NGRAM, cached_audit, decontaminate, warnings
from cpt_bench.data.batches import lm_blocks
from cpt_bench.data.suite import Suite, load_suite
from cpt_bench.data.texts import read_corpus, read_end_task
from cpt_bench.evaluation.evaluator import check_end_task
from cpt_bench.models.loading import is_causal_lm, load_lm
from cpt_bench.models.units import UnitMap
from cpt_bench.running.identity import run_configuration
from cpt_bench.running.synthetic import materialise
from cpt_bench.training.head_warmup import warm_head
from cpt_bench.training.plugin import Method, method_class


@dataclasses.dataclass
class RunRequest:
    """What `cpt-bench run` was asked (CONTRACT.md options)."""

    method: str
    suite: str
    order: list[str] | None = None
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    model: str | None = None
    data_dir: str | None = None
    steps: int | None = None
    output: str = "results/runs"
    device: str = "auto"
    eval: str = "full"
    limit: int | None = None
    sets: list[str] = dataclasses.field(default_factory=list)
    show_progress: bool = True
    checkpoint_every: int = 500  # optimizer steps between mid-stage checkpoints (0: stage ends only)
    fresh: bool = False  # ignore (and delete) the run's checkpoints
    resume: bool = True  # False: no work directory at all (nothing saved, nothing resumed)
    trust_remote_code: bool = False  # run a checkpoint's own Python code (only on the user's explicit flag)
    report_to: str = "none"  # an experiment tracker through accelerate (tracking.py); not part of the run's identity


@dataclasses.dataclass
class RunPlan:
    """A validated request: suite, order, settings and method, ready to run for each seed."""

    request: RunRequest
    suite: Suite
    domains: list[str]
    method_cls: type[Method]
    method_settings: Any
    dap: Any
    finetune: Any
    data_dir: Path | None
    model_name: str
    data_settings: DataSettings = dataclasses.field(default_factory=DataSettings)
    data: LoadedData | None = None  # every corpus and end task, read and validated
    original_model: Any = None  # the LM as loaded (each seed trains a copy)
    tokenizer: Any = None
    model_fingerprint: str = ""
    head_warmup: dict[str, Any] | None = None  # what the head warm-up was, if the suite has one

    @property
    def generates_data(self) -> bool:
        """Whether the data comes from the suite's generator (no --data-dir, no data_dir in the suite)."""
        return self.suite.generator is not None and self.request.data_dir is None and self.suite.data_dir is None

    @property
    def language_follows_seed(self) -> bool:
        """Whether each run seed generates its own data and base LM (a generator seeded by "run")."""
        return self.generates_data and self.suite.generator.seed == "run"


def plan_run(request: RunRequest) -> RunPlan:
    """Check every option before any work: unknown names, bad orders, bad settings are BadInput."""
    plan = plan_data(request)
    configuration = run_configuration(plan, request.seeds[0])
    plan.original_model, plan.tokenizer = load_lm(plan.model_name, request.trust_remote_code, plan.data_dir)
    plan.model_fingerprint = model_fingerprint(plan.original_model)  # once, not per seed: a full-weight hash
    plan.data.tokenizer = plan.tokenizer
    plan.data.causal = is_causal_lm(plan.original_model)  # the objective follows the model: next-token blocks
    plan.head_warmup = warm_head(plan, plan.model_fingerprint)
    if plan.head_warmup is not None:
        plan.model_fingerprint = model_fingerprint(plan.original_model)
    if plan.method_cls.needs_unit_map:
        UnitMap(plan.original_model)  # a family without one is refused here, before any training
    check_lengths(plan)
    for task in plan.data.tasks + plan.data.probes:
        check_end_task(plan.tokenizer, plan.finetune, task, plan.original_model)
    for corpus in list(plan.data.heldout):  # tokenised now: a held-out file too short for one block fails early
        try:
            plan.data.heldout_blocks(corpus, plan.dap.seq_len, plan.suite.perplexity.blocks)
        except BadInput:
            if corpus not in plan.data.uncut:
                raise
            # a slice cut from a small corpus: better trained on than refused
            plan.data.put_back(corpus, f"the held-out slice is shorter than one block of {plan.dap.seq_len} tokens")
    for line in warnings(plan.data.audit) + budget_warnings(plan):
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
        blocks = len(plan.data.blocks(name, plan.dap.seq_len))  # tokenised now, as the run would
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


def plans_by_seed(request: RunRequest) -> Iterator[tuple[int, RunPlan]]:
    """(seed, plan) for each requested seed: one plan for all, except where the suite generates a language per
    run seed (`generator.seed: run`), which gets a plan (data and base LM) per seed. The first plan is made
    before anything runs, so bad input fails at once."""
    first = plan_run(dataclasses.replace(request, seeds=request.seeds[:1]))
    for seed in request.seeds:
        if seed == request.seeds[0] or not first.language_follows_seed:
            yield seed, first
        else:
            yield seed, plan_run(dataclasses.replace(request, seeds=[seed]))


def plan_data(request: RunRequest, loaded: dict[tuple, LoadedData] | None = None) -> RunPlan:
    """The plan without its model: options and settings checked, every corpus and end task read (data problems
    surface before the possibly slow model load). Its `identity.run_key` is the run's: `plan_run` adds the
    model and nothing the configuration reads. `loaded`: data already read by earlier calls, by what it was read
    from (a sweep plans many runs over the same data)."""
    suite = load_suite(request.suite)
    method_cls = method_class(request.method)
    check_request(request)
    domains = suite.resolve_order(request.order)  # names, or row K of a named order ("paper:K")
    plan = RunPlan(request, suite, list(domains), method_cls, method_cls.Settings(), suite.dap, suite.finetune,
                   resolve_data_dir(suite, request.data_dir, request.seeds[0] if request.seeds else 0),
                   request.model or suite.model)
    finetune_keys_from_cli = apply_request_settings(plan)
    source = (suite.fingerprint(), tuple(plan.domains), str(plan.data_dir), request.limit,
              json.dumps(dataclasses.asdict(plan.data_settings), sort_keys=True), tuple(sorted(finetune_keys_from_cli)))
    if loaded is not None and source in loaded:
        plan.data = loaded[source]
        return plan
    plan.data = LoadedData(plan)
    for task in plan.data.tasks + plan.data.probes:  # the command line beats a task's own settings in the suite
        task.finetune_overrides = {k: v for k, v in task.finetune_overrides.items() if k not in finetune_keys_from_cli}
    if loaded is not None:
        loaded[source] = plan.data
    return plan


def check_request(request: RunRequest) -> None:
    if request.eval not in ("full", "final"):
        raise BadInput(f"--eval must be 'full' or 'final', got {request.eval!r}")
    if request.device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"--device must be auto, cpu or cuda, got {request.device!r}")
    if request.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is available")
    if request.limit is not None and request.limit <= 0:
        raise BadInput(f"--limit must be positive, got {request.limit}")
    if request.checkpoint_every < 0:
        raise BadInput(f"--checkpoint-every must be 0 or positive, got {request.checkpoint_every}")
    if not request.seeds:
        raise BadInput("no --seed given")
    for seed in request.seeds:
        if not 0 <= seed < 2 ** 32:  # what numpy's and torch's generators take
            raise BadInput(f"--seed {seed}: must be in 0..{2 ** 32 - 1}")
    from cpt_bench.running.tracking import check_tracker

    check_tracker(request.report_to)


def apply_request_settings(plan: RunPlan) -> set[str]:
    """The request's `--steps` and `--set` values onto the suite's and the method's settings; returns the
    fine-tuning keys set (see `apply_set_options`)."""
    if plan.request.steps is not None:
        plan.dap = override(plan.dap, "steps", str(plan.request.steps), "dap")
    return apply_set_options(plan, plan.request.sets)


def apply_set_options(plan: RunPlan, options: list[str]) -> set[str]:
    """`--set BLOCK.KEY=VALUE` into the plan's settings blocks (dap, finetune, data, the method's); returns the
    fine-tuning keys set, which beat an end task's own settings."""
    method_blocks = {plan.method_cls.name, *plan.method_cls.aliases, "method"}
    finetune_keys: set[str] = set()
    for block, values in parse_set_options(options).items():
        for key, value in values.items():
            if block == "dap":
                plan.dap = override(plan.dap, key, value, "dap")
            elif block == "finetune":
                plan.finetune = override(plan.finetune, key, value, "finetune")
                finetune_keys.add(key)
            elif block == "data":
                plan.data_settings = override(plan.data_settings, key, value, "data")
            elif block in method_blocks:
                plan.method_settings = override(plan.method_settings, key, value, plan.method_cls.name)
            else:
                raise BadInput(f"--set {block}.{key}: unknown settings block {block!r} "
                               f"(known: dap, finetune, data, {plan.method_cls.name})")
    return finetune_keys


def resolve_data_dir(suite: Suite, data_dir: str | None, run_seed: int = 0) -> Path | None:
    """Where the suite's files are: --data-dir, the suite's own folder, or its generator's output (for a
    generator seeded by "run": the language of `run_seed`)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise BadInput(f"--data-dir {data_dir}: no such directory")
        return path
    if suite.data_dir is not None:
        return (Path(suite.source_file).parent / suite.data_dir).resolve()
    if suite.generator is not None:
        return materialise(suite.generator, run_seed)
    if suite.needs_data_dir():
        raise BadInput(f"suite {suite.name!r} reads its data from disk: give --data-dir DIR "
                       "(one folder per domain, see docs/suites.md)")
    return None


class LoadedData:
    """Every corpus and end task of a plan, read and validated (before any training starts)."""

    def __init__(self, plan: RunPlan):
        suite, limit = plan.suite, plan.request.limit
        self.corpora: dict[str, Any] = {}
        self.tasks = []
        self.heldout: dict[str, tuple[list[str], str]] = {}  # corpus name -> held-out texts for perplexity
        self.heldout_notes: dict[str, str] = {}  # corpus name -> what was held out, in words (the result says it)
        self.uncut: dict[str, list[str]] = {}  # corpus name -> its texts before a held-out slice was cut off
        for name in plan.domains:
            domain = suite.domain(name)
            texts, where = read_corpus(domain.corpus, domain.corpus_field, plan.data_dir, limit)
            if domain.heldout is not None:
                self.heldout[name] = read_corpus(domain.heldout, domain.corpus_field, plan.data_dir, limit)
                self.heldout_notes[name] = f"file {self.heldout[name][1]}"
            else:
                texts = self.hold_out(name, texts, where, suite.perplexity)
            self.corpora[name] = (texts, where)
            self.tasks.append(read_end_task(name, domain.end_task, plan.data_dir, limit))
        self.probes = [read_end_task(p.name, p.end_task, plan.data_dir, limit) for p in suite.probes]
        # the suite's trainable general text, read only when a method asks for it (replay's "general" source)
        self.general_source = (suite.general_corpus, plan.data_dir, limit)
        if suite.perplexity.blocks:
            for name, source in suite.heldout_corpora.items():
                self.heldout[name] = read_corpus(source, "text", plan.data_dir, limit)
                self.heldout_notes[name] = f"file {self.heldout[name][1]}"
        self.audit = cached_audit({name: texts for name, (texts, _) in self.corpora.items()},
                                  self.end_task_splits())
        self.decontaminated: dict[str, int] = {}  # corpus -> texts dropped (data.decontaminate)
        if plan.data_settings.decontaminate:
            tests = [text for task in self.tasks + self.probes for text in task.test.texts]
            for name, (texts, where) in self.corpora.items():
                kept, self.decontaminated[name] = decontaminate(texts, tests)
                if not kept:
                    raise BadInput(f"data.decontaminate: every text of the corpus {where} overlaps a test text")
                self.corpora[name] = (kept, where)
        self.tokenizer = None  # set once the model is loaded
        self.causal = False  # a decoder's next-token blocks (set once the model is loaded)
        self._blocks: dict[str, Any] = {}

    def hold_out(self, name: str, texts: list[str], where: str, settings) -> list[str]:
        """Cut a corpus's last texts off as its held-out text (and, before them, its dev slice) for the perplexity
        matrix; returns what DAP trains on: the rest, less any text that is also a held-out or dev text (a
        duplicate line would otherwise be trained on and scored). A corpus of fewer than 4 × (held-out + dev)
        texts gives at most a quarter of itself, in the same proportions; what was cut is said in the result."""
        cut, dev = (settings.heldout_texts, settings.dev_texts) if settings.blocks else (0, 0)
        if not cut:
            return texts
        if len(texts) < 4 * (cut + dev):  # a small corpus: scaled down, never skipped without a word
            cut, dev = len(texts) * cut // (4 * (cut + dev)), len(texts) * dev // (4 * (cut + dev))
            if not cut or (settings.score == "dev" and not dev):
                self.heldout_notes[name] = f"none: {len(texts)} texts are too few to hold any out"
                return texts
        heldout, dev_slice = texts[len(texts) - cut:], texts[len(texts) - cut - dev: len(texts) - cut]
        if settings.score == "dev" and dev_slice:
            self.heldout[name] = (dev_slice, f"{where} (dev slice: {dev} texts before the last {cut})")
            self.heldout_notes[name] = f"dev slice: {dev} of {len(texts)} texts, before the last {cut}"
        else:
            self.heldout[name] = (heldout, f"{where} (last {cut} texts)")
            self.heldout_notes[name] = f"last {cut} of {len(texts)} texts" + (f" (and {dev} before them as the "
                                                                             "dev slice)" if dev else "")
        self.uncut[name] = texts
        scored = set(heldout) | set(dev_slice)
        trained = [text for text in texts[: len(texts) - cut - dev] if text not in scored]
        if not trained:  # a corpus of a few texts repeated: better trained on whole than refused
            self.put_back(name, f"every text before the held-out slice is also in it (the corpus repeats "
                                f"{len(scored)} distinct texts)")
            return texts
        return trained

    def put_back(self, name: str, why: str) -> None:
        """Train on the whole corpus after all, with no held-out text: its slice was too short to score."""
        if name in self.corpora:
            self.corpora[name] = (self.uncut[name], self.corpora[name][1])
        del self.uncut[name], self.heldout[name]
        self.heldout_notes[name] = f"none: {why}"

    def end_task_splits(self) -> dict[tuple[str, str], list[str]]:
        """Every split's texts of the end tasks and probes, by (task, split)."""
        return {(task.name, split): getattr(task, split).texts for task in self.tasks + self.probes
                for split in ("train", "dev", "test") if getattr(task, split) is not None}

    def contamination(self) -> dict[str, Any]:
        """The audit for the result's provenance (and what decontamination dropped)."""
        summary: dict[str, Any] = {"ngram": NGRAM, "overlap": [dataclasses.asdict(r) for r in self.audit]}
        if self.decontaminated:
            summary["decontaminated"] = dict(self.decontaminated)
        return summary

    def blocks(self, corpus: str, seq_len: int):
        """The DAP blocks of a domain's corpus, or of the suite's general corpus ("general"); KeyError for any
        other name."""
        if corpus not in self._blocks:
            texts, where = self.corpora[corpus] if corpus in self.corpora else self.general_corpus(corpus)
            self._blocks[corpus] = lm_blocks(texts, self.tokenizer, seq_len, where, self.causal)
        return self._blocks[corpus]

    def general_corpus(self, name: str) -> tuple[list[str], str]:
        source, data_dir, limit = self.general_source
        if name != "general" or source is None:
            raise KeyError(name)
        return read_corpus(source, "text", data_dir, limit)

    def heldout_blocks(self, corpus: str, seq_len: int, count: int):
        """The first `count` blocks of a corpus's held-out text."""
        key = f"heldout:{corpus}"
        if key not in self._blocks:
            texts, where = self.heldout[corpus]
            blocks = lm_blocks(texts, self.tokenizer, seq_len, where, self.causal)
            self._blocks[key] = blocks.select(range(min(count, len(blocks))))
        return self._blocks[key]

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of every end task's data (computed once per plan)."""
        parts = [(t.name, t.label_names, t.train.texts, t.train.text_pairs, t.train.labels, t.test.texts,
                  t.test.text_pairs, t.test.labels, t.dev and (t.dev.texts, t.dev.labels), t.average,
                  t.finetune_overrides)
                 for t in self.tasks + self.probes]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


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
