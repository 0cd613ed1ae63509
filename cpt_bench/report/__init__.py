"""Reading result files across runs: `cpt-bench report` (`table` builds the table from result files, with the
statistics of `stats`; `markdown`, `latex`, `html_page` and `plots` each render it, none importing another
writer; `formats` picks the writer for `--format`), the regression gate `cpt-bench check` (`check`) and the
importance heatmaps of `cpt-bench importance` (`importance`)."""
