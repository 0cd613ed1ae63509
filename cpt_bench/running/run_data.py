"""A run's data, without its model: the request of `cpt-bench run` checked with its settings (`DataPlan`) and
every corpus and end task it reads, held out, audited and decontaminated (`RunData`). What `cpt-bench sweep`
needs to name a run's result file (`identity.run_key` reads a `DataPlan`) and what `cpt-bench audit` reads;
`plan.RunPlan` adds the model. Both are built whole by one function each and never changed after."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DataSettings, override, parse_set_options
from cpt_bench.data.audit import NGRAM, cached_audit, decontaminate
from cpt_bench.data.corpus import Corpus
from cpt_bench.data.suite import Suite, load_suite
from cpt_bench.data.texts import read_corpus, read_end_task
from cpt_bench.running.synthetic import materialise
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


@dataclasses.dataclass(frozen=True)
class RunData:
    """Every corpus and end task of a run, read and validated before any training (no tokenizer: the blocks
    are the model's, `plan.RunPlan.blocks`)."""

    corpora: dict[str, tuple[Corpus, str]]  # domain -> (the texts DAP trains on, streamed; where they came from)
    tasks: list  # the domains' end tasks, in the run's order (data.texts.EndTaskData)
    probes: list  # the suite's probes
    heldout: dict[str, tuple[list[str], str]]  # corpus -> held-out texts for perplexity, and where from
    heldout_notes: dict[str, str]  # corpus -> what was held out, in words (the result says it)
    uncut: dict[str, Corpus]  # corpus -> its texts before a held-out slice was cut off
    general_source: tuple  # (the suite's general corpus, data folder, limit): read only when a method asks
    audit: list  # the contamination audit (data.audit rows)
    decontaminated: dict[str, int]  # corpus -> texts dropped by data.decontaminate

    def without_heldout(self, name: str, why: str) -> RunData:
        """The data with corpus `name` trained on whole after all, with no held-out text (its slice was too
        short to score)."""
        corpora = dict(self.corpora)
        if name in corpora:
            corpora[name] = (self.uncut[name], corpora[name][1])
        uncut = {k: v for k, v in self.uncut.items() if k != name}
        heldout = {k: v for k, v in self.heldout.items() if k != name}
        return dataclasses.replace(self, corpora=corpora, uncut=uncut, heldout=heldout,
                                   heldout_notes={**self.heldout_notes, name: f"none: {why}"})

    def end_task_splits(self) -> dict[tuple[str, str], list[str]]:
        """Every split's texts of the end tasks and probes, by (task, split)."""
        return end_task_splits(self.tasks + self.probes)

    def contamination(self) -> dict[str, Any]:
        """The audit for the result's provenance (and what decontamination dropped)."""
        summary: dict[str, Any] = {"ngram": NGRAM, "overlap": [dataclasses.asdict(r) for r in self.audit]}
        if self.decontaminated:
            summary["decontaminated"] = dict(self.decontaminated)
        return summary

    def corpus_texts(self, name: str) -> tuple[Corpus, str]:
        """A domain's DAP texts, or the suite's general corpus ("general"); KeyError for any other name."""
        if name in self.corpora:
            return self.corpora[name]
        source, data_dir, limit = self.general_source
        if name != "general" or source is None:
            raise KeyError(name)
        return read_corpus(source, "text", data_dir, limit)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of every end task's data (computed once)."""
        parts = [(t.name, t.label_names, t.train.texts, t.train.text_pairs, t.train.labels, t.test.texts,
                  t.test.text_pairs, t.test.labels, t.dev and (t.dev.texts, t.dev.labels), t.average,
                  t.finetune_overrides)
                 for t in self.tasks + self.probes]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def end_task_splits(tasks: list) -> dict[tuple[str, str], list[str]]:
    return {(task.name, split): getattr(task, split).texts for task in tasks
            for split in ("train", "dev", "test") if getattr(task, split) is not None}


def read_run_data(suite: Suite, domains: list[str], data_dir: Path | None, limit: int | None,
                  data_settings: DataSettings | None = None,
                  finetune_keys_from_cli: frozenset[str] = frozenset()) -> RunData:
    """Read every corpus and end task of `domains` (and the suite's probes), hold out each corpus's perplexity
    slice, audit the corpora against the end tasks and decontaminate if asked. `finetune_keys_from_cli`:
    fine-tuning keys the command line set, which beat an end task's own settings in the suite."""
    data_settings = data_settings if data_settings is not None else DataSettings()
    corpora: dict[str, tuple[Corpus, str]] = {}
    heldout: dict[str, tuple[list[str], str]] = {}
    notes: dict[str, str] = {}
    uncut: dict[str, Corpus] = {}
    tasks = []
    for name in domains:
        domain = suite.domain(name)
        texts, where = read_corpus(domain.corpus, domain.corpus_field, data_dir, limit)
        if domain.heldout is not None:
            heldout[name] = read_corpus(domain.heldout, domain.corpus_field, data_dir, limit)
            notes[name] = f"file {heldout[name][1]}"
        else:
            texts = _hold_out(name, texts, where, suite.perplexity, heldout, notes, uncut)
        corpora[name] = (texts, where)
        tasks.append(read_end_task(name, domain.end_task, data_dir, limit))
    probes = [read_end_task(p.name, p.end_task, data_dir, limit) for p in suite.probes]
    for task in tasks + probes:
        task.finetune_overrides = {k: v for k, v in task.finetune_overrides.items() if k not in finetune_keys_from_cli}
    if suite.perplexity.blocks:
        for name, source in suite.heldout_corpora.items():
            heldout[name] = read_corpus(source, "text", data_dir, limit)
            notes[name] = f"file {heldout[name][1]}"
    audit = cached_audit({name: texts for name, (texts, _) in corpora.items()}, end_task_splits(tasks + probes))
    decontaminated: dict[str, int] = {}
    if data_settings.decontaminate:
        tests = [text for task in tasks + probes for text in task.test.texts]
        for name, (texts, where) in corpora.items():
            kept, decontaminated[name] = decontaminate(texts, tests)
            if not len(kept):
                raise BadInput(f"data.decontaminate: every text of the corpus {where} overlaps a test text")
            corpora[name] = (kept, where)
    return RunData(corpora, tasks, probes, heldout, notes, uncut, (suite.general_corpus, data_dir, limit), audit,
                   decontaminated)


def _hold_out(name: str, texts: Corpus, where: str, settings, heldout: dict, notes: dict,
              uncut: dict) -> Corpus:
    """Cut a corpus's last texts off as its held-out text (and, before them, its dev slice) for the perplexity
    matrix; returns what DAP trains on: the rest, less any text that is also a held-out or dev text (a
    duplicate line would otherwise be trained on and scored). A corpus of fewer than 4 × (held-out + dev)
    texts gives at most a quarter of itself, in the same proportions; what was cut is said in the result.
    The slices are read into memory (a few hundred texts); the rest stays a view of the corpus."""
    cut, dev = (settings.heldout_texts, settings.dev_texts) if settings.blocks else (0, 0)
    if not cut:
        return texts
    count = len(texts)
    if count < 4 * (cut + dev):  # a small corpus: scaled down, never skipped without a word
        cut, dev = count * cut // (4 * (cut + dev)), count * dev // (4 * (cut + dev))
        if not cut or (settings.score == "dev" and not dev):
            notes[name] = f"none: {count} texts are too few to hold any out"
            return texts
    tail = texts.texts(count - cut - dev, count)  # one pass reads both slices
    held, dev_slice = tail[dev:], tail[:dev]
    if settings.score == "dev" and dev_slice:
        heldout[name] = (dev_slice, f"{where} (dev slice: {dev} texts before the last {cut})")
        notes[name] = f"dev slice: {dev} of {count} texts, before the last {cut}"
    else:
        heldout[name] = (held, f"{where} (last {cut} texts)")
        notes[name] = f"last {cut} of {count} texts" + (f" (and {dev} before them as the dev slice)"
                                                         if dev else "")
    trained = texts.view(0, count - cut - dev, excluded=frozenset(held) | frozenset(dev_slice))
    if not len(trained):  # a corpus of a few texts repeated: better trained on whole than refused
        del heldout[name]
        notes[name] = (f"none: every text before the held-out slice is also in it (the corpus repeats "
                       f"{len(set(held) | set(dev_slice))} distinct texts)")
        return texts
    uncut[name] = texts
    return trained


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """A checked request with its settings and data, without the model: enough for the run's identity
    (`identity.run_key`), which `plan.plan_run` does not change."""

    request: RunRequest
    suite: Suite
    domains: list[str]
    method_cls: type[Method]
    method_settings: Any
    dap: Any  # common.settings.DapSettings with the request's --steps and --set applied
    finetune: Any  # common.settings.FinetuneSettings, likewise
    data_settings: DataSettings
    data_dir: Path | None
    model_name: str
    data: RunData

    @property
    def generates_data(self) -> bool:
        """Whether the data comes from the suite's generator (no --data-dir, no data_dir in the suite)."""
        return self.suite.generator is not None and self.request.data_dir is None and self.suite.data_dir is None

    @property
    def language_follows_seed(self) -> bool:
        """Whether each run seed generates its own data and base LM (a generator seeded by "run")."""
        return self.generates_data and self.suite.generator.seed == "run"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings blocks of a run: the suite's, with the request's `--steps` and `--set` applied."""

    method_settings: Any
    dap: Any
    finetune: Any
    data_settings: DataSettings
    finetune_keys_from_cli: frozenset[str]  # these beat an end task's own settings in the suite


def plan_data(request: RunRequest, loaded: dict[tuple, RunData] | None = None) -> DataPlan:
    """The plan without its model: options and settings checked, every corpus and end task read (data problems
    surface before the possibly slow model load). Its `identity.run_key` is the run's: `plan_run` adds the
    model and nothing the configuration reads. `loaded`: data already read by earlier calls, by what it was read
    from (a sweep plans many runs over the same data)."""
    suite = load_suite(request.suite)
    method_cls = method_class(request.method)
    check_request(request)
    domains = list(suite.resolve_order(request.order))  # names, or row K of a named order ("paper:K")
    data_dir = resolve_data_dir(suite, request.data_dir, request.seeds[0] if request.seeds else 0)
    settings = request_settings(suite, method_cls, request)
    source = (suite.fingerprint(), tuple(domains), str(data_dir), request.limit,
              json.dumps(dataclasses.asdict(settings.data_settings), sort_keys=True),
              tuple(sorted(settings.finetune_keys_from_cli)))
    if loaded is not None and source in loaded:
        data = loaded[source]
    else:
        data = read_run_data(suite, domains, data_dir, request.limit, settings.data_settings,
                             settings.finetune_keys_from_cli)
        if loaded is not None:
            loaded[source] = data
    return DataPlan(request, suite, domains, method_cls, settings.method_settings, settings.dap, settings.finetune,
                    settings.data_settings, data_dir, request.model or suite.model, data)


def read_suite_data(suite_name: str, order: list[str] | None, data_dir: str | None, limit: int | None) -> RunData:
    """A suite's data for the domains of `order` (default: all) as a run would read it, with no method or
    model: what `cpt-bench audit` reports on."""
    suite = load_suite(suite_name)
    if limit is not None and limit <= 0:
        raise BadInput(f"--limit must be positive, got {limit}")
    return read_run_data(suite, list(suite.resolve_order(order)), resolve_data_dir(suite, data_dir), limit)


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


def request_settings(suite: Suite, method_cls: type[Method], request: RunRequest) -> RunSettings:
    """The suite's settings blocks with the request's `--steps`, then its `--set BLOCK.KEY=VALUE` values, applied
    (dap, finetune, data, the method's)."""
    dap, finetune, data_settings, method_settings = suite.dap, suite.finetune, DataSettings(), method_cls.Settings()
    if request.steps is not None:
        dap = override(dap, "steps", str(request.steps), "dap")
    method_blocks = {method_cls.name, *method_cls.aliases, "method"}
    finetune_keys: set[str] = set()
    dap_keys: set[str] = set()
    for block, values in parse_set_options(request.sets).items():
        for key, value in values.items():
            if block == "dap":
                dap = override(dap, key, value, "dap")
                dap_keys.add(key)
            elif block == "finetune":
                finetune = override(finetune, key, value, "finetune")
                finetune_keys.add(key)
            elif block == "data":
                data_settings = override(data_settings, key, value, "data")
            elif block in method_blocks:
                method_settings = override(method_settings, key, value, method_cls.name)
            else:
                raise BadInput(f"--set {block}.{key}: unknown settings block {block!r} "
                               f"(known: dap, finetune, data, {method_cls.name})")
    return RunSettings(method_settings, token_budget(dap, request.steps is not None or "steps" in dap_keys),
                       finetune, data_settings, frozenset(finetune_keys))


def token_budget(dap, steps_given: bool):
    """`dap.tokens` as the stage's optimizer steps: enough whole steps of batch_size × seq_len × grad_accum
    tokens to read at least that many (blocks are full, so a step reads exactly that many)."""
    if not dap.tokens:
        return dap
    if steps_given:
        raise BadInput("give a stage's budget once: dap.tokens or --steps (dap.steps), not both")
    per_step = dap.batch_size * dap.seq_len * dap.grad_accum
    return dataclasses.replace(dap, steps=-(-dap.tokens // per_step))


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
