"""Result files (CONTRACT.md): metrics from the score matrix, provenance, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = "cpt-bench/run/v1"


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def final_scores(matrix: list[list[float | None]]) -> list[float | None]:
    """Per column, the score after the latest stage that evaluated it (the last row for continual methods)."""
    if not matrix:
        return []
    columns = len(matrix[0])
    latest: list[float | None] = [None] * columns
    for row in matrix:
        for j, value in enumerate(row):
            if value is not None:
                latest[j] = value
    return latest


def run_metrics(matrix: list[list[float | None]], base: list[float], square: bool) -> dict[str, float | None]:
    """Final score, forgetting and transfer of one metric's matrix (rows = stages, columns = domains).

    `square`: stage i trained domain i, so A[j][j] is "just after learning j" (continual methods, `one`).
    Metrics that a matrix cannot define are None (null), never 0.
    """
    finals = final_scores(matrix)
    final = _mean(finals) if finals and all(v is not None for v in finals) else None
    forgetting = transfer = None
    if square and matrix:
        t = len(matrix)
        last = matrix[-1]
        pairs = [(matrix[j][j], last[j]) for j in range(t - 1)]
        if t > 1 and all(a is not None and b is not None for a, b in pairs):
            forgetting = _mean([a - b for a, b in pairs])  # paper: mean_j<T-1 A[j][j] - A[T-1][j]
        diagonal = [matrix[j][j] for j in range(t)]
        if all(v is not None for v in diagonal):
            transfer = _mean([d - b for d, b in zip(diagonal, base)])  # mean_j A[j][j] - base[j]
    return {"final": final, "forgetting": forgetting, "transfer": transfer}


def metrics_block(matrices: dict[str, list[list[float | None]]], base: dict[str, list[float]],
                  square: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in ("macro_f1", "accuracy"):
        values = run_metrics(matrices[metric], base[metric], square)
        out[f"final_{metric}"] = values["final"]
        out[f"forgetting_{metric}"] = values["forgetting"]
        out[f"transfer_{metric}"] = values["transfer"]
    return out


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
    from cpt_bench.settings import DapSettings, FinetuneSettings

    settings = json.loads(json.dumps(result.get("settings") or {}))
    for task in (settings.get("end_tasks") or {}).values():
        if isinstance(task, dict):
            task.pop("truncated_examples", None)
    for block, cls in (("dap", DapSettings), ("finetune", FinetuneSettings)):
        if isinstance(settings.get(block), dict):
            settings[block] = _with_absent_settings(cls, settings[block])
    return settings


def method_configuration(result: dict[str, Any]) -> dict[str, Any]:
    """A result's `method_config`, with settings the method gained since the file was written filled in as
    the run ran them (so an older run and a new one of the same setup compare equal)."""
    from cpt_bench.plugin import METHODS, load_plugins

    config = dict(result.get("method_config") or {})
    load_plugins()
    cls = getattr(METHODS.get(result.get("method", "")), "Settings", None)
    return _with_absent_settings(cls, config) if dataclasses.is_dataclass(cls) else config


def _with_absent_settings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    from cpt_bench.settings import value_when_absent

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


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a partial file."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def load_result(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} result file")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            # a malformed file, as above: the report's loader turns ValueError into a one-line error
            raise ValueError(f"key {key!r} is missing or not a {kind.__name__}")  # noqa: TRY004
    return data


REQUIRED_KEYS = {"method": str, "suite": str, "domains": list, "seed": int, "model": str, "metrics": dict}


def write_artifacts(result_path: Path, artifacts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Save each tensor collection as `<result stem>.<name>.safetensors` (atomically); returns name -> file."""
    from safetensors.torch import save_file

    written = {}
    for name, tensors in artifacts.items():
        path = result_path.with_name(f"{result_path.stem}.{name}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written[name] = path.name
    return written
