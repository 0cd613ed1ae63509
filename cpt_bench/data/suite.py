"""Suites as data: a YAML file lists domains (unlabeled corpus + end task), probes, and default settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DapSettings, FinetuneSettings, Validated, build, hashed_dap_settings


@dataclasses.dataclass
class HubSource:
    """A dataset on the Hugging Face hub (needs the hub or its local cache)."""

    hub: str
    config: str | None = None
    split: str = "train"


Source = str | HubSource  # a str is a file (jsonl, txt, csv) relative to the data dir, or absolute


@dataclasses.dataclass
class Prompt(Validated):
    """Prompt-based fine-tuning through the MLM head (PET / LM-BFF style): the template holds one mask,
    and a label's score is the log-sum-exp of the MLM logits of its verbalizer words at that mask."""

    template: str  # with {text}, optionally {text_pair}, and exactly one {mask}
    verbalizer: str | dict[str, list[str]]  # label -> words, inline or a JSON file under the data dir

    def check(self, where: str) -> None:
        if self.template.count("{mask}") != 1 or "{text}" not in self.template:
            raise BadInput(f"{where}.template: needs {{text}} and exactly one {{mask}}, got {self.template!r}")


@dataclasses.dataclass
class EndTask(Validated):
    """A classification end task: text (+ optional second text) -> one label of a fixed label set."""

    train: Source
    test: Source
    labels: list[str]
    dev: Source | None = None
    dev_optional: bool = False  # a dev file that does not exist means "no dev split" instead of an error
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    average: Literal["macro", "micro"] = "macro"  # F1 averaging reported as `macro_f1`; micro only on request
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-task fine-tuning overrides
    # fresh classification head, prompt + verbalizer, or a frozen-encoder linear probe (not the paper's protocol)
    evaluator: Literal["head", "prompt", "probe"] = "head"
    prompt: Prompt | None = None
    # at most this many examples per split ({train: N, dev: N, test: N}), drawn stratified by label with
    # `sample_seed`; a split smaller than its size is used whole. The sizes used go into the result file.
    subsample: dict[str, int] = dataclasses.field(default_factory=dict)
    # a task without a dev split gets one cut from train (stratified): at most `dev_from_train` examples and at
    # most `dev_from_train_fraction` of train, so a small train split keeps most of its examples (das6's camera
    # has 286); a class with one train example keeps it. The split used is in the result file.
    dev_from_train: int = 0
    dev_from_train_fraction: float = 0.2
    sample_seed: int = 0

    def check(self, where: str) -> None:
        unknown_splits = sorted(set(self.subsample) - {"train", "dev", "test"})
        if unknown_splits:
            raise BadInput(f"{where}.subsample: unknown split {unknown_splits[0]!r} (splits: train, dev, test)")
        for split, size in self.subsample.items():
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise BadInput(f"{where}.subsample.{split}: expected a positive integer, got {size!r}")
        if self.dev_from_train < 0:
            raise BadInput(f"{where}.dev_from_train: must be non-negative, got {self.dev_from_train}")
        if not 0 < self.dev_from_train_fraction <= 0.5:
            raise BadInput(f"{where}.dev_from_train_fraction: must be in (0, 0.5] (train keeps at least half), "
                           f"got {self.dev_from_train_fraction}")
        if self.evaluator == "prompt" and self.prompt is None:
            raise BadInput(f"{where}: evaluator 'prompt' needs a prompt block (template, verbalizer)")
        if len(self.labels) < 2:
            raise BadInput(f"{where}.labels: need at least two labels, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise BadInput(f"{where}.labels: repeated label in {self.labels}")
        unknown = sorted(set(self.finetune) - {f.name for f in dataclasses.fields(FinetuneSettings)})
        if unknown:
            raise BadInput(f"{where}.finetune: unknown key {unknown[0]!r}")


@dataclasses.dataclass
class Domain:
    name: str
    corpus: Source
    end_task: EndTask
    corpus_field: str = "text"
    heldout: Source | None = None  # held-out text for the perplexity matrix; none: cut from the corpus


@dataclasses.dataclass
class PerplexitySettings(Validated):
    """The MLM perplexity matrix: after every stage, perplexity on held-out text of every domain (and of the
    suite's extra held-out corpora): a forgetting signal that needs no fine-tuning."""

    blocks: int = 32  # held-out blocks scored per corpus; 0 turns the matrix off
    heldout_texts: int = 200  # texts cut from the end of a corpus that has no `heldout` source (not trained on)
    # a dev slice cut from such a corpus too (before its held-out texts): neither trained on nor reported, for
    # tuning (`score: dev` makes the matrix score it instead; benchmarks/tuning.py's grids do that)
    dev_texts: int = 0
    score: Literal["heldout", "dev"] = "heldout"

    def check(self, where: str) -> None:
        if self.blocks < 0 or self.heldout_texts < 0 or self.dev_texts < 0:
            raise BadInput(f"{where}: blocks, heldout_texts and dev_texts must be non-negative")
        if self.score == "dev" and not self.dev_texts:
            raise BadInput(f"{where}.score: 'dev' needs a dev slice (perplexity.dev_texts > 0)")


@dataclasses.dataclass
class HeadWarmup(Validated):
    """Train the LM head alone before anything is scored, encoder frozen, on an equal mix of the run's DAP
    corpora: for a checkpoint that ships without its MLM head (MiniLM). See cpt_bench/training/head_warmup.py."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2.0e-3
    seed: int = 0

    def check(self, where: str) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise BadInput(f"{where}: steps and batch_size must be positive")
        if not self.lr > 0:
            raise BadInput(f"{where}.lr: must be positive, got {self.lr}")


@dataclasses.dataclass
class Probe:
    """An end task evaluated after every stage but never DAP-trained (e.g. general-knowledge retention)."""

    name: str
    end_task: EndTask


@dataclasses.dataclass
class Generator:
    """A registered data generator that writes the suite's files (see cpt_bench.running.synthetic)."""

    name: str
    # the generator's seed: a number, or "run" (each run seed generates its own language and base model)
    seed: int | Literal["run"] = 0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    base_model: dict[str, Any] = dataclasses.field(default_factory=dict)  # the recipe of the suite's base LM

    def seed_for(self, run_seed: int) -> int:
        return run_seed if self.seed == "run" else self.seed


@dataclasses.dataclass
class Suite(Validated):
    name: str
    domains: list[Domain]
    model: str
    description: str = ""
    data_dir: str | None = None  # relative to the YAML file
    generator: Generator | None = None
    probes: list[Probe] = dataclasses.field(default_factory=list)
    heldout_corpora: dict[str, Source] = dataclasses.field(default_factory=dict)  # e.g. {general: file}
    # text of the general distribution that may be trained on (the replay method's `general` source); never
    # one of the held-out files above
    general_corpus: Source | None = None
    perplexity: PerplexitySettings = dataclasses.field(default_factory=PerplexitySettings)
    dap: DapSettings = dataclasses.field(default_factory=DapSettings)
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    head_warmup: HeadWarmup | None = None  # for a checkpoint without its MLM head (cpt_bench/training/head_warmup.py)
    # named lists of domain orders, chosen with `--order NAME:K` (row K), e.g. the paper's published orders
    orders: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)
    source_file: str = ""  # set on load, not in YAML

    def check(self, where: str) -> None:
        if not self.domains:
            raise BadInput(f"{where}.domains: a suite needs at least one domain")
        names = [d.name for d in self.domains] + [p.name for p in self.probes]
        for name in names:
            if names.count(name) > 1:
                raise BadInput(f"{where}: name {name!r} is used twice (domains and probes need unique names)")
            if not name or any(c in name for c in ",/:"):
                raise BadInput(f"{where}: invalid domain/probe name {name!r}")
        for key, rows in self.orders.items():
            if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
                raise BadInput(f"{where}.orders.{key}: expected a non-empty list of domain lists")
            for index, row in enumerate(rows):
                _check_order(self, row, f"{where}.orders.{key}[{index}]")

    def resolve_order(self, order: list[str] | None) -> list[str]:
        """The domains to train, in order: the suite's own, the given names, or row K of a named order
        (`["paper:0"]`)."""
        if order is None:
            return self.domain_names
        if len(order) == 1 and ":" in order[0]:
            key, _, row = order[0].partition(":")
            if key not in self.orders:
                known = ", ".join(f"{k}:0..{len(v) - 1}" for k, v in self.orders.items()) or "none"
                raise BadInput(f"--order {order[0]}: suite {self.name!r} has no named order {key!r} "
                               f"(named orders: {known})")
            rows = self.orders[key]
            if not (row.isascii() and row.isdigit()) or int(row) >= len(rows):
                raise BadInput(f"--order {order[0]}: expected {key}:K with K in 0..{len(rows) - 1}")
            return list(rows[int(row)])
        _check_order(self, order, "--order")
        return list(order)

    def needs_data_dir(self) -> bool:
        """Whether a data file is given relative to a data dir (so a run needs `--data-dir` or `data_dir`)."""
        tasks = [d.end_task for d in self.domains] + [p.end_task for p in self.probes]
        sources = [d.corpus for d in self.domains] + [d.heldout for d in self.domains] + \
            list(self.heldout_corpora.values()) + [s for t in tasks for s in (t.train, t.test, t.dev)]
        return any(isinstance(s, str) and not Path(s).expanduser().is_absolute() for s in sources)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> Domain:
        for domain in self.domains:
            if domain.name == name:
                return domain
        raise BadInput(f"suite {self.name!r} has no domain {name!r} (domains: {', '.join(self.domain_names)})")

    def fingerprint(self) -> str:
        """A hash of the suite's definition (not of its data files). Fields added to an end task since result
        files were first named are left out while at their defaults, so older runs keep their file names."""
        data = dataclasses.asdict(self)
        data.pop("source_file")
        if data["head_warmup"] is None:  # added later: a suite without one keeps its hash
            data.pop("head_warmup")
        # read only by replay, whose runs name it in their summary: the suite's other runs keep their hash
        data.pop("general_corpus")
        data["dap"] = hashed_dap_settings(data["dap"])
        later = {"subsample": {}, "dev_from_train": 0, "sample_seed": 0, "dev_texts": 0, "score": "heldout",
                 "dev_from_train_fraction": 0.2}
        blocks = [d["end_task"] for d in data["domains"]] + [p["end_task"] for p in data["probes"]]
        for block in [*blocks, data["perplexity"]]:
            for key, default in later.items():
                if block.get(key, default) == default:
                    block.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_order(suite: Suite, order: list[str], where: str) -> None:
    if not order:
        raise BadInput(f"{where}: the order is empty")
    for name in order:
        if not isinstance(name, str) or name not in suite.domain_names:
            raise BadInput(f"{where}: suite {suite.name!r} has no domain {name!r} "
                           f"(domains: {', '.join(suite.domain_names)})")
    repeated = sorted({d for d in order if order.count(d) > 1})
    if repeated:
        raise BadInput(f"{where}: names domain {repeated[0]!r} twice")


DEFAULT_SUITE = "synthetic"


def registered_suite_files() -> dict[str, Path]:
    folder = resources.files("cpt_bench.tasks")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def load_suite(name_or_path: str) -> Suite:
    """Load a registered suite by name, or a suite YAML file by path; any problem is one BadInput line."""
    registered = registered_suite_files()
    if name_or_path in registered:
        path = registered[name_or_path]
    else:
        path = Path(name_or_path)
        if not (path.suffix in (".yaml", ".yml") or path.exists()):
            raise BadInput(f"unknown suite {name_or_path!r} (registered: {', '.join(sorted(registered))}; "
                           "or give a path to a suite YAML file)")
        if not path.is_file():
            raise BadInput(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"suite file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"suite file {path}: malformed YAML{at}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise BadInput(f"suite file {path}: expected a mapping at the top level")
    suite = build(Suite, {**data, "source_file": str(path.resolve())}, f"suite {path.name}")
    return suite


def suite_summary(name: str) -> str:
    try:
        suite = load_suite(name)
    except BadInput as error:
        return f"(invalid: {error})"
    return f"{suite.description} [{', '.join(suite.domain_names)}; model {suite.model}]"
