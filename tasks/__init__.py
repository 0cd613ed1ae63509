"""Suite definitions as YAML data (installed as cpt_bench.tasks)."""
