"""A run's identity: its configuration (everything that makes two runs the same run), the configuration's hash
and the result file's path. `cpt-bench run` (runner.SeedRun) and `cpt-bench sweep` (sweeps.grid, which must
know every run's result file before it starts any) both call `run_key` on a data plan made by the same
`run_data.plan_data` (a `plan.RunPlan` is one, with its model), so a sweep's predicted file is the run's file
by construction: a step added to planning moves both. The configuration needs the data (the end tasks'
fingerprint) but no model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from cpt_bench.common.settings import DataSettings, as_dict, hashed_dap_settings
from cpt_bench.running.run_data import DataPlan

ORDER_IN_NAME_MAX = 60  # a longer domain order is hashed in the file name (file systems cap names at 255 bytes)


@dataclasses.dataclass(frozen=True)
class RunKey:
    """Who a run is: its configuration, the configuration's hash, and the result file it writes."""

    configuration: dict[str, Any]
    config_hash: str  # 8 hex digits of SHA-256 over the configuration (result file names, provenance)
    result_path: Path

    @property
    def stem(self) -> str:
        """The result file's name without `.json`: also the name of the run's work folder and lock."""
        return self.result_path.stem


def run_configuration(plan: DataPlan, seed: int) -> dict[str, Any]:
    """Everything that makes two runs the same run (hashed into the result file's name)."""
    configuration = {
        "method": plan.method_cls.name, "method_config": as_dict(plan.method_settings), "suite": plan.suite.name,
        "suite_fingerprint": plan.suite.fingerprint(), "domains": plan.domains, "seed": seed,
        "model": plan.model_name, "dap": hashed_dap_settings(as_dict(plan.dap)), "finetune": as_dict(plan.finetune),
        "eval": plan.request.eval, "limit": plan.request.limit, "data": plan.data.fingerprint}
    if plan.data_settings != DataSettings():  # only when set: earlier runs keep their file names
        configuration["data_settings"] = as_dict(plan.data_settings)
    return configuration


def run_key(plan: DataPlan, seed: int) -> RunKey:
    """The identity of one seed of a plan: one file per (method, order, seed) in the request's output folder; a
    different configuration gets a different file."""
    configuration = run_configuration(plan, seed)
    digest = hashlib.sha256(json.dumps(configuration, sort_keys=True, default=str).encode()).hexdigest()[:8]
    order = "-".join(plan.domains)
    if len(order) > ORDER_IN_NAME_MAX:
        order = hashlib.sha256(order.encode()).hexdigest()[:12]
    name = f"{plan.suite.name}__{plan.method_cls.name}__{order}__seed{seed}__{digest}.json"
    return RunKey(configuration, digest, Path(plan.request.output) / name)
