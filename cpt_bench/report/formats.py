"""`cpt-bench report`: result files in, one table out in the format asked for (and PNG plots on request)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cpt_bench.common.errors import BadInput
from cpt_bench.report.html_page import render_html
from cpt_bench.report.latex import render_latex
from cpt_bench.report.markdown import render_markdown
from cpt_bench.report.plots import group_figures, write_plots
from cpt_bench.report.table import Group, build_table, group_runs, load_results, records

FORMATS = ("markdown", "latex", "csv", "json", "html")


def render(groups: list[Group], fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not supported (use {', '.join(FORMATS)})")
    if fmt == "json":
        return json.dumps(records(groups), indent=2, default=_json_default)
    if fmt == "csv":
        return pd.DataFrame.from_records(records(groups)).to_csv(index=False)
    table = build_table(groups)
    if fmt == "latex":
        return render_latex(table)
    if fmt == "html":
        return render_html(table, [(group.title, group_figures(group)) for group in groups])
    return render_markdown(table)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def report(paths: list[str], fmt: str = "markdown", by_order: bool = False, plots_dir: str | None = None) -> str:
    """The table of the result files under `paths` in format `fmt`; with `plots_dir`, PNG plots written there."""
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not supported (use {', '.join(FORMATS)})")
    groups = group_runs(load_results(paths), by_order)
    if plots_dir is not None:
        write_plots(groups, Path(plots_dir))
    return render(groups, fmt)
