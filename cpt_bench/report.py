"""Aggregating result files: group by (suite, method, order), mean ± std over seeds."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cpt_bench.errors import BadInput
from cpt_bench.results import load_result

METRIC_COLUMNS = {
    "final MF1": ("metrics", "final_macro_f1"),
    "final Acc": ("metrics", "final_accuracy"),
    "forgetting MF1": ("metrics", "forgetting_macro_f1"),
    "transfer MF1": ("metrics", "transfer_macro_f1"),
}


def find_result_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.json") if not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(f"no such result file or folder: {raw}")
    return files


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    results = []
    for file in find_result_files(paths):
        try:
            results.append(load_result(file))
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadInput(f"{file}: not a readable result file ({str(error).splitlines()[0][:120]})") from None
    if not results:
        raise BadInput(f"no result files found in {', '.join(paths)}")
    return results


def general_retention(result: dict[str, Any]) -> float | None:
    """Probe score after the last stage minus before any DAP (negative = general knowledge lost)."""
    probe = result.get("probes", {}).get("general")
    if not probe or not probe.get("stages"):
        return None
    return probe["stages"][-1] - probe["base"]


def wall_seconds(result: dict[str, Any]) -> float | None:
    """Wall time of the run (training, fine-tuning, evaluation), from the result file."""
    if "wall_seconds" in result:
        return result["wall_seconds"]
    provenance = result.get("provenance", {})
    try:
        started = datetime.datetime.fromisoformat(provenance["started"])
        finished = datetime.datetime.fromisoformat(provenance["finished"])
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


def rows(results: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for r in results:
        record = {"suite": r["suite"], "method": r["method"], "order": ",".join(map(str, r["domains"])),
                  "model": r["model"], "config": config_label(results, r), "seed": r["seed"]}
        for column, (block, key) in METRIC_COLUMNS.items():
            record[column] = r[block].get(key)
        record["general Δ"] = general_retention(r)
        record["wall s"] = wall_seconds(r)
        overhead = r.get("overhead")
        record["overhead M"] = sum(overhead.values()) / 1e6 if overhead else None
        records.append(record)
    return pd.DataFrame.from_records(records)


def _flat_config(result: dict[str, Any]) -> dict[str, str]:
    """Every setting of a run as `block.key` -> JSON value (the method's block is named after the method)."""
    blocks = {result["method"]: result.get("method_config") or {}, **(result.get("settings") or {})}
    flat = {}
    for block, values in blocks.items():
        if isinstance(values, dict):
            flat.update({f"{block}.{k}": json.dumps(v, sort_keys=True) for k, v in values.items()})
        else:
            flat[block] = json.dumps(values, sort_keys=True)
    return flat


def config_label(results: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The settings in which this run differs from the usual (most common) value among the runs of the
    same (suite, method, order, model), e.g. `softmask.contrastive=false`; empty for the usual setup."""
    same = [r for r in results if (r["suite"], r["method"], r["domains"], r["model"]) ==
            (result["suite"], result["method"], result["domains"], result["model"])]
    flats = [_flat_config(r) for r in same]
    mine = _flat_config(result)
    differences = []
    for key in sorted(set().union(*flats)):
        values = [f.get(key) for f in flats]
        if len(set(values)) < 2:
            continue
        usual = max(sorted(set(values), key=str), key=values.count)  # the most common value: not shown
        if mine.get(key) != usual:
            differences.append(f"{key}={mine[key]}" if key in mine else f"{key} unset")
    return ", ".join(differences).replace('"', "")


def summarise(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (suite, method, order, model, configuration): seeds, and mean/std of each metric over
    seeds (ddof=1). Runs that differ in model or any setting are never averaged together."""
    frame = rows(results)
    keys = ["suite", "method", "order", "model", "config"]
    value_columns = [c for c in frame.columns if c not in (*keys, "seed")]
    out = []
    for (suite, method, order, model, config), group in frame.groupby(keys, sort=True):
        record: dict[str, Any] = {"suite": suite, "method": method, "order": order, "model": model,
                                  "config": config, "seeds": ",".join(str(s) for s in sorted(group["seed"]))}
        for column in value_columns:
            values = [float(v) for v in group[column] if v is not None and not _isnan(v)]
            record[f"{column} mean"] = sum(values) / len(values) if values else None
            record[f"{column} std"] = _std(values)
            record[f"{column} n"] = len(values)
        out.append(record)
    return pd.DataFrame.from_records(out)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_cell(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"wall s": 0, "overhead M": 2}  # seconds and millions of numbers need no more


def render(summary: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":
        return summary.to_json(orient="records", indent=2)
    if fmt == "csv":
        return summary.to_csv(index=False)
    if fmt != "markdown":
        raise BadInput(f"--format {fmt!r} is not supported (use markdown, csv or json)")
    metric_names = [c[: -len(" mean")] for c in summary.columns if c.endswith(" mean")]
    identity = ["method", "suite", "order", "seeds"]
    if summary.groupby(["suite", "method", "order"])["model"].nunique().max() > 1:
        identity.insert(3, "model")
    if summary.groupby(["suite", "method", "order", "model"])["config"].nunique().max() > 1:
        identity.insert(3, "config")  # same method run with different settings: tell the rows apart
    table = summary[identity].copy()
    for name in metric_names:
        table[name] = [format_cell(m if not _isnan(m) else None, s if not _isnan(s) else None,
                                   DIGITS.get(name, 3))
                       for m, s in zip(summary[f"{name} mean"], summary[f"{name} std"])]
    return table.to_markdown(index=False, disable_numparse=True)  # keep "0.500": cells are text


def report(paths: list[str], fmt: str = "markdown") -> str:
    return render(summarise(load_results(paths)), fmt)
