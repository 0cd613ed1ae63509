"""`cpt-bench report --format html`: one self-contained leaderboard page (sortable table, plots embedded as
data URIs, no external resources). Every string from result files or settings is HTML-escaped."""

from __future__ import annotations

import base64
import datetime
import html
import re

from cpt_bench.report.table import COMPARISON_HEADER, LEGEND, Table, comparison_rows

_NUMBER = re.compile(r"^\s*\**(-?\d+(?:\.\d+)?)")

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var ascending = th.getAttribute("data-order") !== "asc";
      table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("data-order"); });
      th.setAttribute("data-order", ascending ? "asc" : "desc");
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
        var nx = parseFloat(x), ny = parseFloat(y);
        var result = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return ascending ? result : -result;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th[data-order="asc"]::after { content: " \\25B2"; } th[data-order="desc"]::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
td.best { font-weight: bold; }
.plots img { max-width: 32%; margin: 0.3em; border: 1px solid #eee; }
p.legend { font-size: 0.85em; color: #555; max-width: 70em; }
"""


def _cell_value(text: str) -> str:
    """What a column sorts by: the leading number of a cell, else its text."""
    match = _NUMBER.match(text)
    return match.group(1) if match else text


TEXT_COLUMNS = {"method", "config", "suite", "order", "seeds", "model", "column", "95% CI"}


def _sortable_table(table_id: str, header: list[str], rows: list[list[str]], bold: list[list[bool]]) -> str:
    esc = html.escape
    head = "".join(f'<th class="{"text" if h in TEXT_COLUMNS else ""}">{esc(h)}</th>' for h in header)
    body = []
    for cells, flags in zip(rows, bold):
        tds = []
        for column, cell, flag in zip(header, cells, flags):
            classes = " ".join(c for c in ("text" if column in TEXT_COLUMNS else "", "best" if flag else "") if c)
            tds.append(f'<td class="{classes}" data-value="{esc(_cell_value(cell))}">{esc(cell)}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    return (f'<table class="sortable" id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            f"{chr(10).join(body)}\n</tbody>\n</table>")


def render_html(table: Table, figures: list[tuple[str, dict[str, bytes]]]) -> str:
    """The page: `table`, the paired comparisons with naive, then each row's plots (`figures`: the row's title
    and its PNGs by plot name)."""
    esc = html.escape
    leaderboard = _sortable_table("leaderboard", table.header, table.rows, table.bold)
    comparisons = comparison_rows(table.groups)
    comparison_section = "" if not comparisons else (
        "<h2>Paired comparisons with naive</h2>\n<p>Sign-flip permutation test over runs matched by order and seed."
        "</p>\n" + _sortable_table("comparisons", COMPARISON_HEADER, comparisons,
                                    [[False] * len(COMPARISON_HEADER)] * len(comparisons)))
    sections = []
    for title, pngs in figures:
        images = "".join(
            f'<img alt="{esc(f"{title}: {kind}")}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
            for kind, data in pngs.items())
        if images:
            sections.append(f"<h3>{esc(title)}</h3><div class=\"plots\">{images}</div>")
    groups = table.groups
    suites = ", ".join(sorted({g.suite for g in groups}))
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cpt-bench leaderboard: {esc(suites)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>cpt-bench leaderboard</h1>
<p>Suites: {esc(suites)}. {len(groups)} rows from {sum(len(g.runs) for g in groups)} result files;
generated {generated}. Click a column header to sort.</p>
{leaderboard}
<p class="legend">{esc(LEGEND)}</p>
{comparison_section}
<h2>Plots</h2>
{chr(10).join(sections)}
<script>{_SCRIPT}</script>
</body>
</html>
"""
