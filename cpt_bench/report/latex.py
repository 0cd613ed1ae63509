"""The LaTeX writer of `cpt-bench report` (a booktabs tabular for a paper)."""

from __future__ import annotations

from cpt_bench.report.table import Table

_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    def cell(text: str, flag: bool) -> str:
        text = latex_escape(text).replace(" ± ", r" $\pm$ ").replace("▲", r"$\blacktriangle$") \
            .replace("▼", r"$\blacktriangledown$").replace("—", "--").replace("Δ", r"$\Delta$")
        return rf"\textbf{{{text}}}" if flag else text

    lines = [r"% needs \usepackage{booktabs} and \usepackage{amssymb}",
             r"\begin{tabular}{" + "l" * len(table.header) + "}", r"\toprule",
             " & ".join(cell(h, False) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(c, f) for c, f in zip(cells, flags)) + r" \\"
              for cells, flags in zip(table.rows, table.bold)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)
