"""Experiment trackers for `cpt-bench run --report-to tensorboard|wandb|mlflow` through accelerate's trackers.

Each run (one result file) is one tracker run, named after its result file, that logs:
- every optimizer step: `train/loss` (and each loss term a method logs), `train/lr`, `train/tokens_per_second`,
  at the global step (the steps of the earlier stages plus the stage's own);
- after every stage: each evaluated end task's macro-F1 (`eval/<task>/macro_f1`), each probe, each held-out
  perplexity (`perplexity/<corpus>`);
- at the end: the final metrics (`final/<metric>`) and the score matrix as a Markdown table (`matrix/macro_f1`)
  and cell by cell (`matrix/after_<stage>/<task>`).

Everything stays on this machine: TensorBoard event files and an MLflow file store (mlruns/) under
OUTPUT/trackers, W&B in offline mode under OUTPUT/trackers/wandb unless credentials (WANDB_API_KEY) or WANDB_MODE
say otherwise; MLFLOW_TRACKING_URI and WANDB_DIR, when set, win.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from cpt_bench.common.errors import BadInput

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> its package


def check_tracker(report_to: str) -> None:
    """A one-line error for an unknown tracker or one whose package is missing (which extra to install)."""
    if report_to == "none":
        return
    if report_to not in TRACKERS:
        raise BadInput(f"--report-to must be one of none, {', '.join(TRACKERS)}; got {report_to!r}")
    if importlib.util.find_spec(TRACKERS[report_to]) is None:
        raise BadInput(f"--report-to {report_to}: the package {TRACKERS[report_to]!r} is not installed "
                       f"(pip install \"cpt-bench[{report_to}]\")")


def accelerator_options(report_to: str, output: str) -> dict[str, Any]:
    """Accelerator(...) keyword arguments for the tracker; local storage under OUTPUT/trackers."""
    if report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    folder = Path(output).resolve() / "trackers"
    if report_to == "wandb":
        os.environ.setdefault("WANDB_DIR", str(folder))
        if "WANDB_API_KEY" not in os.environ:
            os.environ.setdefault("WANDB_MODE", "offline")
    # MLflow: a local file store, which needs no database package (mlflow-skinny has none); recent MLflow refuses
    # it unless allowed; a user's own MLFLOW_TRACKING_URI (a server, a database) wins
    if report_to == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = (folder / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    folder.mkdir(parents=True, exist_ok=True)
    return {"log_with": report_to, "project_config": ProjectConfiguration(project_dir=str(folder),
                                                                          logging_dir=str(folder))}


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"a.b": scalar}: what every tracker accepts as hyperparameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[name] = "none" if value is None else value
        else:
            flat[name] = str(value)
    return flat


class RunTracker:
    """One run's tracker run; does nothing when the accelerator has no tracker."""

    def __init__(self, accelerator, run_name: str, config: dict[str, Any], stage_steps: list[int]):
        self.accelerator = accelerator
        self.enabled = bool(getattr(accelerator, "log_with", None))
        # the global step at the start of each stage
        self.offsets = [sum(stage_steps[:i]) for i in range(len(stage_steps) + 1)]
        if self.enabled:
            accelerator.init_trackers(run_name, config=flat_config(config))

    def step(self, stage_index: int, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            self.accelerator.log({f"train/{k}": v for k, v in values.items()}, step=self.offsets[stage_index] + step)

    def stage(self, stage_index: int, values: dict[str, float]) -> None:
        if self.enabled:
            self.accelerator.log(values, step=self.offsets[stage_index + 1])

    def finish(self, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = {f"final/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        # the matrix twice: as a Markdown table (TensorBoard's text tab) and cell by cell as numbers (what
        # MLflow keeps: it drops text values)
        rows = result.get("matrix_rows") or result["domains"]
        cells = {f"matrix/after_{row}/{task}": value for row, values in zip(rows, result["matrix"]["macro_f1"])
                 for task, value in zip(result["domains"], values) if value is not None}
        self.accelerator.log({**metrics, **cells, "matrix/macro_f1": matrix_markdown(result)}, step=self.offsets[-1])
        self.accelerator.end_training()


def matrix_markdown(result: dict[str, Any]) -> str:
    """The macro-F1 matrix as a Markdown table: row i after stage i, column j the end task of domain j."""
    domains = result["domains"]
    lines = ["| after \\ task | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|",
             "| base | " + " | ".join(f"{v:.3f}" for v in result["base"]["macro_f1"]) + " |"]
    for name, row in zip(result.get("matrix_rows") or domains, result["matrix"]["macro_f1"]):
        lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
