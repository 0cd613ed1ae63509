"""The markdown writer of `cpt-bench report` (the default format)."""

from __future__ import annotations

import pandas as pd

from cpt_bench.report.table import LEGEND, Table


def render_markdown(table: Table) -> str:
    rows = [[f"**{cell}**" if flag else cell for cell, flag in zip(cells, flags)]
            for cells, flags in zip(table.rows, table.bold)]
    frame = pd.DataFrame(rows, columns=table.header)
    text = frame.to_markdown(index=False, disable_numparse=True)  # keep "0.500": cells are text
    return text + "\n\n" + LEGEND
