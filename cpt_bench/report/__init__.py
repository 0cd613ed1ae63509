"""`cpt-bench report`: `table` builds the table from result files; `markdown`, `latex`, `html` and `plots` each
render it (none imports another writer); `formats` picks the writer for `--format`."""
