"""One `cpt-bench run`: the request checked and planned (`run_data`: its settings and data without a model;
`plan`: the same with its model), the run's identity (`identity`: configuration, hash, result file), the run
itself stage by stage (`runner`), the result file (`results`, validated by `result.schema.json`), experiment
trackers (`tracking`), the generated default suite and its base models (`synthetic`) and the side-by-side step
benchmark (`bench`)."""
