"""The markdown writer of `cpt-bench report` (the default format)."""

from __future__ import annotations

import pandas as pd

from cpt_bench.report.table import COMPARISON_HEADER, LEGEND, Table, comparison_rows


def render_markdown(table: Table) -> str:
    rows = [[f"**{cell}**" if flag else cell for cell, flag in zip(cells, flags)]
            for cells, flags in zip(table.rows, table.bold)]
    text = _markdown(table.header, rows) + "\n\n" + LEGEND
    comparisons = comparison_rows(table.groups)
    if comparisons:
        text += "\n\nPaired comparisons with naive (sign-flip test over matched order and seed):\n\n" + \
            _markdown(COMPARISON_HEADER, comparisons)
    return text


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    # disable_numparse: keep "0.500" as written, cells are text
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, disable_numparse=True)
