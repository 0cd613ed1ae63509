"""Plots of a report (matplotlib, PNG): per method, the end-task score matrix as a heatmap, each domain's score
over the stages (forgetting made visible), and the held-out MLM perplexity matrix."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

from cpt_bench.common.atomic import write_bytes_atomic
from cpt_bench.report.table import Group


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _mean_matrix(runs: list[dict[str, Any]], rows_of: Any) -> list[list[float | None]]:
    """Element-wise mean over runs of equally shaped matrices (None where no run has a value)."""
    matrices = [rows_of(r) for r in runs]
    matrices = [m for m in matrices if m]
    if not matrices:
        return []
    shape = (len(matrices[0]), len(matrices[0][0]))
    matrices = [m for m in matrices if (len(m), len(m[0])) == shape]
    out = []
    for i in range(shape[0]):
        row = []
        for j in range(shape[1]):
            values = [m[i][j] for m in matrices if m[i][j] is not None]
            row.append(sum(values) / len(values) if values else None)
        out.append(row)
    return out


def _main_order_runs(group: Group) -> list[dict[str, Any]]:
    """The runs of the group's most common domain order (matrices of different orders do not align)."""
    orders = Counter(tuple(r["domains"]) for r in group.runs)
    order = orders.most_common(1)[0][0]
    return [r for r in group.runs if tuple(r["domains"]) == order]


def _heatmap(ax, matrix, row_labels, column_labels, title, fmt, cmap, vmin=None, vmax=None):
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(column_labels)), labels=column_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def group_figures(group: Group) -> dict[str, bytes]:
    """PNG bytes by plot name ("matrix", "curves", "perplexity") for one row of the report."""
    plt = _pyplot()
    runs = _main_order_runs(group)
    domains = runs[0]["domains"]
    rows_of_first = ((runs[0].get("matrix") or {}).get("macro_f1")) or []
    stage_names = runs[0].get("matrix_rows") or [f"stage {i}" for i in range(len(rows_of_first))]
    seeds = f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
    figures: dict[str, bytes] = {}
    matrix = _mean_matrix(runs, lambda r: r.get("matrix", {}).get("macro_f1"))
    if matrix:
        base = _mean_matrix(runs, lambda r: [r["base"]["macro_f1"]] if r.get("base") else None)
        rows = (base or []) + matrix
        labels = (["base"] if base else []) + [f"after {s}" for s in stage_names]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(domains), 1.0 + 0.45 * len(rows)))
        _heatmap(ax, rows, labels, domains, f"{group.title}: macro-F1 ({seeds})", ".2f", "viridis", 0, 1)
        figures["matrix"] = _png(fig)

        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for j, domain in enumerate(domains):
            points = [(i, row[j]) for i, row in enumerate(rows) if row[j] is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=domain)
        ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
        ax.set_ylabel("macro-F1")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{group.title}: each domain over the stages", fontsize=9)
        ax.legend(fontsize=7)
        figures["curves"] = _png(fig)

    def perplexity_rows(result: dict[str, Any]) -> list[list[float]] | None:  # base, then after each stage
        block = result.get("perplexity") or {}
        return [block.get("base"), *block.get("stages", [])] if block.get("corpora") else None

    perplexity = _mean_matrix(runs, perplexity_rows)
    if perplexity:
        corpora = runs[0]["perplexity"]["corpora"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(corpora), 1.0 + 0.45 * len(perplexity)))
        _heatmap(ax, perplexity, ["base", *[f"after {s}" for s in stage_names][:len(perplexity) - 1]], corpora,
                 f"{group.title}: held-out MLM perplexity", ".1f", "magma_r")
        figures["perplexity"] = _png(fig)
    return figures


def _png(fig) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "plot"


def write_plots(groups: list[Group], folder: Path) -> list[Path]:
    """One PNG per (row, plot) into `folder` (each written atomically), and one of forgetting against compute
    per suite; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for group in groups:
        name = slug("__".join(p for p in (group.suite, group.method, group.config, group.model) if p))
        for kind, data in group_figures(group).items():
            path = folder / f"{name}__{kind}.png"
            write_bytes_atomic(path, data)
            written.append(path)
    for suite in sorted({g.suite for g in groups}):
        data = forgetting_against_compute([g for g in groups if g.suite == suite])
        if data is not None:
            path = folder / f"{slug(suite)}__forgetting_vs_compute.png"
            write_bytes_atomic(path, data)
            written.append(path)
    return written


def forgetting_against_compute(groups: list[Group]) -> bytes | None:
    """One point per row: mean approximate DAP compute against mean forgetting, end-task and perplexity; None
    when fewer than two rows have both."""
    from cpt_bench.report.table import compute_tflops, perplexity_forgetting

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    panels = [("forgetting (macro-F1)", lambda r: (r.get("metrics") or {}).get("forgetting_macro_f1")),
              ("perplexity forgetting", perplexity_forgetting)]
    points = []
    for group in groups:
        flops = mean(compute_tflops(r) for r in group.runs)
        label = " ".join(p for p in (group.method, group.config) if p)
        points.append((label, flops, [mean(value(r) for r in group.runs) for _, value in panels]))
    if sum(1 for _, flops, ys in points if flops is not None and ys[0] is not None) < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, _), index in zip(axes, panels, range(2)):
        for label, flops, ys in points:
            if flops is not None and ys[index] is not None:
                ax.scatter(flops, ys[index])
                ax.annotate(label, (flops, ys[index]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("approximate DAP compute (TFLOPs)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} against compute", fontsize=9)
    return _png(fig)
