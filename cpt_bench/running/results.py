"""Result files (CONTRACT.md): metrics from the score matrix, provenance, atomic writes."""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from cpt_bench.common.atomic import write_safetensors_atomic
from cpt_bench.common.settings import DapSettings, DataSettings, FinetuneSettings, value_when_absent
from cpt_bench.evaluation.metrics import MATRICES, final_scores, metrics_block, run_metrics  # noqa: F401 - re-exported
from cpt_bench.training.plugin import METHODS, load_plugins

SCHEMA = "cpt-bench/run/v1"


def git_commit() -> str:
    """HEAD of the source tree, with "+dirty" when tracked files differ from it."""
    where = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=where, capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], check=False, cwd=where,
                               capture_output=True, timeout=5).returncode == 1
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def configuration_settings(result: dict[str, Any]) -> dict[str, Any]:
    """A result's `settings` without what was measured rather than chosen (result files written by earlier
    versions kept per-task truncation counts there), with settings added since the file was written filled
    in as the run ran them: what decides whether two runs are the same setup."""
    settings = json.loads(json.dumps(result.get("settings") or {}))
    for task in (settings.get("end_tasks") or {}).values():
        if isinstance(task, dict):
            task.pop("truncated_examples", None)
            task.pop("examples", None)  # split sizes: what the data gave, recorded beside the settings
            task.pop("dev_split", None)  # likewise: where the dev split came from
    for block, cls in (("dap", DapSettings), ("finetune", FinetuneSettings)):
        if isinstance(settings.get(block), dict):
            settings[block] = _with_absent_settings(cls, settings[block])
    settings["data"] = _with_absent_settings(DataSettings, settings.get("data") or {})  # a block added later
    return settings


def method_configuration(result: dict[str, Any]) -> dict[str, Any]:
    """A result's `method_config`, with settings the method gained since the file was written filled in as
    the run ran them (so an older run and a new one of the same setup compare equal)."""
    config = dict(result.get("method_config") or {})
    load_plugins()
    cls = getattr(METHODS.get(result.get("method", "")), "Settings", None)
    return _with_absent_settings(cls, config) if dataclasses.is_dataclass(cls) else config


def _with_absent_settings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    return {**{f.name: value_when_absent(f) for f in dataclasses.fields(cls)}, **values}


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    import cpt_bench

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "accelerate": accelerate.__version__, "cpt_bench": cpt_bench.__version__}


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def load_result(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return checked_result(json.load(handle))


def is_result(data: Any) -> bool:
    """Whether parsed JSON says it is a result file (its `schema`); whether it is a sound one, `checked_result`
    decides."""
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def checked_result(data: Any) -> dict[str, Any]:
    """`data` if it is a result file that follows the JSON Schema (so every value a report reads has its type);
    ValueError naming the first problem otherwise (the report's loader turns it into one line)."""
    if not is_result(data):
        raise ValueError(f"not a {SCHEMA} result file")
    validate_result(data, "it")
    return data


def write_artifacts(result_path: Path, artifacts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Save each tensor collection as `<result stem>.<name>.safetensors` (atomically); returns name -> file."""
    written = {}
    for name, tensors in artifacts.items():
        path = result_path.with_name(f"{result_path.stem}.{name}.safetensors")
        write_safetensors_atomic(path, tensors)
        written[name] = path.name
    return written


# ---------------------------------------------------------------- a run's measurements and its result file

@dataclasses.dataclass
class RunMeasurements:
    """What a run has measured so far, laid out as in the result file. Every checkpoint keeps it, so a resumed
    run continues it."""

    matrices: dict[str, list[list[float | None]]]  # metric -> rows evaluated so far
    probes: dict[str, dict[str, Any]]  # probe -> {base, stages}
    perplexity: dict[str, Any]  # {corpora, blocks, objective, base, stages, bits_per_byte: {base, stages}}
    stage_records: list[dict[str, Any]]  # one per stage trained
    finetune_seconds: dict[str, Any]  # {matrix: rows like `matrices`, probes: {probe: [seconds per stage]}}
    learned: list[int]  # domains (indices) DAP-trained so far
    started: str  # when the run started (ISO 8601, UTC)
    git_commit: str  # the code the run started with (edits during a run do not count)
    wall_before: float = 0.0  # seconds spent by the processes before this one
    flops: float = 0.0  # approximate DAP FLOPs so far, extra passes included (cpt_bench/models/compute.py)

    @property
    def rows_done(self) -> int:
        return len(self.matrices["macro_f1"])

    def add_row(self, scores: list[dict[str, Any] | None], probe_scores: dict[str, dict[str, Any]],
                perplexity_row: list[tuple[float, float]]) -> None:
        """The evaluation after one stage: each domain's end-task scores (None: not evaluated), each probe's."""
        for metric in MATRICES:
            self.matrices[metric].append([None if s is None else s[metric] for s in scores])
        self.finetune_seconds["matrix"].append([None if s is None else s.get("seconds") for s in scores])
        for name, probe in probe_scores.items():
            self.probes[name]["stages"].append(probe["macro_f1"])
            self.finetune_seconds["probes"][name].append(probe.get("seconds"))
        self.perplexity["stages"].append([perplexity for perplexity, _ in perplexity_row])
        if "bits_per_byte" in self.perplexity:  # absent from checkpoints written before it existed
            self.perplexity["bits_per_byte"]["stages"].append([bits for _, bits in perplexity_row])


@dataclasses.dataclass
class RunIdentity:
    """What a result file is about: its first keys."""

    method: str
    method_config: dict[str, Any]
    suite: str
    domains: list[str]
    seed: int
    model: str


def build_result(identity: RunIdentity, measured: RunMeasurements, base_scores: dict[str, dict[str, Any]],
                 stage_names: list[str], square: bool, truncated_examples: dict[str, dict[str, int]],
                 details: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The result file (CONTRACT.md; `result.schema.json`) of a finished run. `base_scores` are the original
    model's scores by domain; `square`: stage i trained domain i alone (forgetting and transfer are defined);
    `truncated_examples`: task -> split -> examples longer than finetune.max_length; `details`: the keys after
    `finetune_seconds` (wall time, overhead, method summary, settings)."""
    domains = identity.domains
    base = {metric: [base_scores[d][metric] for d in domains] for metric in MATRICES}
    matrices = measured.matrices if stage_names else {k: [list(v)] for k, v in base.items()}  # `base`: one row
    return {
        "schema": SCHEMA,
        **dataclasses.asdict(identity),
        "matrix": matrices,
        "matrix_rows": stage_names or ["base"],
        "base": base,
        "metrics": metrics_block(matrices, base, square),
        "probes": measured.probes,
        "perplexity": measured.perplexity,
        "stages": measured.stage_records,
        # DAP tokens trained on, and the approximate FLOPs of every pass made for them (cpt_bench/models/compute.py)
        "compute": {"tokens": sum(int(s.get("tokens", 0)) for s in measured.stage_records),
                    "flops": float(measured.flops)},
        "truncated_examples": truncated_examples,
        # wall seconds of each fine-tune (same layout as matrix)
        "finetune_seconds": {**measured.finetune_seconds, "base": [base_scores[d].get("seconds") for d in domains]},
        **details,
        "provenance": provenance,
    }


SCHEMA_FILE = Path(__file__).with_name("result.schema.json")


def load_schema() -> dict[str, Any]:
    """The result file's JSON Schema (`cpt_bench/running/result.schema.json`)."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@functools.cache
def schema_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema())


def validate_result(result: dict[str, Any], where: str) -> None:
    """ValueError naming `where` and the first place where `result` does not follow the JSON Schema."""
    import jsonschema

    error = jsonschema.exceptions.best_match(schema_validator().iter_errors(result))
    if error is not None:
        path = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ValueError(f"{where} does not follow {SCHEMA_FILE.name} at {path}: {error.message}")
