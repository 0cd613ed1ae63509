"""`cpt-bench check`: the regression gate. Runs are compared with reference runs of the same configuration;
a metric regresses when it is worse than the reference mean by more than the metric's absolute tolerance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from cpt_bench.common.errors import BadInput
from cpt_bench.evaluation.metrics import gateable_metrics
from cpt_bench.report.table import load_results
from cpt_bench.running.results import configuration_settings, method_configuration

TOLERANCE_FILE = "tolerances.yaml"


@dataclasses.dataclass
class Finding:
    method: str
    metric: str
    value: float | None
    reference: float
    tolerance: float
    configuration: str

    @property
    def regressed(self) -> bool:
        if self.value is None:
            return True  # the reference has the metric, the run lost it
        metric = gateable_metrics()[self.metric]
        gap = self.reference - self.value if metric.higher_is_better else self.value - self.reference
        return gap > self.tolerance + 1e-12

    def line(self) -> str:
        status = "REGRESSION" if self.regressed else "ok"
        shown = "missing" if self.value is None else f"{self.value:.4f}"
        return (f"{status:10s} {self.method:10s} {self.metric:20s} {shown} vs reference {self.reference:.4f} "
                f"(tolerance {self.tolerance:g}; {self.configuration})")


def read_tolerances(reference_dir: Path) -> dict[str, float]:
    path = reference_dir / TOLERANCE_FILE
    if not path.is_file():
        raise BadInput(f"no tolerance file {path} (a mapping of metric name to absolute tolerance)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise BadInput(f"{path}: expected a mapping of metric name to absolute tolerance")
    tolerances, known = {}, gateable_metrics()
    for name, value in data.items():
        if name not in known:
            raise BadInput(f"{path}: unknown metric {name!r} (known: {', '.join(known)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise BadInput(f"{path}: tolerance of {name} must be a non-negative number, got {value!r}")
        tolerances[name] = float(value)
    return tolerances


def configuration_key(result: dict[str, Any]) -> tuple:
    """Runs compare when suite, method, domain order, model and every setting agree (seeds may differ)."""
    return (result["suite"], result["method"], tuple(result["domains"]), result["model"],
            json.dumps(method_configuration(result), sort_keys=True),
            json.dumps(configuration_settings(result), sort_keys=True))


def describe(key: tuple) -> str:
    return f"suite {key[0]}, order {','.join(key[2])}, model {key[3]}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def check(run_paths: list[str], reference_dir: str) -> tuple[list[Finding], list[str]]:
    """Findings for every (configuration, metric) with a reference, and notes on unmatched runs."""
    folder = Path(reference_dir)
    if not folder.is_dir():
        raise BadInput(f"--reference {reference_dir}: no such directory")
    tolerances = read_tolerances(folder)
    references = _by_configuration(load_results([str(folder)]))
    runs = _by_configuration(load_results(run_paths))
    findings, notes = [], []
    for key, group in sorted(runs.items()):
        if key not in references:
            notes.append(f"no reference for {group[0]['method']} ({describe(key)}): not checked")
            continue
        for name, tolerance in tolerances.items():
            metric = gateable_metrics()[name]
            reference = _mean([metric.value(r) for r in references[key]])
            if reference is None:
                continue  # undefined for this method (e.g. forgetting of `one`)
            findings.append(Finding(group[0]["method"], name, _mean([metric.value(r) for r in group]), reference,
                                    tolerance, describe(key)))
    if not findings:
        raise BadInput("no run matches a reference configuration (same suite, method, order, model and "
                       "settings); nothing was checked")
    return findings, notes


def _by_configuration(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(configuration_key(r), []).append(r)
    return groups
