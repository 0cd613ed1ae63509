"""One benchmark run: validate everything, then DAP stage by stage with end-task evaluation in between."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cpt_bench.checkpoint import StopRequested, StopSignal, WorkDir, rng_state, set_rng_state
from cpt_bench.data import cache_dir, mlm_blocks, read_corpus, read_end_task
from cpt_bench.errors import BadInput
from cpt_bench.evaluator import EndTaskEvaluator, check_end_task, derive_seed
from cpt_bench.models import load_masked_lm
from cpt_bench.perplexity import masked_lm_perplexity
from cpt_bench.plugin import Method, SequenceState, method_class
from cpt_bench.results import SCHEMA, command_line, git_commit, metrics_block, versions, write_json_atomic
from cpt_bench.settings import as_dict, override, parse_set_options
from cpt_bench.suite import Suite, load_suite
from cpt_bench.trainer import Checkpointing, DapTrainer


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
    data: LoadedData | None = None  # every corpus and end task, read and validated
    original_model: Any = None  # the LM as loaded (each seed trains a copy)
    tokenizer: Any = None
    model_fingerprint: str = ""


def plan_run(request: RunRequest) -> RunPlan:
    """Check every option before any work: unknown names, bad orders, bad settings are BadInput."""
    suite = load_suite(request.suite)
    method_cls = method_class(request.method)
    if request.eval not in ("full", "final"):
        raise BadInput(f"--eval must be 'full' or 'final', got {request.eval!r}")
    if request.device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"--device must be auto, cpu or cuda, got {request.device!r}")
    if request.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is available")
    if request.limit is not None and request.limit <= 0:
        raise BadInput(f"--limit must be positive, got {request.limit}")
    if not request.seeds:
        raise BadInput("no --seed given")
    domains = suite.resolve_order(request.order)  # names, or row K of a named order ("paper:K")

    dap, finetune = suite.dap, suite.finetune
    if request.steps is not None:
        dap = override(dap, "steps", str(request.steps), "dap")
    method_settings = method_cls.Settings()
    method_blocks = {method_cls.name, *method_cls.aliases, "method"}
    finetune_keys_from_cli: set[str] = set()
    for block, values in parse_set_options(request.sets).items():
        for key, value in values.items():
            if block == "dap":
                dap = override(dap, key, value, "dap")
            elif block == "finetune":
                finetune = override(finetune, key, value, "finetune")
                finetune_keys_from_cli.add(key)
            elif block in method_blocks:
                method_settings = override(method_settings, key, value, method_cls.name)
            else:
                raise BadInput(f"--set {block}.{key}: unknown settings block {block!r} "
                               f"(known: dap, finetune, {method_cls.name})")
    plan = RunPlan(request, suite, list(domains), method_cls, method_settings, dap, finetune,
                   resolve_data_dir(suite, request.data_dir), request.model or suite.model)
    plan.data = LoadedData(plan)  # data problems surface before the (possibly slow) model load
    for task in plan.data.tasks + plan.data.probes:  # the command line beats a task's own settings in the suite
        task.finetune_overrides = {k: v for k, v in task.finetune_overrides.items() if k not in finetune_keys_from_cli}
    plan.original_model, plan.tokenizer = load_masked_lm(plan.model_name, request.trust_remote_code)
    plan.model_fingerprint = model_fingerprint(plan.original_model)  # once, not per seed: a full-weight hash
    plan.data.tokenizer = plan.tokenizer
    for task in plan.data.tasks + plan.data.probes:
        check_end_task(plan.tokenizer, plan.finetune, task)
    for corpus in plan.data.heldout:  # tokenised now: a held-out text too short for one block fails early
        plan.data.heldout_blocks(corpus, dap.seq_len, suite.perplexity.blocks)
    return plan


def resolve_data_dir(suite: Suite, data_dir: str | None) -> Path | None:
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise BadInput(f"--data-dir {data_dir}: no such directory")
        return path
    if suite.data_dir is not None:
        return (Path(suite.source_file).parent / suite.data_dir).resolve()
    if suite.generator is not None:
        from cpt_bench.synthetic import materialise

        return materialise(suite.generator)
    if suite.needs_data_dir():
        raise BadInput(f"suite {suite.name!r} reads its data from disk: give --data-dir DIR "
                       "(one folder per domain, see the README)")
    return None


class LoadedData:
    """Every corpus and end task of a plan, read and validated (before any training starts)."""

    def __init__(self, plan: RunPlan):
        suite, limit = plan.suite, plan.request.limit
        self.corpora: dict[str, Any] = {}
        self.tasks = []
        self.heldout: dict[str, tuple[list[str], str]] = {}  # corpus name -> held-out texts for perplexity
        cut = suite.perplexity.heldout_texts if suite.perplexity.blocks else 0
        for name in plan.domains:
            domain = suite.domain(name)
            texts, where = read_corpus(domain.corpus, domain.corpus_field, plan.data_dir, limit)
            if domain.heldout is not None:
                self.heldout[name] = read_corpus(domain.heldout, domain.corpus_field, plan.data_dir, limit)
            elif cut and len(texts) >= 4 * cut:  # hold out the corpus's last texts (never trained on)
                texts, self.heldout[name] = texts[:-cut], (texts[-cut:], f"{where} (last {cut} texts)")
            self.corpora[name] = (texts, where)
            self.tasks.append(read_end_task(name, domain.end_task, plan.data_dir, limit))
        self.probes = [read_end_task(p.name, p.end_task, plan.data_dir, limit) for p in suite.probes]
        if suite.perplexity.blocks:
            for name, source in suite.heldout_corpora.items():
                self.heldout[name] = read_corpus(source, "text", plan.data_dir, limit)
        self.tokenizer = None  # set once the model is loaded
        self._blocks: dict[str, Any] = {}

    def blocks(self, corpus: str, seq_len: int):
        if corpus not in self._blocks:
            texts, where = self.corpora[corpus]
            self._blocks[corpus] = mlm_blocks(texts, self.tokenizer, seq_len, where)
        return self._blocks[corpus]

    def heldout_blocks(self, corpus: str, seq_len: int, count: int):
        """The first `count` blocks of a corpus's held-out text."""
        key = f"heldout:{corpus}"
        if key not in self._blocks:
            texts, where = self.heldout[corpus]
            blocks = mlm_blocks(texts, self.tokenizer, seq_len, where)
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


def result_path(plan: RunPlan, seed: int, config: dict[str, Any]) -> Path:
    """One file per (method, order, seed); a different configuration gets a different file."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    order = "-".join(plan.domains)
    if len(order) > 60:
        order = hashlib.sha256(order.encode()).hexdigest()[:12]
    name = f"{plan.suite.name}__{plan.method_cls.name}__{order}__seed{seed}__{digest}.json"
    return Path(plan.request.output) / name


def execute(plan: RunPlan, seed: int, accelerator, stop_signal: StopSignal | None = None
            ) -> tuple[Path, dict[str, Any], dict[str, Any], WorkDir]:
    """Run one seed of a plan, resuming from its work directory; returns the result file's path, its content,
    the method's artifacts and the work directory (to remove once the result is written)."""
    from accelerate.utils import set_seed

    request = plan.request
    started = datetime.datetime.now(datetime.timezone.utc)
    model, tokenizer, data = copy.deepcopy(plan.original_model), plan.tokenizer, plan.data
    method = plan.method_cls(plan.method_settings)
    stages = method.plan_stages(plan.domains) if method.trains_lm else []
    config = {
        "method": method.name, "method_config": as_dict(plan.method_settings), "suite": plan.suite.name,
        "suite_fingerprint": plan.suite.fingerprint(), "domains": plan.domains, "seed": seed,
        "model": plan.model_name, "dap": as_dict(plan.dap), "finetune": as_dict(plan.finetune),
        "eval": request.eval, "limit": request.limit, "data": data.fingerprint,
    }
    path = result_path(plan, seed, config)

    model = model.to(accelerator.device)
    evaluator = EndTaskEvaluator(accelerator, tokenizer, plan.finetune, request.show_progress)
    work = WorkDir(Path(request.output) / ".work" / path.stem,
                   enabled=request.resume and accelerator.num_processes == 1)
    if request.fresh:
        work.clear()
    try:
        checkpoint = work.latest()  # (stage, step, state) of the newest checkpoint, or None
    except Exception as error:  # noqa: BLE001 - any damage or format change of the saved files
        raise BadInput(f"cannot read the checkpoint in {work.path} ({type(error).__name__}: {error}); "
                       f"run with --fresh to start over") from None
    stop = stop_signal or StopSignal()
    evaluator.stop = stop
    base_scores = cached_base_scores(plan, data, model, evaluator, seed)
    set_seed(seed)

    columns = len(plan.domains)
    perplexity_corpora = [c for c in plan.domains if c in data.heldout] + \
        [c for c in data.heldout if c not in plan.domains]
    if checkpoint is None:
        run = {"matrices": {"macro_f1": [], "accuracy": []},
               "probes": {p.name: {"base": base_scores["probes"][p.name]["macro_f1"], "stages": []}
                          for p in data.probes},
               "perplexity": {"corpora": perplexity_corpora, "blocks": plan.suite.perplexity.blocks,
                              "base": [heldout_perplexity(plan, data, model, c, accelerator)
                                       for c in perplexity_corpora], "stages": []},
               "stage_records": [], "learned": [], "started": started.isoformat(), "wall_before": 0.0,
               "git_commit": git_commit(),  # the code the run started with (edits during a run do not count)
               "finetune_seconds": {"matrix": [], "probes": {p.name: [] for p in data.probes}}}
    else:
        run = checkpoint[2]["run"]
        try:
            method.load_state_dict(checkpoint[2]["method"])  # before on_sequence_start: it rebuilds modules
        except Exception as error:  # noqa: BLE001 - a checkpoint of another version of the method
            raise BadInput(f"the checkpoint in {work.path} does not fit method {method.name} "
                           f"({type(error).__name__}: {error}); run with --fresh to start over") from None
        started = datetime.datetime.fromisoformat(run["started"])
        print(f"resuming {path.name} from stage {checkpoint[0] + 1} step {checkpoint[1]} "
              f"({work.path})", file=sys.stderr, flush=True)
    segment_started = time.perf_counter()
    matrices, probes, perplexity, stage_records = run["matrices"], run["probes"], run["perplexity"], \
        run["stage_records"]
    learned: set[int] = set(run["learned"])

    def run_state() -> dict[str, Any]:
        return {**run, "learned": sorted(learned),
                "wall_before": run["wall_before"] + time.perf_counter() - segment_started}

    trainer = DapTrainer(accelerator, tokenizer, plan.dap, method, seed, request.show_progress)
    method.on_sequence_start(SequenceState(model, tokenizer, accelerator, plan.domains, seed))
    for column, task in enumerate(data.tasks):
        method.observe_end_task(column, task.train.texts)
    resume_training = None
    if checkpoint is not None:
        if checkpoint[2]["kind"] == "mid_stage":
            resume_training = checkpoint[2]["training"]
        else:
            model.load_state_dict(checkpoint[2]["model"])
            set_rng_state(checkpoint[2]["rng"])
    for index, stage in enumerate(stages):
        if index < len(matrices["macro_f1"]):
            continue  # trained and evaluated before the interruption
        unknown = [c for c in stage.corpora if c not in plan.domains]
        if unknown:
            raise ValueError(f"method {method.name} planned a stage on unknown corpus {unknown[0]!r}")
        trained_now = {plan.domains.index(c) for c in stage.corpora}
        if index >= len(stage_records):
            blocks = _stage_blocks(data, stage.corpora, plan.dap.seq_len)

            def save_mid_stage(step: int, training: dict[str, Any], index=index) -> None:
                work.save_checkpoint(index, step, {"kind": "mid_stage", "run": run_state(),
                                                   "method": method.state_dict(), "training": training})

            record = trainer.train_stage(model, blocks, stage, index, Checkpointing(
                save_mid_stage, request.checkpoint_every if work.enabled else 0, stop, resume_training))
            resume_training = None
            stage_records.append(dataclasses.asdict(record))
            learned |= trained_now
            work.save_checkpoint(index, record.steps, {"kind": "stage_end", "run": run_state(),
                                                       "method": method.state_dict(), "model": model.state_dict(),
                                                       "rng": rng_state()})
        if request.eval == "full" or index == len(stages) - 1:
            scheduled = sorted(learned)
        else:
            scheduled = sorted(trained_now)
        evaluations = _row_evaluations(work, index)  # what this row already measured before an interruption

        # the closures below run at once; their defaults bind this row's values so that they could not drift
        def measured(key: str, compute, evaluations=evaluations, index=index, stage=stage) -> Any:
            """One measurement of this row: replayed from progress.json, or computed and saved there."""
            if key in evaluations:
                set_rng_state(evaluations[key]["rng"])
                return evaluations[key]["value"]
            if stop.requested:
                raise StopRequested(f"stopped by {stop.requested} while evaluating after stage {stage.name!r}")
            value = compute()
            evaluations[key] = {"value": value, "rng": _json_rng()}
            work.save_progress({"row": index, "evaluations": evaluations})
            return value

        row_f1: list[float | None] = [None] * columns
        row_acc: list[float | None] = [None] * columns
        row_seconds: list[float | None] = [None] * columns
        for column in method.end_tasks_after_stage(index, scheduled):
            task = data.tasks[column]
            scores = measured(f"task:{task.name}", lambda column=column, task=task: evaluator.evaluate(
                method.end_task_lm(model, column), task, finetune_seed(seed, task.name)))
            row_f1[column], row_acc[column] = scores["macro_f1"], scores["accuracy"]
            row_seconds[column] = scores.get("seconds")
        probe_scores = [measured(f"probe:{probe.name}", lambda probe=probe: evaluator.evaluate(
            method.probe_lm(model), probe, finetune_seed(seed, probe.name))) for probe in data.probes]
        # a learned domain is scored with the LM the method fine-tunes for it, anything else with its general LM
        perplexity_row = measured("perplexity", lambda learned=learned: [
            heldout_perplexity(plan, data, method.end_task_lm(model, plan.domains.index(c)) if c in plan.domains
                               and plan.domains.index(c) in learned else method.probe_lm(model), c, accelerator)
            for c in perplexity_corpora])
        matrices["macro_f1"].append(row_f1)
        matrices["accuracy"].append(row_acc)
        run["finetune_seconds"]["matrix"].append(row_seconds)
        for probe, scores in zip(data.probes, probe_scores):
            probes[probe.name]["stages"].append(scores["macro_f1"])
            run["finetune_seconds"]["probes"][probe.name].append(scores.get("seconds"))
        perplexity["stages"].append(perplexity_row)
        if index < len(stages) - 1:  # the row is complete: the next stage starts from this checkpoint
            work.save_checkpoint(index, stage_records[-1]["steps"], {
                "kind": "stage_end", "run": run_state(), "method": method.state_dict(),
                "model": model.state_dict(), "rng": rng_state()})

    base = {"macro_f1": [base_scores["tasks"][t.name]["macro_f1"] for t in data.tasks],
            "accuracy": [base_scores["tasks"][t.name]["accuracy"] for t in data.tasks]}
    if not stages:  # no DAP: the only row is the original model's
        matrices = {k: [list(v)] for k, v in base.items()}
    square = bool(stages) and [s.corpora for s in stages] == [[d] for d in plan.domains]
    metrics = metrics_block(matrices, base, square and method.trains_lm)
    finished = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "schema": SCHEMA,
        "method": method.name,
        "method_config": as_dict(plan.method_settings),
        "suite": plan.suite.name,
        "domains": plan.domains,
        "seed": seed,
        "model": plan.model_name,
        "matrix": matrices,
        "matrix_rows": [s.name for s in stages] if stages else ["base"],
        "base": base,
        "metrics": metrics,
        "probes": probes,
        "perplexity": perplexity,
        "stages": stage_records,
        "truncated_examples": evaluator.truncated,  # task -> split -> examples longer than finetune.max_length
        "finetune_seconds": {**run["finetune_seconds"],  # wall seconds of each fine-tune (same layout as matrix)
                             "base": [base_scores["tasks"][t.name].get("seconds") for t in data.tasks]},
        "wall_seconds": round(run["wall_before"] + time.perf_counter() - segment_started, 3),
        "overhead": method.overhead(model),
        "method_summary": method.summary(),
        "settings": {"dap": as_dict(plan.dap), "finetune": as_dict(plan.finetune), "eval": request.eval,
                     "limit": request.limit,
                     "end_tasks": {t.name: {"evaluator": EVALUATOR_NAMES[t.evaluator],
                                            "finetune_overrides": t.finetune_overrides}
                                   for t in plan.data.tasks + plan.data.probes}},
        "provenance": {
            "git_commit": run["git_commit"], "versions": versions(), "started": started.isoformat(),
            "finished": finished.isoformat(), "device": describe_device(accelerator),
            "command": command_line(), "config_hash": path.stem.rsplit("__", 1)[-1],
        },
    }
    if git_commit() != run["git_commit"]:  # the tree changed while the run ran, or between crash and resume
        result["provenance"]["git_commit_at_finish"] = git_commit()
    return path, result, method.artifacts(), work


def _row_evaluations(work: WorkDir, row: int) -> dict[str, Any]:
    progress = work.load_progress()
    return dict(progress["evaluations"]) if progress and progress.get("row") == row else {}


def _json_rng() -> dict[str, Any]:
    """The RNG states as JSON (for progress.json): tensors as lists (set_rng_state takes either)."""
    state = rng_state()
    return {"python": state["python"], "torch": state["torch"].tolist(),
            "numpy": [state["numpy"][0], state["numpy"][1].tolist(), *state["numpy"][2:]],
            **({"cuda": [t.tolist() for t in state["cuda"]]} if "cuda" in state else {})}


def heldout_perplexity(plan: RunPlan, data: LoadedData, lm: torch.nn.Module, corpus: str, accelerator) -> float:
    blocks = data.heldout_blocks(corpus, plan.dap.seq_len, plan.suite.perplexity.blocks)
    return round(masked_lm_perplexity(lm, blocks, plan.tokenizer, accelerator, plan.dap.batch_size,
                                      plan.dap.mlm_probability), 5)


def _stage_blocks(data: LoadedData, corpora: list[str], seq_len: int):
    import datasets

    parts = [data.blocks(c, seq_len) for c in corpora]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


EVALUATOR_NAMES = {"head": "fine-tune a classification head on the first token",
                   "prompt": "prompt-based fine-tuning of the whole LM (verbalizer words at the mask)"}


def finetune_seed(run_seed: int, task_name: str) -> int:
    # the same seed for a task after every stage: differences between rows come from the LM, not the head
    return derive_seed(run_seed, "finetune", task_name)


def cached_base_scores(plan: RunPlan, data: LoadedData, model, evaluator: EndTaskEvaluator,
                       seed: int) -> dict[str, Any]:
    """End-task and probe scores of the original model, cached per (suite data, model, seed, settings)."""
    key_parts = {"data": data.fingerprint, "model": plan.model_fingerprint, "seed": seed,
                 "finetune": as_dict(plan.finetune), "max_length": plan.finetune.max_length,
                 "device": evaluator.accelerator.device.type}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "base-scores" / f"{key}.json"
    names = [t.name for t in data.tasks] + [p.name for p in data.probes]
    cached: dict[str, Any] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    scores = cached.get("scores", {})
    missing = [t for t in data.tasks + data.probes if t.name not in scores]
    for task in missing:
        scores[task.name] = evaluator.evaluate(model, task, finetune_seed(seed, task.name))
    if missing and evaluator.accelerator.is_main_process:
        write_json_atomic(path, {"key": key_parts, "scores": scores})
    return {"tasks": {n: scores[n] for n in names[: len(data.tasks)]},
            "probes": {p.name: scores[p.name] for p in data.probes}}


def describe_device(accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import os
        name = f"cpu ({os.cpu_count()} cores)"
    return f"{name}; processes={accelerator.num_processes}; precision={accelerator.mixed_precision}"


def make_accelerator(plan: RunPlan):
    from accelerate import Accelerator

    # "auto" without a GPU is the CPU, said explicitly: accelerate joins several launched processes on the CPU
    # (gloo) only when told cpu=True, and otherwise runs each of them alone
    cpu = plan.request.device == "cpu" or (plan.request.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision=plan.dap.precision)
